"""Quantised storage of a LoRA run's frozen base projections (QLoRA), dequantised
into the matmul (DecoderConfig.base_quant; Dense2D reads these params).

- "int8": symmetric per output column: kernel_q int8 [in, out] and kernel_scale
  float32 [out] = max |W[:, j]| / 127; W ~ kernel_q * kernel_scale (1 byte a weight).
- "nf4": QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, the 16 quantiles of a
  normal distribution, NF4_CODE) per block of NF4_BLOCK input rows of one column:
  kernel_nf4 uint8 [in / 2, out] (two 4-bit codes a byte: row 2i in the low nibble,
  row 2i + 1 in the high one) and kernel_absmax float32 [in / NF4_BLOCK, out]
  (4.5 bits a weight; QLoRA's second quantisation of the absmax values is not done).

Kernels are stored flattened to [in, out] (Dense2D's matmul shape) whatever their
head layout. The functions are pure and jit-able; `quantize_params` turns a loaded
float base into the stored form.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

NF4_BLOCK = 64
# The NF4 code book (QLoRA, Appendix E; bitsandbytes' table): values in [-1, 1].
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Param names of each storage, in Dense2D's params (replacing "kernel").
PARAM_NAMES = {"int8": ("kernel_q", "kernel_scale"), "nf4": ("kernel_nf4", "kernel_absmax")}


def check_shape(kind: str, n_in: int) -> None:
  """Raises ValueError when `n_in` input rows cannot be stored as `kind`."""
  if kind == "nf4" and n_in % NF4_BLOCK:
    raise ValueError(f"base_quant='nf4' stores blocks of {NF4_BLOCK} input rows; a "
                     f"projection has {n_in} (not a multiple of {NF4_BLOCK}). Use "
                     "base_quant='int8' for this model.")


def quantize(kind: str, w_IxO: Any) -> dict[str, Any]:
  """The stored form of a float kernel [in, out] (float32 arithmetic). A numpy array
  is quantised with numpy on the host (loading: one tensor at a time, never the
  whole float base on a device), a jax array with jax (the same values: every
  operation is one both do alike)."""
  xp = np if isinstance(w_IxO, np.ndarray) else jnp
  w = w_IxO.astype(np.float32)
  n_in, n_out = w.shape
  check_shape(kind, n_in)
  if kind == "int8":
    # A multiply, not a division: XLA may turn x / 127 into x * (1 / 127), numpy does
    # not; written as the multiply, both paths give the same scales bit for bit.
    scale_O = xp.max(xp.abs(w), axis=0) * np.float32(1.0 / 127.0)
    safe_O = xp.where(scale_O > 0, scale_O, np.float32(1.0))
    q = xp.clip(xp.round(w / safe_O), -127, 127).astype(np.int8)
    return {"kernel_q": q, "kernel_scale": scale_O}
  if kind == "nf4":
    blocks = w.reshape(n_in // NF4_BLOCK, NF4_BLOCK, n_out)
    absmax_BxO = xp.max(xp.abs(blocks), axis=1)
    safe = xp.where(absmax_BxO > 0, absmax_BxO, np.float32(1.0))[:, None, :]
    # Nearest code by the midpoints between neighbours (no [in, out, 16] distances).
    mids = xp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
    codes = xp.searchsorted(mids, (blocks / safe).reshape(n_in, n_out)).astype(np.uint8)
    packed = codes[0::2] | (codes[1::2] << 4)
    return {"kernel_nf4": packed, "kernel_absmax": absmax_BxO}
  raise ValueError(f"base_quant={kind!r} is not a quantisation; expected 'int8' or 'nf4'.")


def dequantize(kind: str, params: dict[str, jax.Array], dtype: Any) -> jax.Array:
  """The [in, out] kernel in `dtype` from its stored form."""
  if kind == "int8":  # float32 product, one rounding to dtype (as nf4 and merge)
    return (params["kernel_q"].astype(jnp.float32)
            * params["kernel_scale"].astype(jnp.float32)[None, :]).astype(dtype)
  packed = params["kernel_nf4"]
  half, n_out = packed.shape
  codes = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(2 * half, n_out)
  values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
  absmax = jnp.repeat(params["kernel_absmax"], NF4_BLOCK, axis=0)
  return (values * absmax).astype(dtype)


def param_specs(kind: str, n_in: int, n_out: int, flat_init: Callable
                ) -> dict[str, tuple[tuple[int, ...], Any, Callable]]:
  """{name: (shape, dtype, init)} of the stored params, for Dense2D's self.param
  (codes are integers, scales float32; a 1-D scale runs along the output axis).

  A quantised kernel is only ever a frozen base loaded from a checkpoint
  (`quantize_params`); initialising one (for shapes, or a test) quantises
  flat_init's kernel with the fixed scale of its bound (xavier uniform: sqrt(6 /
  (in + out))), so that codes and scales agree without sharing a random key.
  """
  check_shape(kind, n_in)
  bound = math.sqrt(6.0 / (n_in + n_out))

  def codes_init(rng, shape, dtype):
    del shape, dtype
    w = flat_init(rng, (n_in, n_out), jnp.float32)
    if kind == "int8":  # the fixed scale bound / 127
      return jnp.clip(jnp.round(w / (bound / 127)), -127, 127).astype(jnp.int8)
    mids = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
    codes = jnp.searchsorted(mids, w / bound).astype(jnp.uint8)
    return codes[0::2] | (codes[1::2] << 4)

  def scale_init(rng, shape, dtype):
    del rng
    value = bound / 127 if kind == "int8" else bound
    return jnp.full(shape, value, dtype)

  if kind == "int8":
    return {"kernel_q": ((n_in, n_out), jnp.int8, codes_init),
            "kernel_scale": ((n_out,), jnp.float32, scale_init)}
  return {"kernel_nf4": ((n_in // 2, n_out), jnp.uint8, codes_init),
          "kernel_absmax": ((n_in // NF4_BLOCK, n_out), jnp.float32, scale_init)}


def num_in_axes(module: str) -> int:
  """Input axes of a projection's kernel: 2 for the attention output ([H, K] -> D),
  1 for the others ([D] -> ...). The one rule the decoder, pdl_jax.models.lora and the
  quantisation here use (defined here, below the decoder, which imports this module)."""
  return 2 if module == "out" else 1


def quantize_params(params: dict[str, Any], cfg) -> dict[str, Any]:
  """A float base (the Decoder's params for `cfg` with base_quant "none") with every
  LoRA-targeted kernel replaced by its stored form (cfg.base_quant); other params
  kept. Handles both layer layouts (scanned leaves carry a leading layers axis).
  Pure: jit it with the quantised tree's out_shardings."""
  if cfg.base_quant == "none":
    return params

  def module(m: dict[str, Any], name: str, stacked: bool) -> dict[str, Any]:
    if not cfg.lora_on(name) or "kernel" not in m:
      return m
    num_in = num_in_axes(name)

    def one(w):
      n_in = math.prod(w.shape[:num_in])
      return quantize(cfg.base_quant, w.reshape(n_in, -1))

    stored = jax.vmap(one)(m["kernel"]) if stacked else one(m["kernel"])
    return {**{k: v for k, v in m.items() if k != "kernel"}, **stored}

  def walk(tree: Any, stacked: bool) -> Any:
    if not isinstance(tree, dict):
      return tree
    return {k: module(walk(v, stacked), k, stacked) if isinstance(v, dict) else v
            for k, v in tree.items()}

  return {k: walk(v, stacked=(k == "blocks")) if isinstance(v, dict) else v
          for k, v in params.items()}


def quantizing_readers(cfg, readers: dict) -> tuple[dict, dict]:
  """hf_weights.load_params' `transform` for a LoRA base: each targeted kernel's
  reader replaced by readers of its stored form, quantised on the host from the
  checkpoint tensor (a scanned stack one layer at a time) when its first block is
  placed; returns (readers, {path: dtype}). The host holds one tensor's float copy
  (a layer's, scanned) at a time, and the quantised tensors until the load returns
  (the readers keep them); the devices never hold the float base."""
  out, dtypes = {}, {}
  for path, (shape, read) in readers.items():
    module = path[-2] if len(path) >= 2 else ""
    if path[-1] != "kernel" or not cfg.lora_on(module):
      out[path] = (shape, read)
      continue
    stacked = path[0] == "blocks"
    num_in = num_in_axes(module)
    per_layer = shape[1:] if stacked else shape
    n_in, n_out = math.prod(per_layer[:num_in]), math.prod(per_layer[num_in:])
    memo: dict[str, np.ndarray] = {}

    def stored(read=read, shape=shape, stacked=stacked, n_in=n_in, memo=memo):
      if not memo:
        full = tuple(slice(None) for _ in shape)
        if stacked:
          layers = [quantize(cfg.base_quant, np.asarray(
              read((slice(i, i + 1),) + full[1:]), np.float32).reshape(n_in, -1))
                    for i in range(shape[0])]
          memo.update({k: np.stack([q[k] for q in layers]) for k in layers[0]})
        else:
          memo.update(quantize(cfg.base_quant, np.asarray(read(full), np.float32).reshape(
              n_in, -1)))
      return memo

    specs = param_specs(cfg.base_quant, n_in, n_out, lambda *a: None)
    for name, (qshape, dtype, _) in specs.items():
      qshape = ((shape[0],) if stacked else ()) + tuple(qshape)
      out[path[:-1] + (name,)] = (qshape, lambda idx, name=name, stored=stored: stored()[
          name][idx])
      dtypes[path[:-1] + (name,)] = dtype
  return out, dtypes


def stored_bytes(params: Any) -> int:
  """Bytes of a param tree as stored (what the memory benchmark reports)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))
