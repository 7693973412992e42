"""Power-Law Decay Loss (PDL) and cross-entropy: pure math, no I/O.

PDL multiplies each target token's negative log-likelihood by a per-vocabulary weight

    w(t) = 1 / (freq(t) + eps) ** alpha

and, by default, normalises by the sum of the weights of the real (unmasked) target
tokens (reduction "weights"):

    loss = sum_i mask_i * w[y_i] * nll_i / sum_i mask_i * w[y_i].

With that reduction the loss is invariant to scaling all weights by a constant: the
scale of the weights cancels, so it neither raises nor lowers the loss or the
gradient. Reduction "tokens" divides by the number of target tokens instead, as the
ITF/FACE/TLAT papers do; then the scale of the weights multiplies the gradient (an
effective learning-rate factor). alpha = 0 (or weights all ones) is the masked mean
token cross-entropy under either reduction.

`pdl_jax.losses.get_loss(name, **params)` (the registry, losses/registry.py) returns
every loss of the project (CE, PDL and the baselines of `losses/baselines.py`) as fn(logits, labels, weights_V, *, mask) ->
(loss, LossAux), so one train step serves all.

Everything here is a pure function of arrays. Weight builders (`power_law_weights`,
`baselines.itf_weights`, `baselines.tlat_weights`) run once on the host (float64
numpy, returned as float32); the losses are jitted and work on arrays sharded over
any mesh (XLA inserts the collectives for a vocabulary-sharded logsumexp).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

FREQUENCY_KINDS = ("relative", "count")

# How a weighted loss is normalised: by the sum of mask * w[label] ("weights", PDL's
# choice) or by the number of target tokens ("tokens", as in ITF, FACE and TLAT).
REDUCTIONS = ("weights", "tokens")

# Above this ratio between the weight of a never-seen token and that of a token seen
# once, a single rare label can dominate a batch (see `effective_sample_size`).
_UNSEEN_RATIO_WARNING = 100.0


class LossAux(NamedTuple):
  """What a loss returns beside the optimised value, for logging.

  nll: masked mean of the plain token NLL (cross-entropy), comparable across alphas
    and across losses.
  weight_sum: sum of mask * w[label] (the "weights" reduction's denominator; equals
    num_tokens for losses without frequency weights).
  num_tokens: number of unmasked target tokens (the "tokens" reduction's denominator).
  ess: effective sample size of the batch's token weights (equals num_tokens for CE).
  """

  nll: jax.Array
  weight_sum: jax.Array
  num_tokens: jax.Array
  ess: jax.Array


# ---------------------------------------------------------------------------
# Weights from counts (host side, once per run).
# ---------------------------------------------------------------------------


def default_epsilon(total: float, frequency: str) -> float:
  """The add-one-smoothing epsilon: an unseen token weighs 2**alpha times a singleton.

  With raw counts that is eps = 1; with relative frequencies the same smoothing is
  eps = 1 / total, so both kinds give the same weights up to a constant factor.
  """
  _check_frequency(frequency)
  return 1.0 if frequency == "count" else 1.0 / float(total)


def power_law_weights(
    counts: np.ndarray,
    alpha: float,
    epsilon: float | None = None,
    *,
    frequency: str = "relative",
    normalize: bool = True,
    max_weight: float | None = None,
) -> np.ndarray:
  """Per-vocabulary PDL weights w(t) = 1 / (freq(t) + eps) ** alpha.

  Args:
    counts: int or float array [V], how often each token occurs in the corpus
      targets. Must be finite, non-negative and not all zero.
    alpha: decay exponent, >= 0. alpha = 0 gives all ones (plain cross-entropy).
    epsilon: smoothing added to the frequency, > 0, in the unit of `frequency`.
      None (the default) is the numerically safe add-one value (`default_epsilon`):
      an unseen token then weighs at most 2**alpha times a token seen once. The
      authors' reference setting (frequency="count", epsilon=1e-7) makes an unseen
      token weigh 1e7 at alpha = 1; it is reproduced when asked, with a warning.
    frequency: "relative" (count / total) or "count" (raw counts, as in the
      authors' reference code).
    normalize: rescale so that the mean weight over the corpus tokens,
      sum(counts * w) / sum(counts), is 1. With the default "weights" reduction
      the loss is invariant to this overall scale (it cancels in the ratio), so
      normalisation changes nothing there except what `max_weight` and
      `fix_token_weight`'s value mean (multiples of an average corpus token's
      weight). With the "tokens" reduction it matters: the scale then multiplies
      the gradient, and mean 1 keeps an average corpus token at weight 1, so the
      gradient's overall size stays comparable to CE's (the weighted loss itself
      is still larger than CE, rare tokens having larger NLL).
    max_weight: if given (> 0), clip the (normalised) weights to at most this,
      applied last, so a token never weighs more than max_weight (in units of the
      average corpus token when normalize=True).

  Returns:
    float32 numpy array [V].

  Raises:
    ValueError: naming the bad value, for alpha < 0, epsilon <= 0, counts that are
      not 1-D, negative, not finite or all zero, an unknown `frequency`, or
      max_weight <= 0.
  """
  counts_V = check_counts(counts)
  total = float(counts_V.sum())
  alpha = _check_alpha(alpha)
  _check_frequency(frequency)
  if epsilon is None:
    epsilon = default_epsilon(total, frequency)
  epsilon = _check_epsilon(epsilon)
  if max_weight is not None and not (
      math.isfinite(max_weight) and max_weight > 0):
    raise ValueError(f"max_weight must be > 0 and finite or None; got {max_weight}.")

  if alpha == 0.0:
    weights_V = np.ones_like(counts_V)
  else:
    freq_V = counts_V / total if frequency == "relative" else counts_V
    # Ratio of an unseen token's weight to a singleton's, in this unit.
    singleton = 1.0 / total if frequency == "relative" else 1.0
    unseen_ratio = ((singleton + epsilon) / epsilon) ** alpha
    if unseen_ratio > _UNSEEN_RATIO_WARNING:
      warnings.warn(
          f"power_law_weights: epsilon={epsilon:g} with frequency={frequency!r} "
          f"and alpha={alpha:g} makes an unseen token weigh {unseen_ratio:.3g} "
          "times a token seen once; one such label can dominate a batch (watch "
          "effective_sample_size). epsilon=None gives add-one smoothing; "
          "max_weight clips.", stacklevel=2)
    # log-space keeps tiny frequencies and large alphas from overflowing.
    weights_V = np.exp(-alpha * np.log(freq_V + epsilon))
    if normalize:
      weights_V = weights_V * (total / float(np.dot(counts_V, weights_V)))
  if max_weight is not None:
    weights_V = np.minimum(weights_V, max_weight)
  return weights_V.astype(np.float32)


def check_counts(counts) -> np.ndarray:
  """counts as float64 [V], or ValueError naming the bad shape, dtype or entry.

  Counts must be 1-D, real, finite, non-negative and not all zero.
  """
  counts_V = np.asarray(counts)
  if counts_V.ndim != 1:
    raise ValueError(f"counts must be 1-D [vocab]; got shape {counts_V.shape}.")
  if counts_V.size == 0:
    raise ValueError("counts is empty; expected one count per vocabulary entry.")
  if not np.issubdtype(counts_V.dtype, np.number) or np.issubdtype(
      counts_V.dtype, np.complexfloating):
    raise ValueError(f"counts must be real numbers; got dtype {counts_V.dtype}.")
  counts_V = counts_V.astype(np.float64)
  if not np.all(np.isfinite(counts_V)):
    bad = int(np.flatnonzero(~np.isfinite(counts_V))[0])
    raise ValueError(
        f"counts must be finite; counts[{bad}] = {counts_V[bad]}.")
  if np.any(counts_V < 0):
    bad = int(np.flatnonzero(counts_V < 0)[0])
    raise ValueError(
        f"counts must be >= 0; counts[{bad}] = {counts_V[bad]}.")
  if float(counts_V.sum()) <= 0:
    raise ValueError(
        f"counts are all zero (vocab size {counts_V.size}); expected a frequency "
        "pass over a non-empty corpus.")
  return counts_V


def _check_alpha(alpha: float) -> float:
  alpha = float(alpha)
  if not (math.isfinite(alpha) and alpha >= 0):
    raise ValueError(f"alpha must be >= 0 and finite; got {alpha}.")
  return alpha


def _check_epsilon(epsilon: float) -> float:
  epsilon = float(epsilon)
  if not (math.isfinite(epsilon) and epsilon > 0):
    raise ValueError(f"epsilon must be > 0 and finite; got {epsilon}.")
  return epsilon


def _check_frequency(frequency: str) -> None:
  if frequency not in FREQUENCY_KINDS:
    raise ValueError(
        f"frequency must be one of {FREQUENCY_KINDS}; got {frequency!r}.")


def effective_sample_size(token_weights: jax.Array) -> jax.Array:
  """Kish effective sample size (sum w)^2 / sum w^2 of a batch's token weights.

  Pass mask * w[label] for the batch. Equals the number of tokens when all weights
  are equal, and approaches 1 when one token holds all the weight. 0 for all-zero.
  """
  w = jnp.asarray(token_weights, jnp.float32)
  sum_w = jnp.sum(w)
  sum_w2 = jnp.sum(w * w)
  return jnp.where(sum_w2 > 0, sum_w * sum_w / jnp.where(sum_w2 > 0, sum_w2, 1.0),
                   0.0)


def fix_token_weight(weights_V, token_id: int, value: float, *, counts_V=None):
  """A copy of weights_V with weights_V[token_id] set to `value` (e.g. loss.eos_weight).

  Used to stop EOS from getting its frequency weight: EOS ends every target, so
  frequency weighting makes it one of the lightest tokens and the model learns to
  end late. `value` is in the units of the weights array: for PDL's normalised
  weights and FACE's (mean 1 over the vocabulary) 1 is an average token. For
  unnormalised weights (ITF, TLAT, PDL with normalize=False) pass the corpus counts:
  the value is then multiplied by the mean weight of a corpus token,
  sum(counts * w) / sum(counts) (computed before the fix), so 1 again means an
  average token.

  Works on host numpy arrays (returns float32 numpy) and on jax arrays, traced
  included (returns float32 jax), so it can follow `face_weights` in a train step.

  Raises:
    ValueError: naming the bad value, for weights that are not 1-D, a token id
      outside [0, V), a value that is negative or not finite, or counts of another
      length (or all zero).
  """
  is_numpy = not isinstance(weights_V, jax.Array)  # tracers are jax.Arrays
  xp = np if is_numpy else jnp
  weights_V = xp.asarray(weights_V, xp.float32)
  if weights_V.ndim != 1:
    raise ValueError(f"weights must be 1-D [vocab]; got shape {weights_V.shape}.")
  vocab = weights_V.shape[0]
  if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
    raise ValueError(f"token_id must be an int; got {token_id!r}.")
  if not 0 <= int(token_id) < vocab:
    raise ValueError(f"token_id must be in [0, {vocab}); got {token_id}.")
  value = float(value)
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"value (the fixed token weight) must be >= 0 and finite; got "
                     f"{value}.")
  if counts_V is not None:
    counts_V = check_counts(counts_V)
    if counts_V.shape[0] != vocab:
      raise ValueError(f"counts length ({counts_V.shape[0]}) must equal len(weights) "
                       f"({vocab}).")
    mean = xp.dot(xp.asarray(counts_V / counts_V.sum(), xp.float32), weights_V)
    value = value * mean
  if is_numpy:
    out_V = weights_V.copy()
    out_V[int(token_id)] = value
    return out_V
  return weights_V.at[int(token_id)].set(value)


# ---------------------------------------------------------------------------
# Losses (device side, jitted).
# ---------------------------------------------------------------------------


def _check_logits_labels(logits: jax.Array, labels: jax.Array,
                         mask: jax.Array | None) -> None:
  if logits.ndim < 1:
    raise ValueError(f"logits must have a vocabulary axis; got shape {logits.shape}.")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be floating point; got dtype {logits.dtype}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        f"labels must be integer token ids; got dtype {labels.dtype}.")
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"labels shape {labels.shape} must equal logits' leading shape "
        f"{logits.shape[:-1]} (logits shape {logits.shape}).")
  if mask is not None and mask.shape != labels.shape:
    raise ValueError(
        f"mask shape {mask.shape} must equal labels shape {labels.shape}.")


def check_weights(weights: jax.Array, vocab: int, vocab_source: str) -> None:
  """Raise ValueError unless weights is a 1-D [vocab] array."""
  if weights.ndim != 1:
    raise ValueError(f"weights must be 1-D [vocab]; got shape {weights.shape}.")
  if weights.shape[0] != vocab:
    raise ValueError(
        f"{vocab_source} ({vocab}) must equal len(weights) ({weights.shape[0]}).")


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood -log softmax(logits)[label], in float32.

  Args:
    logits: [..., V] float32 or bfloat16; upcast so the logsumexp accumulates in
      float32.
    labels: [...] integer ids in [0, V).

  Returns:
    float32 [...].
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  _check_logits_labels(logits, labels, None)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def effective_mask(labels: jax.Array, vocab: int,
                   mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Float32 mask with invalid labels removed, and labels safe to gather with.

  Labels outside [0, vocab) (e.g. -1 or -100 padding) count as masked: they are
  replaced by 0 so they can neither index out of range nor leak NaN into the
  gradient.
  """
  valid = (labels >= 0) & (labels < vocab)
  if mask is None:
    mask = valid.astype(jnp.float32)
  else:
    mask = jnp.where(valid, mask.astype(jnp.float32), 0.0)
  return mask, jnp.where(valid, labels, 0)


def _masked_nll(logits_NxV: jax.Array, labels_N: jax.Array,
                mask_N: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token NLL, the effective mask and the safe labels (see effective_mask)."""
  mask_N, safe_labels_N = effective_mask(labels_N, logits_NxV.shape[-1], mask_N)
  nll_N = optax.softmax_cross_entropy_with_integer_labels(
      logits_NxV.astype(jnp.float32), safe_labels_N)
  return nll_N, mask_N, safe_labels_N


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and exactly 0 (with zero gradient) when den == 0."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")


@functools.partial(jax.jit, static_argnames=("reduction",))
def weighted_loss_and_aux(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    mask: jax.Array | None = None,
    reduction: str = "weights",
) -> tuple[jax.Array, LossAux]:
  """sum(mask * w[y] * nll) / denominator, and the logging aux.

  The loss of PDL, ITF, FACE and TLAT, which differ only in their weights and
  default reduction. Arguments as `pdl_loss`, plus:

    reduction: "weights" divides by sum(mask * w[y]) (PDL; invariant to the scale
      of the weights), "tokens" by the number of target tokens (ITF, FACE, TLAT;
      the scale of the weights multiplies the gradient).
  """
  check_reduction(reduction)
  _check_logits_labels(logits, labels, mask)
  if weights is None:
    raise ValueError("weights must be a [vocab] array for a frequency-weighted loss; "
                     "got None.")
  check_weights(weights, logits.shape[-1], "logits' last axis")
  nll, mask, safe_labels = _masked_nll(logits, labels, mask)
  token_w = mask * weights.astype(jnp.float32)[safe_labels]
  return reduce_token_losses(nll, mask, token_w, reduction=reduction)


def pdl_loss_and_aux(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, LossAux]:
  """PDL value and logging aux; see `pdl_loss` for the arguments."""
  return weighted_loss_and_aux(logits, labels, weights, mask=mask, reduction="weights")


def reduce_token_losses(nll: jax.Array, mask: jax.Array, token_w: jax.Array, *,
                        reduction: str = "weights",
                        token_loss: jax.Array | None = None
                        ) -> tuple[jax.Array, LossAux]:
  """Weighted mean of per-token losses and the logging aux.

  Args:
    nll: [...] float32 per-token NLL (finite where mask > 0); logged as aux.nll.
    mask: [...] float32, 0 for tokens that do not count.
    token_w: [...] float32 mask * w[label] (equal to mask for CE).
    reduction: "weights" divides by sum(token_w), "tokens" by sum(mask).
    token_loss: [...] float32 per-token loss to reduce, if not the NLL itself
      (unlikelihood, focal, label smoothing).

  Returns:
    (sum(token_w * token_loss) / denominator, LossAux); exactly 0, with zero
    gradients, for an empty batch.
  """
  check_reduction(reduction)
  weight_sum = jnp.sum(token_w)
  num_tokens = jnp.sum(mask)
  per_token = nll if token_loss is None else token_loss
  den = weight_sum if reduction == "weights" else num_tokens
  loss = _safe_ratio(jnp.sum(token_w * per_token), den)
  mean_nll = _safe_ratio(jnp.sum(mask * nll), num_tokens)
  aux = LossAux(nll=mean_nll, weight_sum=weight_sum, num_tokens=num_tokens,
                ess=effective_sample_size(token_w))
  return loss, aux


def loss_denominator(aux: LossAux, reduction: str) -> jax.Array:
  """The denominator a loss was divided by: aux.weight_sum or aux.num_tokens.

  loss * loss_denominator(aux, reduction) is the numerator, to sum over micro-batches
  (gradient accumulation) or eval batches before one division; averaging per-batch
  ratios is biased when denominators differ.
  """
  check_reduction(reduction)
  return aux.weight_sum if reduction == "weights" else aux.num_tokens


def pdl_loss(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Power-Law Decay Loss: sum(mask * w[y] * nll) / sum(mask * w[y]).

  Args:
    logits: [..., V] float32 or bfloat16 (accumulated in float32).
    labels: [...] integer ids; ids outside [0, V) are ignored like masked tokens.
    weights: [V] per-vocabulary weights, e.g. from `power_law_weights`.
    mask: [...] 1 for target tokens, 0 for prompt and padding; default all ones.

  Returns:
    float32 scalar. Exactly 0.0, with zero gradients, when nothing is unmasked.

  Raises:
    ValueError at trace time, naming the bad shape or dtype.
  """
  return pdl_loss_and_aux(logits, labels, weights, mask=mask)[0]


@jax.jit
def cross_entropy_loss_and_aux(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, LossAux]:
  """Masked mean token cross-entropy and logging aux; see `cross_entropy_loss`."""
  _check_logits_labels(logits, labels, mask)
  nll, mask, _ = _masked_nll(logits, labels, mask)
  return reduce_token_losses(nll, mask, mask)


def cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Masked mean token cross-entropy: `pdl_loss` with all weights 1.

  Same arguments as `pdl_loss` minus `weights`.
  """
  return cross_entropy_loss_and_aux(logits, labels, mask=mask)[0]


LossFn = Callable[..., tuple[jax.Array, LossAux]]
