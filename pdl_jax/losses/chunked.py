"""Memory-efficient PDL from hidden states: chunked logits, custom VJPs.

Serves every loss whose per-token loss is w[label] * nll (ce, pdl, itf, face, tlat_exp,
tlat_chi2), or a function of the NLL and the cross-entropy against the uniform
distribution (focal, label smoothing: `chunked_token_stats`), through
`get_loss_from_hidden(name, **params)` (`registry.CHUNKABLE`: all but unlikelihood);
`chunked_argmax` gives FACE its predictions.

`pdl_loss(hidden @ unembed, ...)` materialises [N, V] float32 logits and, in the
backward pass, their [N, V] gradient; at V = 128k and N = 4096 that is 4 GB. Two
strategies avoid that:

"tokens" (the default; Liger-Kernel's fused linear cross-entropy, in JAX): a scan
over chunks of Cn rows of hidden. Every chunkable loss is sum(token_w * nll) / den
with token_w = mask * w[label] known before any logits exist, so under
differentiation the forward rule forms each chunk's dlogits = token_w * (softmax -
onehot) from the full [Cn, V] logits it just computed, then d hidden for those rows
and the chunk's share of d unembed; the backward pass only scales them by the
incoming cotangent (1 / den). 3 matmuls, as the naive path; temporaries are a few
[Cn, V] blocks and a float32 [D, V] d unembed. A plain call (evaluation) does the
logits matmul only. Rows that do not fill the last chunk are padded (masked).

"vocab" (chunked_vocab.py, which also holds the per-token statistics and the argmax):
a scan over vocabulary chunks of C columns with a running logsumexp, whose custom VJP
recomputes each chunk's logits in the backward pass. That is 4 matmuls (the logits
twice) but only [N, C] blocks besides d unembed, so the smallest temporaries.

Plain autodiff through either scan would save every chunk's logits as residuals and
save nothing; the custom VJPs are what make this cheap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pdl_jax.losses import pdl
from pdl_jax.losses import registry
# Re-exported: callers use chunked.<name> for the vocabulary-chunked functions too.
from pdl_jax.losses.chunked_vocab import (  # noqa: F401
    DEFAULT_CHUNK_SIZE, chunked_argmax, chunked_token_nll, chunked_token_stats)

# "tokens": rows of hidden in chunks, 3 matmuls; "vocab": vocabulary columns in
# chunks, 4 matmuls (the backward pass recomputes the logits) but smaller temporaries.
STRATEGIES = ("tokens", "vocab")
# The token-chunked path: as fast as the naive path (3 matmuls).
DEFAULT_STRATEGY = "tokens"


def _check_strategy(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}.")


# ---------------------------------------------------------------------------
# Token-chunked path: 3 matmuls, gradients formed in the forward pass.
# ---------------------------------------------------------------------------

# The default row chunk: DEFAULT_ROWS rows, fewer where a [Cn, V] float32 block would
# exceed MAX_ROW_BLOCK_BYTES (vocabularies above 262k).
DEFAULT_ROWS = 512
MAX_ROW_BLOCK_BYTES = 512 * 2**20


def default_row_chunk_size(vocab: int, max_block_bytes: int = MAX_ROW_BLOCK_BYTES) -> int:
  """Rows per token chunk: 512, or fewer so one [Cn, V] float32 block stays under
  `max_block_bytes`; a multiple of 8 (at least 8).

  Why a row count rather than a block size: each block adds its [D, V] product into
  the d unembed sum (one pass over D x V per block), so the number of blocks sets
  that cost. Measured (N=4096, D=1024, experiments/bench_fused.py): 512 rows gave
  0.99x the naive time at V = 32000 and 1.02x at V = 128000 (520 rows: 1.03-1.05x
  and 1.08x in noisier runs), while 128 rows gave 1.10-1.16x at V = 128000 and 2096
  rows 1.11x at V = 32000 (and 0.55 of the naive temporaries). On a batch split over
  several devices each block's [D, V] term is all-reduced (train.chunk_strategy
  picks "vocab" there).
  """
  rows = min(DEFAULT_ROWS, max_block_bytes // (4 * vocab))
  return max(8, rows // 8 * 8)


def _to_blocks(x_N: jax.Array, width: int) -> jax.Array:
  """[N, ...] padded with zeros to Cn * K rows, as K blocks [K, Cn, ...] of strided rows.

  Block k holds rows k, K + k, 2K + k, ...: the row order inside a block does not
  matter to the loss, and strided blocks keep a batch-sharded N axis sharded within
  every block (contiguous blocks would each live on one device, and the scan would
  gather all rows onto every device).
  """
  n = x_N.shape[0]
  num = -(-n // width)
  x_N = jnp.pad(x_N, ((0, num * width - n),) + ((0, 0),) * (x_N.ndim - 1))
  return jnp.swapaxes(x_N.reshape((width, num) + x_N.shape[1:]), 0, 1)


def _from_blocks(x_KxC: jax.Array, n: int) -> jax.Array:
  """Inverse of `_to_blocks`: [K, Cn, ...] back to the first n rows [n, ...]."""
  x = jnp.swapaxes(x_KxC, 0, 1)
  return x.reshape((-1,) + x.shape[2:])[:n]


def _row_blocks(hidden_NxD, labels_N, token_w_N, row_chunk_size):
  """hidden, labels and token weights as [K, Cn, ...] blocks (see `_to_blocks`).

  Padding rows are zero hidden states with label 0 and token weight 0: they add
  nothing to the loss or to d unembed, and their d hidden rows are cut off.
  """
  if row_chunk_size < 1:
    raise ValueError(f"row_chunk_size must be >= 1; got {row_chunk_size}.")
  width = min(row_chunk_size, hidden_NxD.shape[0])
  return tuple(_to_blocks(x, width) for x in (hidden_NxD, labels_N, token_w_N))


def _block_nll(hidden_CxD, unembed_DxV, labels_C):
  """A row block's float32 logits [Cn, V], logsumexp [Cn] and NLL [Cn]."""
  logits_CxV = jnp.matmul(hidden_CxD, unembed_DxV, preferred_element_type=jnp.float32)
  lse_C = jax.nn.logsumexp(logits_CxV, axis=1)
  label_logit_C = jnp.take_along_axis(logits_CxV, labels_C[:, None], axis=1)[:, 0]
  return logits_CxV, lse_C, lse_C - label_logit_C


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def token_chunked_weighted_nll(hidden_NxD: jax.Array, unembed_DxV: jax.Array,
                               labels_N: jax.Array, token_w_N: jax.Array,
                               row_chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """(sum(token_w * nll), nll [N]) of softmax(hidden @ unembed), row chunk by chunk.

  Undifferentiated (evaluation) this is one [Cn, D] x [D, V] matmul per chunk and
  nothing else. Under differentiation the forward rule also forms each chunk's
  dlogits = token_w * (softmax - onehot), d hidden for its rows and its share of
  d unembed, since token_w is known before any logits are; the backward pass then
  only scales them by the incoming cotangent: 3 matmuls in all, as the naive path.

  Only the first output is differentiable: the nll output is for logging and its
  cotangent is ignored (callers wrap it in stop_gradient).

  Args:
    hidden_NxD: [N, D] float32 or bfloat16.
    unembed_DxV: [D, V] same dtype.
    labels_N: [N] int ids in [0, V) (callers map invalid labels to 0 and mask them).
    token_w_N: [N] float32 per-token factor, mask * w[label] (0 for masked tokens).
    row_chunk_size: rows per chunk (static); need not divide N.

  Returns:
    float32 scalar and float32 [N].
  """
  return _token_forward(hidden_NxD, unembed_DxV, labels_N, token_w_N, row_chunk_size,
                        with_grads=False)[:2]


def _token_forward(hidden_NxD, unembed_DxV, labels_N, token_w_N, row_chunk_size,
                   with_grads):
  n = hidden_NxD.shape[0]
  d, vocab = unembed_DxV.shape
  token_w_N = token_w_N.astype(jnp.float32)
  blocks = _row_blocks(hidden_NxD, labels_N, token_w_N, row_chunk_size)

  def value_body(carry, xs):
    hidden_CxD, labels_C, _ = xs
    return carry, _block_nll(hidden_CxD, unembed_DxV, labels_C)[2]

  def grad_body(dunembed_DxV, xs):
    hidden_CxD, labels_C, token_w_C = xs
    logits_CxV, lse_C, nll_C = _block_nll(hidden_CxD, unembed_DxV, labels_C)
    onehot_CxV = labels_C[:, None] == jnp.arange(vocab)[None, :]
    dlogits_CxV = token_w_C[:, None] * (jnp.exp(logits_CxV - lse_C[:, None]) - onehot_CxV)
    dhidden_CxD = jnp.matmul(dlogits_CxV.astype(unembed_DxV.dtype), unembed_DxV.T,
                             preferred_element_type=jnp.float32)
    dunembed_DxV = dunembed_DxV + jnp.matmul(
        hidden_CxD.T, dlogits_CxV.astype(hidden_CxD.dtype),
        preferred_element_type=jnp.float32)
    return dunembed_DxV, (nll_C, dhidden_CxD)

  if with_grads:
    dunembed_DxV, (nll_KxC, dhidden_KxCxD) = jax.lax.scan(
        grad_body, jnp.zeros((d, vocab), jnp.float32), blocks)
    dhidden_NxD = _from_blocks(dhidden_KxCxD, n)
  else:
    _, nll_KxC = jax.lax.scan(value_body, None, blocks)
    dhidden_NxD = dunembed_DxV = None
  nll_N = _from_blocks(nll_KxC, n)
  return jnp.sum(token_w_N * nll_N), nll_N, dhidden_NxD, dunembed_DxV


def _token_fwd(hidden_NxD, unembed_DxV, labels_N, token_w_N, row_chunk_size):
  total, nll_N, dhidden_NxD, dunembed_DxV = _token_forward(
      hidden_NxD, unembed_DxV, labels_N, token_w_N, row_chunk_size, with_grads=True)
  # The dtypes ride along as zero-size arrays: residuals must be jax types.
  return (total, nll_N), (dhidden_NxD, dunembed_DxV, nll_N,
                          jnp.zeros((0,), hidden_NxD.dtype),
                          jnp.zeros((0,), unembed_DxV.dtype),
                          jnp.zeros((0,), token_w_N.dtype))


def _token_bwd(row_chunk_size, residuals, cotangents):
  del row_chunk_size
  dhidden_NxD, dunembed_DxV, nll_N, h_dtype, u_dtype, w_dtype = residuals
  g, _ = cotangents  # the nll output is not differentiable (see the docstring)
  g = g.astype(jnp.float32)
  return ((g * dhidden_NxD).astype(h_dtype.dtype), (g * dunembed_DxV).astype(u_dtype.dtype),
          None, (g * nll_N).astype(w_dtype.dtype))


token_chunked_weighted_nll.defvjp(_token_fwd, _token_bwd)


def _check(hidden_NxD, unembed_DxV, labels_N, weights_V, mask_N):
  if hidden_NxD.ndim != 2 or unembed_DxV.ndim != 2:
    raise ValueError(
        f"hidden must be [N, D] and unembed [D, V]; got shapes {hidden_NxD.shape} "
        f"and {unembed_DxV.shape}.")
  if hidden_NxD.shape[1] != unembed_DxV.shape[0]:
    raise ValueError(
        f"hidden's last axis ({hidden_NxD.shape[1]}) must equal unembed's first "
        f"axis ({unembed_DxV.shape[0]}).")
  for name, x in (("hidden", hidden_NxD), ("unembed", unembed_DxV)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point; got dtype {x.dtype}.")
  if not jnp.issubdtype(labels_N.dtype, jnp.integer):
    raise ValueError(f"labels must be integer token ids; got dtype {labels_N.dtype}.")
  if labels_N.shape != hidden_NxD.shape[:1]:
    raise ValueError(
        f"labels shape {labels_N.shape} must be [N] = {hidden_NxD.shape[:1]}.")
  if mask_N is not None and mask_N.shape != labels_N.shape:
    raise ValueError(f"mask shape {mask_N.shape} must equal labels shape {labels_N.shape}.")
  if weights_V is not None:
    pdl.check_weights(weights_V, unembed_DxV.shape[1], "unembed's last axis")


@functools.partial(jax.jit, static_argnames=("chunk_size", "reduction", "strategy",
                                             "row_chunk_size"))
def pdl_loss_from_hidden_and_aux(
    hidden_NxD: jax.Array,
    unembed_DxV: jax.Array,
    labels_N: jax.Array,
    weights_V: jax.Array | None,
    *,
    mask_N: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "weights",
    strategy: str = DEFAULT_STRATEGY,
    row_chunk_size: int | None = None,
) -> tuple[jax.Array, pdl.LossAux]:
  """`weighted_loss_and_aux(hidden @ unembed, ...)` without materialising the logits.

  Args:
    hidden_NxD: [N, D] final hidden states (float32 or bfloat16).
    unembed_DxV: [D, V] output projection (same dtype).
    labels_N: [N] integer ids; ids outside [0, V) are ignored like masked tokens.
    weights_V: [V] per-vocabulary weights (PDL, ITF, TLAT), or None for plain
      cross-entropy.
    mask_N: [N] 1 for target tokens; default all ones.
    chunk_size: strategy "vocab": vocabulary columns per chunk; need not divide V.
      Peak temporary memory is about N * chunk_size * 4 bytes a buffer.
    reduction: "weights" (divide by sum(mask * w[y]), PDL) or "tokens" (divide by
      the number of target tokens); see `loss.weighted_loss_and_aux`.
    strategy: "tokens" (rows of hidden in chunks of row_chunk_size, gradients
      formed in the forward pass: 3 matmuls, as the naive path, and temporaries of
      one [Cn, V] block plus a float32 [D, V] d unembed) or "vocab" (vocabulary
      chunks of chunk_size, logits recomputed in the backward pass: 4 matmuls, and
      temporaries of a few [N, chunk_size] blocks).
    row_chunk_size: strategy "tokens": rows per chunk; need not divide N. None:
      `default_row_chunk_size(V)` (512 rows, fewer above V = 262144).

  Returns:
    (loss, LossAux) as `loss.weighted_loss_and_aux`; same value and gradients (wrt
    hidden and unembed) as the unchunked loss, up to float32 summation order.
  """
  pdl.check_reduction(reduction)
  _check_strategy(strategy)
  _check(hidden_NxD, unembed_DxV, labels_N, weights_V, mask_N)
  mask_N, safe_labels_N = pdl.effective_mask(labels_N, unembed_DxV.shape[1], mask_N)
  if weights_V is None:
    token_w_N = mask_N
  else:
    token_w_N = mask_N * weights_V.astype(jnp.float32)[safe_labels_N]
  if strategy == "vocab":
    nll_N = chunked_token_nll(hidden_NxD, unembed_DxV, safe_labels_N, chunk_size)
    # Masked tokens can hold any finite NLL; zero them so 0 * value stays exact.
    nll_N = jnp.where(mask_N > 0, nll_N, 0.0)
    return pdl.reduce_token_losses(nll_N, mask_N, token_w_N, reduction=reduction)
  if row_chunk_size is None:
    row_chunk_size = default_row_chunk_size(unembed_DxV.shape[1])
  total, nll_N = token_chunked_weighted_nll(hidden_NxD, unembed_DxV, safe_labels_N,
                                            token_w_N, row_chunk_size)
  # The per-token NLL is only logged (aux.nll); the loss's gradient flows through
  # `total`, whose custom VJP already holds it.
  nll_N = jnp.where(mask_N > 0, jax.lax.stop_gradient(nll_N), 0.0)
  weight_sum, num_tokens = jnp.sum(token_w_N), jnp.sum(mask_N)
  den = weight_sum if reduction == "weights" else num_tokens
  # As loss.reduce_token_losses: exactly 0 with zero gradients when den == 0.
  loss = jnp.where(den > 0, total / jnp.where(den > 0, den, 1.0), 0.0)
  _, aux = pdl.reduce_token_losses(nll_N, mask_N, token_w_N, reduction=reduction)
  return loss, aux


def pdl_loss_from_hidden(
    hidden_NxD: jax.Array,
    unembed_DxV: jax.Array,
    labels_N: jax.Array,
    weights_V: jax.Array,
    *,
    mask_N: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "weights",
    strategy: str = DEFAULT_STRATEGY,
    row_chunk_size: int | None = None,
) -> jax.Array:
  """Scalar PDL from hidden states; see `pdl_loss_from_hidden_and_aux`."""
  return pdl_loss_from_hidden_and_aux(hidden_NxD, unembed_DxV, labels_N, weights_V,
                                      mask_N=mask_N, chunk_size=chunk_size,
                                      reduction=reduction, strategy=strategy,
                                      row_chunk_size=row_chunk_size)[0]


def get_loss_from_hidden(name: str, **params):
  """Chunked counterpart of `losses.get_loss`, for the names in `registry.CHUNKABLE`.

  Returns fn(hidden_NxD, unembed_DxV, labels_N, weights_V, *, mask_N, chunk_size,
  strategy, row_chunk_size) -> (loss, LossAux), equal to get_loss(name, **params)(
  hidden @ unembed, labels, weights_V, mask=mask_N); the keywords as
  `pdl_loss_from_hidden_and_aux`. "ce" ignores weights_V. A loss whose per-token
  loss is a function of the NLL and the uniform cross-entropy (focal, label
  smoothing: LossSpec.token_loss_from_stats) runs through `chunked_token_stats`
  (vocabulary chunks whatever `strategy` says); FACE is a weighted loss here (its
  weights come from its state, updated by the caller with `chunked_argmax`).

  Raises:
    ValueError: naming the loss, for a loss without a chunked path (unlikelihood:
      set loss.chunked=False), an unknown name, or parameters as `losses.get_loss`.
  """
  if not registry.supports_chunked(name):
    raise ValueError(
        f"loss {name!r} has no chunked path (loss.chunked=True supports only "
        f"{sorted(registry.CHUNKABLE)}): its per-token loss needs more of the logits than "
        "a few per-token statistics; set loss.chunked=False.")
  registry.get_loss(name, **params)  # validates the parameters
  spec = registry.spec(name)
  if spec.token_loss_from_stats is not None:
    token_loss_of = spec.token_loss_from_stats(**params)

    def from_stats(hidden_NxD, unembed_DxV, labels_N, weights_V=None, *, mask_N=None,
                   chunk_size=DEFAULT_CHUNK_SIZE, strategy=DEFAULT_STRATEGY,
                   row_chunk_size=None):
      del weights_V, row_chunk_size  # unweighted; always vocabulary chunks
      _check_strategy(strategy)
      _check(hidden_NxD, unembed_DxV, labels_N, None, mask_N)
      mask_N, safe_labels_N = pdl.effective_mask(labels_N, unembed_DxV.shape[1], mask_N)
      nll_N, unif_N = chunked_token_stats(hidden_NxD, unembed_DxV, safe_labels_N,
                                          chunk_size)
      # Masked tokens can hold any finite value; zero them so 0 * value stays exact.
      nll_N = jnp.where(mask_N > 0, nll_N, 0.0)
      token_loss_N = jnp.where(mask_N > 0, token_loss_of(nll_N, unif_N), 0.0)
      return pdl.reduce_token_losses(nll_N, mask_N, mask_N, reduction="tokens",
                                   token_loss=token_loss_N)
    return from_stats

  reduction = registry.resolve_reduction(name, params.get("reduction"))
  use_weights = spec.weighted  # CE's token weights are all 1

  def fn(hidden_NxD, unembed_DxV, labels_N, weights_V=None, *, mask_N=None,
         chunk_size=DEFAULT_CHUNK_SIZE, strategy=DEFAULT_STRATEGY, row_chunk_size=None):
    if use_weights and weights_V is None:
      raise ValueError(f"loss {name!r} needs weights_V; got None.")
    return pdl_loss_from_hidden_and_aux(
        hidden_NxD, unembed_DxV, labels_N, weights_V if use_weights else None,
        mask_N=mask_N, chunk_size=chunk_size, reduction=reduction, strategy=strategy,
        row_chunk_size=row_chunk_size)
  return fn
