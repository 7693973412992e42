"""Benchmark: jitted value-and-grad of pdl_loss against optax cross-entropy.

Both run in the same process on the same inputs; the script prints the median time
of each, their ratio, and the compiled memory of each (XLA memory_analysis: the
temporaries plus the outputs, arguments excluded since they are the same arrays).

    python experiments/bench_loss.py [--repeats 7] [--shapes 8x512x32000,4x256x128000]

Targets: PDL / CE time <= 1.05 and memory <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from pdl_jax.losses import pdl


def optax_ce(logits_BxLxV, labels_BxL, mask_BxL):
  nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, labels_BxL)
  return jnp.sum(nll_BxL * mask_BxL) / jnp.sum(mask_BxL)


def pdl_objective(logits_BxLxV, labels_BxL, mask_BxL, weights_V):
  return pdl.pdl_loss(logits_BxLxV, labels_BxL, weights_V, mask=mask_BxL)


def compiled_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def interleaved_medians(fns_args, repeats: int) -> list[float]:
  """Median seconds of each (fn, args), timed call by call in turn.

  Alternating the calls makes background load on a shared machine hit all alike.
  """
  for fn, args in fns_args:
    jax.block_until_ready(fn(*args))  # warm-up
  times = [[] for _ in fns_args]
  for _ in range(repeats):
    for i, (fn, args) in enumerate(fns_args):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def bench_shape(shape, repeats: int) -> dict:
  b, l, v = shape
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 2, (b, l, v)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  mask = jnp.asarray(rng.random((b, l)) > 0.2, jnp.float32)
  counts = np.floor(1e7 / np.arange(1, v + 1)).astype(np.int64)
  weights = jnp.asarray(pdl.power_law_weights(counts, 1.0))

  ce_fn = jax.jit(jax.value_and_grad(optax_ce))
  pdl_fn = jax.jit(jax.value_and_grad(pdl_objective))
  ce_args, pdl_args = (logits, labels, mask), (logits, labels, mask, weights)
  ce_mem = compiled_bytes(ce_fn.lower(*ce_args).compile())
  pdl_mem = compiled_bytes(pdl_fn.lower(*pdl_args).compile())
  ce_s, pdl_s = interleaved_medians([(ce_fn, ce_args), (pdl_fn, pdl_args)], repeats)
  return dict(shape=shape, ce_s=ce_s, pdl_s=pdl_s,
              ce_mem=ce_mem, pdl_mem=pdl_mem)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--shapes", default="8x512x32000,4x256x128000",
                 help="comma-separated BxLxV logits shapes")
  args = p.parse_args()
  shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({os.cpu_count()} cpus); value_and_grad wrt float32 logits; "
        f"median of {args.repeats} interleaved runs")
  print(f"{'logits BxLxV':>18} | {'CE ms':>8} | {'PDL ms':>8} | {'time PDL/CE':>11} | "
        f"{'CE MiB':>8} | {'PDL MiB':>8} | {'mem PDL/CE':>10}")
  for shape in shapes:
    r = bench_shape(shape, args.repeats)
    print(f"{'x'.join(map(str, shape)):>18} | {r['ce_s'] * 1e3:8.1f} | "
          f"{r['pdl_s'] * 1e3:8.1f} | {r['pdl_s'] / r['ce_s']:11.3f} | "
          f"{r['ce_mem'] / 2**20:8.1f} | {r['pdl_mem'] / 2**20:8.1f} | "
          f"{r['pdl_mem'] / r['ce_mem']:10.3f}", flush=True)


if __name__ == "__main__":
  main()
