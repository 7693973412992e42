"""Benchmark: the PDL train step of LoRA (and QLoRA) against full finetuning on the
real default base, same process, steps interleaved so background load hits all
alike. Prints, per variant: trainable parameters, train-state bytes (trainable
params + AdamW moments; the frozen base separately), the median step time and its
ratio to full finetuning.

    python experiments/bench_lora.py [--pretrained=smollm2-135m-instruct] \
        [--batch_size=8 --seq_len=128 --rank=16 --steps=10]

Variants: full finetuning (float32), LoRA rank r on every projection with a
float32 base, and with int8 and nf4 bases (dequantised in the matmul: on this CPU
that costs time, its gain is memory; experiments/bench_memory.py --lora_suite has
the 8B memory table).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.common import load_config
from pdl_jax.models import lora
from pdl_jax.train import optimizer as opt_lib
from pdl_jax import sharding
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import run as run_lib
from pdl_jax.losses import pdl
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
from pdl_jax.models import factory
from pdl_jax.models import quant
from pdl_jax.models.hf import locate
from pdl_jax.models.hf import weights as hf_weights


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pretrained", default="smollm2-135m-instruct")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  args = p.parse_args()
  config = load_config(f"configs/dialogue.py:pretrained={args.pretrained}")
  config.model.pretrained = locate.local_dir(config.model.pretrained)
  config.batch_size, config.seq_len = args.batch_size, args.seq_len
  config.max_target_len = min(config.max_target_len, args.seq_len // 2)
  config.loss.name = "pdl"
  mesh = run_lib.make_mesh(config)
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  full_cfg = factory.decoder_config(config.model)
  rep = sharding.replicated(mesh)
  bs = sharding.named_sharding(mesh, "batch", "length")
  b, l, vocab = config.batch_size, config.seq_len, full_cfg.vocab_size
  counts = np.floor(1e6 / np.arange(1, vocab + 1)).astype(np.int64)
  weights = jax.device_put(jnp.asarray(pdl.power_law_weights(counts, 0.5)), rep)
  rng = np.random.default_rng(0)
  span = rng.integers(1, config.max_target_len + 2, b)
  start = rng.integers(1, l - span + 1)
  pos = np.arange(l)[None, :]
  batch = {"inputs": jax.device_put(rng.integers(0, vocab, (b, l)).astype(np.int32), bs),
           "labels": jax.device_put(rng.integers(0, vocab, (b, l)).astype(np.int32), bs),
           "loss_mask": jax.device_put(((pos >= start[:, None]) & (
               pos < (start + span)[:, None])).astype(np.float32), bs)}

  variants = {"full": full_cfg}
  for kind in ("none", "int8", "nf4"):
    variants[f"lora r={args.rank} base {'float32' if kind == 'none' else kind}"] = (
        dataclasses.replace(full_cfg, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                            lora_targets=tuple(model_config.LORA_TARGETS), base_quant=kind))
  runs = {}
  for name, cfg in variants.items():
    model = decoder.Decoder(cfg)
    _, shardings = state_lib.abstract_state(model, tx, mesh, l)
    if lora.enabled(cfg):  # the adapters trained, the base frozen in the state
      state, _ = state_lib.create_state(model, tx, mesh, 0, l)
      state = state.replace(frozen=state_lib.load_base(config.model.pretrained, model,
                                                       shardings.frozen))
    else:
      state = state_lib.state_from_params(hf_weights.load_params(
          config.model.pretrained, cfg, shardings.params), model, tx, shardings)
    base = state.frozen or None
    fn = run_lib.make_loss_fn(config, model)
    extra = ()
    step = jax.jit(lambda s, bt, w, fn=fn: step_lib.train_step(s, bt, w, loss_fn=fn, tx=tx),
                   in_shardings=(shardings, bs, rep), out_shardings=(shardings, rep),
                   donate_argnums=(0,))
    with jax.set_mesh(mesh):
      state, m = step(state, batch, weights)  # compile + warm-up
    jax.block_until_ready(m)
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    runs[name] = dict(step=step, state=state, extra=extra, times=[], trainable=trainable,
                      state_bytes=nbytes((state.params, state.opt_state)),
                      base_bytes=quant.stored_bytes(base) if base is not None else 0)
  with jax.set_mesh(mesh):
    for _ in range(args.steps):
      for r in runs.values():
        t0 = time.perf_counter()
        r["state"], m = r["step"](r["state"], batch, weights, *r["extra"])
        jax.block_until_ready(m)
        r["times"].append(time.perf_counter() - t0)
  full_t = statistics.median(runs["full"]["times"])
  print(f"jax {jax.__version__}; {args.pretrained} ({full_cfg.num_layers} layers, d "
        f"{full_cfg.d_model}), batch {b} x {l}, PDL, float32 compute; median of "
        f"{args.steps} interleaved steps")
  print(f"{'variant':<26} {'trainable':>12} {'state (params+Adam)':>20} {'frozen base':>12} "
        f"{'step':>8} {'vs full':>8}")
  for name, r in runs.items():
    t = statistics.median(r["times"])
    print(f"{name:<26} {r['trainable'] / 1e6:10.2f} M {r['state_bytes'] / 2**20:17.1f} MiB "
          f"{r['base_bytes'] / 2**20:9.1f} MiB {t * 1e3:6.0f} ms {t / full_t:7.2f}x")


if __name__ == "__main__":
  main()
