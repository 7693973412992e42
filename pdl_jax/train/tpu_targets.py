"""Cloud TPU slices as compile targets from any machine: a slice name (v4-8, v5e-16,
v5p-64, v6e-8, ...) -> its topology's devices (libtpu's, no TPU needed) -> the run's
real train step and decode step compiled for them ahead of time (nothing runs,
nothing is allocated), with the compiler's memory and cost analyses.

    slice_ = tpu_targets.parse_slice("v5e-16")
    mesh = run_lib.make_mesh(config, devices=tpu_targets.devices(slice_))
    train = tpu_targets.compile_train(config, model, mesh, eos_id=1)

Needs libtpu (requirements-tpu.txt: the release jax[tpu] pins for this jax). Slice
names follow Cloud TPU's: v4 and v5p names count TensorCores (two per chip: v5p-8 is
4 chips, 2x2x1), v5e (v5litepod) and v6e names count chips (v5e-16 is 4x4). One
JAX device per chip, except v4, whose topology libtpu lays out per TensorCore (a
v4-8 has 8 devices of 16 GiB each). Single chips (v5e-1, v6e-1) are refused by
libtpu's topology loader (a slice is a multiple of a host's 2x2 chips), so the
smallest targets are a host's 4 chips.

Start-up noise: libtpu, loaded on a machine without TPUs, logs warnings about
TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES. `devices` sets those two (and
TPU_SKIP_MDS_QUERY) when unset and no TPU is on this host, before libtpu loads; the
CPU backend stays the default (pdl_jax.main pins JAX_PLATFORMS=cpu on hosts with
libtpu but no TPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from pdl_jax import sharding
from pdl_jax.eval import decode as decode_lib
from pdl_jax.losses import batch_loss
from pdl_jax.models import decoder
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import run as run_lib
from pdl_jax.train import state as state_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's chip: HBM and dense bf16 peak per chip (Cloud TPU's
  published figures, `source`), and JAX devices per chip in libtpu's topologies."""

  generation: str  # libtpu's topology prefix: v4, v5e, v5p, v6e
  hbm_gib: float
  bf16_tflops: float
  devices_per_chip: int
  names_count: str  # what the number in a slice name counts: "TensorCores" or "chips"
  source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32, 275, 1, "TensorCores", "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16, 197, 1, "chips", "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95, 459, 1, "TensorCores", "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32, 918, 1, "chips", "https://cloud.google.com/tpu/docs/v6e"),
}

# Chips of a slice -> topology (Cloud TPU's published shapes per generation).
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_GRID_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice: its name, chip, number of chips and topology string."""

  name: str
  chip: Chip
  chips: int
  topology: str  # libtpu's name, e.g. "v5e:4x4"

  @property
  def num_devices(self) -> int:
    return self.chips * self.chip.devices_per_chip

  @property
  def device_hbm_bytes(self) -> float:
    return self.chip.hbm_gib * GiB / self.chip.devices_per_chip

  @property
  def accelerator_type(self) -> str:
    """Cloud's accelerator-type string (v5e's is v5litepod-N)."""
    return self.name.replace("v5e-", "v5litepod-")


def _slices() -> dict[str, Slice]:
  out = {}
  for gen, chip in CHIPS.items():
    table = _GRID_2D if chip.names_count == "chips" else _TORUS_3D
    for chips, topo in table.items():
      count = chips * (2 if chip.names_count == "TensorCores" else 1)
      out[f"{gen}-{count}"] = Slice(f"{gen}-{count}", chip, chips, f"{gen}:{topo}")
  return out


SLICES: dict[str, Slice] = _slices()


def parse_slice(name: str) -> Slice:
  """The Slice of a Cloud TPU slice name ("v5e-16"; "v5litepod-16" as well).

  Raises:
    ValueError: an unknown name, with the known ones.
  """
  key = re.sub(r"^v5litepod-", "v5e-", name.strip().lower())
  if key not in SLICES:
    known = ", ".join(SLICES)
    hint = (" (single chips are not a topology libtpu compiles for: use a host's 4)"
            if key in ("v5e-1", "v6e-1") else "")
    raise ValueError(f"TPU slice {name!r} is unknown{hint}; known slices: {known}.")
  return SLICES[key]


def has_libtpu() -> bool:
  """Whether the TPU compiler (the libtpu package) is installed."""
  import importlib.util

  return importlib.util.find_spec("libtpu") is not None


def _quiet_libtpu(slice_: Slice) -> None:
  """Values for the variables libtpu warns about when no TPU VM is around."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu takes /tmp/libtpu_lockfile for a process that drives chips; compiling
  # drives none, so several plans (and a CPU run that probed libtpu) may coexist.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(slice_: Slice) -> list[Any]:
  """The slice's devices from libtpu's topology description (no TPU needed), in
  topology order.

  Raises:
    RuntimeError: libtpu is not installed.
  """
  if not has_libtpu():
    raise RuntimeError("compiling for a TPU slice needs libtpu: pip install -r "
                       "requirements-tpu.txt")
  from jax.experimental import topologies

  _quiet_libtpu(slice_)
  # v4 and v5p VMs run their chips' two TensorCores as one device (megacore), as
  # MaxText compiles for them; libtpu's default lays a v4 chip out as two devices.
  megacore = {"chip_config_name": "megacore"} if slice_.chip.names_count == "TensorCores" else {}
  topo = topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology,
                                      **megacore)
  found = list(topo.devices)
  if len(found) != slice_.num_devices:  # the table and libtpu disagree: say so
    raise RuntimeError(f"{slice_.name}: libtpu's {slice_.topology} has {len(found)} devices; "
                       f"expected {slice_.num_devices}.")
  return found


