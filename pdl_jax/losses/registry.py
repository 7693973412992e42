"""Every loss by its config name: one `LossSpec` each, in one table.

A spec says everything the rest of the code needs to know about a loss: the factory
of its math (`get_loss(name, **params)` returns fn(logits, labels, weights_V, *,
mask) -> (loss, LossAux), so one train step serves CE, PDL and the baselines), the
config.loss fields it takes, its default reduction, how its per-vocabulary weights
come from the token counts (stored beside the checkpoints) or from state carried in
the train state (FACE's running prediction counts), and whether the chunked path
(no [B, L, V] logits) serves it. losses/weights.py, train/provenance.py, batch_loss.py and
config_checks.py read the spec: adding a loss is one spec here plus its function in
pdl.py or baselines.py (and a config.loss field for each new hyperparameter).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from pdl_jax.losses import baselines
from pdl_jax.losses import pdl
from pdl_jax.losses import self_weighted


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One loss name and what the code around it needs to know.

  make: factory(**params) -> fn(logits, labels, weights_V, *, mask) -> (loss, aux);
    raises ValueError naming a bad parameter value.
  params: the config.loss fields the factory takes.
  default_reduction: the paper's reduction ("weights" | "tokens") for a loss with
    frequency weights (config.loss.reduction overrides it); None for a loss without
    them (its token weights are all 1, where both reductions agree: "tokens").
  weight_params: the config.loss fields that make its static weights from the counts.
  weights_from_counts: (settings, counts_V, stats) -> float weights [V] (settings: the
    values of weight_params); None: no static weights (all ones are stored).
  chunkable: the chunked path (no [B, L, V] logits) serves it: its per-token loss is
    w[label] * nll, or token_loss_from_stats says how from the NLL and the uniform
    cross-entropy; a stateful one also needs state_update_from_preds.
  state_weights: for a loss whose weights come from state carried in the train state
    (FACE): (update(state_V, logits, labels, mask) -> state_V, weights(state_V) ->
    weights_V). The state is an int32 [V] array, zeros at step 0.
  """

  name: str
  make: Callable[..., pdl.LossFn]
  params: tuple[str, ...] = ()
  default_reduction: str | None = None
  weight_params: tuple[str, ...] = ()
  weights_from_counts: Callable[[Mapping[str, Any], np.ndarray, Any], np.ndarray] | None = None
  chunkable: bool = False
  state_weights: tuple[Callable[..., Any], Callable[..., Any]] | None = None
  # The chunked path of a loss that is not w[label] * nll: factory(**params) ->
  # fn(nll_N, uniform_N) -> per-token loss [N] (focal, label smoothing; the inputs from
  # chunked.chunked_token_stats).
  token_loss_from_stats: Callable[..., Callable[..., Any]] | None = None
  # A stateful loss's update from argmax predictions (chunked.chunked_argmax) instead
  # of logits: update(state_V, preds, labels, mask) -> state_V.
  state_update_from_preds: Callable[..., Any] | None = None
  # The reduction of a loss without frequency weights that weighs tokens itself
  # (MiLe: "weights", sum f nll / sum f, so accumulation sums f); None: "tokens".
  own_reduction: str | None = None

  @property
  def weighted(self) -> bool:
    """Whether its token NLL is multiplied by per-vocabulary weights."""
    return self.default_reduction is not None

  @property
  def stateful(self) -> bool:
    """Whether it carries state in the train state (its weights change every step)."""
    return self.state_weights is not None


def _ce(**params) -> pdl.LossFn:
  del params
  def ce(logits, labels, weights=None, *, mask=None):
    del weights  # CE is PDL with all weights 1.
    return pdl.cross_entropy_loss_and_aux(logits, labels, mask=mask)
  return ce


def _weighted(name: str) -> Callable[..., pdl.LossFn]:
  """Factory of a frequency-weighted loss: sum(mask w[y] nll) / its reduction."""
  def make(reduction: str | None = None) -> pdl.LossFn:
    reduction = resolve_reduction(name, reduction)

    def weighted(logits, labels, weights, *, mask=None):
      return pdl.weighted_loss_and_aux(logits, labels, weights, mask=mask,
                                     reduction=reduction)
    return weighted
  return make


