"""Benchmark: per-device memory and compile time of the real train step at real model
shapes, compiled ahead of time on forced CPU devices (nothing is allocated).

For a named shape (a built-in table of Hugging Face config values, or any
config.json), it builds the decoder, AdamW and the train state's shardings on a
mesh of forced CPU devices, lowers and compiles the full jitted train step
(forward, PDL backward, AdamW update; the step `pdl_jax.train` runs) for abstract
inputs, and prints per device, from XLA's own memory analysis of the compiled
step: parameter + optimizer-state bytes (the shards of the state arguments), the
ideal (whole state / devices), the state's ratio to the ideal, temporaries, total
(arguments + outputs - donated aliases + temporaries) and the compile time.

    python experiments/bench_memory.py                      # the suite below
    python experiments/bench_memory.py --devices=64 --mesh=fsdp:64 --shape=llama-3-8b \\
        --seq=2048 --batch=64 --remat=full --scan
    python experiments/bench_memory.py --devices=8 --mesh=fsdp:8 \\
        --shape=/path/to/config.json --seq=1024 --batch=8

    python experiments/bench_memory.py --devices=1 --lora_suite   # LoRA on one device

    # The TPU compiler (libtpu, requirements-tpu.txt) for a Cloud TPU slice instead of
    # forced CPU devices; splash or xla attention; adds the step-time estimate and MFU:
    python experiments/bench_memory.py --target=v5p-64 --mesh=fsdp:-1 --shape=llama-3-8b \
        --seq=2048 --batch=64 --attention=splash
    python experiments/bench_memory.py --tpu_suite   # docs/tpu.md's tables

The suite (no --shape): Llama-3-8B (seq 2048, batch 64, fsdp=64, remat full, scan,
chunked PDL, bfloat16 compute), Llama-3.2-1B (seq 2048, batch 32, fsdp=8), the
state ratio of Qwen2.5-0.5B at fsdp=8 and fsdp=64, and the compile time of the
Llama-3.2-1B shape at 4 and 32 layers, scanned and unrolled. --lora_suite: LoRA
on one device (Llama-3-8B rank 16, batch 8 x 2048, bfloat16 / int8 / nf4 base,
against full finetuning; with --no_licm, see NO_LICM).

Forced CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count is set from
--devices before jax is imported. CPU compile times are this machine's; the memory
figures are the partitioned program's buffer assignment, which on TPU/GPU differs
in detail (fusion, layouts) but not in what is sharded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _forced_devices(argv: list[str]) -> int:
  """--devices from argv (before argparse, since jax must not be imported yet)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 64


# --no_licm: XLA:CPU has no bfloat16 matmul, so it upcasts a bfloat16 weight to
# float32 before each dot, and its while-loop invariant code motion then hoists that
# convert out of the scanned layer loop: one float32 copy of the whole stacked
# weights (twice a bfloat16 base: 30 GiB for Llama-3-8B) that no TPU or GPU program
# has (their bfloat16 dots are native). Disabling the pass removes that CPU-only copy
# (a 16-layer 2048^2 toy: 0.278 -> 0.021 GiB of temporaries).
NO_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" {DEVICES_FLAG}={_forced_devices(sys.argv[1:])}"
                             + (f" {NO_LICM}" if {"--no_licm", "--lora_suite"} & set(
                                 sys.argv[1:]) else ""))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.common import load_config  # noqa: E402
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import weights as hf_weights
from pdl_jax import sharding
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
from pdl_jax.losses import batch_loss
from pdl_jax.train import tpu_targets
from pdl_jax.cli import plan

GiB = 1024 ** 3

# Hugging Face config.json values of the named shapes (only what the decoder reads):
# the bases a plan may name (SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B, Llama-3-8B).
SHAPES: dict[str, dict] = plan.NAMED_CONFIGS


@dataclasses.dataclass(frozen=True)
class Case:
  """One compiled train step."""

  shape: str  # a SHAPES name or a config.json path
  mesh: dict[str, int]
  seq: int
  batch: int
  scan: bool = True
  remat: str = "full"
  layers: int | None = None  # override the shape's depth (compile-time comparison)
  loss: str = "pdl"
  chunked: bool = True
  chunk_size: int = 8192  # vocabulary columns per chunk ("vocab" strategy)
  strategy: str = "vocab"  # chunked loss: "vocab" (smallest temporaries) or "tokens"
  dtype: str = "bfloat16"
  grad_accum: int = 1
  # LoRA (pdl_jax/models/lora.py): adapters of this rank on every projection, the frozen
  # base in base_dtype or quantised (base_quant); 0: full finetuning.
  lora_rank: int = 0
  base_dtype: str = "float32"
  base_quant: str = "none"
  attention: str = "xla"  # model.attention (pdl_jax/models/attention.py)
  target: str | None = None  # a TPU slice (pdl_jax/train/tpu_targets.py); None: CPU devices


