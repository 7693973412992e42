"""LoRA and QLoRA (pdl_jax.models.lora, pdl_jax.models.quant): step 0 equals the base, only
the adapters train (no gradients or optimizer state for the base), the merge equals
the adapter forward, adapter gradients against finite differences, quantisation
against a numpy reference, resume and sharding exactness, PEFT names for every
family, init_from rules, config errors, and a CLI finetune + export of a fixture."""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from safetensors.numpy import load_file, save_file

from pdl_jax import config_checks
from pdl_jax.cli import export_hf
from pdl_jax.models.hf import peft as hf_peft
from pdl_jax.models import lora
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import run as run_lib
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
from pdl_jax.models import quant
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import weights as hf_weights

from test_faults import ROOT, env, params_and_steps
from test_train import tiny_config

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
LLAMA = os.path.join(FIXTURES, "llama")
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def lora_cfg(base: model_config.DecoderConfig, rank=4, quant_kind="none", **kw):
  return dataclasses.replace(base, lora_rank=rank, lora_alpha=8.0, lora_targets=ALL,
                             base_quant=quant_kind, **kw)


def small_cfg(**kw):
  """A decoder whose projections hold whole nf4 blocks (64 input rows)."""
  return model_config.DecoderConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, mlp_dim=128, **kw)


def forward(model, params, tokens=None):
  """The model's logits, jitted: one compile instead of an eager dispatch per op (the
  tests' main cost)."""
  return jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(
      params, TOKENS if tokens is None else tokens)


def init(cfg, seed=0):
  model = decoder.Decoder(cfg)
  init_fn = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
  return model, nn.meta.unbox(init_fn(jax.random.key(seed)))


def randomise_b(adapters, seed=1, scale=0.05):
  """Adapters with a non-zero B (at init B = 0 and A gets no gradient)."""
  leaves, tree = jax.tree.flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [scale * jax.random.normal(k, x.shape) if path[-1].key == "lora_b" else x
         for k, (path, x) in zip(keys, leaves)]
  return jax.tree.unflatten(tree, out)


