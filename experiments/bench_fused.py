"""Benchmark: chunked PDL from hidden states (both strategies) against the naive path.

For hidden [N, D] and unembed [D, V], in the same process, prints the compiled
temporary memory (XLA memory_analysis().temp_size_in_bytes) and the median time of
jitted value-and-grad (wrt hidden and unembed) of:

- naive:   pdl_loss(hidden @ unembed, labels, weights, mask)   ([N, V] logits and
           their [N, V] gradient)
- tokens:  pdl_loss_from_hidden(..., strategy="tokens"): rows in chunks of Cn
           (row_chunk_size; default from V, 512 rows, fewer above V = 262144), the
           gradients formed in the forward pass, 3 matmuls. Temporaries: a few
           [Cn, V] blocks plus a float32 [D, V] d unembed (saved for the backward
           pass, and the per-chunk [D, V] product added into it).
- vocab:   pdl_loss_from_hidden(..., strategy="vocab"): vocabulary chunks of
           chunk_size columns, logits recomputed in the backward pass, 4 matmuls.
           Temporaries: a few [N, chunk_size] blocks plus the float32 [D, V] d unembed
           accumulator.
- jax-cce: jax_cce.linear_cross_entropy (unweighted mean CE, no mask; a speed and
           memory peer only), if the package is installed
           (pip install --no-deps jax-cce==0.1.0).

    python experiments/bench_fused.py [--n 4096 --d 1024 --vocabs 32000,128000]
        [--row_chunk_sizes auto,256] [--chunk_size 4096] [--repeats 5]

Targets: tokens time <= 1.1x naive at V=32000 and V=128000; vocab temporaries
<= 1/16 of naive at V=128000 and <= 1/5 at V=32000.
"""

from __future__ import annotations

import argparse
import os


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.bench_loss import interleaved_medians  # noqa: E402
from pdl_jax.losses import chunked as chunked_loss
from pdl_jax.losses import pdl

try:
  import jax_cce  # noqa: E402
except ImportError as e:  # reported in the table
  jax_cce = None
  JAX_CCE_ERROR = f"jax-cce not importable ({e}); pip install --no-deps jax-cce==0.1.0"


def naive(hidden_NxD, unembed_DxV, labels_N, weights_V, mask_N):
  logits_NxV = jnp.matmul(hidden_NxD, unembed_DxV, preferred_element_type=jnp.float32)
  return pdl.pdl_loss(logits_NxV, labels_N, weights_V, mask=mask_N)


def make_chunked(strategy: str, chunk_size: int, row_chunk_size: int | None = None):
  """value fn of the chunked loss with the given strategy and chunk sizes."""
  def chunked(hidden_NxD, unembed_DxV, labels_N, weights_V, mask_N):
    return chunked_loss.pdl_loss_from_hidden(hidden_NxD, unembed_DxV, labels_N, weights_V,
                                  mask_N=mask_N, chunk_size=chunk_size,
                                  strategy=strategy, row_chunk_size=row_chunk_size)
  return chunked


def cce(hidden_NxD, unembed_VxD, labels_N):
  return jax_cce.linear_cross_entropy(hidden_NxD, unembed_VxD, labels_N)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=4096)
  p.add_argument("--d", type=int, default=1024)
  p.add_argument("--vocabs", default="32000,128000")
  p.add_argument("--chunk_size", type=int, default=chunked_loss.DEFAULT_CHUNK_SIZE,
                 help="vocabulary columns per chunk of the vocab strategy")
  p.add_argument("--row_chunk_sizes", default="auto",
                 help="comma-separated rows per chunk of the tokens strategy; auto: "
                      "default_row_chunk_size(V)")
  p.add_argument("--no_vocab", action="store_true", help="skip the vocab strategy")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); "
        f"N={args.n} D={args.d} float32, value_and_grad wrt hidden and unembed, "
        f"vocab chunk_size={args.chunk_size}, median of {args.repeats} interleaved runs")
  if jax_cce is None:
    print(JAX_CCE_ERROR)
  print(f"{'V':>7} | {'path':>12} | {'temp MiB':>9} | {'temp / naive':>12} | "
        f"{'time s':>7} | {'time / naive':>12}")
  for v in [int(x) for x in args.vocabs.split(",")]:
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(0, 1, (args.n, args.d)), jnp.float32)
    unembed = jnp.asarray(rng.normal(0, args.d ** -0.5, (args.d, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, args.n), jnp.int32)
    mask = jnp.asarray(rng.random(args.n) > 0.2, jnp.float32)
    weights = jnp.asarray(pdl.power_law_weights(
        np.floor(1e7 / np.arange(1, v + 1)).astype(np.int64), 1.0))
    fn_args = (hidden, unembed, labels, weights, mask)
    runs = {"naive": (naive, fn_args)}
    for rows in args.row_chunk_sizes.split(","):
      rows = chunked_loss.default_row_chunk_size(v) if rows == "auto" else int(rows)
      runs[f"tokens Cn={rows}"] = (make_chunked("tokens", args.chunk_size, rows), fn_args)
    if not args.no_vocab:
      runs["vocab"] = (make_chunked("vocab", args.chunk_size), fn_args)
    if jax_cce is not None:
      runs["jax-cce"] = (cce, (hidden, jnp.asarray(unembed.T), labels))
    fns, temps = {}, {}
    for name, (fn, fn_args) in runs.items():
      fns[name] = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
      temps[name] = fns[name].lower(*fn_args).compile().memory_analysis().temp_size_in_bytes
    times = dict(zip(runs, interleaved_medians(
        [(fns[name], fn_args) for name, (_, fn_args) in runs.items()], args.repeats)))
    for name in runs:
      print(f"{v:>7} | {name:>12} | {temps[name] / 2**20:9.1f} | "
            f"{temps[name] / temps['naive']:12.3f} | {times[name]:7.2f} | "
            f"{times[name] / times['naive']:12.3f}", flush=True)


if __name__ == "__main__":
  main()