def model_of(case: Case) -> decoder.Decoder:
  """The decoder of a case: a named shape's config values, or a Hugging Face model
  directory's (or config.json's) read by hf_families.read_config; then the case's
  depth, scan and remat."""
  if case.shape in SHAPES:
    cfg = hf_families.config_from_hf(SHAPES[case.shape], dtype=case.dtype,
                                    param_dtype="float32")
  else:
    model_dir = (os.path.dirname(case.shape) or "." if case.shape.endswith(".json")
                 else case.shape)
    try:
      cfg = hf_families.read_config(model_dir, dtype=case.dtype, param_dtype="float32")
    except FileNotFoundError as e:
      raise SystemExit(f"--shape={case.shape!r}: expected one of {sorted(SHAPES)} or a "
                       f"config.json path (or a directory holding one): {e}") from None
  cfg = dataclasses.replace(cfg, scan_layers=case.scan, remat=case.remat,
                            num_layers=case.layers or cfg.num_layers,
                            attention=case.attention)
  if case.lora_rank:
    cfg = dataclasses.replace(cfg, lora_rank=case.lora_rank, lora_alpha=2.0 * case.lora_rank,
                              lora_targets=tuple(model_config.LORA_TARGETS),
                              base_quant=case.base_quant, param_dtype=case.base_dtype)
  return decoder.Decoder(cfg)


def compile_step(case: Case):
  """(compiled step, state shardings, abstract state, lower+compile seconds)."""
  config = load_config("configs/dialogue.py")  # AdamW, warmup + cosine, clipping
  model = model_of(case)
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  devices = (tpu_targets.devices(tpu_targets.parse_slice(case.target)) if case.target
             else jax.devices())[:math.prod(case.mesh.values())]
  mesh = sharding.make_mesh(case.mesh, devices=devices)
  shards = sharding.batch_shards(mesh)
  if case.batch % (shards * case.grad_accum):
    raise SystemExit(f"{describe(case)}: batch {case.batch} does not split into "
                     f"{case.grad_accum} micro-batches over {shards} data x fsdp shards "
                     "(training refuses it too).")
  # A LoRA model's frozen base is in the state's `frozen` part.
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, seq_len=8)
  batch_sharding = sharding.named_sharding(mesh, "batch", "length")
  rep = sharding.replicated(mesh)
  v = model.cfg.vocab_size
  batch = {"inputs": jax.ShapeDtypeStruct((case.batch, case.seq), jnp.int32,
                                          sharding=batch_sharding),
           "labels": jax.ShapeDtypeStruct((case.batch, case.seq), jnp.int32,
                                          sharding=batch_sharding),
           "loss_mask": jax.ShapeDtypeStruct((case.batch, case.seq), jnp.float32,
                                             sharding=batch_sharding)}
  weights = jax.ShapeDtypeStruct((v,), jnp.float32, sharding=rep)
  # Loss on every position (a pretraining-like worst case: no loss window).
  loss_fn = functools.partial(batch_loss.compute_loss, model=model, loss_name=case.loss,
                              loss_params={}, chunked=case.chunked,
                              chunk_size=case.chunk_size, chunk_strategy=case.strategy,
                              eos_id=1, eos_weight=None)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                                   grad_accum_steps=case.grad_accum,
                                   reduction="weights" if case.loss == "pdl" else "tokens"),
                 in_shardings=(shardings, batch_sharding, rep),
                 out_shardings=(shardings, rep), donate_argnums=(0,))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # activation constraints resolve against it (as in training)
    compiled = step.lower(abstract, batch, weights).compile()
  # The state's bytes include a LoRA run's frozen base.
  return compiled, shardings, abstract, time.perf_counter() - t0


def state_bytes(abstract, shardings) -> tuple[int, int]:
  """(bytes of one device's shards of the state, bytes of the whole state)."""
  per_device = total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    item = jnp.dtype(x.dtype).itemsize
    total += math.prod(x.shape) * item
    per_device += math.prod(s.shard_shape(x.shape)) * item
  return per_device, total


