"""The loss of a batch from the model's output, with the config's loss: full logits,
the loss window (logits only on the target span) or the chunked path (no [B, L, V]
logits), and the state a loss carries (FACE's counts). Training and evaluation both
call `loss_fn_of(config.loss, model, capacity=...)`."""

from __future__ import annotations

import functools
from typing import Any

import jax

from pdl_jax.losses import chunked as chunked_loss
from pdl_jax.losses import pdl
from pdl_jax.losses import registry
from pdl_jax.losses import window
from pdl_jax.models import decoder


def loss_params(loss_cfg) -> dict:
  """The hyperparameters of the loss settings' loss (config.loss) that
  registry.get_loss takes."""
  return {k: loss_cfg[k] for k in registry.spec(loss_cfg.name).params}


def compute_loss(params, batch, weights_V, loss_state_V, *, model, loss_name: str,
                 loss_params: dict[str, Any], chunked: bool, chunk_size: int, eos_id: int,
                 eos_weight: float | None, capacity: int | None = None,
                 update_loss_state: bool = True,
                 chunk_strategy: str = chunked_loss.DEFAULT_STRATEGY,
                 row_chunk_size: int | None = None, rng: jax.Array | None = None):
  """(loss, (LossAux, loss_state_V)) of a batch with the config's loss; training and
  evaluation both call this.

  With `capacity`, logits (or the chunked loss) are computed only on a window of that
  many positions per row, starting at the row's first loss position (the target span
  of the prefix-LM; pdl_jax.losses.window): the same loss and gradients, without the
  unembedding of the prompt positions. FACE's weights come from its running prediction
  counts (updated with this batch's argmax first, as its authors do, unless evaluating).
  `rng` (training only) drives the model's dropout (LoRA's adapter dropout); without
  it the model is deterministic.
  """
  labels_BxL, mask_BxL = batch["labels"], batch["loss_mask"]
  variables = {"params": params}
  rngs = None if rng is None else {"dropout": rng}
  # Packed rows (config.data.packing) carry segment ids and per-segment positions.
  packed = "segment_ids" in batch
  inputs = dict(positions_BxL=batch.get("positions"), segment_ids_BxL=batch.get("segment_ids"))
  if chunked or capacity is not None:
    hidden_BxLxD, _ = model.apply(variables, batch["inputs"], return_hidden=True, rngs=rngs,
                                  **inputs)
    if capacity is not None:
      gather = window.gather_loss_positions if packed else window.gather_window
      hidden_BxLxD, labels_BxL, mask_BxL = gather(hidden_BxLxD, labels_BxL, mask_BxL,
                                                  capacity)
    if chunked:
      d = hidden_BxLxD.shape[-1]
      hidden_NxD = hidden_BxLxD.reshape(-1, d)
      unembed_DxV = decoder.unembed_DxV(model, params).astype(hidden_BxLxD.dtype)
      spec = registry.spec(loss_name)
      if spec.stateful:  # FACE: counts of the argmax, found by vocabulary chunks
        _, weights_of = spec.state_weights
        if update_loss_state:
          preds_N = chunked_loss.chunked_argmax(hidden_NxD, unembed_DxV, chunk_size)
          loss_state_V = spec.state_update_from_preds(
              loss_state_V, preds_N, labels_BxL.reshape(-1), mask_BxL.reshape(-1))
        weights_V = weights_of(loss_state_V)
        if eos_weight is not None:
          weights_V = pdl.fix_token_weight(weights_V, eos_id, eos_weight)
      loss, aux = chunked_loss.get_loss_from_hidden(loss_name, **loss_params)(
          hidden_NxD, unembed_DxV, labels_BxL.reshape(-1), weights_V,
          mask_N=mask_BxL.reshape(-1), chunk_size=chunk_size, strategy=chunk_strategy,
          row_chunk_size=row_chunk_size)
      return loss, (aux, loss_state_V)
    logits_BxLxV = model.apply(variables, hidden_BxLxD, method=decoder.Decoder.unembed_logits)
  else:
    logits_BxLxV, _ = model.apply(variables, batch["inputs"], rngs=rngs, **inputs)
  spec = registry.spec(loss_name)
  if spec.stateful:  # weights from the state carried in the train state (FACE's counts)
    update, weights_of = spec.state_weights
    if update_loss_state:
      loss_state_V = update(loss_state_V, logits_BxLxV, labels_BxL, mask_BxL)
    weights_V = weights_of(loss_state_V)
    if eos_weight is not None:
      weights_V = pdl.fix_token_weight(weights_V, eos_id, eos_weight)
  loss, aux = registry.get_loss(loss_name, **loss_params)(logits_BxLxV, labels_BxL,
                                                            weights_V, mask=mask_BxL)
  return loss, (aux, loss_state_V)