TOKENS = np.random.default_rng(0).integers(0, 97, (2, 12)).astype(np.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_step0_logits_equal_the_base(scan):
  base_cfg = dataclasses.replace(hf_families.read_config(LLAMA), scan_layers=scan)
  base = hf_weights.load_params(LLAMA, base_cfg)
  cfg = lora_cfg(base_cfg)
  model, params = init(cfg)
  adapters, _ = lora.split(params)
  want = forward(decoder.Decoder(base_cfg), base)
  got = forward(model, lora.combine(base, adapters))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # B = 0: exactly
  assert all(np.all(np.asarray(b) == 0) for b in jax.tree.leaves(
      {k: v for k, v in flax.traverse_util.flatten_dict(adapters).items()
       if k[-1] == "lora_b"}))
  # Every targeted projection has an adapter, nothing else has one.
  paths = {k[:-1] for k in flax.traverse_util.flatten_dict(adapters)}
  layer = decoder.SCANNED if scan else "block_0"
  assert {p[1:] for p in paths if p[0] == layer} == {
      ("attn", "query"), ("attn", "key"), ("attn", "value"), ("attn", "out"),
      ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")}


@pytest.mark.parametrize("quant_kind", ["none", "int8", "nf4"])
@pytest.mark.parametrize("scan", [False, True])
def test_merged_params_equal_the_adapter_forward(quant_kind, scan):
  cfg = lora_cfg(small_cfg(scan_layers=scan), quant_kind=quant_kind)
  model, params = init(cfg)
  adapters, base = lora.split(params)
  params = lora.combine(base, randomise_b(adapters))
  want = forward(model, params)
  plain = dataclasses.replace(cfg, lora_rank=0, lora_targets=(), base_quant="none")
  merged = jax.jit(lambda p: lora.merge(p, cfg))(params)  # pure: one compile
  assert not any(k[-1] in lora.ADAPTER_PARAMS + quant.PARAM_NAMES.get(quant_kind, ())
                 for k in flax.traverse_util.flatten_dict(merged))
  got = forward(decoder.Decoder(plain), merged)
  assert float(jnp.abs(want - forward(model, lora.combine(base, adapters))).max()
               ) > 1e-3  # B moved the logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_adapter_gradient_matches_finite_differences():
  cfg = lora_cfg(small_cfg())
  model, params = init(cfg)
  adapters, base = lora.split(params)
  adapters = randomise_b(adapters, scale=0.2)
  labels = np.roll(TOKENS, -1, axis=1)

  @jax.jit
  def loss(a):
    logits = model.apply({"params": lora.combine(base, a)}, TOKENS)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(adapters)
  assert set(flax.traverse_util.flatten_dict(grads)) == set(
      flax.traverse_util.flatten_dict(adapters))  # gradients of the adapters alone
  rng = np.random.default_rng(0)
  h = 1e-2
  for _ in range(4):  # directional derivatives (float32 model: central differences)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                             adapters)
    norm = optax.tree.norm(direction)
    direction = jax.tree.map(lambda d: d / norm, direction)  # a unit step
    shift = lambda s: jax.tree.map(lambda x, d: x + s * d, adapters, direction)
    fd = (float(loss(shift(h))) - float(loss(shift(-h)))) / (2 * h)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(
        jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert analytic == pytest.approx(fd, rel=1e-2, abs=1e-4)
    assert abs(analytic) > 1e-2


def test_train_step_updates_only_the_adapters():
  cfg = lora_cfg(small_cfg())
  model, params = init(cfg)
  adapters, base = lora.split(params)
  base_before = jax.tree.map(np.array, base)
  config = tiny_config(**{"loss.name": "ce", "optimizer.learning_rate": 1e-2,
                          "optimizer.warmup_steps": 0})
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  state = state_lib.fresh_state(adapters, tx, cfg.vocab_size)
  # No optimizer state for the base: Adam's two moments of the adapters only.
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * lora.count(adapters)
  loss_fn = run_lib.make_loss_fn(config, model)
  batch = {"inputs": TOKENS, "labels": np.roll(TOKENS, -1, 1),
           "loss_mask": np.ones_like(TOKENS, np.float32)}
  # The trainable / frozen split: the base rides in the state, outside the gradient.
  state = state.replace(frozen=base)
  step = jax.jit(lambda s, b, w: step_lib.train_step(s, b, w, loss_fn=loss_fn, tx=tx))
  new, metrics = step(state, batch, jnp.ones(cfg.vocab_size))
  assert np.isfinite(float(metrics["train/loss"]))
  assert jax.tree.structure(new.params) == jax.tree.structure(adapters)
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new.params),
                                                       jax.tree.leaves(adapters))]
  assert min(moved) > 0  # every adapter leaf trained (B from 0, A once B is not)
  # The base comes back bit-identical, and nothing of it trained: above, the params
  # and moments are the adapters' alone.
  for a, b in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(base_before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_grad_accumulation_and_chunked_loss_with_lora():
  """Exact accumulation (k=2 equals k=1) and the chunked / windowed loss (equal
  to the full-logits loss) hold for adapter gradients too."""
  cfg = lora_cfg(small_cfg())
  model, params = init(cfg)
  adapters, base = lora.split(params)
  adapters = randomise_b(adapters)
  opt_config = tiny_config(**{"optimizer.warmup_steps": 0})
  tx = opt_lib.make_optimizer(opt_config.optimizer, opt_config.num_steps)
  state = state_lib.fresh_state(adapters, tx, cfg.vocab_size)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 97, (4, 12)).astype(np.int32)
  mask = (np.arange(12)[None] >= rng.integers(3, 8, (4, 1))).astype(np.float32)
  batch = {"inputs": tokens, "labels": np.roll(tokens, -1, 1), "loss_mask": mask}
  weights = jnp.asarray(rng.uniform(0.5, 2.0, cfg.vocab_size), jnp.float32)
  outs = []
  for k, chunked in ((1, False), (2, False), (1, True)):
    config = tiny_config(**{"loss.name": "pdl", "loss.chunked": chunked,
                            "loss.chunk_size": 32})
    fn = run_lib.make_loss_fn(config, model)
    new, m = jax.jit(functools.partial(step_lib.train_step, loss_fn=fn, tx=tx,
                                       grad_accum_steps=k))(state.replace(frozen=base),
                                                            batch, weights)
    outs.append((float(m["train/loss"]), new.params))
  for loss, p in outs[1:]:
    assert loss == pytest.approx(outs[0][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0][1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_dropout_only_with_a_dropout_rng():
  cfg = lora_cfg(small_cfg(), lora_dropout=0.5)
  model, params = init(cfg)
  adapters, base = lora.split(params)
  params = lora.combine(base, randomise_b(adapters))
  plain = forward(model, params)
  again = forward(model, params)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))  # eval: none
  dropped = jax.jit(lambda p: model.apply({"params": p}, TOKENS,
                                          rngs={"dropout": jax.random.key(0)})[0])(params)
  assert float(jnp.abs(dropped - plain).max()) > 1e-4


