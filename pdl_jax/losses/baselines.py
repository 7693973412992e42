"""Frequency-aware and anti-dullness baselines PDL is compared against: pure math.

Each is chosen by `config.loss.name` through `losses.get_loss`, which returns every
loss as fn(logits, labels, weights_V, *, mask) -> (loss, LossAux).

Frequency-weighted, loss = sum(mask * w[y] * nll) / denominator (the shared
`loss.weighted_loss_and_aux`); here are their weights:

- ITF, Nakamura et al. 2019, "Another Diversity-Promoting Objective Function for
  Neural Dialogue Generation" (arXiv 1811.08100): static w = 1 / count ** lambda,
  loss divided by the number of target tokens. `itf_weights`.
- FACE, Jiang et al. 2019, "Improving Neural Response Diversity with
  Frequency-Aware Cross-Entropy Loss" (arXiv 1902.09191), output-frequency
  pre-weighting: w = 1 - RF / max RF from running counts of the model's own argmax
  predictions, rescaled to mean 1 over the vocabulary, loss divided by the number
  of tokens. `face_count_update`, `face_weights`.
- TLAT, Gu et al. 2020, "Token-level Adaptive Training for Neural Machine
  Translation" (EMNLP 2020, arXiv 2010.04380): static exponential or chi-square
  weights of the median-normalised count, in [1, e]. `tlat_weights`.

Others (no frequency weights; `weights_V` is ignored):

- Unlikelihood, Welleck et al. 2019, "Neural Text Generation with Unlikelihood
  Training" (arXiv 1908.04319), token level. `unlikelihood_loss_and_aux`.
- Focal, Lin et al. 2017, "Focal Loss for Dense Object Detection" (arXiv
  1708.02002), over the vocabulary softmax. `focal_loss_and_aux`.
- Label smoothing (Szegedy et al. 2016, arXiv 1512.00567) via optax.
  `label_smoothing_loss_and_aux`.

Weight builders from counts are float64 numpy returning float32 (like
`loss.power_law_weights`) so the arrays can be stored beside checkpoints; FACE's
run on device inside the train step. The losses are jitted, accumulate in float32
for bfloat16 logits, ignore labels outside [0, V) like masked tokens, give exactly
0 with zero gradients for an all-masked batch, and raise ValueError naming the bad
value at trace time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pdl_jax.losses import pdl

TLAT_KINDS = ("exp", "chi2")

# TLAT's T: the default of the authors' code (`--adaptive-T 1.0`).
TLAT_DEFAULT_T = 1.0

# Welleck et al.'s clamp of 1 - p(candidate): keeps -log(1 - p) <= log(1e5) and its
# gradient finite when the model puts all its mass on a candidate.
_UL_MIN_ONE_MINUS_P = 1e-5

_INT32_MAX = np.iinfo(np.int32).max


# ---------------------------------------------------------------------------
# Static weights from counts (host side, once per run).
# ---------------------------------------------------------------------------


def _check_nonneg(name: str, value: float) -> float:
  value = float(value)
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"{name} must be >= 0 and finite; got {value}.")
  return value


def itf_weights(counts_V, lam: float) -> np.ndarray:
  """ITF weights w(c) = 1 / count(c) ** lam (Nakamura et al. 2019), not normalised.

  Used with the "tokens" reduction, as in the paper, so the weights' scale is the
  scale of the loss: every weight is in (0, 1], 1 for a token seen once.

  Args:
    counts_V: [V] counts of each token in the train targets (the frequency pass).
    lam: exponent lambda >= 0; 0 gives all ones (CE).

  Returns:
    float32 numpy [V]. Unseen tokens (count 0) get the weight of a token seen once
    (1): the formula is infinite there, and such a token can only be a label at
    eval time, where the largest finite weight is the honest choice.

  Raises:
    ValueError: naming the bad value (counts as in `loss.power_law_weights`; lam
      negative or not finite).
  """
  counts_V = pdl.check_counts(counts_V)
  lam = _check_nonneg("lam (itf_lambda)", lam)
  # log-space: large counts and lambdas neither overflow nor underflow to 0 early.
  return np.exp(-lam * np.log(np.maximum(counts_V, 1.0))).astype(np.float32)


def tlat_weights(counts_V, kind: str, A: float | None = None,
                 T: float = TLAT_DEFAULT_T) -> np.ndarray:
  """TLAT weights of Gu et al. 2020 from counts.

  With x = count / median count (the median over tokens seen at least once, as
  the authors' code takes it from fairseq's dictionary of seen tokens):

    "exp":  w = A * exp(-T * x) + 1
    "chi2": w = A * x**2 * exp(-T * x) + 1

  A=None (default) sets A as the authors' code does: the largest weight of a seen
  token is e, i.e. w = (e - 1) * f / max_seen f + 1 with f the x-dependent factor,
  so every weight is in [1, e] (frequent tokens near 1). An explicit A uses the
  paper's formula as written. T defaults to the code's default, 1.

  Unseen tokens (count 0; not in the code's dictionary) follow the formula at
  x = 0, capped at e when A=None: e for "exp" (the formula would exceed the
  rarest seen token's e), and 1 for "chi2" (its curve vanishes at 0). They can be
  labels only at eval time.

  Deviations from the paper/code: no "weight drop" (the code resets a token's
  weight to 1 with probability 0.1 during training; our losses take no rng, and a
  static array is what can be stored beside a checkpoint); special tokens are not
  forced to weight 1 here (fairseq's four specials are; use
  `loss.fix_token_weight` for EOS); the median of an even number of seen tokens is
  the mean of the middle two (the code takes one of them).

  Returns:
    float32 numpy [V], each weight >= 1.

  Raises:
    ValueError: naming the bad value (counts as in `loss.power_law_weights`; an
      unknown kind; A negative or not finite; T <= 0 or not finite).
  """
  counts_V = pdl.check_counts(counts_V)
  if kind not in TLAT_KINDS:
    raise ValueError(f"kind must be one of {TLAT_KINDS}; got {kind!r}.")
  if A is not None:
    A = _check_nonneg("A (tlat_A)", A)
  T = float(T)
  if not (math.isfinite(T) and T > 0):
    raise ValueError(f"T (tlat_T) must be > 0 and finite; got {T}.")
  x_V = counts_V / float(np.median(counts_V[counts_V > 0]))
  # log f, so exp(-T x) of very frequent tokens underflows only after the max.
  with np.errstate(divide="ignore"):
    log_f_V = -T * x_V + (2.0 * np.log(x_V) if kind == "chi2" else 0.0)
  if A is None:
    # f / max f over seen tokens: 1 for the heaviest seen token.
    f_V = np.exp(log_f_V - log_f_V[counts_V > 0].max())
    return np.minimum((math.e - 1.0) * f_V + 1.0, math.e).astype(np.float32)
  return (A * np.exp(log_f_V) + 1.0).astype(np.float32)


# ---------------------------------------------------------------------------
# FACE: running prediction counts (train state) and their weights (device side).
# ---------------------------------------------------------------------------


@jax.jit
def face_count_update(pred_counts_V: jax.Array, logits: jax.Array, labels: jax.Array,
                      mask: jax.Array | None = None) -> jax.Array:
  """FACE's running counts plus this batch's argmax predictions at target positions.

  Call before `face_weights` in the same step: FACE's code updates the counts with
  the batch's predictions and then weights that batch's loss.

  int32, not float32: counts are exact (float32 stops counting one by one at 2**24,
  which a frequent token passes within a few thousand steps), and integer sums are
  independent of reduction order, so data-parallel runs and resumes are bitwise
  reproducible. The add saturates at 2**31 - 1 per token instead of wrapping
  negative; that many predictions of one token is far beyond our runs.

  Deviation from FACE's code: it counts the teacher-forced argmax at every decoder
  step up to and including the first predicted END (padding steps included when no
  END comes first); here only target positions count (mask > 0 and a label in
  [0, V)), so prompts and padding never move the weights.

  Args:
    pred_counts_V: [V] int32 running counts (zeros at the start of training).
    logits: [..., V] float32 or bfloat16 (no gradient flows through the argmax).
    labels: [...] integer ids; positions with ids outside [0, V) do not count.
    mask: [...] 1 for target tokens; default all ones.

  Returns:
    int32 [V].

  Raises:
    ValueError at trace time, naming the bad shape or dtype.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  pdl._check_logits_labels(logits, labels, mask)
  vocab = logits.shape[-1]
  if pred_counts_V.dtype != jnp.int32:
    raise ValueError(f"pred_counts must be int32; got dtype {pred_counts_V.dtype}.")
  pdl.check_weights(pred_counts_V, vocab, "logits' last axis")
  preds = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
  return face_count_update_from_preds(pred_counts_V, preds, labels, mask)


def face_count_update_from_preds(pred_counts_V: jax.Array, preds: jax.Array,
                                 labels: jax.Array, mask: jax.Array | None = None
                                 ) -> jax.Array:
  """`face_count_update` from the argmax predictions [...] themselves (the chunked
  path's `chunked_argmax` of the hidden states): the same counts, no logits."""
  vocab = pred_counts_V.shape[0]
  mask, _ = pdl.effective_mask(labels, vocab, mask)
  batch_V = jnp.zeros((vocab,), jnp.int32).at[preds.reshape(-1)].add(
      (mask > 0).astype(jnp.int32).reshape(-1))
  return pred_counts_V + jnp.minimum(batch_V, _INT32_MAX - pred_counts_V)


@jax.jit
def face_weights(pred_counts_V: jax.Array) -> jax.Array:
  """FACE pre-weights from prediction counts: w = 1 - RF / max RF, mean 1 over V.

  RF = counts / sum(counts), so RF / max RF = counts / max counts (computed that
  way: no sum that could overflow). The most predicted token gets 0, tokens never
  predicted the most. Rescaled as w * V / sum(w), as in FACE's code.

  Degenerate counts give all ones (CE): all zero (the start of training), or all
  equal (every weight would be 0). FACE's code divides by zero there.

  Args:
    pred_counts_V: [V] counts (int32 from `face_count_update`, or float).

  Returns:
    float32 [V], mean 1.
  """
  c_V = jnp.asarray(pred_counts_V).astype(jnp.float32)
  if c_V.ndim != 1:
    raise ValueError(f"pred_counts must be 1-D [vocab]; got shape {c_V.shape}.")
  top = jnp.max(c_V)
  # (top - c) / top rather than 1 - c / top: exactly 0 for the top token, never
  # negative (XLA may turn the division into a multiply by a reciprocal).
  w_V = (top - c_V) / jnp.where(top > 0, top, 1.0)
  total = jnp.sum(w_V)
  return jnp.where(total > 0, w_V * (c_V.shape[0] / jnp.where(total > 0, total, 1.0)),
                   1.0)


# ---------------------------------------------------------------------------
# Losses without frequency weights (device side, jitted).
# ---------------------------------------------------------------------------


def _unweighted(logits, labels, mask):
  """Checks, float32 log-softmax, NLL, effective mask and safe labels."""
  pdl._check_logits_labels(logits, labels, mask)
  vocab = logits.shape[-1]
  mask, safe = pdl.effective_mask(labels, vocab, mask)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return logp, nll, mask, safe


@functools.partial(jax.jit, static_argnames=("ul_alpha",))
def unlikelihood_loss_and_aux(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    ul_alpha: float = 1.0,
) -> tuple[jax.Array, pdl.LossAux]:
  """Token-level unlikelihood (Welleck et al. 2019), mean over target tokens.

    loss_t = nll_t - ul_alpha * sum_{c in C_t} log(1 - p_t(c)),

  C_t = the distinct labels of the earlier target positions (mask > 0, valid
  label) of the same sequence, other than y_t. The last axis of `labels` is the
  sequence; each leading index is a separate sequence, so candidates never come
  from another row (the authors' code takes them from the whole flattened batch).
  1 - p is clamped at 1e-5 as in their code (whose candidates also include the
  padding id; ours do not).

  Computed from [..., L, L] gathers of the log-probabilities rather than a
  [..., L, V] candidate mask: s is a candidate of t when s < t, s is a target
  position, y_s != y_t, and s is the first target position holding y_s (so a
  repeated token counts once).

  Args:
    logits: [..., L, V] float32 or bfloat16 (accumulated in float32).
    labels: [..., L] integer ids; ids outside [0, V) are ignored like masked tokens.
    mask: [..., L] 1 for target tokens; default all ones.
    ul_alpha: weight of the unlikelihood term, >= 0 (0 is CE).

  Returns:
    (loss, LossAux); aux.nll is the plain token NLL.
  """
  ul_alpha = _check_nonneg("ul_alpha", ul_alpha)
  labels = jnp.asarray(labels)
  if labels.ndim < 1:
    raise ValueError(f"labels must have a sequence axis; got shape {labels.shape}.")
  logp, nll, mask, safe = _unweighted(logits, labels, mask)
  seq = labels.shape[-1]
  on = mask > 0
  same = safe[..., :, None] == safe[..., None, :]          # [..., t, s]
  before = jnp.tril(jnp.ones((seq, seq), bool), k=-1)       # s < t
  # s is the first target position with its token: no earlier target s' holds it.
  first = on & ~jnp.any(same & before & on[..., None, :], axis=-1)
  cand = on[..., :, None] & first[..., None, :] & before & ~same
  idx = jnp.broadcast_to(safe[..., None, :], safe.shape + (seq,))
  logp_cand = jnp.take_along_axis(logp, idx, axis=-1)       # log p_t(y_s)
  one_minus_p = jnp.maximum(-jnp.expm1(logp_cand), _UL_MIN_ONE_MINUS_P)
  ul = -jnp.sum(jnp.where(cand, jnp.log(one_minus_p), 0.0), axis=-1)
  token_loss = nll + ul_alpha * ul
  return pdl.reduce_token_losses(nll, mask, mask, reduction="tokens",
                               token_loss=jnp.where(on, token_loss, 0.0))


@functools.partial(jax.jit, static_argnames=("gamma",))
def focal_loss_and_aux(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    gamma: float = 2.0,
) -> tuple[jax.Array, pdl.LossAux]:
  """Focal loss over the vocabulary softmax, mean over target tokens.

    loss_t = -(1 - p_t)**gamma * log p_t      (Lin et al. 2017)

  gamma = 0 is CE. The factor is differentiated, as in the paper (no stop-gradient).
  optax.sigmoid_focal_loss is the binary version, not this.

  Args: as `unlikelihood_loss_and_aux`, with gamma >= 0 (the paper's default 2).
  """
  gamma = _check_nonneg("gamma", gamma)
  _, nll, mask, _ = _unweighted(logits, labels, mask)
  return pdl.reduce_token_losses(nll, mask, mask, reduction="tokens",
                               token_loss=focal_token_loss(nll, gamma))


def focal_token_loss(nll: jax.Array, gamma: float) -> jax.Array:
  """-(1 - p_t)**gamma * log p_t from the token NLL (p_t = exp(-nll)); differentiable
  in nll (the chunked path's chain rule goes through it)."""
  one_minus_p = -jnp.expm1(-nll)  # accurate 1 - p_t near p_t = 1
  if gamma == 0.0:
    return nll
  # x ** gamma with a zero gradient (not 0 * inf) where p_t rounds to 1.
  pos = one_minus_p > 0
  return jnp.where(pos, jnp.where(pos, one_minus_p, 1.0) ** gamma, 0.0) * nll


def label_smoothing_token_loss(nll: jax.Array, uniform: jax.Array,
                               smoothing: float) -> jax.Array:
  """(1 - smoothing) * nll_t + smoothing * mean_c(-log p_t(c)) from the token NLL and
  the cross-entropy against the uniform distribution (lse - mean logit): what
  optax.smooth_labels + softmax_cross_entropy give, for the chunked path."""
  return (1.0 - smoothing) * nll + smoothing * uniform


@functools.partial(jax.jit, static_argnames=("smoothing",))
def label_smoothing_loss_and_aux(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    smoothing: float = 0.1,
) -> tuple[jax.Array, pdl.LossAux]:
  """Label-smoothed cross-entropy, mean over target tokens:

    (1 - smoothing) * nll_t + smoothing * mean_c(-log p_t(c)),

  via optax.smooth_labels and optax.softmax_cross_entropy.

  Args: as `unlikelihood_loss_and_aux`, with smoothing in [0, 1) (0 is CE).
  """
  smoothing = float(smoothing)
  if not (math.isfinite(smoothing) and 0 <= smoothing < 1):
    raise ValueError(f"smoothing must be in [0, 1); got {smoothing}.")
  _, nll, mask, safe = _unweighted(logits, labels, mask)
  targets = optax.smooth_labels(
      jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32), smoothing)
  token_loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  return pdl.reduce_token_losses(nll, mask, mask, reduction="tokens",
                               token_loss=jnp.where(mask > 0, token_loss, 0.0))


def unweighted(fn, key: str, default: float):
  """Factory of a loss without frequency weights: make(**{key: value}) -> fn(logits,
  labels, weights_V=None, *, mask) -> (loss, LossAux), `value` checked at once (a clear
  error at config time, not at the first step's trace); None means `default`."""
  def make(**params) -> pdl.LossFn:
    value = params.get(key)
    value = default if value is None else float(value)
    if key == "smoothing":
      if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"smoothing must be in [0, 1); got {value}.")
    else:
      _check_nonneg(key, value)

    def loss_fn(logits, labels, weights=None, *, mask=None):
      del weights  # No frequency weights.
      return fn(logits, labels, mask=mask, **{key: value})
    return loss_fn
  return make