def use_chunked_loss(loss_cfg, vocab_size: int, softcap: float | None = None) -> bool:
  """loss.chunked, or for None: chunked for vocabularies of 32,000 and more
  (pretrained models), where the [B, L, V] logits dominate memory, if the loss can.
  A model with final logit soft-capping (softcap) is never chunked: the chunked loss
  reads the raw unembedding, which the cap does not pass through.

  Raises:
    ValueError: loss.chunked=True with a soft-capped model.
  """
  if softcap is not None:
    if loss_cfg.chunked:
      raise ValueError(f"config.loss.chunked=True with a model whose final logits are "
                       f"soft-capped (final_logit_softcapping={softcap}); expected "
                       "chunked=False or None: the chunked loss cannot apply the cap.")
    return False
  if loss_cfg.chunked is not None:
    return bool(loss_cfg.chunked)
  return vocab_size >= 32_000 and registry.supports_chunked(loss_cfg.name)


def chunk_strategy(loss_cfg, batch_shards: int = 1) -> str:
  """config.loss.chunk_strategy, or for None: "tokens" when the batch is on one
  device, "vocab" when it is split over several (data x fsdp). Why: each row block of
  the tokens strategy adds a [D, V] d unembed term summed over rows that live on
  every device, so a split batch all-reduces the whole [D, V] once per block."""
  if loss_cfg.chunk_strategy is not None:
    return loss_cfg.chunk_strategy
  return "tokens" if batch_shards == 1 else "vocab"


def loss_fn_of(loss_cfg, model, *, capacity: int | None, eos_id: int = 1,
               batch_shards: int = 1, **kwargs):
  """compute_loss with the loss settings `loss_cfg` (config.loss); capacity: the loss
  window's (window_capacity); batch_shards: how many devices the batch is split
  over, for `chunk_strategy`:
  fn(params, batch, weights_V, loss_state_V) -> (loss, (aux, loss_state_V))."""
  return functools.partial(compute_loss, model=model, loss_name=loss_cfg.name,
                           loss_params=loss_params(loss_cfg),
                           chunked=use_chunked_loss(loss_cfg, model.cfg.vocab_size,
                                                    model.cfg.final_logit_softcap),
                           chunk_size=loss_cfg.chunk_size,
                           chunk_strategy=chunk_strategy(loss_cfg, batch_shards),
                           row_chunk_size=loss_cfg.row_chunk_size, eos_id=eos_id,
                           capacity=capacity, eos_weight=loss_cfg.eos_weight, **kwargs)


def check(c) -> None:
  """The loss settings (config.loss): raises ValueError naming the first bad key and
  what is allowed."""
  if c.name not in registry.LOSS_NAMES:
    raise ValueError(f"config.loss.name={c.name!r}; expected one of {registry.LOSS_NAMES}.")
  if c.chunked and not registry.supports_chunked(c.name):
    raise ValueError(f"config.loss.chunked=True with config.loss.name={c.name!r}: this loss "
                     "needs the full logits; chunked losses are "
                     f"{sorted(registry.CHUNKABLE)}.")
  if c.chunk_strategy is not None and c.chunk_strategy not in chunked_loss.STRATEGIES:
    raise ValueError(f"config.loss.chunk_strategy={c.chunk_strategy!r}; expected one of "
                     f"{chunked_loss.STRATEGIES} or None.")
  if c.row_chunk_size is not None and c.row_chunk_size < 1:
    raise ValueError(f"config.loss.row_chunk_size={c.row_chunk_size}; expected >= 1 or "
                     "None.")
  if c.reduction is not None and c.reduction not in pdl.REDUCTIONS:
    raise ValueError(f"config.loss.reduction={c.reduction!r}; expected one of "
                     f"{pdl.REDUCTIONS} or None.")
  if c.eos_weight is not None and (c.name not in registry.WEIGHTED_LOSSES
                                   or not c.eos_weight >= 0):
    raise ValueError(f"config.loss.eos_weight={c.eos_weight} with loss {c.name!r}; expected "
                     f"None, or a number >= 0 with a weighted loss {registry.WEIGHTED_LOSSES}.")
  for key, ok, want in (("itf_lambda", c.itf_lambda >= 0, ">= 0"),
                        ("tlat_T", c.tlat_T > 0, "> 0"),
                        ("tlat_A", c.tlat_A is None or c.tlat_A >= 0, "None or >= 0")):
    if not ok:
      raise ValueError(f"config.loss.{key}={c[key]}; expected {want}.")
  try:  # gamma, smoothing, ul_alpha: the loss checks its own ranges
    registry.get_loss(c.name, **loss_params(c))
  except ValueError as e:
    raise ValueError(f"config.loss ({c.name}): {e}") from None
  if not c.alpha >= 0:
    raise ValueError(f"config.loss.alpha={c.alpha}; expected >= 0.")
  if c.epsilon is not None and not c.epsilon > 0:
    raise ValueError(f"config.loss.epsilon={c.epsilon}; expected > 0 or None.")
  if c.frequency not in pdl.FREQUENCY_KINDS:
    raise ValueError(f"config.loss.frequency={c.frequency!r}; expected one of "
                     f"{pdl.FREQUENCY_KINDS}.")