def test_dropout_reaches_the_train_step(mock_data, tmp_path):
  """dropout_seed draws a mask per step (same seed and step: same mask), and a run
  with model.lora.dropout trains differently from one without."""
  cfg = lora_cfg(small_cfg(), lora_dropout=0.5)
  model, params = init(cfg)
  adapters, base = lora.split(params)
  adapters = randomise_b(adapters)
  config = tiny_config(**{"optimizer.warmup_steps": 0})
  tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
  fn = run_lib.make_loss_fn(config, model)
  batch = {"inputs": TOKENS, "labels": np.roll(TOKENS, -1, 1),
           "loss_mask": np.ones_like(TOKENS, np.float32)}
  w = jnp.ones(cfg.vocab_size)
  steps = {seed: jax.jit(functools.partial(step_lib.train_step, loss_fn=fn, tx=tx,
                                           dropout_seed=seed)) for seed in (0, None)}
  loss = lambda seed, step=0: float(steps[seed](
      state_lib.fresh_state(adapters, tx, cfg.vocab_size).replace(step=jnp.int32(step),
                                                                  frozen=base),
      batch, w)[1]["train/loss"])
  assert loss(0) == loss(0) != loss(None)
  assert loss(0, step=1) != loss(0)
  runs = {}
  for name, rate in (("plain", 0.0), ("dropout", 0.5)):
    run_lib.train_and_evaluate(lora_run_config(num_steps=3, **{"model.lora.dropout": rate}),
                             str(tmp_path / name))
    runs[name] = jax.tree.leaves(params_and_steps(tmp_path / name)[1])
  assert any(not np.array_equal(a, b) for a, b in zip(runs["plain"], runs["dropout"]))


# ------------------------------------------------------------------ quantisation


