"""Attention behind one function, with implementations chosen by `model.attention`
(DecoderConfig.attention):

- "xla": the einsum of head-major layouts (the reference; what every CPU result of
  the project was computed with): [B*G, R*L, S] scores plus an additive float32 mask
  bias, float32 softmax.
- "splash": the Pallas splash-attention kernel (TPU; Pallas interpret mode elsewhere,
  for tests), under shard_map over the mesh's batch axes (data x fsdp) and, where the
  KV heads divide over it, the model axis: causal, segment ids (packed rows), a
  local sliding window, grouped KV heads; lengths padded to the kernel's 128 blocks;
  its own backward pass. No [B, H, L, S] array in either pass.
- "cudnn": jax.nn.dot_product_attention(implementation="cudnn") (GPU): causal and
  sliding windows; where cuDNN cannot take the call (no GPU, float32, packed rows or
  padded keys, head_dim over 128), `xla` with one log line saying why.
- "auto": splash on TPU, cudnn on GPU, xla elsewhere (so CPU results are unchanged).

The decoder computes q (its 1/sqrt(head_dim) scale already folded in), k and v; this
module only combines them. Decoding with a KV cache keeps the einsum (a one-token
query reads the cache once; a kernel buys nothing measurable there).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "splash", "cudnn", "auto")


class Mask(NamedTuple):
  """What a query may attend to, made once per forward by the decoder: the xla path's
  additive bias [B or 1, L, S] (0 or -1e30), and what it was made from for the
  kernels (causality is implied): the segment ids of packed rows [B, L] and the
  real-key mask [B, S] (None when absent)."""

  bias_BxLxS: jax.Array
  segment_ids_BxL: jax.Array | None = None
  key_mask_BxS: jax.Array | None = None
SPLASH_BLOCK = 128  # the kernel's default block sizes: lengths are padded to a multiple
_LOGGED: set[str] = set()
# How a log line ends where a kernel refused the call and the einsum ran instead.
FALLBACK = "using the xla attention"


def _platform() -> str:
  """The platform the current program compiles for: the mesh's devices (a TPU
  topology's when compiling ahead of time from a CPU host), else JAX's default."""
  try:  # jax.sharding.get_mesh() refuses to run under jit; the context's mesh does
    from jax._src import mesh as mesh_lib

    mesh = mesh_lib.get_concrete_mesh()
  except (ImportError, AttributeError):
    mesh = None
  if mesh is not None and not mesh.empty:
    return mesh.devices.flat[0].platform
  return jax.default_backend()


def resolve(impl: str, platform: str | None = None) -> str:
  """The implementation `impl` runs as on `platform` (default: _platform()): "auto"
  is splash on TPU, cudnn on GPU, xla elsewhere.

  Raises:
    ValueError: an unknown implementation.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={impl!r}; expected one of {IMPLEMENTATIONS}.")
  if impl != "auto":
    return impl
  platform = platform or _platform()
  return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def fallbacks() -> list[str]:
  """The fallback lines logged so far in this process (a kernel refused, xla ran)."""
  return sorted(m for m in _LOGGED if m.endswith(FALLBACK))


def clear_log() -> None:
  """Forgets what was logged: the next refusal is logged (and seen by fallbacks) again."""
  _LOGGED.clear()


def _log_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.warning(message)


