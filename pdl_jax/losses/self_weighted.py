"""SFT losses whose token weights come from the model's own distribution, not from
corpus counts: DFT, GEM and MiLe, the baselines a reviewer names since 2024.

- DFT (Wu et al., 2025, "On the Generalization of SFT: A Reinforcement Learning
  Perspective with Reward Rectification"): loss_t = stopgrad(p_t) * (-log p_t),
  whose gradient is that of -p_t. It down-weights low-probability (mostly rare)
  tokens: the opposite pull of PDL.
- GEM (Li et al., ICLR 2025, "Preserving Diversity in Supervised Fine-Tuning of
  Large Language Models"): loss_t = -log p_t(y) + sum_v q_v log p_t(v) with
  q = stopgrad(softmax(z / beta)), beta 0.7: entropy-regularised SFT for output
  diversity (its gradient in the logits is q - onehot(y)).
- MiLe (Su et al., NAACL Findings 2024, "MiLe Loss: a New Loss for Mitigating the
  Bias of Learning Difficulties in Generative Language Models"): each token's CE
  times f_t = (1 + H(stopgrad p_t))^gamma (natural-log entropy), normalised by the
  batch mean of f: sum_t f_t nll_t / sum_t f_t, gamma 1. That is a ratio of sums, so
  gradient accumulation sums the numerator and sum f (aux.weight_sum) separately and
  divides once: exact, as PDL's "weights" reduction (registry: reduction "weights").

All three take fn(logits, labels, *, mask, <param>) -> (loss, LossAux) with
aux.nll the plain token NLL, and are mean over target tokens unless said otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pdl_jax.losses import baselines
from pdl_jax.losses import pdl


def dft_token_loss(nll: jax.Array) -> jax.Array:
  """stopgrad(p_t) * nll_t from the token NLL (p_t = exp(-nll_t)): DFT's per-token
  loss; its derivative in nll is p_t, so d/dlogits = p_t (softmax - onehot), the
  gradient of -p_t. A function of the NLL alone: the chunked path serves it."""
  return jax.lax.stop_gradient(jnp.exp(-nll)) * nll


@jax.jit
def dft_loss_and_aux(logits: jax.Array, labels: jax.Array, *,
                     mask: jax.Array | None = None) -> tuple[jax.Array, pdl.LossAux]:
  """Dynamic Fine-Tuning: mean over target tokens of stopgrad(p_t) * (-log p_t).

  Args: as `baselines.focal_loss_and_aux`, without a hyperparameter.
  """
  _, nll, mask, _ = baselines._unweighted(logits, labels, mask)
  return pdl.reduce_token_losses(nll, mask, mask, reduction="tokens",
                                 token_loss=jnp.where(mask > 0, dft_token_loss(nll), 0.0))


@functools.partial(jax.jit, static_argnames=("gem_beta",))
def gem_loss_and_aux(logits: jax.Array, labels: jax.Array, *,
                     mask: jax.Array | None = None, gem_beta: float = 0.7
                     ) -> tuple[jax.Array, pdl.LossAux]:
  """GEM: mean over target tokens of -log p(y) + sum_v q_v log p(v), with
  q = stopgrad(softmax(logits / gem_beta)) (gem_beta > 0; the paper's 0.7).

  Not chunked: the q-weighted sum needs a second logsumexp per token (of logits /
  beta), one more running statistic than the chunked path keeps; with the loss
  window the full logits are only the target span's.
  """
  logp, nll, mask, _ = baselines._unweighted(logits, labels, mask)
  q = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32) / gem_beta, axis=-1))
  token_loss = nll + jnp.sum(q * logp, axis=-1)
  return pdl.reduce_token_losses(nll, mask, mask, reduction="tokens",
                                 token_loss=jnp.where(mask > 0, token_loss, 0.0))


def mile_token_weights(logits: jax.Array, gamma: float) -> jax.Array:
  """(1 + H(p_t))^gamma per position, H the natural-log entropy of softmax(logits),
  without gradient (MiLe's weights are constants of the step)."""
  logp = jax.nn.log_softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  # p log p with 0 log 0 = 0 (a -inf logit, e.g. a banned padding row).
  entropy = -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)
  return (1.0 + entropy) ** gamma


@functools.partial(jax.jit, static_argnames=("mile_gamma",))
def mile_loss_and_aux(logits: jax.Array, labels: jax.Array, *,
                      mask: jax.Array | None = None, mile_gamma: float = 1.0
                      ) -> tuple[jax.Array, pdl.LossAux]:
  """MiLe: sum_t f_t nll_t / sum_t f_t over target tokens, f_t = (1 + H(p_t))^gamma
  (mile_gamma >= 0; the paper's 1; 0 is CE). aux.weight_sum is sum_t f_t, the
  denominator that gradient accumulation and evaluation sum across batches.

  Not chunked: the entropy is one more per-token statistic than the chunked path
  keeps (the full logits are only the loss window's).
  """
  _, nll, mask, _ = baselines._unweighted(logits, labels, mask)
  token_w = mask * mile_token_weights(logits, mile_gamma)
  return pdl.reduce_token_losses(nll, mask, token_w, reduction="weights")


def factory(fn, key: str | None = None, default: float | None = None,
            positive: bool = False):
  """make(**{key: value}) -> fn(logits, labels, weights_V=None, *, mask) ->
  (loss, LossAux), the value checked at once (None: `default`); key None: no
  hyperparameter (DFT)."""
  def make(**params) -> pdl.LossFn:
    kwargs = {}
    if key is not None:
      value = params.get(key)
      value = default if value is None else float(value)
      if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{key} must be {'> 0' if positive else '>= 0'} and finite; got "
                         f"{value}.")
      kwargs[key] = value

    def loss_fn(logits, labels, weights=None, *, mask=None):
      del weights  # No frequency weights.
      return fn(logits, labels, mask=mask, **kwargs)
    return loss_fn
  return make