def np_nf4(w, block=64):
  """Independent numpy NF4: nearest code of w / absmax per block of rows."""
  n_in, n_out = w.shape
  blocks = w.reshape(n_in // block, block, n_out)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  normed = blocks / absmax
  idx = np.abs(normed[..., None] - quant.NF4_CODE).argmin(-1)
  return (quant.NF4_CODE[idx] * absmax).reshape(n_in, n_out)


def test_quantisation_against_numpy():
  w = np.random.default_rng(0).normal(0, 0.05, (128, 48)).astype(np.float32)
  stored = quant.quantize("nf4", jnp.asarray(w))
  assert stored["kernel_nf4"].dtype == jnp.uint8 and stored["kernel_nf4"].shape == (64, 48)
  np.testing.assert_allclose(np.asarray(quant.dequantize("nf4", stored, jnp.float32)),
                             np_nf4(w), rtol=1e-6, atol=1e-7)
  stored = quant.quantize("int8", jnp.asarray(w))
  scale = np.abs(w).max(axis=0) / 127
  want = np.clip(np.round(w / scale), -127, 127) * scale
  np.testing.assert_allclose(np.asarray(quant.dequantize("int8", stored, jnp.float32)),
                             want, rtol=1e-6, atol=1e-7)
  assert np.abs(want - w).max() <= scale.max() / 2 + 1e-7
  # 4.5 and 8 (+ scales) bits a weight, against float32's 32.
  assert quant.stored_bytes(quant.quantize("nf4", jnp.asarray(w))) == 128 * 48 // 2 + 2 * 48 * 4
  with pytest.raises(ValueError, match="blocks of 64 input rows; a projection has 96"):
    quant.quantize("nf4", jnp.zeros((96, 8)))


def test_quantize_params_matches_the_quantised_model():
  """A loaded float base quantised by quantize_params has the quantised model's tree,
  and its forward equals the float forward with dequantised kernels; the rounding
  costs int8 well under a per cent of the logits, nf4 more (xavier-uniform weights,
  many near the block's absmax where NF4's codes are sparse), neither garbage."""
  errors = {}
  for kind in ("int8", "nf4"):
    cfg = lora_cfg(small_cfg(scan_layers=True), quant_kind=kind)
    plain = dataclasses.replace(cfg, lora_rank=0, lora_targets=(), base_quant="none")
    _, float_params = init(plain, seed=3)
    stored = jax.jit(lambda p: quant.quantize_params(p, cfg))(float_params)  # pure
    model, params = init(cfg)
    adapters, base = lora.split(params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), stored) == jax.tree.map(
        lambda x: (x.shape, x.dtype), base)
    got = forward(model, lora.combine(stored, adapters))
    merged = jax.jit(lambda p: lora.merge(p, cfg))(lora.combine(stored, adapters))
    want = forward(decoder.Decoder(plain), merged)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    full = forward(decoder.Decoder(plain), float_params)
    errors[kind] = float(jnp.linalg.norm(got - full) / jnp.linalg.norm(full))
  assert 0 < errors["int8"] < 0.01 and errors["int8"] < errors["nf4"] < 0.25, errors


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("scan", [False, True])
def test_quantising_load_equals_quantize_params(kind, scan, tmp_path):
  """load_base quantises tensor by tensor on the host (the float base never reaches
  a device): the same stored params as quantize_params of the loaded float base."""
  from pdl_jax import sharding
  from pdl_jax.models.hf import export as hf_export
  own = dataclasses.replace(small_cfg(), model_type="pdl", tied_embeddings=False)
  _, params = init(own, seed=5)
  hf_export.export(params, own, tmp_path / "base")
  plain = dataclasses.replace(hf_families.read_config(tmp_path / "base"), scan_layers=scan)
  cfg = lora_cfg(plain, quant_kind=kind)
  model = decoder.Decoder(cfg)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  _, shardings = state_lib.abstract_base(model, mesh, 8)  # the state's `frozen` shardings
  got = state_lib.load_base(str(tmp_path / "base"), model, shardings)
  want = quant.quantize_params(hf_weights.load_params(tmp_path / "base", plain), cfg)
  flat_got, flat_want = (flax.traverse_util.flatten_dict(t) for t in (got, want))
  assert set(flat_got) == set(flat_want)
  assert any(k[-1] in quant.PARAM_NAMES[kind] for k in flat_got)
  for k in flat_want:
    a, b = np.asarray(flat_got[k]), np.asarray(flat_want[k])
    assert a.dtype == b.dtype, k
    np.testing.assert_array_equal(a, b, err_msg=str(k))  # host and device: same bits


# ------------------------------------------------------------------ PEFT names


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3",
                                    "gemma3_mm"])
