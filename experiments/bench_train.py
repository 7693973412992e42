"""Benchmark: tokens/s of the jitted train step with CE and with PDL, same process.

Builds the model, optimizer and sharded state of a config (default
configs/dialogue.py: the pretrained default base; `--arg smoke` for the own model) and times the compiled train step on random
token batches of the config's shape, alternating CE and PDL step by step so that
background load hits both alike. Prints the median tokens/s of each and PDL/CE.

    python experiments/bench_train.py [--config configs/dialogue.py] [--steps 30]
    python experiments/bench_train.py --scan_layers --remat none,full,dots
    python experiments/bench_train.py --pretrained=smollm2-135m-instruct \
        --batch_size=8 --seq_len=128 --steps 10

It also prints the achieved FLOP/s of each: the matmul FLOPs of a step (forward and
backward: 6 x the tokens x the projections' and unembedding's weights, the
unembedding only on the positions the loss window keeps, plus the attention's
12 x layers x L x heads x head_dim per token) over its median time, against a
2048 x 2048 float32 GEMM timed in the same process (interleaved with the steps).

With several --remat values, every (remat, loss) pair is timed in the same
interleaved loop, and each remat's cost is printed as its tokens/s against the
first value's.

Target: PDL / CE >= 0.97 (<= 1.03 in step time), also with scan and remat on.
"""

from __future__ import annotations

import argparse
import statistics
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pdl_jax.losses import pdl
from pdl_jax import sharding
from configs.common import load_config  # noqa: E402
from pdl_jax.models import factory
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import run as run_lib