@dataclasses.dataclass
class Compiled:
  """One compiled program's analyses, per device (bytes) and whole (flops)."""

  what: str
  compiled: Any  # jax.stages.Compiled (as_text() is the TPU HLO)
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float  # the compiler's count for one device's program (loop bodies once)
  optimal_seconds: float  # the cost model's time, less its -1 s per uncosted op
  compile_seconds: float
  raw_optimal_seconds: float = float("nan")  # cost_analysis()["optimal_seconds"] as given
  uncosted_ops: int = 0  # ConcatBitcast custom calls: -1 s each in the raw figure
  while_loops: int = 0  # loops in the program: their bodies are costed once

  @property
  def total_bytes(self) -> int:
    """Peak HBM of the program on one device: arguments + outputs - donated
    aliases + temporaries (XLA's memory analysis; code size excluded)."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


# The TPU cost model (libtpu 0.0.42.1) times a ConcatBitcast custom call (a layout
# concatenation the TPU compiler inserts) at exactly -1 s: a 1-layer SmolLM2 train
# step with 17 of them reports -16.9978 s, with 2 layers and 43 of them -42.9960 s.
# The estimate adds them back; every other op had a non-negative time in our probes
# (docs/tpu.md).
UNCOSTED = re.compile(r'custom_call_target="ConcatBitcast"')


def analyse(what: str, compiled, seconds: float) -> Compiled:
  """Compiled's numbers from XLA's memory and cost analyses (optimal_seconds less
  the cost model's -1 s sentinels, see UNCOSTED)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  hlo = compiled.as_text()
  uncosted = len(UNCOSTED.findall(hlo))
  raw = float(cost.get("optimal_seconds", float("nan")))
  return Compiled(what, compiled, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                  mem.alias_size_in_bytes, mem.temp_size_in_bytes,
                  float(cost.get("flops", float("nan"))), raw + uncosted, seconds,
                  raw_optimal_seconds=raw, uncosted_ops=uncosted,
                  while_loops=len(re.findall(r"\bwhile\(", hlo)))


class DoesNotFit(Exception):
  """The TPU compiler refused the program: it needs more HBM than a device has (its
  message says how much). `state_bytes`: one device's share of the arguments."""

  def __init__(self, what: str, message: str, state_bytes: int):
    super().__init__(f"{what}: {message}")
    self.what, self.message, self.state_bytes = what, message, state_bytes


def _compile(what: str, lowered, seconds_from: float, args) -> Compiled:
  """lowered.compile() -> Compiled; the compiler's out-of-memory refusal as
  DoesNotFit (with the arguments' per-device bytes)."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = str(e).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0]
    raise DoesNotFit(what, message, device_bytes(args)) from None
  return analyse(what, compiled, time.perf_counter() - seconds_from)


def device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if getattr(x, "sharding", None) is not None)


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch as abstract arrays in the trainer's batch sharding."""
  s = sharding.named_sharding(mesh, "batch", "length")
  shape = (config.batch_size, config.seq_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s),
           "labels": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s),
           "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s)}
  if config.data.get("packing"):  # packed rows carry positions and segment ids
    batch["positions"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
    batch["segment_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
  return batch


def compile_train(config, model: decoder.Decoder, mesh, *, eos_id: int = 1) -> Compiled:
  """The config's train step (run.make_step_fn: its loss, LoRA / QLoRA, accumulation,
  optimizer) compiled for `mesh`'s devices with abstract state, batch and weights."""
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, seq_len=8)
  step = run_lib.make_step_fn(config, model, tx, mesh, shardings, eos_id=eos_id)
  weights = jax.ShapeDtypeStruct((model.cfg.vocab_size,), jnp.float32,
                                 sharding=sharding.replicated(mesh))
  t0 = time.perf_counter()
  args = (abstract, abstract_batch(config, mesh), weights)
  with jax.set_mesh(mesh):  # activation constraints resolve against it (as in training)
    return _compile("train step", step.lower(*args), t0, args)


def step_seconds(config, model: decoder.Decoder, mesh, train: Compiled) -> tuple[float, str]:
  """(The cost model's time of one train step, how it was had).

  The cost model sums its ops' times once each: a loop body counts once whatever its
  trip count (a scan of 10 matmuls costs as one), and nothing overlaps (a program
  with a matmul and an all-gather costs their sum). So the compiled step's figure
  stands for an unrolled model without accumulation or chunked loss; a scanned model (a loop over
  layers) or accumulated micro-batches (a loop over them) are timed from unrolled
  1- and 2-layer compiles of one micro-batch: depth-linear, t1 + (n - 1)(t2 - t1),
  times the micro-batches.
  """
  cfg, k = model.cfg, config.optimizer.grad_accum_steps
  # The chunked loss is a loop over vocabulary (or token) chunks too: its unembedding
  # would count one chunk's. The timing compiles use the plain loss (the same matmuls
  # once, unlooped).
  chunked = batch_loss.use_chunked_loss(config.loss, cfg.vocab_size, cfg.final_logit_softcap)
  if not cfg.scan_layers and k == 1 and not chunked:
    return train.optimal_seconds, "the compiled step"
  micro = config.copy_and_resolve_references()
  micro.optimizer.grad_accum_steps, micro.batch_size = 1, config.batch_size // k
  micro.loss.chunked = False

  def at_depth(n: int) -> float:
    shallow = dataclasses.replace(cfg, scan_layers=False, num_layers=n,
                                  local_layers=tuple(cfg.local_layers[:n]))
    return compile_train(micro, decoder.Decoder(shallow), mesh).optimal_seconds

  t1, t2 = at_depth(1), at_depth(2)
  how = (f"unrolled 1- and 2-layer compiles ({t1 * 1e3:.2f}, {t2 * 1e3:.2f} ms), "
         f"extrapolated to {cfg.num_layers} layers" + (f", x {k} micro-batches" if k > 1 else "")
         + (", plain loss (the chunked loss's loop would count once)" if chunked else ""))
  return k * (t1 + (cfg.num_layers - 1) * (t2 - t1)), how


def decode_length(config) -> int:
  """Positions of the decode step's KV cache: a full-length prompt plus the new tokens."""
  return config.seq_len + config.eval.max_new_tokens


def compile_decode(config, model: decoder.Decoder, mesh) -> Compiled:
  """One token of batched decoding with the KV cache (eval/decode.py's step, after
  its decoding_model: unrolled layers, params cast to the compute dtype), at the
  config's eval batch and a cache of decode_length(config) positions."""
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, seq_len=8)
  params, param_shardings = abstract.model_params(), shardings.model_params()
  b, s = config.eval.batch_size, decode_length(config)
  unrolled = (decoder.Decoder(dataclasses.replace(model.cfg, scan_layers=False, remat="none"))
              if model.cfg.scan_layers else model)  # decoding_model's layout
  rows = sharding.named_sharding(mesh, "batch")
  cache_s = sharding.named_sharding(mesh, "batch", None, "length", None)
  cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cache_s),
                       jax.eval_shape(lambda: decoder.init_cache(unrolled.cfg, b, s)))

  def step(params, token_B, pos_B, key_mask_BxS, cache, index):
    m, p = decode_lib.decoding_model(model, params)
    logits_Bx1xV, cache = m.apply({"params": p}, token_B[:, None], pos_B[:, None],
                                  key_mask_BxS, cache, index)
    return logits_Bx1xV[:, 0], cache

  fn = jax.jit(step, in_shardings=(param_shardings, rows, rows,
                                   sharding.named_sharding(mesh, "batch", "length"),
                                   jax.tree.map(lambda x: x.sharding, cache),
                                   sharding.replicated(mesh)),
               donate_argnums=(4,))
  tok = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)
  mask = jax.ShapeDtypeStruct((b, s), jnp.int32,
                              sharding=sharding.named_sharding(mesh, "batch", "length"))
  t0 = time.perf_counter()
  args = (params, tok, tok, mask, cache, jax.ShapeDtypeStruct((), jnp.int32))
  with jax.set_mesh(mesh):
    return _compile("decode step", fn.lower(*args), t0, args)