def test_peft_names_for_each_family(family, tmp_path):
  path = os.path.join(FIXTURES, family)
  base_cfg = hf_families.read_config(path)
  cfg = lora_cfg(base_cfg)
  _, params = init(cfg)
  tensors = hf_peft.peft_tensors(lora.split(params)[0], cfg)
  stored = {}
  for name in os.listdir(path):  # one file, or shards (mistral's fixture)
    if name.endswith(".safetensors"):
      stored.update(load_file(os.path.join(path, name)))
  # The multimodal Gemma 3's modules are model.language_model.* in transformers v5
  # (and in PEFT's names), stored as language_model.model.* on the Hub.
  stored = {re.sub(r"^language_model\.model\.", "model.language_model.", k): v
            for k, v in stored.items()}
  assert len(tensors) == 2 * 7 * base_cfg.num_layers
  for name, value in tensors.items():
    assert name.startswith("base_model.model.")
    module, kind = name.removeprefix("base_model.model.").rsplit(".", 2)[0], name.split(".")[-2]
    weight = stored[f"{module}.weight"]  # torch Linear [out, in]
    want = (cfg.lora_rank, weight.shape[1]) if kind == "lora_A" else (weight.shape[0],
                                                                        cfg.lora_rank)
    assert value.shape == want, (name, value.shape, want)
  conf = hf_peft.peft_config(cfg, "some/base")
  projections = sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"])
  if family == "gemma3_mm":  # a pattern: the vision tower's q/k/v_proj stay unwrapped
    pattern = re.compile(conf["target_modules"])
    modules = {k.removesuffix(".weight") for k in stored}
    wrapped = sorted(m for m in modules if pattern.fullmatch(m))
    assert wrapped == sorted(n.removeprefix("base_model.model.").rsplit(".", 2)[0]
                             for n in tensors if n.endswith("lora_A.weight"))
    assert any(m.startswith("vision_tower.") and m.endswith("q_proj") for m in modules)
  else:
    assert conf["target_modules"] == projections
  assert (conf["r"], conf["lora_alpha"], conf["peft_type"]) == (4, 8.0, "LORA")
  assert conf["base_model_name_or_path"] == "some/base"
  only_q = dataclasses.replace(cfg, lora_targets=("q", "v"))
  assert hf_peft.peft_config(only_q, "b")["target_modules"] == (
      ["q_proj", "v_proj"] if family != "gemma3_mm" else
      r"model\.language_model\.layers\.\d+\.\w+\.(q_proj|v_proj)")
  # The values in PEFT's layout: W_hf + (alpha / r) B_peft @ A_peft is the merged
  # model's tensor in transformers' layout, for every module (head order included).
  from pdl_jax.models.hf import export as hf_export
  adapters = randomise_b(lora.split(params)[0], scale=0.5)
  base = hf_weights.load_params(path, base_cfg)
  tensors = hf_peft.peft_tensors(adapters, cfg)
  merged = lora.merge(lora.combine(base, adapters), cfg)
  out = tmp_path / "merged"
  hf_export.export(merged, base_cfg, out)
  exported = load_file(str(out / "model.safetensors"))
  scale = cfg.lora_alpha / cfg.lora_rank
  names = {n.rsplit(".", 2)[0] for n in tensors}
  for name in names:
    module = name.removeprefix("base_model.model.")
    want = stored[f"{module}.weight"] + scale * (tensors[f"{name}.lora_B.weight"]
                                                 @ tensors[f"{name}.lora_A.weight"])
    # (A multimodal Gemma 3 exports its text model alone: model.* names.)
    text_module = module.replace("model.language_model.", "model.")
    np.testing.assert_allclose(exported[f"{text_module}.weight"], want, rtol=1e-5, atol=1e-6)


def test_peft_export_refused_for_fused_gpt2():
  cfg = lora_cfg(hf_families.read_config(os.path.join(FIXTURES, "gpt2")))
  with pytest.raises(ValueError, match="c_attn.*--merge"):
    hf_peft.peft_config(cfg, "gpt2")


# ------------------------------------------------------------------ runs


@pytest.fixture
def mock_data():
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def lora_run_config(num_steps=6, **overrides):
  c = tiny_config(**{"num_steps": num_steps, "eval_every": 100, "checkpoint_every": 3,
                     "optimizer.learning_rate": 1e-2, "model.lora.rank": 4, **overrides})
  c.model.pretrained = LLAMA
  return c


