"""LoRA adapters in PEFT's format: module names of the Hugging Face family,
adapter_config.json, adapter_model.safetensors, and the adapter folder written
atomically (peft.PeftModel.from_pretrained(base, DIR) loads it)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping
import jax
import numpy as np
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
import json
import os
import ml_dtypes
from pdl_jax.models.hf import peft as hf_peft
from pdl_jax import multihost
from pdl_jax import paths
from pdl_jax.models.hf import export as hf_export


def hf_module_names(cfg: model_config.DecoderConfig) -> dict[tuple[str, ...], str]:
  """(block_i, attn|mlp, module) -> the transformers module name of that projection
  ("model.layers.3.self_attn.q_proj"), from the family's tensor table.

  Raises:
    ValueError: a family whose projections are fused in the checkpoint (GPT-2's
      c_attn holds q, k and v: one PEFT adapter per fused module cannot hold three
      separate rank-r adapters; export with --merge instead).
  """
  from pdl_jax.models.hf import families as hf_families

  plain = dataclasses.replace(cfg, lora_rank=0, lora_targets=(),
                                          base_quant="none", scan_layers=False)
  out: dict[tuple[str, ...], str] = {}
  for t in hf_families.tensor_table(plain):
    if t.path[-1] != "kernel" or len(t.path) != 4:
      continue
    if t.kind.startswith("conv_in_heads"):
      raise ValueError(
          f"{cfg.model_type}: its checkpoint fuses q, k and v into one module "
          "(c_attn), which a PEFT adapter of rank r per module cannot express; export "
          "the merged model with `python -m pdl_jax.cli.export_hf --merge`.")
    out[t.path[:3]] = t.name.removesuffix(".weight")
  return out


def peft_config(cfg: model_config.DecoderConfig, base_name: str) -> dict[str, Any]:
  """adapter_config.json of a PEFT LoRA adapter for these adapters."""
  names = hf_module_names(cfg)
  wanted = {model_config.LORA_TARGETS[t] for t in cfg.lora_targets}
  targets: list[str] | str = sorted({name.rsplit(".", 1)[-1] for path, name in names.items()
                                     if path[2] in wanted})
  if cfg.model_type == "gemma3":
    # A multimodal base: its vision tower has q_proj / k_proj / v_proj modules too, which
    # a list of names would also wrap (PEFT matches a string by re.fullmatch instead).
    targets = rf"model\.language_model\.layers\.\d+\.\w+\.({'|'.join(targets)})"
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
      "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
      "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
      "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False, "layers_to_transform": None,
      "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
  }


def peft_tensors(adapters: Mapping[str, Any], cfg: model_config.DecoderConfig
                 ) -> dict[str, np.ndarray]:
  """adapter_model.safetensors' tensors (float32) in PEFT's names and layouts:
  base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]
  (torch Linear layouts, the flattened head axes in transformers' order)."""
  if decoder.SCANNED in adapters:
    adapters = decoder.unstack_layers(adapters)
  names = hf_module_names(cfg)
  out: dict[str, np.ndarray] = {}
  for block, sub in adapters.items():
    for part, modules in sub.items():
      for module, leaves in modules.items():
        a = np.asarray(jax.device_get(leaves["lora_a"]), np.float32)
        b = np.asarray(jax.device_get(leaves["lora_b"]), np.float32)
        r = a.shape[-1]
        name = f"base_model.model.{names[(block, part, module)]}"
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
  return out


def write_peft(adapters, cfg, out: str, *, base_name: str, tokenizer_dir: str | None = None,
               dtype: str = "float32"):
  """Writes `adapters` (a LoRA model's lora_a / lora_b tree for `cfg`) as a PEFT
  adapter folder: adapter_config.json (base_model_name_or_path = base_name),
  adapter_model.safetensors in PEFT's names, the tokenizer files; into a temporary
  folder renamed at the end. Returns its path.

  Raises:
    FileExistsError: `out` exists.
    ValueError: a family whose checkpoint fuses q, k and v (GPT-2).
  """
  target = paths.path(out)
  if target.exists():
    raise FileExistsError(f"export target {out!r} exists; give a new folder.")
  tensors = hf_peft.peft_tensors(adapters, cfg)
  adapter_config = hf_peft.peft_config(cfg, base_name)
  if dtype == "bfloat16":
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  if jax.process_index() == 0:
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=False)
    try:
      hf_export.save_safetensors(tensors, tmp / "adapter_model.safetensors")
      (tmp / "adapter_config.json").write_text(
          json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
      if tokenizer_dir is not None:
        hf_export.copy_tokenizer_files(tokenizer_dir, tmp)
      tmp.rename(target)
    except BaseException:
      if tmp.exists():
        tmp.rmtree()
      raise
  multihost.sync(f"pdl_jax.cli.export_hf {out}")
  return target
