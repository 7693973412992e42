"""Every loss by its config name: `get_loss(name, **params)` returns
fn(logits, labels, weights_V, *, mask) -> (loss, LossAux), so one train step serves
CE, PDL and the baselines. The math lives in pdl_jax/loss.py (CE, PDL and the
weighted losses) and pdl_jax/baselines.py (the others); this module only picks."""

from __future__ import annotations

from pdl_jax import baselines
from pdl_jax import loss as L


def get_loss(name: str, **params) -> L.LossFn:
  """Loss by config name, as fn(logits, labels, weights_V, *, mask) -> (loss, aux).

  Every loss takes the same arguments, so one train step serves all; losses without
  frequency weights (ce, unlikelihood, focal, label_smoothing) ignore `weights_V`
  (None allowed). aux is a `LossAux` whose `nll` is always the plain token NLL.

  Names and keyword params (`L.LOSS_PARAMS[name]`; config.loss has a field of each):
    "ce": masked mean token cross-entropy.
    "pdl": power-law decay loss, weights from `power_law_weights`.
    "itf": Nakamura et al. 2019, weights from `baselines.itf_weights`.
    "face": Jiang et al. 2019, weights from `baselines.face_weights` of the running
      prediction counts (`baselines.face_count_update`, train state).
    "tlat_exp", "tlat_chi2": Gu et al. 2020, weights from `baselines.tlat_weights`.
      These five take `reduction` ("weights" | "tokens"; None = the paper's:
      "weights" for pdl, "tokens" for the others, see DEFAULT_REDUCTION).
    "unlikelihood": Welleck et al. 2019, token level; `ul_alpha` (default 1.0).
    "focal": Lin et al. 2017 over the vocabulary softmax; `gamma` (default 2.0).
    "label_smoothing": `smoothing` (default 0.1).

  Raises:
    ValueError: naming the bad value, for an unknown name, a parameter the loss
      does not take, or a bad parameter value.
  """
  L._check_name(name)
  unknown = sorted(set(params) - set(L.LOSS_PARAMS[name]))
  if unknown:
    raise ValueError(f"loss {name!r} takes parameters {L.LOSS_PARAMS[name]}; got "
                     f"unknown {unknown}.")
  if name == "ce":
    def ce(logits, labels, weights=None, *, mask=None):
      del weights  # CE is PDL with all weights 1.
      return L.cross_entropy_loss_and_aux(logits, labels, mask=mask)
    return ce
  if name in L.WEIGHTED_LOSSES:
    reduction = L.resolve_reduction(name, params.get("reduction"))

    def weighted(logits, labels, weights, *, mask=None):
      return L.weighted_loss_and_aux(logits, labels, weights, mask=mask,
                                   reduction=reduction)
    return weighted
  return baselines.get_unweighted_loss(name, **params)