def test_config_errors():
  c = tiny_config(**{"model.lora.rank": 4})
  with pytest.raises(ValueError, match="adapts a pretrained base; set config.model.pretrained"):
    config_checks.validate_config(c)
  for key, value, match in (("model.lora.targets", ("q", "x"), r"unknown: \['x'\]"),
                            ("model.lora.base_quant", "int4", "base_quant='int4'"),
                            ("model.lora.alpha", 0.0, "alpha=0.0"),
                            ("model.lora.dropout", 1.0, "dropout=1.0")):
    with pytest.raises(ValueError, match=match):
      config_checks.validate_config(lora_run_config(**{key: value}))
  with pytest.raises(ValueError, match="set config.model.lora.rank > 0"):
    config_checks.validate_config(tiny_config(**{"model.lora.base_quant": "nf4"}))
  # A frozen bfloat16 base is allowed with LoRA, refused for full finetuning.
  config_checks.validate_config(lora_run_config(**{"model.param_dtype": "bfloat16"}))
  with pytest.raises(ValueError, match="does not train"):
    config_checks.validate_config(tiny_config(**{"model.param_dtype": "bfloat16"}))


def test_resume_and_sharding_are_exact(mock_data, tmp_path):
  straight = tmp_path / "straight"
  run_lib.train_and_evaluate(lora_run_config(), str(straight))
  step, want = params_and_steps(straight)
  assert step == 6
  assert set(k[-1] for k in flax.traverse_util.flatten_dict(want)) == {"lora_a", "lora_b"}
  # Killed after 3 steps (steps_per_run), resumed: the same adapters.
  resumed = tmp_path / "resumed"
  run_lib.train_and_evaluate(lora_run_config(steps_per_run=3), str(resumed))
  assert params_and_steps(resumed)[0] == 3
  run_lib.train_and_evaluate(lora_run_config(steps_per_run=3), str(resumed))
  _, got = params_and_steps(resumed)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  # FSDP x model sharding over 4 devices, rematerialised: same adapters. (A scanned
  # model draws its initial A per layer from other keys: not comparable here; the
  # scanned forward is checked in test_step0 / test_merged.)
  sharded = tmp_path / "sharded"
  run_lib.train_and_evaluate(lora_run_config(**{
      "mesh.fsdp": 2, "mesh.model": 2, "model.remat": "full"}), str(sharded))
  _, got = params_and_steps(sharded)
  flat_got, flat_want = (flax.traverse_util.flatten_dict(t) for t in (got, want))
  assert set(flat_got) == set(flat_want)
  for k in flat_want:
    np.testing.assert_allclose(flat_got[k], flat_want[k], rtol=2e-4, atol=2e-6)
  # A quantised (int8) base sharded the same way: the one-device adapters too.
  got = {}
  for name, mesh in (("q1", {}), ("q4", {"mesh.fsdp": 2, "mesh.model": 2})):
    run_lib.train_and_evaluate(lora_run_config(num_steps=3, **{
        "model.lora.base_quant": "int8", **mesh}), str(tmp_path / name))
    got[name] = flax.traverse_util.flatten_dict(params_and_steps(tmp_path / name)[1])
  for k in got["q1"]:
    np.testing.assert_allclose(got["q4"][k], got["q1"][k], rtol=2e-4, atol=2e-6)


