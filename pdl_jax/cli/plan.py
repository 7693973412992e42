"""Does a config fit a TPU slice, and how fast should it run? The run's real train
step and decode step compiled for the slice by the TPU compiler (libtpu) on this
machine: nothing runs, no weights are read (a named base's config.json values
suffice).

    python -m pdl_jax.main --config=configs/dialogue.py --plan=v5e-4
    python -m pdl_jax.cli.plan --config=configs/dialogue.py --plan=v5p-64 \\
        --config.batch_size=64 --config.mesh.fsdp=-1 --config.mesh.data=1

Prints per device: HBM (arguments, outputs, temporaries, total) against the chip's
and whether it fits (what to change when not); the FLOPs of a step, the compiler's
step-time estimate (`optimal_seconds`, see docs/tpu.md for what it covers) and the
tokens/s and model-FLOPs utilisation it implies; the attention implementation
compiled; the compile times.
"""

from __future__ import annotations

import dataclasses

from pdl_jax import paths
from pdl_jax import sharding
from pdl_jax.cli import errors
from pdl_jax.models import decoder
from pdl_jax.models import factory
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import offline
from pdl_jax.train import run as run_lib
from pdl_jax.train import tpu_targets

GiB = tpu_targets.GiB
# A plan "fits" below this share of the device's HBM: XLA's analysis leaves out the
# runtime's own reservations and fragmentation.
FIT_SHARE = 0.95

# config.json values (only what the decoder reads) of bases a plan may name without
# their folder: the offline bases (pdl_jax.models.hf.offline, as their GGUFs convert;
# a plan downloads nothing) and the shapes of experiments/bench_memory.py.
NAMED_CONFIGS: dict[str, dict] = {
    "smollm2-135m-instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu"),
    "gemma3-270m": dict(
        model_type="gemma3_text", hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        vocab_size=262144, max_position_embeddings=32768, rope_theta=1000000.0,
        rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_bias=False, hidden_activation="gelu_pytorch_tanh",
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        sliding_window=512, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
        final_logit_softcapping=None, attn_logit_softcapping=None,
        use_bidirectional_attention=False),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu"),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu",
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, hidden_act="silu"),
}


def _config_folder(name: str) -> str | None:
  """The folder holding NAME's config.json: NAME itself (local or gs://, the path
  layer) or a converted offline base's folder in the cache; None without one."""
  for folder in (paths.path(name), paths.path(offline.cache_dir()) / "models" / name / "hf"):
    if (folder / "config.json").exists():
      return str(folder)
  return None


def model_of(config) -> decoder.Decoder:
  """The config's decoder for a TPU: a named base's config values (NAMED_CONFIGS), a
  folder's config.json (or an offline base's converted folder in the cache), or the
  own model at the tokenizer's vocabulary size; compute dtype bfloat16 unless set;
  model.attention "auto" compiled as on a TPU (splash).

  Raises:
    ValueError: a pretrained value whose config.json is not here (a plan downloads
      nothing).
  """
  m = config.model
  dtype = m.dtype or "bfloat16"  # None: bfloat16 on accelerators (factory.compute_dtype)
  name = m.pretrained
  if name is None:
    cfg = dataclasses.replace(factory.decoder_config(m, config.tokenizer.vocab_size),
                              dtype=dtype)
  else:
    if name in NAMED_CONFIGS:
      cfg = hf_families.config_from_hf(NAMED_CONFIGS[name], dtype=dtype,
                                       param_dtype=m.param_dtype)
    elif (found := _config_folder(name)) is not None:
      cfg = hf_families.read_config(found, dtype=dtype, param_dtype=m.param_dtype)
    else:
      raise ValueError(f"config.model.pretrained={name!r}: a plan reads only a config.json "
                       f"and downloads nothing; expected a folder holding one or a named "
                       f"base of {sorted(NAMED_CONFIGS)}.")
    cfg = dataclasses.replace(cfg, **factory.run_fields(m))
  if getattr(cfg, "attention", None) == "auto":
    cfg = dataclasses.replace(cfg, attention="splash")
  return decoder.Decoder(cfg)


def check_target(config, slice_name: str):
  """(Slice, mesh) of the plan: the slice by name and the config's mesh on its
  devices, with the trainer's own checks (mesh axes, batch over data x fsdp).

  Raises:
    ValueError: an unknown slice (lists the known ones), a mesh the slice cannot
      hold or a batch that does not split over it.
  """
  slice_ = tpu_targets.parse_slice(slice_name)
  found = tpu_targets.devices(slice_)
  try:
    mesh = run_lib.make_mesh(config, devices=found)
  except ValueError as e:
    raise ValueError(f"{e} (on {slice_.name}: {len(found)} devices)") from None
  return slice_, mesh


def suggestions(config, model: decoder.Decoder, mesh, argument_bytes: int,
                temp_bytes: int | None) -> list[str]:
  """What to change when the train step does not fit, most effective first
  (temp_bytes None: unknown, the compiler refused the program)."""
  cfg, out = model.cfg, []
  n = mesh.devices.size
  if mesh.shape["fsdp"] < n and (temp_bytes is None or argument_bytes > temp_bytes):
    out.append(f"shard the state: --config.mesh.fsdp={n} --config.mesh.data=1 "
               f"(arguments are {argument_bytes / GiB:.2f} GiB a device)")
  if cfg.remat != "full":
    out.append("--config.model.remat=full (keep only each layer's input)")
  if getattr(cfg, "attention", "xla") == "xla":
    out.append("--config.model.attention=splash (no [B, H, L, L] scores)")
  per_device = config.batch_size // sharding.batch_shards(mesh)
  accum = config.optimizer.grad_accum_steps
  if per_device // accum > 1:
    out.append(f"--config.optimizer.grad_accum_steps={2 * accum} (same batch, half the "
               "activations at once)")
  if not cfg.lora_rank and config.model.pretrained is not None:
    out.append("--config.model.lora.rank=16 (adapters only: no optimizer state for the base)")
  elif cfg.lora_rank and cfg.base_quant == "none":
    out.append("--config.model.lora.base_quant=nf4 (QLoRA: a 4-bit frozen base)")
  if not cfg.scan_layers:
    out.append("--config.model.scan_layers=true (compile time flat in depth)")
  return out