def train_flops(cfg, batch: int, seq_len: int, window: int | None) -> float:
  """Matmul FLOPs of one train step (forward + backward = 3 x forward) of the decoder:
  projections on every position, the unembedding on the loss window's positions
  (every position without one), attention scores and values over the full L x L
  (causal halves are still computed). Rematerialisation's recomputation is not
  counted: the figure is useful work."""
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  mlp = (3 if cfg.mlp == "gated" else 2) * d * f
  per_layer = d * (h * k) * 2 + d * (g * k) * 2 + mlp  # q, out, k, v, MLP
  tokens = batch * seq_len
  unembed_tokens = batch * (window or seq_len)
  forward = (2 * tokens * per_layer * cfg.num_layers
             + 2 * unembed_tokens * d * cfg.vocab_size
             + 2 * 2 * batch * seq_len * seq_len * h * k * cfg.num_layers)
  return 3.0 * forward


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/dialogue.py")
  p.add_argument("--arg", default=None, help="config argument, e.g. 'smoke'")
  p.add_argument("--steps", type=int, default=30, help="timed steps per loss")
  p.add_argument("--vocab_size", type=int, default=None)
  p.add_argument("--scan_layers", action="store_true", help="model.scan_layers=True")
  p.add_argument("--remat", default="none",
                 help="model.remat values to compare, e.g. none,full (first: baseline)")
  p.add_argument("--pretrained", default=None,
                 help="a named model or HF folder (default: the config's model)")
  p.add_argument("--batch_size", type=int, default=None, help="default: the config's")
  p.add_argument("--seq_len", type=int, default=None, help="default: the config's")
  args = p.parse_args()
  arg = ",".join(a for a in (args.arg, args.pretrained and f"pretrained={args.pretrained}")
                 if a)
  config = load_config(f"{args.config}:{arg}" if arg else args.config)
  if args.batch_size:
    config.batch_size = args.batch_size
  if args.seq_len:
    config.seq_len = args.seq_len
    config.max_target_len = min(config.max_target_len, args.seq_len // 2)
  config.model.scan_layers = args.scan_layers
  if config.model.pretrained is not None:  # a name: fetched and converted once
    from pdl_jax.models.hf import locate
    config.model.pretrained = locate.local_dir(config.model.pretrained)
    vocab = factory.decoder_config(config.model).vocab_size
  else:
    vocab = args.vocab_size or config.tokenizer.vocab_size
  mesh = run_lib.make_mesh(config)
  remats = args.remat.split(",")
  models_by_remat = {}
  for remat in remats:
    config.model.remat = remat
    models_by_remat[remat] = factory.make_model(config.model, vocab)
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  rep = sharding.replicated(mesh)
  bs = sharding.named_sharding(mesh, "batch", "length")
  b, l = config.batch_size, config.seq_len
  counts = np.floor(1e6 / np.arange(1, vocab + 1)).astype(np.int64)
  weights = jax.device_put(jnp.asarray(pdl.power_law_weights(counts, 0.5)), rep)

  def batch(seed):
    # The prefix-LM's loss mask: one contiguous target span per row (target + EOS, at
    # most max_target_len + 1 tokens), as the loss window expects.
    r = np.random.default_rng(seed)
    span = r.integers(1, config.max_target_len + 2, b)
    start = r.integers(1, l - span + 1)
    pos = np.arange(l)[None, :]
    mask = (pos >= start[:, None]) & (pos < (start + span)[:, None])
    return {"inputs": jax.device_put(r.integers(0, vocab, (b, l)).astype(np.int32), bs),
            "labels": jax.device_put(r.integers(0, vocab, (b, l)).astype(np.int32), bs),
            "loss_mask": jax.device_put(mask.astype(np.float32), bs)}

  runs = {}
  for remat in remats:
    for name in ("ce", "pdl"):
      m_ = models_by_remat[remat]
      state, shardings = state_lib.create_state(m_, tx, mesh, 0, l)
      config.loss.name = name
      step = jax.jit(lambda s, bt, w, fn=run_lib.make_loss_fn(config, m_): step_lib.train_step(
          s, bt, w, loss_fn=fn, tx=tx),
          in_shardings=(shardings, bs, rep), out_shardings=(shardings, rep),
          donate_argnums=(0,))
      with jax.set_mesh(mesh):
        state, m = step(state, batch(0), weights)  # compile + warm-up
      jax.block_until_ready(m)
      runs[remat, name] = [step, state, []]
  batches = [batch(i) for i in range(4)]
  a_NxN = jnp.ones((2048, 2048), jnp.float32)
  gemm = jax.jit(lambda a: a @ a)
  gemm(a_NxN).block_until_ready()
  gemm_times = []
  with jax.set_mesh(mesh):
    for i in range(args.steps):
      t0 = time.perf_counter()
      gemm(a_NxN).block_until_ready()
      gemm_times.append(time.perf_counter() - t0)
      for key in runs:
        step, state, times = runs[key]
        t0 = time.perf_counter()
        state, m = step(state, batches[i % 4], weights)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        runs[key][1] = state
  tps = {key: b * l / statistics.median(r[2]) for key, r in runs.items()}
  print(f"jax {jax.__version__}, {sharding.mesh_summary(mesh)}; config {args.config} "
        f"model {args.pretrained or config.model.pretrained or config.model.preset} "
        f"({factory.compute_dtype(config.model)}, "
        f"scan_layers={args.scan_layers}), batch {b} x {l} tokens, vocab {vocab}; median of "
        f"{args.steps} interleaved steps")
  for remat in remats:
    print(f"remat={remat}: CE {tps[remat, 'ce']:8.0f} tokens/s  PDL {tps[remat, 'pdl']:8.0f} "
          f"tokens/s  PDL/CE step time = {tps[remat, 'ce'] / tps[remat, 'pdl']:.3f} "
          "(target <= 1.03)")
  gemm_flops = 2 * 2048 ** 3 / statistics.median(gemm_times)
  step_flops = train_flops(models_by_remat[remats[0]].cfg, b, l,
                           run_lib.loss_window(config))
  for remat in remats:
    for name in ("ce", "pdl"):
      achieved = step_flops * tps[remat, name] / (b * l)
      print(f"remat={remat} {name}: {achieved / 1e9:6.1f} GFLOP/s achieved "
            f"({step_flops / 1e9:.1f} GFLOP a step) = {achieved / gemm_flops:.0%} of the "
            f"2048^2 GEMM's {gemm_flops / 1e9:.1f} GFLOP/s in this process")
  for remat in remats[1:]:
    for name in ("ce", "pdl"):
      print(f"remat={remat} vs {remats[0]}, {name}: step time x "
            f"{tps[remats[0], name] / tps[remat, name]:.2f}")


if __name__ == "__main__":
  main()