def _pdl_weights(s: Mapping[str, Any], counts_V: np.ndarray, stats: Any) -> np.ndarray:
  del counts_V
  return pdl.power_law_weights(stats.counts, s["alpha"], s["epsilon"], frequency=s["frequency"],
                       normalize=s["normalize"], max_weight=s["max_weight"])


def _tlat(kind: str):
  def weights(s: Mapping[str, Any], counts_V: np.ndarray, stats: Any) -> np.ndarray:
    del stats
    return baselines.tlat_weights(counts_V, kind, s["tlat_A"], s["tlat_T"])
  return weights


def _from_stats(key: str, default: float, fn: Callable[..., Any]):
  """token_loss_from_stats factory of an unweighted loss with one hyperparameter:
  make(**{key: value}) -> fn(nll_N, uniform_N) (None: `default`)."""
  def make(**params):
    value = params.get(key)
    value = default if value is None else float(value)
    return lambda nll_N, unif_N: fn(nll_N, unif_N, value)
  return make


_SPECS = (
    LossSpec("ce", _ce, chunkable=True),
    LossSpec("pdl", _weighted("pdl"), ("reduction",), "weights",
             ("alpha", "epsilon", "frequency", "normalize", "max_weight"), _pdl_weights,
             chunkable=True),
    LossSpec("itf", _weighted("itf"), ("reduction",), "tokens", ("itf_lambda",),
             lambda s, counts_V, stats: baselines.itf_weights(counts_V, s["itf_lambda"]),
             chunkable=True),
    # FACE's count update needs the argmax: chunked.chunked_argmax gives it.
    LossSpec("face", _weighted("face"), ("reduction",), "tokens",
             state_weights=(baselines.face_count_update, baselines.face_weights),
             chunkable=True, state_update_from_preds=baselines.face_count_update_from_preds),
    LossSpec("tlat_exp", _weighted("tlat_exp"), ("reduction",), "tokens",
             ("tlat_A", "tlat_T"), _tlat("exp"), chunkable=True),
    LossSpec("tlat_chi2", _weighted("tlat_chi2"), ("reduction",), "tokens",
             ("tlat_A", "tlat_T"), _tlat("chi2"), chunkable=True),
    # Unlikelihood needs the probabilities of the row's earlier targets: not chunkable.
    LossSpec("unlikelihood", baselines.unweighted(baselines.unlikelihood_loss_and_aux,
                                                  "ul_alpha", 1.0), ("ul_alpha",)),
    LossSpec("focal", baselines.unweighted(baselines.focal_loss_and_aux, "gamma", 2.0),
             ("gamma",), chunkable=True, token_loss_from_stats=_from_stats(
                 "gamma", 2.0, lambda nll, unif, g: baselines.focal_token_loss(nll, g))),
    LossSpec("label_smoothing", baselines.unweighted(
        baselines.label_smoothing_loss_and_aux, "smoothing", 0.1), ("smoothing",),
             chunkable=True, token_loss_from_stats=_from_stats(
                 "smoothing", 0.1, baselines.label_smoothing_token_loss)),
    # The model-weighted SFT losses (losses/self_weighted.py).
    LossSpec("dft", self_weighted.factory(self_weighted.dft_loss_and_aux), chunkable=True,
             token_loss_from_stats=lambda: lambda nll, unif: self_weighted.dft_token_loss(nll)),
    LossSpec("gem", self_weighted.factory(self_weighted.gem_loss_and_aux, "gem_beta", 0.7,
                                          positive=True), ("gem_beta",)),
    LossSpec("mile", self_weighted.factory(self_weighted.mile_loss_and_aux, "mile_gamma",
                                           1.0), ("mile_gamma",), own_reduction="weights"),
)
SPECS: dict[str, LossSpec] = {s.name: s for s in _SPECS}

# Views of the table, for messages and tests.
LOSS_NAMES = tuple(SPECS)
WEIGHTED_LOSSES = tuple(n for n, s in SPECS.items() if s.weighted)
DEFAULT_REDUCTION = {n: s.default_reduction for n, s in SPECS.items() if s.weighted}
LOSS_PARAMS = {n: s.params for n, s in SPECS.items()}
CHUNKABLE = frozenset(n for n, s in SPECS.items() if s.chunkable)


def spec(name: str) -> LossSpec:
  """The LossSpec of `name`; ValueError listing the known names otherwise."""
  if name not in SPECS:
    raise ValueError(f"loss name must be one of {LOSS_NAMES}; got {name!r}.")
  return SPECS[name]