def xla_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, bias_BxLxS, *, cached: bool,
                  dtype) -> jax.Array:
  """The einsum reference: out [B, L, H, K] from q (scaled), head-major k and v and
  the additive mask bias [B or 1, L, S] (0 allowed, -1e30 not).

  Head-major layouts, so both attention matmuls (and their gradients) are plain
  batched matmuls over N = B * G (one batch axis: a size-1 G axis of its own would
  cost layout copies), with the R query heads that share a KV head stacked with the
  L queries (M = R * L rows): XLA:CPU then copies only q, k, v and the output ([B,
  L, H, K] each), never the [B, H, L, S] scores. Query head i uses KV head i // R,
  the order of transformers' repeat_kv. With a cache (`cached`), the matmuls read
  the updated [B, G, S, K] buffers as they are (batch axes B and G): reshaping them
  to [B * G, S, K] makes XLA:CPU duplicate each cache update into the reshape's
  fusion, every duplicate starting from a copy of the whole cache
  (tests/models/test_decoder_speed.py, in place).
  """
  b, l, h, k = q_BxLxHxK.shape
  g, s = k_BxGxSxK.shape[1], k_BxGxSxK.shape[2]
  r = h // g
  q_BxGxMxK = q_BxLxHxK.reshape(b, l, g, r, k).transpose(0, 2, 3, 1, 4).reshape(
      b, g, r * l, k)
  if cached:
    attend = lambda spec, x, y, **kw: jnp.einsum(spec.replace("n", "bg"), x, y, **kw)
    k_xSxK, v_xSxK = k_BxGxSxK.astype(dtype), v_BxGxSxK.astype(dtype)
    q_xMxK = q_BxGxMxK
  else:
    attend = jnp.einsum
    k_xSxK = k_BxGxSxK.astype(dtype).reshape(b * g, s, k)
    v_xSxK = v_BxGxSxK.astype(dtype).reshape(b * g, s, k)
    q_xMxK = q_BxGxMxK.reshape(b * g, r * l, k)
  logits_xMxS = attend("nmk,nsk->nms", q_xMxK, k_xSxK, preferred_element_type=jnp.float32)
  # An add of the [B or 1, L, S] bias, not a `where` on a broadcast boolean mask:
  # no [B, H, L, S] predicate in the forward or backward pass. score - 1e30
  # rounds to exactly -1e30 in float32, as the `where` gave. Row m of M is query
  # m % L: the bias is tiled R times along M.
  bias_Bx1xMxS = (jnp.tile(bias_BxLxS, (1, r, 1)) if r > 1 else bias_BxLxS)[:, None]
  logits_BxGxMxS = logits_xMxS.reshape(b, g, r * l, s) + bias_Bx1xMxS
  probs_xMxS = jax.nn.softmax(logits_BxGxMxS, axis=-1).astype(dtype).reshape(
      logits_xMxS.shape)
  out_NxMxK = attend("nms,nsk->nmk", probs_xMxS, v_xSxK).reshape(b * g, r * l, k)
  return out_NxMxK.reshape(b, g, r, l, k).transpose(0, 3, 1, 2, 4).reshape(b, l, h, k)


def _splash_kernel(heads: int, length: int, window: int | None, interpret: bool):
  """A splash MHA kernel for `heads` query heads of `length` (a block multiple):
  causal, or causal within `window` positions (LocalMask with no right side)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  shape = (length, length)
  one = (sm.CausalMask(shape) if window is None
         else sm.LocalMask(shape, window_size=(window - 1, 0), offset=0))
  mask = sm.MultiHeadMask([one for _ in range(heads)])
  # Built inside each trace, not cached: its mask tables become that program's
  # constants (a cached kernel would leak one trace's tracers into the next, and
  # compile-time evaluation would place them on the mesh's devices, which an AOT TPU
  # topology does not have here).
  return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, segment_ids_BxL=None, *,
                     window: int | None = None, dtype=jnp.bfloat16,
                     interpret: bool | None = None) -> jax.Array:
  """Causal attention by the splash kernel: out [B, L, H, K] (no cache: S == L).

  Rows padded to a multiple of SPLASH_BLOCK; padded positions get segment id -1 (real
  ones their segment id, or 0), so no real query sees them and each padded query
  sees at least itself. interpret None: the Pallas interpreter unless the program
  compiles for a TPU.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  b, l, h, k = q_BxLxHxK.shape
  g = k_BxGxSxK.shape[1]
  if interpret is None:
    interpret = _platform() != "tpu"
    if interpret:  # correct but orders of magnitude slower than xla: say so, once
      _log_once(f"attention: splash off a TPU ({_platform()}) runs in the Pallas "
                "interpreter (for tests; slow): use model.attention=auto or xla here.")
  lp = max(SPLASH_BLOCK, math.ceil(l / SPLASH_BLOCK) * SPLASH_BLOCK)
  seg_BxL = (jnp.zeros((b, l), jnp.int32) if segment_ids_BxL is None
             else segment_ids_BxL.astype(jnp.int32))
  pad = lp - l
  q_BxHxLxK = jnp.pad(q_BxLxHxK.astype(dtype).transpose(0, 2, 1, 3),
                      ((0, 0), (0, 0), (0, pad), (0, 0)))
  k_BxGxLxK = jnp.pad(k_BxGxSxK.astype(dtype), ((0, 0), (0, 0), (0, pad), (0, 0)))
  v_BxGxLxK = jnp.pad(v_BxGxSxK.astype(dtype), ((0, 0), (0, 0), (0, pad), (0, 0)))
  seg_BxL = jnp.pad(seg_BxL, ((0, 0), (0, pad)), constant_values=-1)

  def local(q, k_, v, seg):  # one shard's rows and heads
    kernel = _splash_kernel(q.shape[1], lp, window, interpret)
    return jax.vmap(lambda qq, kk, vv, ss: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(
        q=ss, kv=ss)))(q, k_, v, seg)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    out_BxHxLxK = local(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, seg_BxL)
  else:
    from jax.sharding import PartitionSpec as P

    batch = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
    batch_axes = batch if batch and b % math.prod(mesh.shape[a] for a in batch) == 0 else None
    model = mesh.shape.get("model", 1)
    heads = "model" if model > 1 and g % model == 0 else None
    spec = P(batch_axes, heads, None, None)
    out_BxHxLxK = jax.shard_map(local, in_specs=(spec, spec, spec, P(batch_axes, None)),
                                out_specs=spec, check_vma=False)(
                                    q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, seg_BxL)
  return out_BxHxLxK[:, :, :l].transpose(0, 2, 1, 3)


