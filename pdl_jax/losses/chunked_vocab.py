"""The "vocab" chunking strategy: scans over vocabulary chunks, custom VJPs.

Everything here reads hidden @ unembed C vocabulary columns at a time, so no [N, V]
block ever exists (`chunked.py` holds the public API and the "tokens" strategy, and
re-exports these names): `chunked_token_nll`, the per-token NLL (the "vocab"
strategy of `chunked.pdl_loss_from_hidden_and_aux`); `chunked_token_stats`, the NLL
and the cross-entropy against the uniform distribution (focal, label smoothing);
`chunked_argmax`, the argmax per row (FACE's predictions, no gradient).

- forward: a scan over chunks keeps a running (max, sum) logsumexp and picks up the
  label logit in the chunk that holds it;
- backward (custom VJP): a second scan recomputes each chunk's logits from the saved
  hidden states and logsumexp, forms dlogits = g * (softmax - onehot) for that chunk
  only, and accumulates d hidden and the chunk's columns of d unembed.

That is 4 matmuls (the logits twice) but only [N, C] blocks besides d unembed, so
the smallest temporaries. A chunk size that does not divide V is handled by letting
the last chunk start at V - C and masking the columns an earlier chunk already
covered.

Plain autodiff through these scans would save every chunk's logits as residuals and
save nothing; the custom VJPs are what make this cheap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Vocabulary columns per chunk (the "vocab" strategy, per-token stats, the argmax).
DEFAULT_CHUNK_SIZE = 4096


def _chunk_layout(vocab: int, chunk_size: int) -> tuple[int, int]:
  """(chunk width C, number of chunks): C <= V, ceil(V / C) chunks."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
  width = min(chunk_size, vocab)
  return width, -(-vocab // width)


def _chunk(unembed_DxV: jax.Array, i: jax.Array, width: int
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunk i's columns, its start, and which of its columns are new.

  The last chunk is clamped to start at V - C; columns below i * C belong to the
  previous chunk and are marked not-new.
  """
  vocab = unembed_DxV.shape[1]
  start = jnp.minimum(i * width, vocab - width)
  w_DxC = jax.lax.dynamic_slice_in_dim(unembed_DxV, start, width, axis=1)
  new_C = start + jnp.arange(width) >= i * width
  return w_DxC, start, new_C


def _chunk_logits(hidden_NxD: jax.Array, w_DxC: jax.Array) -> jax.Array:
  # float32 accumulation whatever the input dtype (bfloat16 included).
  return jnp.matmul(hidden_NxD, w_DxC, preferred_element_type=jnp.float32)


def _forward(hidden_NxD, unembed_DxV, labels_N, chunk_size):
  """Per-token NLL [N] float32 and the logsumexp [N] (residual for backward)."""
  nll_N, _, lse_N = _stats_forward(hidden_NxD, unembed_DxV, labels_N, chunk_size,
                                   with_mean=False)
  return nll_N, lse_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_token_nll(hidden_NxD: jax.Array, unembed_DxV: jax.Array,
                      labels_N: jax.Array, chunk_size: int) -> jax.Array:
  """Per-token NLL of softmax(hidden @ unembed) without the [N, V] logits.

  Args:
    hidden_NxD: [N, D] float32 or bfloat16.
    unembed_DxV: [D, V] same dtype.
    labels_N: [N] int ids in [0, V) (callers map invalid labels to 0 and mask them).
    chunk_size: vocabulary columns per chunk (static).

  Returns:
    float32 [N].
  """
  return _forward(hidden_NxD, unembed_DxV, labels_N, chunk_size)[0]


def _fwd(hidden_NxD, unembed_DxV, labels_N, chunk_size):
  nll_N, lse_N = _forward(hidden_NxD, unembed_DxV, labels_N, chunk_size)
  return nll_N, (hidden_NxD, unembed_DxV, labels_N, lse_N)


def _bwd(chunk_size, residuals, g_N):
  hidden_NxD, unembed_DxV, labels_N, lse_N = residuals
  return _vocab_chunk_grads(hidden_NxD, unembed_DxV, labels_N, lse_N, g_N, None,
                            chunk_size)


chunked_token_nll.defvjp(_fwd, _bwd)


# ---------------------------------------------------------------------------
# Per-token statistics beyond the label's NLL (focal, label smoothing) and the
# argmax (FACE), by vocabulary chunks.
# ---------------------------------------------------------------------------


def _stats_forward(hidden_NxD, unembed_DxV, labels_N, chunk_size, with_mean=True):
  """(nll [N], uniform cross-entropy [N] = lse - mean logit, lse [N]), float32, by
  one scan over vocabulary chunks (a running (max, sum) logsumexp, the label logit
  picked up in the chunk that holds it); with_mean=False skips the logit sum and
  returns None for the uniform term (`chunked_token_nll`)."""
  n = hidden_NxD.shape[0]
  vocab = unembed_DxV.shape[1]
  width, num_chunks = _chunk_layout(vocab, chunk_size)

  def body(carry, i):
    max_N, sum_N, label_logit_N, logit_sum_N = carry
    w_DxC, start, new_C = _chunk(unembed_DxV, i, width)
    raw_NxC = _chunk_logits(hidden_NxD, w_DxC)
    logits_NxC = jnp.where(new_C[None, :], raw_NxC, -jnp.inf)
    new_max_N = jnp.maximum(max_N, jnp.max(logits_NxC, axis=1))
    sum_N = (sum_N * jnp.exp(max_N - new_max_N)
             + jnp.sum(jnp.exp(logits_NxC - new_max_N[:, None]), axis=1))
    if with_mean:
      logit_sum_N = logit_sum_N + jnp.sum(jnp.where(new_C[None, :], raw_NxC, 0.0), axis=1)
    offset_N = labels_N - start
    here_N = (offset_N >= 0) & (offset_N < width) & (labels_N >= i * width)
    picked_N = jnp.take_along_axis(
        raw_NxC, jnp.clip(offset_N, 0, width - 1)[:, None], axis=1)[:, 0]
    label_logit_N = label_logit_N + jnp.where(here_N, picked_N, 0.0)
    return (new_max_N, sum_N, label_logit_N, logit_sum_N), None

  zeros = jnp.zeros((n,), jnp.float32)
  (max_N, sum_N, label_logit_N, logit_sum_N), _ = jax.lax.scan(
      body, (jnp.full((n,), -jnp.inf, jnp.float32), zeros, zeros, zeros),
      jnp.arange(num_chunks))
  lse_N = max_N + jnp.log(sum_N)
  unif_N = lse_N - logit_sum_N / vocab if with_mean else None
  return lse_N - label_logit_N, unif_N, lse_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_token_stats(hidden_NxD: jax.Array, unembed_DxV: jax.Array,
                        labels_N: jax.Array, chunk_size: int
                        ) -> tuple[jax.Array, jax.Array]:
  """(nll [N], uniform [N]) of softmax(hidden @ unembed) without the [N, V] logits:
  the label's NLL and the cross-entropy against the uniform distribution over the V
  columns, lse - mean logit (what label smoothing mixes in). Both differentiable:
  d/dlogits = g_nll * (softmax - onehot) + g_unif * (softmax - 1 / V), formed chunk
  by chunk in the backward pass from the saved logsumexp (4 matmuls in all, as the
  "vocab" strategy). A per-token loss that is any function of these two (focal:
  (1 - e^-nll)^gamma * nll) is differentiated through them by the chain rule.

  Args: as `chunked_token_nll`. Returns: two float32 [N].
  """
  nll_N, unif_N, _ = _stats_forward(hidden_NxD, unembed_DxV, labels_N, chunk_size)
  return nll_N, unif_N


def _stats_fwd(hidden_NxD, unembed_DxV, labels_N, chunk_size):
  nll_N, unif_N, lse_N = _stats_forward(hidden_NxD, unembed_DxV, labels_N, chunk_size)
  return (nll_N, unif_N), (hidden_NxD, unembed_DxV, labels_N, lse_N)


def _vocab_chunk_grads(hidden_NxD, unembed_DxV, labels_N, lse_N, g_nll_N, g_unif_N,
                       chunk_size):
  """(d hidden, d unembed, None) of sum(g_nll * nll + g_unif * uniform) by a second
  scan over vocabulary chunks: each chunk's logits recomputed from the saved hidden
  states and logsumexp, dlogits = (g_nll + g_unif) p - g_nll onehot - g_unif / V for
  that chunk only (g_unif None: the NLL alone, `chunked_token_nll`), accumulated into
  d hidden and the chunk's columns of d unembed."""
  d, vocab = unembed_DxV.shape
  width, num_chunks = _chunk_layout(vocab, chunk_size)
  g_nll_N = g_nll_N.astype(jnp.float32)
  g_p_N = g_nll_N if g_unif_N is None else g_nll_N + g_unif_N.astype(jnp.float32)

  def body(carry, i):
    dhidden_NxD, dunembed_DxV = carry
    w_DxC, start, new_C = _chunk(unembed_DxV, i, width)
    logits_NxC = _chunk_logits(hidden_NxD, w_DxC)
    probs_NxC = jnp.where(new_C[None, :], jnp.exp(logits_NxC - lse_N[:, None]), 0.0)
    onehot_NxC = (labels_N[:, None] == start + jnp.arange(width)[None, :]) & new_C[None, :]
    dlogits_NxC = g_p_N[:, None] * probs_NxC - g_nll_N[:, None] * onehot_NxC
    if g_unif_N is not None:
      dlogits_NxC = dlogits_NxC - jnp.where(
          new_C[None, :], g_unif_N.astype(jnp.float32)[:, None] / vocab, 0.0)
    dhidden_NxD = dhidden_NxD + jnp.matmul(
        dlogits_NxC.astype(w_DxC.dtype), w_DxC.T, preferred_element_type=jnp.float32)
    dw_DxC = jnp.matmul(hidden_NxD.T, dlogits_NxC.astype(hidden_NxD.dtype),
                        preferred_element_type=jnp.float32)
    # Add, not overwrite: the clamped last chunk overlaps the previous one, and its
    # not-new columns carry zero gradient.
    old_DxC = jax.lax.dynamic_slice_in_dim(dunembed_DxV, start, width, axis=1)
    dunembed_DxV = jax.lax.dynamic_update_slice_in_dim(
        dunembed_DxV, old_DxC + dw_DxC, start, axis=1)
    return (dhidden_NxD, dunembed_DxV), None

  init = (jnp.zeros(hidden_NxD.shape, jnp.float32), jnp.zeros((d, vocab), jnp.float32))
  (dhidden_NxD, dunembed_DxV), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  return (dhidden_NxD.astype(hidden_NxD.dtype), dunembed_DxV.astype(unembed_DxV.dtype),
          None)


def _stats_bwd(chunk_size, residuals, cotangents):
  hidden_NxD, unembed_DxV, labels_N, lse_N = residuals
  g_nll_N, g_unif_N = cotangents
  return _vocab_chunk_grads(hidden_NxD, unembed_DxV, labels_N, lse_N, g_nll_N, g_unif_N,
                            chunk_size)


chunked_token_stats.defvjp(_stats_fwd, _stats_bwd)


def chunked_argmax(hidden_NxD: jax.Array, unembed_DxV: jax.Array,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """argmax of hidden @ unembed per row [N] (int32), by vocabulary chunks, as
  jnp.argmax of the full logits (the first index among ties); no gradient. FACE's
  prediction counts from hidden states."""
  hidden_NxD, unembed_DxV = (jax.lax.stop_gradient(x) for x in (hidden_NxD, unembed_DxV))
  n = hidden_NxD.shape[0]
  width, num_chunks = _chunk_layout(unembed_DxV.shape[1], chunk_size)

  def body(carry, i):
    best_N, arg_N = carry
    w_DxC, start, new_C = _chunk(unembed_DxV, i, width)
    logits_NxC = jnp.where(new_C[None, :], _chunk_logits(hidden_NxD, w_DxC), -jnp.inf)
    top_N = jnp.max(logits_NxC, axis=1)
    better_N = top_N > best_N  # strictly: an earlier chunk keeps its tie
    arg_N = jnp.where(better_N, start + jnp.argmax(logits_NxC, axis=1), arg_N)
    return (jnp.maximum(best_N, top_N), arg_N), None

  (_, arg_N), _ = jax.lax.scan(
      body, (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32)),
      jnp.arange(num_chunks))
  return arg_N
