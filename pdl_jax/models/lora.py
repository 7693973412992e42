"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen base: the param split and
the merge.

The adapters live inside the decoder's projections (pdl_jax.models.layers.Dense2D:
lora_a [*in, r], lora_b [r, *out] beside the kernel, y = x W + (alpha / r) x A B), so
a LoRA model's params are one tree. Training splits it (`split`, in
pdl_jax.train.state): the trainable params are the adapters with their optimizer
state; the frozen rest rides in the train state untouched, combined back inside the
loss (`combine`), so jax.grad sees the adapters alone: no gradients, moments or
checkpoint bytes for the base. The PEFT format is pdl_jax.models.hf.peft.
"""

from __future__ import annotations

import math
from typing import Any, Mapping
import flax
import jax
import jax.numpy as jnp
from pdl_jax.models import layers
from pdl_jax.models import config as model_config
from pdl_jax.models import quant

# The adapter leaves of a projection (the rest of the tree is the frozen base).
ADAPTER_PARAMS = ("lora_a", "lora_b")


def enabled(cfg: model_config.DecoderConfig) -> bool:
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
  num_in = layers.num_in_axes(module)
  lead = a.ndim - num_in - 1
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  r = a.shape[-1]
  a_ = a.astype(jnp.float32).reshape(a.shape[:lead] + (math.prod(in_shape), r))
  b_ = b.astype(jnp.float32).reshape(b.shape[:lead] + (r, math.prod(out_shape)))
  return (scale * jnp.matmul(a_, b_)).reshape(a.shape[:lead] + in_shape + out_shape)


def merge(params: Mapping[str, Any], cfg: model_config.DecoderConfig,
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