def get_loss(name: str, **params) -> pdl.LossFn:
  """Loss by config name, as fn(logits, labels, weights_V, *, mask) -> (loss, aux).

  Every loss takes the same arguments, so one train step serves all; losses without
  frequency weights (ce, unlikelihood, focal, label_smoothing) ignore `weights_V`
  (None allowed). aux is a `LossAux` whose `nll` is always the plain token NLL.

  Names and keyword params (`LOSS_PARAMS[name]`; config.loss has a field of each):
    "ce": masked mean token cross-entropy.
    "pdl": power-law decay loss, weights from `pdl.power_law_weights`.
    "itf": Nakamura et al. 2019, weights from `baselines.itf_weights`.
    "face": Jiang et al. 2019, weights from `baselines.face_weights` of the running
      prediction counts (`baselines.face_count_update`, train state).
    "tlat_exp", "tlat_chi2": Gu et al. 2020, weights from `baselines.tlat_weights`.
      These five take `reduction` ("weights" | "tokens"; None = the paper's:
      "weights" for pdl, "tokens" for the others, see DEFAULT_REDUCTION).
    "unlikelihood": Welleck et al. 2019, token level; `ul_alpha` (default 1.0).
    "focal": Lin et al. 2017 over the vocabulary softmax; `gamma` (default 2.0).
    "label_smoothing": `smoothing` (default 0.1).
    "dft": Wu et al. 2025, stopgrad(p) * nll; no parameter.
    "gem": Li et al. 2025, entropy-regularised; `gem_beta` (default 0.7).
    "mile": Su et al. 2024, (1 + entropy)^gamma token weights normalised by their
      batch sum; `mile_gamma` (default 1.0).

  Raises:
    ValueError: naming the bad value, for an unknown name, a parameter the loss
      does not take, or a bad parameter value.
  """
  s = spec(name)
  unknown = sorted(set(params) - set(s.params))
  if unknown:
    raise ValueError(f"loss {name!r} takes parameters {s.params}; got unknown {unknown}.")
  return s.make(**params)


def resolve_reduction(name: str, reduction: str | None = None) -> str:
  """The reduction loss `name` uses: `reduction`, or the paper's when None.

  Losses without frequency weights (ce, unlikelihood, focal, label_smoothing, dft,
  gem) have all token weights 1, where both reductions are the same; they report
  "tokens". MiLe weighs tokens by the model's entropy and reports "weights".
  """
  s = spec(name)
  if reduction is not None:
    pdl.check_reduction(reduction)
  if not s.weighted:
    return s.own_reduction or "tokens"
  return s.default_reduction if reduction is None else reduction


def supports_chunked(name: str) -> bool:
  """Whether loss `name` has a chunked path (config.loss.chunked=True).

  Raises ValueError for an unknown name.
  """
  return spec(name).chunkable


def _setting(value: Any) -> Any:
  """A config value as stored with the weights (JSON: numbers as float)."""
  return value if value is None or isinstance(value, (bool, str)) else float(value)


def weight_settings(loss_config: Mapping[str, Any]) -> dict[str, Any]:
  """The config.loss values that make the loss's weights_V from the counts: stored
  beside the weights and compared on resume."""
  s = spec(loss_config["name"])
  settings: dict[str, Any] = {"loss": str(s.name)}
  settings.update({k: _setting(loss_config[k]) for k in s.weight_params})
  if s.weighted and not s.stateful:  # a stateful loss fixes EOS's weight every step
    settings["eos_weight"] = _setting(loss_config["eos_weight"])
  return settings


def static_weights(settings: Mapping[str, Any], stats: Any, eos_id: int) -> np.ndarray:
  """float32 weights [V] from the token stats (`settings` from weight_settings): the
  loss's function of the counts, all ones for the losses without static weights
  (a stateful loss's change every step: they are made in the train step). EOS's
  weight is then fixed when eos_weight is set (1 = an average corpus token)."""
  s = spec(settings["loss"])
  if s.weights_from_counts is None:
    w = np.ones(stats.vocab_size, np.float32)
  else:
    w = s.weights_from_counts(settings, stats.counts, stats)
  if settings.get("eos_weight") is not None:
    w = pdl.fix_token_weight(w, eos_id, settings["eos_weight"], counts_V=stats.counts)
  return np.asarray(w, np.float32)
