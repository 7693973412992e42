"""Mesh construction and the loss under jax.jit on a 4x2 mesh of forced CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from pdl_jax import sharding
from pdl_jax.losses import pdl


def test_eight_forced_cpu_devices():
  assert jax.device_count() == 8, "tests/conftest.py must force 8 CPU devices"


def test_make_mesh_from_config_and_fill():
  cfg = common.get_mesh_config()
  mesh = sharding.make_mesh(cfg.to_dict())
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh((-1, 2, 2)).shape) == {"data": 2, "fsdp": 2, "model": 2}
  assert dict(sharding.make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 8, "model": 1}
  assert sharding.make_mesh((1, 1, 1)).devices.ravel().tolist() == [jax.devices()[0]]
  assert "data=4 fsdp=1 model=2 on 8 cpu" in sharding.mesh_summary(
      sharding.make_mesh({"data": 4, "model": 2}))
  assert sharding.batch_shards(sharding.make_mesh({"data": 2, "fsdp": 4})) == 8


@pytest.mark.parametrize("shape, match", [
    ({"data": 4, "model": 4}, "needs 16 devices; 8 are available"),
    ({"data": 3, "model": -1}, "not divisible by 3"),
    ({"data": -1, "model": -1}, "at most one -1"),
    ({"data": 0, "model": 1}, "must be >= 1"),
    ({"data": 8, "expert": 1}, r"\['expert'\] are unknown"),
    ((8, 1), "one size per axis"),
])
def test_make_mesh_bad_shapes(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(shape)


def test_logical_rules_are_flax_rules():
  assert sharding.logical_to_spec(("batch", "length", "vocab")) == P(
      ("data", "fsdp"), None, "model")
  # FSDP: weights split over fsdp on their embed axis; activations keep embed whole
  # (the batch has taken fsdp).
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "model")
  assert sharding.logical_to_spec(("vocab", "embed")) == P("model", "fsdp")
  assert sharding.logical_to_spec(("layers", "embed", "heads", "kv")) == P(
      None, "fsdp", "model", None)
  assert sharding.logical_to_spec(("batch", "length", "embed")) == P(
      ("data", "fsdp"), None, None)
  # A mesh axis once per array, taken by the earlier rule (vocab before mlp).
  assert sharding.logical_to_spec(("mlp", "vocab")) == P(None, "model")
  with pytest.raises(ValueError, match="'pixels'"):
    sharding.logical_to_spec(("pixels",))
  # One engine: activations get exactly what Flax gives the parameters, also for a
  # rules table with fallbacks (where the old hand-written engine differed).
  rules = (("batch", "data"), ("embed", "model"), ("embed", "data"), ("mlp", "model"))
  for axes in (("batch", "embed"), ("embed", "mlp"), ("mlp", "embed"), ("embed",)):
    assert sharding.logical_to_spec(axes, rules) == nn.logical_to_mesh_axes(axes, rules)
  assert sharding.logical_to_spec(("mlp", "embed"), rules) == P(None, "model")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pdl_sharded_equals_single_device(dtype):
  rng = np.random.default_rng(0)
  b, l, v = 8, 6, 96
  logits = jnp.asarray(rng.normal(0, 2, (b, l, v)), dtype)
  labels = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  mask = jnp.asarray(rng.random((b, l)) > 0.3, jnp.float32)
  weights = jnp.asarray(pdl.power_law_weights(rng.zipf(1.5, v), 1.0))

  def value_and_grad(lg, lb, w, m):
    return jax.value_and_grad(pdl.pdl_loss)(lg, lb, w, mask=m)

  dev0 = jax.devices()[0]
  single = jax.jit(value_and_grad)(*jax.device_put((logits, labels, weights, mask), dev0))

  mesh = sharding.make_mesh({"data": 4, "model": 2})
  s = {"logits": sharding.named_sharding(mesh, "batch", "length", "vocab"),
       "labels": sharding.named_sharding(mesh, "batch", "length"),
       "mask": sharding.named_sharding(mesh, "batch", "length"),
       "weights": sharding.replicated(mesh)}
  args = (jax.device_put(logits, s["logits"]), jax.device_put(labels, s["labels"]),
          jax.device_put(weights, s["weights"]), jax.device_put(mask, s["mask"]))
  fn = jax.jit(value_and_grad,
               in_shardings=(s["logits"], s["labels"], s["weights"], s["mask"]),
               out_shardings=(sharding.replicated(mesh), s["logits"]))
  value, grad = fn(*args)
  assert grad.sharding.spec == P(("data", "fsdp"), None, "model")
  assert len(args[0].addressable_shards) == 8
  assert args[0].addressable_shards[0].data.shape == (2, 6, 48)
  np.testing.assert_allclose(float(value), float(single[0]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad, np.float32),
                             np.asarray(single[1], np.float32), rtol=1e-5, atol=1e-7)


def test_axes_the_mesh_does_not_divide_are_replicated(capsys):
  sharding._REPLICATED_LOGGED.clear()  # said once per process: earlier tests may have
  mesh = sharding.make_mesh({"fsdp": 4, "model": 2})
  assert sharding.divisible_spec(P("fsdp", "model"), (64, 6), mesh) == P("fsdp", "model")
  assert "replicated" not in capsys.readouterr().err
  # 3 heads on model=2 and a 6-wide axis on fsdp=4: replicated, not an error, and said
  # (once per case: e.g. 14 heads on model=4 would cost every device all heads).
  assert sharding.divisible_spec(P("fsdp", "model"), (6, 3), mesh) == P(None, None)
  sharding.divisible_spec(P("fsdp", "model"), (6, 3), mesh)
  err = capsys.readouterr().err
  assert err.count("an axis of size 3 does not divide over mesh axes ('model',) (size 2): "
                   "replicated") == 1
  assert err.count("an axis of size 6 does not divide over mesh axes ('fsdp',)") == 1
  assert sharding.divisible_spec(P(("data", "fsdp")), (8,), mesh) == P("fsdp")  # data=1
  assert sharding.divisible_spec(P(("data", "fsdp")), (8,), sharding.make_mesh(
      {"data": 2, "fsdp": 4})) == P(("data", "fsdp"))
  boxed = {"w": nn.Partitioned(jax.ShapeDtypeStruct((64, 3), jnp.float32),
                               ("embed", "heads")),
           "count": jax.ShapeDtypeStruct((5,), jnp.int32)}
  shardings = sharding.tree_shardings(mesh, boxed)
  assert shardings["w"].spec == P("fsdp", None)
  assert shardings["count"].spec == P()