def param_count(model: decoder.Decoder) -> tuple[int, int]:
  """(all parameters, those in matmuls other than the embedding lookup): what the
  6 N tokens FLOPs rule counts (a tied embedding's unembedding matmul included)."""
  from pdl_jax.models.hf import weights as hf_weights

  cfg = dataclasses.replace(model.cfg, base_quant="none", lora_rank=0, lora_targets=())
  params = hf_weights.abstract_params(cfg)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  embed = cfg.vocab_size * cfg.d_model
  pos = cfg.max_len * cfg.d_model if cfg.positions == "learned" else 0
  # The unembedding is a matmul either way (tied: the embedding's second use).
  return total, total - pos - (0 if cfg.tied_embeddings else embed)


def model_flops(model: decoder.Decoder, tokens: int, seq_len: int) -> float:
  """Model FLOPs of one train step over `tokens` tokens (PaLM's appendix B): 6 N per
  token for the matmul params (4 N with LoRA: no weight gradient of the frozen base;
  the adapters' own flops are negligible) plus causal attention's 6 x layers x
  heads x head_dim x seq_len per token (QK^T and PV, forward and backward, half
  the square). Rematerialisation is not counted: MFU, not hardware utilisation."""
  cfg = model.cfg
  _, matmul = param_count(model)
  per_token = (4 if cfg.lora_rank else 6) * matmul
  per_token += 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return float(per_token) * tokens
