"""The GPU check (issue 40): train and decode tokens/s and MFU on one GPU, attention
`xla` against `cudnn`, for SmolLM2-135M and Llama-3.2-1B shapes in bfloat16 (random
weights: speed does not depend on them; nothing is downloaded).

    bash experiments/gpu_check.sh              # on a GPU machine (requirements-gpu.txt)
    python experiments/gpu_check.py --dry_run  # CPU: tiny shapes, the same code paths

Each row: the trainer's own jitted train step (pdl_jax.train.run.make_step_fn: PDL,
AdamW, the state donated) timed over --steps steps after a compile step (median), and
greedy decoding with the KV cache (pdl_jax.eval.decode.generate) of --new_tokens
tokens; MFU = model FLOPs (tpu_targets.model_flops: 6 N + attention per token) over
the median step time and the chip's dense bf16 peak (PEAK_TFLOPS by the device's kind,
or --peak_tflops; an unknown GPU needs the flag). Attentions are interleaved step by
step, so background load hits both alike. Where cuDNN refuses the call the model runs
`xla`: the row says `cudnn>xla` and the log line says why. --remat (default full, so
the 1B fits any 80 GB card at these shapes) is printed with the table: MFU counts the
model's FLOPs, not the recomputed ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.common import load_config
from pdl_jax import sharding
from pdl_jax.cli import plan
from pdl_jax.eval import decode as decode_lib
from pdl_jax.models import attention
from pdl_jax.models import config as model_config
from pdl_jax.models import decoder
from pdl_jax.models.hf import families as hf_families
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import run as run_lib
from pdl_jax.train import state as state_lib
from pdl_jax.train import tpu_targets

# (name, shape, seq, batch): the default experiment's base at seq 2048, and the 1B.
CASES = [("smollm2-135m", "smollm2-135m-instruct", 2048, 16),
         ("llama-3.2-1b", "llama-3.2-1b", 2048, 8)]
DRY_CASES = [("tiny-llama", "smollm2-135m-instruct", 64, 2)]
# Dense bf16 peak TFLOP/s by device kind (a substring of jax's device_kind), from the
# vendors' data sheets (without sparsity); the first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
               ("H20", 148.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10G", 70.0), ("A10", 125.0))


def peak_tflops(device_kind: str, given: float | None) -> float:
  """The dense bf16 peak for MFU: --peak_tflops, else PEAK_TFLOPS by the device's kind.

  Raises:
    SystemExit: an unknown device without --peak_tflops.
  """
  if given is not None:
    return given
  for kind, tflops in PEAK_TFLOPS:
    if kind in device_kind:
      return tflops
  raise SystemExit(f"no bf16 peak known for {device_kind!r} (known: "
                   f"{[k for k, _ in PEAK_TFLOPS]}); pass --peak_tflops.")


def make_model(shape: str, impl: str, dry: bool, remat: str) -> decoder.Decoder:
  """The named shape's decoder in bfloat16 compute (--dry_run: 2 narrow layers)."""
  hf = dict(plan.NAMED_CONFIGS[shape])
  if dry:
    hf.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
  cfg = hf_families.config_from_hf(hf, dtype="bfloat16", param_dtype="float32")
  return decoder.Decoder(dataclasses.replace(cfg, attention=impl, remat=remat,
                                             scan_layers=True))


def train_steps(impl: str, shape: str, seq: int, batch: int, dry: bool, remat: str):
  """(step function, state, batch, weights) of one case, compiled by a first call."""
  config = load_config("configs/dialogue.py:pretrained=none")
  config.seq_len, config.batch_size = seq, batch
  config.mesh.data = 1
  model = make_model(shape, impl, dry, remat)
  mesh = run_lib.make_mesh(config, devices=jax.devices()[:1])
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create_state(model, tx, mesh, 0, seq)
    step = run_lib.make_step_fn(config, model, tx, mesh, shardings, eos_id=1)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 2, model.cfg.vocab_size)
    data = {"inputs": tokens, "labels": jnp.roll(tokens, -1, axis=1),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}
    data = jax.device_put(data, sharding.named_sharding(mesh, "batch", "length"))
    weights = jnp.ones((model.cfg.vocab_size,), jnp.float32)
  return model, mesh, step, state, data, weights


