"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen base: the param split, the
merge, and the PEFT adapter format.

The adapters live inside the decoder's projections (pdl_jax.models.decoder.Dense2D:
lora_a [*in, r], lora_b [r, *out] beside the kernel, y = x W + (alpha / r) x A B), so
a LoRA model's params are one tree. Training splits it (`split`): the train state
holds only the adapters and their optimizer state; the base is a separate, frozen
argument of the step, combined back inside the loss (`combine`), so jax.grad sees
the adapters alone: no gradients, moments or checkpoint bytes for the base.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pdl_jax.models import decoder as decoder_lib
from pdl_jax.models import quant

ADAPTER_PARAMS = ("lora_a", "lora_b")


def enabled(cfg: decoder_lib.DecoderConfig) -> bool:
  """Whether `cfg` has adapters."""
  return cfg.lora_rank > 0


def split(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(adapters, base) of a LoRA model's params: the lora_a / lora_b leaves, and the
  rest; two nested dicts of the same module paths (works on boxed, abstract and
  real trees: the leaves are not looked at)."""
  flat = flax.traverse_util.flatten_dict(dict(params))
  adapters = {k: v for k, v in flat.items() if k[-1] in ADAPTER_PARAMS}
  base = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_PARAMS}
  return (flax.traverse_util.unflatten_dict(adapters),
          flax.traverse_util.unflatten_dict(base))


def combine(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
  """The model's params from `split`'s two parts (a dict union, no array copies)."""
  flat = flax.traverse_util.flatten_dict(dict(base))
  flat.update(flax.traverse_util.flatten_dict(dict(adapters)))
  return flax.traverse_util.unflatten_dict(flat)


def count(adapters: Any) -> int:
  """Number of adapter parameters."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


def delta(a: jax.Array, b: jax.Array, module: str, scale: float) -> jax.Array:
  """scale * A @ B in the kernel's shape [..., *in, *out] (a leading layers axis of
  a scanned tree is kept), in float32."""
  num_in = decoder_lib.num_in_axes(module)
  lead = a.ndim - num_in - 1
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  r = a.shape[-1]
  a_ = a.astype(jnp.float32).reshape(a.shape[:lead] + (math.prod(in_shape), r))
  b_ = b.astype(jnp.float32).reshape(b.shape[:lead] + (r, math.prod(out_shape)))
  return (scale * jnp.matmul(a_, b_)).reshape(a.shape[:lead] + in_shape + out_shape)


def merge(params: Mapping[str, Any], cfg: decoder_lib.DecoderConfig,
          dtype: Any = jnp.float32) -> dict[str, Any]:
  """A LoRA model's params with each adapter folded into its kernel (W + (alpha / r)
  A B; a quantised kernel dequantised first) and the adapters dropped: the params
  of the same model without LoRA (DecoderConfig with lora_rank 0, base_quant none).
  Kernels come out in `dtype`; other params as they are. Pure (jit-able)."""
  scale = cfg.lora_alpha / cfg.lora_rank

  def module(name: str, m: dict[str, Any]) -> dict[str, Any]:
    if "lora_a" not in m:
      return m
    d = delta(m["lora_a"], m["lora_b"], name, scale)
    if "kernel" in m:
      w = m["kernel"].astype(jnp.float32)
    else:  # quantised: dequantised (stored [in, out], or [layers, in, out] scanned)
      stored = {k: m[k] for k in quant.PARAM_NAMES[cfg.base_quant]}
      deq = lambda s: quant.dequantize(cfg.base_quant, s, jnp.float32)
      stacked = next(iter(stored.values())).ndim == 3
      w = (jax.vmap(deq)(stored) if stacked else deq(stored)).reshape(d.shape)
    rest = {k: v for k, v in m.items()
            if k not in ADAPTER_PARAMS and k not in quant.PARAM_NAMES.get(
                cfg.base_quant, ())}
    return {**rest, "kernel": (w + d).astype(dtype)}

  def walk(tree: Any) -> Any:
    if not isinstance(tree, Mapping):
      return tree
    return {k: module(k, walk(v)) if isinstance(v, Mapping) else v for k, v in tree.items()}

  return walk(params)


# ------------------------------------------------------------------ PEFT format


def hf_module_names(cfg: decoder_lib.DecoderConfig) -> dict[tuple[str, ...], str]:
  """(block_i, attn|mlp, module) -> the transformers module name of that projection
  ("model.layers.3.self_attn.q_proj"), from the family's tensor table.

  Raises:
    ValueError: a family whose projections are fused in the checkpoint (GPT-2's
      c_attn holds q, k and v: one PEFT adapter per fused module cannot hold three
      separate rank-r adapters; export with --merge instead).
  """
  from pdl_jax.models.hf import families  # pylint: disable=import-outside-toplevel

  plain = dataclasses.replace(cfg, lora_rank=0, lora_targets=(),
                                          base_quant="none", scan_layers=False)
  out: dict[tuple[str, ...], str] = {}
  for t in families.tensor_table(plain):
    if t.path[-1] != "kernel" or len(t.path) != 4:
      continue
    if t.kind.startswith("conv_in_heads"):
      raise ValueError(
          f"{cfg.model_type}: its checkpoint fuses q, k and v into one module "
          "(c_attn), which a PEFT adapter of rank r per module cannot express; export "
          "the merged model with `python -m pdl_jax.export --merge`.")
    out[t.path[:3]] = t.name.removesuffix(".weight")
  return out


def peft_config(cfg: decoder_lib.DecoderConfig, base_name: str) -> dict[str, Any]:
  """adapter_config.json of a PEFT LoRA adapter for these adapters."""
  names = hf_module_names(cfg)
  wanted = {decoder_lib.LORA_TARGETS[t] for t in cfg.lora_targets}
  targets = sorted({name.rsplit(".", 1)[-1] for path, name in names.items()
                    if path[2] in wanted})
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
      "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
      "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
      "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False, "layers_to_transform": None,
      "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
  }


def peft_tensors(adapters: Mapping[str, Any], cfg: decoder_lib.DecoderConfig
                 ) -> dict[str, np.ndarray]:
  """adapter_model.safetensors' tensors (float32) in PEFT's names and layouts:
  base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]
  (torch Linear layouts, the flattened head axes in transformers' order)."""
  if decoder_lib.SCANNED in adapters:
    adapters = decoder_lib.unstack_layers(adapters)
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