def measure(case: Case) -> dict:
  """Memory and compile time of one case, per device."""
  compiled, shardings, abstract, seconds = compile_step(case)
  mem = compiled.memory_analysis()
  devices = math.prod(case.mesh.values())
  per_device, total = state_bytes(abstract, shardings)
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  # Parameters of the model (a quantised base counted as the weights it stands for).
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(
      hf_weights.abstract_params(dataclasses.replace(model_of(case).cfg, base_quant="none"))))
  out = dict(case=case, params=params, devices=devices, state=per_device,
             ideal=total / devices, ratio=per_device / (total / devices), args=args,
             temp=temp, total=args + out - alias + temp, compile_s=seconds)
  if case.target:
    out.update(tpu_speed(case, compiled))
  return out


def tpu_speed(case: Case, compiled) -> dict:
  """The TPU cost model's step time (tpu_targets.step_seconds' method: unrolled 1-
  and 2-layer compiles of one micro-batch, depth-linear, times the micro-batches,
  when the step loops) and the model-FLOPs utilisation it implies."""
  slice_ = tpu_targets.parse_slice(case.target)
  step = tpu_targets.analyse("train step", compiled, 0.0).optimal_seconds
  model = model_of(case)
  n = model.cfg.num_layers
  if case.scan or case.grad_accum > 1:
    at = lambda d: tpu_targets.analyse("", compile_step(dataclasses.replace(
        case, scan=False, layers=d, grad_accum=1, batch=case.batch // case.grad_accum))[0],
        0.0).optimal_seconds
    t1, t2 = at(1), at(2)
    step = case.grad_accum * (t1 + (n - 1) * (t2 - t1))
  tokens = case.batch * case.seq
  flops = tpu_targets.model_flops(model, tokens, case.seq)
  peak = slice_.chip.bf16_tflops * 1e12 / slice_.chip.devices_per_chip
  devices = math.prod(case.mesh.values())
  return dict(step_s=step, tokens_s=tokens / step, mfu=flops / devices / step / peak,
              hbm=slice_.device_hbm_bytes)


def describe(case: Case) -> str:
  mesh = ",".join(f"{k}:{v}" for k, v in case.mesh.items())
  layers = f" layers={case.layers}" if case.layers else ""
  target = f"{case.target} {case.attention} " if case.target else ""
  return (f"{target}{case.shape}{layers} mesh={mesh} seq={case.seq} batch={case.batch} "
          f"{'scan' if case.scan else 'unrolled'} remat={case.remat} "
          f"{f'chunked({case.strategy}) ' if case.chunked else ''}{case.loss} {case.dtype}"
          f"{f' accum={case.grad_accum}' if case.grad_accum > 1 else ''}"
          + (f" LoRA r={case.lora_rank} base={base_storage(case)}" if case.lora_rank else ""))


def base_storage(case: Case) -> str:
  """How a LoRA case stores its frozen base."""
  return case.base_dtype if case.base_quant == "none" else case.base_quant


HEADER = (f"{'case':<120} {'params':>7} {'state/dev':>9} {'ideal':>7} {'ratio':>6} "
          f"{'temp':>7} {'total':>7} {'compile':>8}")
TPU_HEADER = HEADER + f" {'HBM/dev':>8} {'step':>9} {'tokens/s':>11} {'MFU':>5}"


def row(r: dict) -> str:
  out = (f"{describe(r['case']):<120} {r['params'] / 1e9:6.2f}B {r['state'] / GiB:7.2f}G "
         f"{r['ideal'] / GiB:6.2f}G {r['ratio']:6.3f} {r['temp'] / GiB:6.2f}G "
         f"{r['total'] / GiB:6.2f}G {r['compile_s']:7.1f}s")
  if "step_s" in r:
    out += (f" {r['hbm'] / GiB:7.1f}G {r['step_s'] * 1e3:7.1f}ms {r['tokens_s']:11,.0f} "
            f"{r['mfu']:5.0%}")
  return out


def suite() -> list[tuple[str, Case, float | None]]:
  """The issue's targets: (what, case, per-device total limit in GiB or None)."""
  return [
      ("8B fits a 16 GiB v5e chip", Case("llama-3-8b", {"fsdp": 64}, 2048, 64), 12.0),
      ("1B at fsdp=8", Case("llama-3.2-1b", {"fsdp": 8}, 2048, 32), 10.0),
      ("state ratio fsdp=8", Case("qwen2.5-0.5b", {"fsdp": 8}, 512, 8), None),
      ("state ratio fsdp=64", Case("qwen2.5-0.5b", {"fsdp": 64}, 512, 64), None),
      ("8B, token-chunked loss", Case("llama-3-8b", {"fsdp": 64}, 2048, 64,
                                      strategy="tokens"), 12.0),
      ("8B, batch 256 as 4 micro-batches", Case("llama-3-8b", {"fsdp": 64}, 2048, 256,
                                                grad_accum=4), 12.0),
  ] + [(f"compile time {n} layers {'scanned' if scan else 'unrolled'}",
        Case("llama-3.2-1b", {"fsdp": 8}, 512, 8, scan=scan, layers=n), None)
       for scan in (True, False) for n in (4, 32)]


def lora_suite() -> list[tuple[str, Case, float | None]]:
  """LoRA on one device: Llama-3-8B, rank 16 on every projection, batch 8 x 2048 a
  step, remat full, scanned; the base's other params (embeddings, norms) bfloat16.
  The batch in one pass (its [8, 32, 2048, 2048] attention scores are most of the
  temporaries) and as 8 exact micro-batches of one row (grad_accum 8: the same
  step); targets bfloat16 base <= 24 GiB, int8 / nf4 <= 16 GiB; full finetuning of
  the same shape for the contrast."""
  one = {"fsdp": 1}
  out = []
  for accum in (1, 8):
    lora = functools.partial(Case, "llama-3-8b", one, 2048, 8, lora_rank=16,
                             base_dtype="bfloat16", grad_accum=accum)
    how = "one pass" if accum == 1 else "8 micro-batches"
    out += [(f"8B LoRA r16, bf16 base, {how}", lora(), 24.0 if accum > 1 else None),
            (f"8B QLoRA r16, int8 base, {how}", lora(base_quant="int8"),
             16.0 if accum > 1 else None),
            (f"8B QLoRA r16, nf4 base, {how}", lora(base_quant="nf4"),
             16.0 if accum > 1 else None)]
  return out + [("8B full finetune, one device",
                 Case("llama-3-8b", one, 2048, 8, grad_accum=8), None)]


def tpu_suite() -> list[tuple[str, Case, float | None]]:
  """docs/tpu.md's table (issue 40): each case with xla and splash attention, on the
  TPU compiler; the limit is the slice's HBM per device."""
  cases = [
      ("SmolLM2-135M, the default experiment's shape", Case(
          "smollm2-135m-instruct", {"data": 4}, 256, 8, scan=False, remat="none",
          target="v5e-4")),
      ("SmolLM2-135M at seq 2048", Case("smollm2-135m-instruct", {"data": 4}, 2048, 8,
                                        scan=True, target="v5e-4")),
      ("Llama-3.2-1B full, v5e-8", Case("llama-3.2-1b", {"fsdp": 8}, 2048, 32,
                                        target="v5e-8")),
      ("Llama-3-8B LoRA r16 bf16 base, v5e-4", Case(
          "llama-3-8b", {"fsdp": 4}, 2048, 8, lora_rank=16, base_dtype="bfloat16",
          target="v5e-4")),
      ("Llama-3-8B QLoRA r16 nf4 base, v5e-4", Case(
          "llama-3-8b", {"fsdp": 4}, 2048, 8, lora_rank=16, base_dtype="bfloat16",
          base_quant="nf4", target="v5e-4")),
      ("Llama-3-8B full, v5p-64", Case("llama-3-8b", {"fsdp": 32}, 2048, 64,
                                       target="v5p-64")),
      # The same model on the largest v5e slice: one sequence a chip.
      ("Llama-3-8B full, v5e-256", Case("llama-3-8b", {"fsdp": 256}, 2048, 256,
                                        target="v5e-256")),
      ("Llama-3-8B LoRA r16 bf16 base, v6e-4", Case(
          "llama-3-8b", {"fsdp": 4}, 2048, 8, lora_rank=16, base_dtype="bfloat16",
          target="v6e-4")),
      ("Llama-3-8B QLoRA r16 nf4 base, v6e-4", Case(
          "llama-3-8b", {"fsdp": 4}, 2048, 8, lora_rank=16, base_dtype="bfloat16",
          base_quant="nf4", target="v6e-4")),
  ]
  out = []
  for what, case in cases:
    hbm = tpu_targets.parse_slice(case.target).device_hbm_bytes / GiB
    for attention in ("xla", "splash"):
      out.append((f"{what}, {attention}", dataclasses.replace(case, attention=attention),
                  hbm))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=64, help="forced CPU devices")
  p.add_argument("--shape", default=None,
                 help=f"{sorted(SHAPES)} or a config.json path; none: the suite")
  p.add_argument("--mesh", default="fsdp:-1", help="axis:size,... e.g. fsdp:8,model:2")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--layers", default=None, help="depths to compile, e.g. 4,32")
  p.add_argument("--scan", default="on", choices=("on", "off", "both"))
  p.add_argument("--remat", default="full", choices=model_config.REMATS)
  p.add_argument("--loss", default="pdl", choices=("pdl", "ce"))
  p.add_argument("--unchunked", action="store_true", help="full [B, L, V] logits")
  p.add_argument("--strategy", default="vocab", choices=("vocab", "tokens"),
                 help="chunked loss strategy (pdl_jax/losses/chunked.py)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--lora_rank", type=int, default=0, help="LoRA on every projection")
  p.add_argument("--base_dtype", default="float32", choices=("bfloat16", "float32"),
                 help="LoRA: the frozen base's dtype")
  p.add_argument("--base_quant", default="none", choices=model_config.BASE_QUANTS,
                 help="LoRA: the frozen base stored quantised")
  p.add_argument("--lora_suite", action="store_true",
                 help="only the LoRA cases (implies --no_licm: bfloat16 bases)")
  p.add_argument("--target", default=None,
                 help="a TPU slice (v5e-4, v5p-64, ...): the TPU compiler (libtpu) instead of "
                 "forced CPU devices; adds the step-time estimate and MFU")
  p.add_argument("--attention", default="xla", choices=("xla", "splash", "cudnn", "auto"))
  p.add_argument("--tpu_suite", action="store_true", help="docs/tpu.md's TPU table")
  p.add_argument("--only", default=None, help="tpu_suite: only cases whose name has this")
  p.add_argument("--no_licm", action="store_true",
                 help="disable XLA:CPU's loop-invariant code motion (see NO_LICM)")
  args = p.parse_args()
  print(f"{jax.device_count()} forced {jax.default_backend()} devices; jax {jax.__version__}"
        + ("; XLA:CPU loop-invariant code motion off (--no_licm)"
           if args.no_licm or args.lora_suite else ""),
        flush=True)
  if args.tpu_suite:
    todo = [t for t in tpu_suite() if args.only is None or args.only in t[0]]
  elif args.lora_suite:
    todo = lora_suite()
  elif args.shape is None:
    todo = suite()
  else:
    mesh = {}
    for part in args.mesh.split(","):
      axis, _, size = part.partition(":")
      mesh[axis] = int(size)
    if -1 in mesh.values():
      rest = math.prod(v for v in mesh.values() if v != -1)
      n = tpu_targets.parse_slice(args.target).num_devices if args.target else args.devices
      mesh = {k: (n // rest if v == -1 else v) for k, v in mesh.items()}
    depths = [int(x) for x in args.layers.split(",")] if args.layers else [None]
    scans = {"on": [True], "off": [False], "both": [True, False]}[args.scan]
    todo = [("", Case(args.shape, mesh, args.seq, args.batch, scan=s, remat=args.remat,
                      layers=n, loss=args.loss, chunked=not args.unchunked,
                      strategy=args.strategy,
                      dtype=args.dtype, grad_accum=args.grad_accum,
                      lora_rank=args.lora_rank, base_dtype=args.base_dtype,
                      base_quant=args.base_quant, attention=args.attention,
                      target=args.target), None)
            for s in scans for n in depths]
  print(TPU_HEADER if args.tpu_suite or args.target else HEADER, flush=True)
  results, failed = [], []
  for what, case, limit in todo:
    r = measure(case)
    results.append((what, r, limit))
    verdict = ""
    if limit is not None:
      ok = r["total"] <= limit * GiB
      verdict = f"  [{what}: total <= {limit:g} GiB: {'yes' if ok else 'NO'}]"
      failed += [] if ok else [what]
    print(row(r) + verdict, flush=True)
  compile_s = {(r["case"].scan, r["case"].layers): r["compile_s"] for _, r, _ in results
               if r["case"].layers}
  for scan in (True, False):
    if (scan, 4) in compile_s and (scan, 32) in compile_s:
      print(f"compile time 32 / 4 layers, {'scanned' if scan else 'unrolled'}: "
            f"{compile_s[(scan, 32)] / compile_s[(scan, 4)]:.2f}x")
  ratios = [r["ratio"] for _, r, _ in results]
  print(f"state per device / ideal: max {max(ratios):.3f}")
  if failed:
    raise SystemExit(f"over the memory limit: {failed}")


if __name__ == "__main__":
  main()