def time_cases(args, cases) -> list[dict]:
  """Median step times of every (case, attention), interleaved."""
  rows = []
  for name, shape, seq, batch in cases:
    runs = {}
    for impl in args.attentions.split(","):
      model, mesh, step, state, data, weights = train_steps(impl, shape, seq, batch,
                                                            args.dry_run, args.remat)
      attention.clear_log()  # a refusal is logged once per message
      with jax.set_mesh(mesh):
        state, _ = step(state, data, weights)  # compile
        jax.block_until_ready(state)
      label = f"{impl}>xla" if attention.fallbacks() and impl != "xla" else impl
      runs[label] = [model, mesh, step, state, data, weights, []]
    for _ in range(args.steps):
      for run in runs.values():
        model, mesh, step, state, data, weights, times = run
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
          run[3], metrics = step(state, data, weights)
          jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    for label, (model, mesh, step, state, data, weights, times) in runs.items():
      median = statistics.median(times)
      flops = tpu_targets.model_flops(model, batch * seq, seq)
      decode_s = time_decode(model, state.params, batch, seq, args)
      rows.append(dict(case=name, attention=label, seq=seq, batch=batch,
                       step_s=median, tokens_s=batch * seq / median,
                       mfu=flops / median / (args.peak * 1e12),
                       decode_tokens_s=batch * args.new_tokens / decode_s))
  return rows


def time_decode(model, params, batch: int, seq: int, args) -> float:
  """Median seconds of a greedy decode of --new_tokens after a prompt of seq / 2."""
  prompt = jax.random.randint(jax.random.key(2), (batch, seq // 2), 2, model.cfg.vocab_size)
  mask = jnp.ones_like(prompt)
  run = lambda: decode_lib.generate(model, params, prompt, mask, jax.random.key(0),
                                    max_new_tokens=args.new_tokens, method="greedy")
  jax.block_until_ready(run())  # compile
  times = []
  for _ in range(max(1, args.steps // 3)):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def table(rows: list[dict]) -> str:
  head = (f"{'case':<14} {'attention':<9} {'seq x batch':>11} {'step ms':>9} "
          f"{'train tok/s':>12} {'MFU':>6} {'decode tok/s':>13}")
  lines = [head]
  for r in rows:
    lines.append(f"{r['case']:<14} {r['attention']:<9} {r['seq']:>5} x {r['batch']:<3} "
                 f"{r['step_s'] * 1e3:9.1f} {r['tokens_s']:12,.0f} {r['mfu']:6.1%} "
                 f"{r['decode_tokens_s']:13,.0f}")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes, 2 steps")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--attentions", default="xla,cudnn")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="dense bf16 peak of the GPU; default: PEAK_TFLOPS by its kind")
  p.add_argument("--remat", default="full", choices=model_config.REMATS,
                 help="rematerialisation of the layers (full fits the 1B at 2048 x 8)")
  args = p.parse_args()
  kind = jax.devices()[0].device_kind
  if args.dry_run:
    args.steps, args.new_tokens = 2, 4
    args.peak_tflops = args.peak_tflops or 1.0  # a CPU: the MFU column is not one
  args.peak = peak_tflops(kind, args.peak_tflops)
  print(f"{kind} ({jax.default_backend()}); jax {jax.__version__}; remat {args.remat}; "
        f"peak {args.peak:g} TFLOP/s bf16", flush=True)
  rows = time_cases(args, DRY_CASES if args.dry_run else CASES)
  print(table(rows), flush=True)
  if not args.dry_run and not np.isfinite([r["mfu"] for r in rows]).all():
    raise SystemExit("a non-finite measurement")


if __name__ == "__main__":
  main()
