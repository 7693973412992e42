"""The train state: what a checkpoint restores, how it is made, and where it comes from.

Resume order (the one place it is decided, `initial_state`): this workdir's latest
checkpoint (config.resume) > config.init_from (another run's params, step 0) >
config.model.pretrained (a Hugging Face checkpoint, step 0) > a fresh init from
config.seed. Every source allocates the state once, directly in its shardings.

LoRA (model.lora.rank > 0) is a trainable / frozen split of the params, made here
and nowhere else: `params` are the adapters (their optimizer state, their
checkpoints), `frozen` the base (`load_base`: the pretrained weights, quantised if
configured), which rides in the state untouched and is never checkpointed. The
step, the loop and the evaluator see `state.model_params()` and `state.params`, and
do not branch on LoRA. A resume or init_from restores the adapters; a fresh start
initialises them (B = 0: step 0 is the base).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.models import lora
from pdl_jax import sharding
from pdl_jax import multihost
from pdl_jax.models.hf import weights as hf_weights


class TrainState(struct.PyTreeNode):
  """The state of a run. Everything but `frozen` is what a checkpoint restores.
  nonfinite_steps counts steps whose loss or gradient was not finite;
  first_nonfinite is the first such step (-1: none)."""

  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array
  first_nonfinite: jax.Array
  # State a loss carries between steps (LossSpec.state_weights; FACE's running counts
  # of the model's argmax predictions at target positions): int32 [V], zeros and
  # unused for a stateless loss. Part of the train state, so a resume continues it.
  loss_state: jax.Array
  # The params that do not train (LoRA: the frozen base; {} for full finetuning):
  # no gradients, no optimizer state, not in checkpoints.
  frozen: Any = struct.field(default_factory=dict)

  def model_params(self) -> Any:
    """The params the model computes with: the frozen ones and the trained ones
    together (just `params` without a frozen part). Works on a state of shardings
    or abstract arrays as well."""
    return lora.combine(self.frozen, self.params) if self.frozen else self.params

  def checkpointed(self) -> dict[str, Any]:
    """What a checkpoint holds: every field but `frozen` (the same tree as the
    checkpoints written before the split, which restore as they were)."""
    return {f: getattr(self, f) for f in CHECKPOINTED}


# The fields a checkpoint holds, in order.
CHECKPOINTED = ("step", "params", "opt_state", "nonfinite_steps", "first_nonfinite",
                "loss_state")


def fresh_state(params, tx, vocab_size: int) -> TrainState:
  """Step 0 around `params`: a new optimizer state, no non-finite steps, zero loss
  state. The one place a TrainState is built from nothing."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), nonfinite_steps=jnp.zeros((), jnp.int32),
                    first_nonfinite=jnp.full((), -1, jnp.int32),
                    loss_state=jnp.zeros((vocab_size,), jnp.int32))


def _init_params(model, seq_len: int, rng):
  """The model's Flax-partitioned (boxed) params: the one init function."""
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def _init_boxed(model, tx, seq_len: int, rng):
  """The initial state with boxed params (a LoRA model's: the adapters only; the
  base's init is dead code XLA drops)."""
  params = _init_params(model, seq_len, rng)
  if lora.enabled(model.cfg):
    params = lora.split(params)[0]
  return fresh_state(params, tx, model.cfg.vocab_size)


def abstract_base(model, mesh, seq_len: int) -> tuple[Any, Any]:
  """(abstract frozen base params, their shardings) of a LoRA model: every param but
  the adapters, in its stored form (quantised kernels for base_quant int8 / nf4)."""
  boxed = lora.split(jax.eval_shape(functools.partial(_init_params, model, seq_len),
                                        jax.random.key(0)))[1]
  shardings = sharding.tree_shardings(mesh, boxed)
  return ckpt_lib.abstract_like(nn.meta.unbox(boxed), shardings), shardings


def load_base(pretrained: str, model, base_shardings) -> Any:
  """A LoRA run's frozen base: the pretrained weights read as the same model without
  adapters (in model.param_dtype); for base_quant int8 / nf4 each targeted kernel is
  quantised on the host as it is read (models.quant.quantizing_readers) and only its
  stored form reaches the devices: the float base never does."""
  from pdl_jax.models import quant

  cfg = model.cfg
  plain = dataclasses.replace(cfg, lora_rank=0, lora_targets=(), base_quant="none")
  if cfg.base_quant == "none":
    return hf_weights.load_params(pretrained, plain, base_shardings)
  base = hf_weights.load_params(pretrained, plain, base_shardings,
                                transform=functools.partial(quant.quantizing_readers, cfg))
  # The transform's output must be exactly the quantised base's tree (load_params
  # cannot check it against the plain model's).
  want = set(flax.traverse_util.flatten_dict(flax.core.unfreeze(base_shardings)))
  got = set(flax.traverse_util.flatten_dict(base))
  if want != got:
    raise AssertionError(f"quantised base params differ from the model's: missing "
                         f"{sorted(want - got)}, unexpected {sorted(got - want)}")
  return base