def _memory_lines(c: tpu_targets.Compiled, hbm: float) -> list[str]:
  share = c.total_bytes / hbm
  verdict = "fits" if share <= FIT_SHARE else "DOES NOT FIT"
  return [f"  HBM per device: arguments {c.argument_bytes / GiB:.2f} GiB, outputs "
          f"{c.output_bytes / GiB:.2f} GiB (donated {c.alias_bytes / GiB:.2f}), temporaries "
          f"{c.temp_bytes / GiB:.2f} GiB; total {c.total_bytes / GiB:.2f} GiB of "
          f"{hbm / GiB:.1f} GiB ({100 * share:.0f}%): {verdict}",
          f"  compiled in {c.compile_seconds:.1f} s"]


def report(config, slice_name: str, *, decode: bool = True) -> tuple[str, bool]:
  """(The plan's text, whether the train step fits): compiles the train step (and the
  decode step) of `config` for the slice."""
  slice_, mesh = check_target(config, slice_name)
  model = model_of(config)
  cfg = model.cfg
  total, _ = tpu_targets.param_count(model)
  n = mesh.devices.size
  hbm = slice_.device_hbm_bytes
  kind = ("full finetune" if not cfg.lora_rank else
          f"LoRA r{cfg.lora_rank}, base {cfg.base_quant if cfg.base_quant != 'none' else cfg.param_dtype}")
  lines = [f"plan for {slice_.name}: {n} x {mesh.devices.flat[0].device_kind} "
           f"({slice_.chips} chips, {slice_.chip.hbm_gib:g} GiB HBM and "
           f"{slice_.chip.bf16_tflops:g} bf16 TFLOP/s a chip; topology {slice_.topology})",
           f"model: {cfg.model_type} {total / 1e6:.1f} M params, {cfg.num_layers} layers, "
           f"d {cfg.d_model}, heads {cfg.num_heads}/{cfg.num_kv_heads}; {cfg.dtype} compute, "
           f"{cfg.param_dtype} params; {kind}; remat {cfg.remat}, "
           f"{'scanned' if cfg.scan_layers else 'unrolled'}",
           f"attention compiled: {getattr(cfg, 'attention', 'xla')}",
           f"{sharding.mesh_summary(mesh)}; batch {config.batch_size} x seq "
           f"{config.seq_len}, grad_accum {config.optimizer.grad_accum_steps}"]
  try:
    train = tpu_targets.compile_train(config, model, mesh)
  except tpu_targets.DoesNotFit as e:
    lines += ["train step: DOES NOT FIT (the TPU compiler refused it):",
              f"  {e.message}",
              f"  arguments (state, batch) {e.state_bytes / GiB:.2f} GiB a device",
              "  to fit, try:"] + [f"    {s}" for s in suggestions(
                  config, model, mesh, e.state_bytes, temp_bytes=None)]
    return "\n".join(lines), False
  lines += ["train step:"] + _memory_lines(train, hbm)
  tokens = config.batch_size * config.seq_len
  flops = tpu_targets.model_flops(model, tokens, config.seq_len)
  peak = slice_.chip.bf16_tflops * 1e12 / slice_.chip.devices_per_chip
  step_s, how = tpu_targets.step_seconds(config, model, mesh, train)
  lines.append(f"  FLOPs per step: model {flops:.3g} (6N + attention; {flops / n:.3g} a "
               f"device), compiler {train.flops:.3g} a device (remat included)")
  lines.append(f"  compiler's step time (optimal_seconds) {step_s * 1e3:.2f} ms -> "
               f"{tokens / step_s:,.0f} tokens/s, MFU {flops / n / step_s / peak:.0%} "
               f"(from {how}; no overlap of communication: see docs/tpu.md)")
  if getattr(cfg, "attention", "xla") == "splash":
    lines.append("  (with splash the cost model under-counts the kernel: Llama-3-8B on v5p-64 "
                 "came out at 109% MFU; read its time as a lower bound, docs/tpu.md)")
  fits = train.total_bytes <= FIT_SHARE * hbm
  if not fits:
    lines += ["  to fit, try:"] + [f"    {s}" for s in suggestions(
        config, model, mesh, train.argument_bytes, train.temp_bytes)]
  if decode:
    try:
      dec = tpu_targets.compile_decode(config, model, mesh)
    except tpu_targets.DoesNotFit as e:
      return "\n".join(lines + [f"decode step: DOES NOT FIT: {e.message}"]), fits
    b = config.eval.batch_size
    lines += [f"decode step (one token, batch {b}, KV cache of "
              f"{tpu_targets.decode_length(config)} positions):"] + _memory_lines(dec, hbm)
    lines.append(f"  compiler's time a token {dec.optimal_seconds * 1e3:.3f} ms -> "
                 f"{b / dec.optimal_seconds:,.0f} tokens/s")
  return "\n".join(lines), fits


def main(argv) -> None:
  """CLI: --config and --plan (see report)."""
  del argv
  from absl import flags

  text, _ = report(flags.FLAGS.config, flags.FLAGS.plan)
  print(text, flush=True)


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:args]")
  flags.DEFINE_string("plan", None, f"a TPU slice: {', '.join(tpu_targets.SLICES)}")
  flags.mark_flags_as_required(["config", "plan"])
  errors.run(main)