def cudnn_refusal(q_BxLxHxK, segment_ids_BxL, key_mask_BxS, dtype) -> str | None:
  """Why cuDNN's fused attention cannot take this call (None: it can)."""
  if _platform() not in ("gpu", "cuda"):
    return f"cudnn attention needs a GPU (compiling for {_platform()})"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cudnn attention takes bfloat16 / float16, not {jnp.dtype(dtype).name}"
  if segment_ids_BxL is not None or key_mask_BxS is not None:
    return ("cudnn attention: packed rows or padded keys need a mask array, which "
            "cuDNN refuses without a bias (jax#28974)")
  if q_BxLxHxK.shape[-1] > 128 or q_BxLxHxK.shape[-1] % 8:
    return f"cudnn attention: head_dim {q_BxLxHxK.shape[-1]} (cuDNN takes <= 128, a multiple of 8)"
  return None


def cudnn_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, *, window: int | None, dtype
                    ) -> jax.Array:
  """jax.nn.dot_product_attention's cuDNN kernel: causal (and a sliding window)."""
  out = jax.nn.dot_product_attention(
      q_BxLxHxK.astype(dtype), k_BxGxSxK.transpose(0, 2, 1, 3).astype(dtype),
      v_BxGxSxK.transpose(0, 2, 1, 3).astype(dtype), scale=1.0, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation="cudnn")
  return out


def attend(impl: str, q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, bias_BxLxS, *, dtype,
           cached: bool = False, segment_ids_BxL=None, key_mask_BxS=None,
           window: int | None = None, local=True) -> jax.Array:
  """Attention output [B, L, H, K] by implementation `impl` (IMPLEMENTATIONS).

  q is scaled already; k, v are head-major [B, G, S, K]; bias_BxLxS is the xla
  path's additive mask (it encodes causality, key padding, segments and the
  layer's window); segment_ids_BxL, key_mask_BxS, and `window` where `local` (a
  bool, or a traced flag: a scan over layers of two kinds, where lax.cond picks one
  of the two kernels) say the same to the kernels. With a KV cache (`cached`) every
  implementation is the einsum.
  """
  impl = resolve(impl)
  if cached or impl == "xla":
    return xla_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, bias_BxLxS, cached=cached,
                         dtype=dtype)
  if impl == "cudnn":
    why = cudnn_refusal(q_BxLxHxK, segment_ids_BxL, key_mask_BxS, dtype)
    if why is not None:
      _log_once(f"{why}: {FALLBACK}")
      return xla_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, bias_BxLxS, cached=False,
                           dtype=dtype)
    kernel = lambda w: cudnn_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, window=w,
                                       dtype=dtype)
    try:  # what cudnn_refusal does not foresee (compute capability, cuDNN version,
      # length rules) jax refuses while tracing: fall back then too
      return _by_layer(kernel, window, local)
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
      _log_once(f"cudnn attention refused this call ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}): {FALLBACK}")
      return xla_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, bias_BxLxS, cached=False,
                           dtype=dtype)
  else:
    seg = segment_ids_BxL
    if key_mask_BxS is not None:  # padded keys: a segment of their own (-1)
      base = jnp.zeros(key_mask_BxS.shape, jnp.int32) if seg is None else seg
      seg = jnp.where(key_mask_BxS.astype(bool), base, -1)
    kernel = lambda w: splash_attention(q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, seg, window=w,
                                        dtype=dtype).astype(dtype)
  return _by_layer(kernel, window, local)


def _by_layer(kernel, window: int | None, local) -> jax.Array:
  """kernel(window) on a local layer, kernel(None) on a global one; `local` a traced
  flag (a scan over layers of both kinds): lax.cond picks."""
  if window is None or isinstance(local, bool):
    return kernel(window if local else None)
  return jax.lax.cond(local, lambda: kernel(window), lambda: kernel(None))