def test_init_from_and_resume_rules(mock_data, tmp_path):
  mybase = tmp_path / "mybase"
  shutil.copytree(LLAMA, mybase)

  def config(**kw):
    c = lora_run_config(num_steps=3, **kw)
    c.model.pretrained = str(mybase)
    return c

  first = tmp_path / "first"
  run_lib.train_and_evaluate(config(), str(first))
  # A LoRA run continues another's adapters (step 0, its adapters).
  second = tmp_path / "second"
  c = config()
  c.init_from = str(first)
  run_lib.train_and_evaluate(c, str(second))
  assert params_and_steps(second)[0] == 3
  # The base's weights change (same folder): its adapters neither carry over nor resume.
  t = load_file(os.path.join(mybase, "model.safetensors"))
  t["model.norm.weight"] = t["model.norm.weight"] * 2
  save_file(t, os.path.join(mybase, "model.safetensors"), metadata={"format": "pt"})
  c = config()
  c.init_from = str(first)
  with pytest.raises(ValueError, match="adapters do not carry over between bases"):
    run_lib.train_and_evaluate(c, str(tmp_path / "third"))
  with pytest.raises(ValueError, match="lora_base_weights_sha256: stored"):
    run_lib.train_and_evaluate(config(), str(first))
  with pytest.raises(ValueError, match="export against the base the run used"):
    export_hf.export_run(str(first), str(tmp_path / "export"), merge=True)
  assert not (tmp_path / "export").exists()
  # Other adapters (rank) are not continued either, whatever the base.
  c = config(**{"model.lora.rank": 8})
  c.init_from = str(second)
  with pytest.raises(ValueError, match="has other adapters .lora_rank: 4 there, 8 here"):
    run_lib.train_and_evaluate(c, str(tmp_path / "fifth"))
  # A full finetune is not a LoRA run to continue.
  full = tmp_path / "full"
  fc = tiny_config(**{"num_steps": 2, "eval_every": 100})
  fc.model.pretrained = str(mybase)
  run_lib.train_and_evaluate(fc, str(full))
  c = config()
  c.init_from = str(full)
  with pytest.raises(ValueError, match="is a full finetune, not a LoRA run"):
    run_lib.train_and_evaluate(c, str(tmp_path / "fourth"))


def test_cli_finetune_and_export(tmp_path):
  """The CLI on the user-data example: a LoRA (int8 base) finetune, its PEFT export
  and the merged export; the merged export's logits (read back by the Hugging Face
  loader) equal the merge of the run's float base and adapters."""
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "pdl_jax.main",
         f"--config=configs/summarization.py:smoke,dataset=files,pretrained={LLAMA}",
         "--config.dataset.train=examples/support_summaries.jsonl",
         "--config.max_target_len=24", "--config.seq_len=64", f"--workdir={work}",
         "--config.model.lora.rank=4", "--config.model.lora.base_quant=int8",
         "--config.model.lora.targets=('q','v','down')",
         "--config.num_steps=4", "--config.eval_every=4", "--config.log_every=2",
         "--config.eval.num_examples=2", "--config.eval.max_new_tokens=3",
         "--config.optimizer.learning_rate=3e-2"]
  done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "trainable parameters" in done.stderr and "stored as int8" in done.stderr
  for out, extra in (("peft", []), ("merged", ["--merge"])):
    exp = subprocess.run([sys.executable, "-m", "pdl_jax.cli.export_hf", f"--workdir={work}",
                          f"--out={tmp_path / out}", *extra], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert exp.returncode == 0, exp.stderr[-3000:]
  conf = json.load(open(tmp_path / "peft" / "adapter_config.json"))
  assert conf["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert conf["base_model_name_or_path"] == LLAMA and conf["r"] == 4
  tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  assert len(tensors) == 2 * 3 * 2  # A and B, three targets, two layers
  _, adapters = params_and_steps(work)
  cfg = dataclasses.replace(hf_families.read_config(LLAMA), lora_rank=4, lora_alpha=16.0,
                            lora_targets=("q", "v", "down"))
  assert float(np.abs(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
                      ).max()) > 0  # trained
  np.testing.assert_array_equal(
      tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
      adapters["block_0"]["attn"]["query"]["lora_a"].T)
  base = hf_weights.load_params(LLAMA, hf_families.read_config(LLAMA))
  merged = lora.merge(lora.combine(base, adapters), cfg)
  want = decoder.Decoder(hf_families.read_config(LLAMA)).apply({"params": merged}, TOKENS % 300)[0]
  got = hf_weights.logits(str(tmp_path / "merged"), TOKENS % 300)
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
