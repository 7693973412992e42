"""PDL's free control: a decoding-time frequency bias on a CE model's logits.

For one context x, the distribution q that minimises PDL's population objective
E_{y~p(.|x)}[w(y) * (-log q(y|x))] is q(y|x) proportional to w(y) p(y|x): with
PDL's w = (freq + eps)^-alpha, the CE optimum with -alpha * log(freq + eps) added to
its logits (logit adjustment, Menon et al., 2021). So decoding a CE model with the
bias -beta * log(freq + eps), beta = alpha, is what PDL would give at convergence
with an unlimited model, for the price of no training run (docs/losses.md).

Host-side numpy, once per evaluation: the bias is a [V] float32 vector added to the
logits before each choice (pdl_jax.eval.decode).
"""

from __future__ import annotations

import math

import numpy as np

from pdl_jax.losses import pdl


def frequency_bias(counts, beta: float, epsilon: float | None = None, *,
                   frequency: str = "relative", vocab_size: int | None = None
                   ) -> np.ndarray:
  """-beta * log(freq(t) + eps) per token, float32 [vocab_size].

  freq and eps exactly as `pdl.power_law_weights` makes PDL's weights from the same
  counts (relative frequencies or raw counts; eps None: add-one smoothing), so
  the bias equals log(power_law_weights(counts, alpha=beta)) up to a constant (the
  weights' normalisation, which a softmax ignores).

  Args:
    counts: [V] token counts of the run's train targets (its token stats).
    beta: the bias's strength, >= 0 (0: plain decoding).
    epsilon, frequency: as `pdl.power_law_weights`.
    vocab_size: the model's vocabulary, >= V; the rows past the counts (a
      pretrained embedding's padding, never generated) get bias 0.

  Raises:
    ValueError: naming the bad value (beta < 0 or not finite, bad counts, epsilon
      or frequency, a vocab_size below the counts' length).
  """
  counts_V = pdl.check_counts(counts)
  beta = float(beta)
  if not (math.isfinite(beta) and beta >= 0):
    raise ValueError(f"beta (the decoding bias strength) must be >= 0 and finite; got "
                     f"{beta}.")
  if frequency not in pdl.FREQUENCY_KINDS:
    raise ValueError(f"frequency must be one of {pdl.FREQUENCY_KINDS}; got {frequency!r}.")
  total = float(counts_V.sum())
  eps = pdl.default_epsilon(total, frequency) if epsilon is None else float(epsilon)
  if not (math.isfinite(eps) and eps > 0):
    raise ValueError(f"epsilon must be > 0 and finite; got {epsilon}.")
  freq_V = counts_V / total if frequency == "relative" else counts_V
  bias_V = -beta * np.log(freq_V + eps)
  size = len(counts_V) if vocab_size is None else int(vocab_size)
  if size < len(counts_V):
    raise ValueError(f"vocab_size ({size}) must be >= the counts' length "
                     f"({len(counts_V)}).")
  return np.pad(bias_V, (0, size - len(counts_V))).astype(np.float32)
