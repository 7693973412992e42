"""Device mesh from the config and the one set of logical axis rules.

Sharding is jax.jit with NamedSharding over a jax.sharding.Mesh (the current form of
pjit). Meshes use Auto axis types: jax.make_mesh now defaults to Explicit, under which
with_sharding_constraint and optax's integer-label cross-entropy on vocabulary-sharded
logits fail.

One rule engine: Flax's (nn.logical_to_mesh_axes / nn.logical_to_mesh_sharding) for
parameters, state and activations alike, with LOGICAL_AXIS_RULES.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdl_jax import multihost

# The mesh axes every config names, in order: data parallelism, fully sharded data
# parallelism (ZeRO-3), tensor/model parallelism.
MESH_AXES = ("data", "fsdp", "model")

# Logical array axes -> mesh axes, in Flax's order of precedence (for each logical
# axis the first rule whose mesh axes the array does not use yet). The batch goes
# over data x fsdp; the large feature axes (vocabulary, MLP hidden, heads) over
# model; the embed axis of every weight over fsdp, so parameters, gradients and
# optimizer state are split over fsdp (each layer's weights are all-gathered where
# they are used). Activations [batch, length, embed] keep embed whole: batch has
# taken fsdp first.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    # Key/value heads of grouped-query attention (pdl_jax.models.decoder): often fewer
    # (1-8) than the devices of the model axis, so replicated; their projections are
    # num_heads / num_kv_heads times smaller than the query's.
    ("kv_heads", None),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    # The stacked layer axis of scanned layers (model.scan_layers): never sharded.
    ("layers", None),
)


def make_mesh(mesh_shape: Mapping[str, int] | Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "model") mesh with Auto axis types.

  Args:
    mesh_shape: sizes per axis, as a mapping {"data": 4, "model": 2} (missing axes
      are 1) or a sequence in MESH_AXES order. One size may be -1: it takes the
      remaining devices.
    devices: devices to use; default all of jax.devices().

  Raises:
    ValueError: unknown axis names, sizes < 1 (other than one -1), or a mesh
      larger than the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(mesh_shape, Mapping):
    unknown = sorted(set(mesh_shape) - set(MESH_AXES))
    if unknown:
      raise ValueError(
          f"mesh axes {unknown} are unknown; allowed axes are {MESH_AXES}.")
    sizes = [int(mesh_shape.get(name, 1)) for name in MESH_AXES]
  else:
    sizes = [int(s) for s in mesh_shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(
          f"mesh shape {tuple(sizes)} must have one size per axis {MESH_AXES}.")
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
    raise ValueError(
        f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be >= 1, with at most "
        "one -1 (fill with the remaining devices).")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
          f"divisible by {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
        f"{len(devices)} are available.")
  # A smaller mesh uses the first devices (e.g. one device on a multi-device host).
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
                       devices=devices[:math.prod(sizes)])


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for an array whose axes carry these logical names (Flax's rules
  engine, the one the parameters use).

  Raises:
    ValueError: a logical axis no rule names.
  """
  known = {logical for logical, _ in rules}
  unknown = [name for name in logical_axes if name is not None and name not in known]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no rule; known axes are {sorted(known)}.")
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
  """An activation's sharding by the logical axis rules, under the mesh set with
  `jax.set_mesh` (a no-op without one, e.g. in unsharded tests).

  Why: with weights split over fsdp on their embed axis and activations split over
  fsdp on their batch axis, the partitioner must choose for every matmul which of
  the two to re-shard; unconstrained it may gather the batch (each device then
  computes every row's attention: ~100 GiB at the 8B shape) instead of the weights.
  """
  return nn.with_logical_constraint(x, tuple(logical_axes), rules=LOGICAL_AXIS_RULES)


def named_sharding(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
  """NamedSharding for an array with the given logical axis names on `mesh`."""
  return NamedSharding(mesh, logical_to_spec(logical_axes))


_REPLICATED_LOGGED: set[str] = set()


def divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` without the mesh axes of size 1 and those that do not divide their
  array axis.

  Such an axis is replicated instead (e.g. 3 heads on a model axis of 2, or a
  192-wide embed axis on fsdp=128): jax refuses uneven shardings of arguments, and
  a model that does not split evenly should still run. Size-1 axes are dropped so
  specs read as what is really split (P("model", None), not P("model", "fsdp")
  with fsdp=1).
  """
  out = []
  for dim, entry in zip(shape, spec):  # a spec may be shorter than the shape
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    names = tuple(n for n in names if mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    if names and dim % size:
      # Said once per case: a replicated axis costs memory and compute on every device.
      message = (f"sharding: an axis of size {dim} does not divide over mesh axes "
                 f"{names} (size {size}): replicated on them instead")
      if message not in _REPLICATED_LOGGED:
        _REPLICATED_LOGGED.add(message)
        multihost.log(message)
    if not names or dim % size:
      out.append(None)
    else:
      out.append(names[0] if len(names) == 1 else names)
  return P(*out)


def tree_shardings(mesh: Mesh, boxed_tree):
  """Shardings of a tree of Flax-partitioned (boxed) abstract values (e.g. from
  jax.eval_shape of an init function), by the logical axis rules; an axis the mesh
  does not divide evenly is replicated (`divisible_spec`)."""
  specs = nn.get_partition_spec(boxed_tree)
  values = nn.meta.unbox(boxed_tree)

  def one(spec, value):
    spec = nn.logical_to_mesh_axes(tuple(spec), LOGICAL_AXIS_RULES) if spec else P()
    return NamedSharding(mesh, divisible_spec(spec, value.shape, mesh))

  return jax.tree.map(one, specs, values, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  """Shards of the batch axis: data x fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def mesh_summary(mesh: Mesh) -> str:
  """One line such as 'mesh data=4 fsdp=1 model=2 on 8 cpu devices' for logs."""
  sizes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  kinds = sorted({d.platform for d in np.asarray(mesh.devices).flat})
  return f"mesh {sizes} on {mesh.devices.size} {'/'.join(kinds)} devices"