def abstract_state(model, tx, mesh, seq_len: int) -> tuple[TrainState, Any]:
  """(abstract state, its shardings) without allocating anything: shapes and logical
  axes from jax.eval_shape of the init function, shardings from the axis rules. The
  abstract leaves are jax.ShapeDtypeStruct with their sharding (for AOT lowering
  and restores). A LoRA model's state has its frozen base in `frozen`."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, seq_len),
                         jax.random.key(0))
  shardings = sharding.tree_shardings(mesh, boxed)
  abstract = ckpt_lib.abstract_like(nn.meta.unbox(boxed), shardings)
  if lora.enabled(model.cfg):
    base, base_shardings = abstract_base(model, mesh, seq_len)
    abstract, shardings = abstract.replace(frozen=base), shardings.replace(frozen=base_shardings)
  return abstract, shardings


def state_from_params(params, model, tx, shardings) -> TrainState:
  """A fresh train state (step 0, new optimizer state) around loaded params, built
  in the state's shardings: with init_from / pretrained nothing is initialised and
  thrown away, so peak memory holds one copy of the params."""
  trained = shardings.replace(frozen={})
  return jax.jit(lambda p: fresh_state(p, tx, model.cfg.vocab_size),
                 in_shardings=(trained.params,), out_shardings=trained,
                 donate_argnums=(0,))(params)


def create_state(model, tx, mesh, seed: int, seq_len: int):
  """State initialised directly into its shardings (no replicated copy on any
  device first; a LoRA model's: the adapters, `frozen` left empty). Returns
  (state, state_shardings)."""
  _, shardings = abstract_state(model, tx, mesh, seq_len)
  shardings = shardings.replace(frozen={})
  state = jax.jit(lambda r: nn.meta.unbox(_init_boxed(model, tx, seq_len, r)),
                  out_shardings=shardings)(jax.random.key(seed))
  return state, shardings


def check_lora_init_from(init_from: str, fingerprint: dict[str, Any]) -> None:
  """A LoRA run continues another LoRA run's adapters only on the same base.

  Raises:
    ValueError: `init_from` is not a LoRA run, or adapted a base of other weights.
  """
  try:
    _, stored = ckpt_lib.read_meta(init_from)
  except ValueError:
    raise ValueError(f"config.init_from={init_from!r} has no checkpoint.") from None
  theirs = stored.get("fingerprint", {}).get("lora_base_weights_sha256")
  ours = fingerprint["lora_base_weights_sha256"]
  if theirs is None:
    raise ValueError(
        f"config.init_from={init_from!r} is a full finetune, not a LoRA run: a LoRA run "
        "continues another LoRA run's adapters. To adapt a finetuned model, export it "
        "(python -m pdl_jax.cli.export_hf) and set config.model.pretrained to the export.")
  # Not lora_dropout: a regularisation setting, not part of what the adapters are.
  lora_keys = ("lora_rank", "lora_alpha", "lora_targets", "base_quant")
  diffs = [f"{k}: {stored['fingerprint']['model'].get(k)!r} there, "
           f"{fingerprint['model'].get(k)!r} here" for k in lora_keys
           if stored["fingerprint"]["model"].get(k) != fingerprint["model"].get(k)]
  if diffs:
    raise ValueError(f"config.init_from={init_from!r} has other adapters ({'; '.join(diffs)}); "
                     "a LoRA run continues adapters of the same rank, scale, targets "
                     "and base storage.")
  if theirs != ours:
    raise ValueError(
        f"config.init_from={init_from!r} trained its adapters on a base of weights "
        f"checksum {theirs[:16]}..., this run's base ({fingerprint.get('model', {}).get('model_type')}"
        f", config.model.pretrained) has {ours[:16]}...: adapters do not carry over "
        "between bases.")


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where a run's state may come from, in the resume order (module docstring)."""

  mngr: Any  # this workdir's checkpoint manager
  where: str  # how errors name the workdir
  fingerprint: dict[str, Any]  # what its checkpoints must agree with
  stats_sha256: str  # the checksum of the token stats its checkpoints were trained with
  init_from: str | None  # another run's workdir (config.init_from)
  pretrained: str | None  # a Hugging Face folder or offline name (config.model.pretrained)
  seed: int  # a fresh init's seed


def initial_state(sources: Sources, model, tx, mesh, abstract: TrainState, shardings: Any,
                  seq_len: int) -> tuple[TrainState, bool]:
  """(state, resumed) from the first source of the resume order above; `abstract`
  and `shardings` from abstract_state. A LoRA model's frozen base is loaded last,
  into `frozen`, whatever the source of its adapters.

  A resume checks the stored fingerprint and token-stats checksum against this run's
  (ckpt_lib.restore_latest raises naming what differs)."""
  is_lora = lora.enabled(model.cfg)
  restored = ckpt_lib.restore_latest(sources.mngr, abstract.checkpointed(),
                                     sources.fingerprint, sources.stats_sha256,
                                     sources.where)
  if restored is not None:
    state, latest = TrainState(**restored[0]), restored[1]
    multihost.log(f"resumed from step {latest}")
  elif sources.init_from is not None:
    if is_lora:
      check_lora_init_from(sources.init_from, sources.fingerprint)
    state = state_from_params(ckpt_lib.load_params(sources.init_from, abstract.params),
                              model, tx, shardings)
    multihost.log(f"initialised {'adapters' if is_lora else 'params'} "
                  f"from {sources.init_from}")
  elif sources.pretrained is not None and not is_lora:
    state = state_from_params(hf_weights.load_params(
        sources.pretrained, model.cfg, shardings.params), model, tx, shardings)
    multihost.log(f"initialised params from the pretrained {sources.pretrained}")
  else:
    state, _ = create_state(model, tx, mesh, sources.seed, seq_len)
  if is_lora:
    state = state.replace(frozen=load_base(sources.pretrained, model, shardings.frozen))
    multihost.log(f"LoRA base: {sources.pretrained} (frozen)")
  return state, restored is not None
