"""Scanned layers (model.scan_layers) and rematerialisation (model.remat): the same
logits, loss, gradients and greedy tokens as the unrolled decoder, for the own model
and a Hugging Face fixture; stacked loading, export and sharding of pretrained
checkpoints; the stack/unstack helpers; the fingerprint; clear errors.

Compile time and HLO size against depth are a benchmark's business, not a test's:
nothing here is timed.
"""

import dataclasses
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from configs import dialogue
from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.train import provenance
from pdl_jax.eval import decode as decode_lib
from pdl_jax import sharding
from pdl_jax.models import decoder
from pdl_jax.models import config as model_config
from pdl_jax.models import factory
from pdl_jax.models.hf import export as hf_export
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import weights as hf_weights

# The tests/ folder (this file is 1 level below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXTURES = os.path.join(TESTS, "fixtures", "hf")
VARIANTS = [(scan, remat) for scan in (False, True) for remat in model_config.REMATS]


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _own_cfg():
  # Three layers: a scan of more than two steps, and an odd count.
  return model_config.from_model_config(model_config.preset_config("tiny", vocab_size=50, num_layers=3))


def _loss_logits_grads(cfg, params, tokens_BxL):
  """(loss, logits, grads) of next-token cross-entropy, jitted, float32 matmuls."""
  model = decoder.Decoder(cfg)

  def loss_fn(p):
    logits_BxLxV, _ = model.apply({"params": p}, tokens_BxL)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV[:, :-1],
                                                          tokens_BxL[:, 1:])
    return jnp.mean(nll), logits_BxLxV

  with jax.default_matmul_precision("highest"):
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return float(loss), np.asarray(logits), jax.device_get(grads)


def _check_variants_agree(cfg, params, tokens_BxL, variants=tuple(VARIANTS)):
  """The (scan, remat) variants equal the unrolled, non-rematerialised decoder."""
  base_loss, base_logits, base_grads = _loss_logits_grads(cfg, params, tokens_BxL)
  stacked = decoder.stack_layers(params, cfg.num_layers)
  for scan, remat in variants:
    variant = dataclasses.replace(cfg, scan_layers=scan, remat=remat)
    loss, logits, grads = _loss_logits_grads(variant, stacked if scan else params,
                                             tokens_BxL)
    if scan:
      assert set(grads) == set(stacked)  # the stacked layout: one "blocks" tree
      grads = decoder.unstack_layers(grads)
    where = f"scan_layers={scan}, remat={remat}"
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6, err_msg=where)
    np.testing.assert_allclose(logits, base_logits, rtol=1e-5, atol=1e-5, err_msg=where)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                         err_msg=where), grads, base_grads)


def test_own_model_variants_agree():
  cfg = _own_cfg()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  params = nn.meta.unbox(decoder.Decoder(cfg).init(jax.random.key(0), tokens)["params"])
  _check_variants_agree(cfg, jax.device_get(params), tokens)


# qwen3 (GQA, q/k norm, RoPE): every variant; gpt2 (learned positions, so no RoPE
# tables to broadcast, biases): the scanned, rematerialised one (each variant compiles
# a gradient: the test time is what is spared).
@pytest.mark.parametrize("name,variants", [("qwen3", ((False, "full"), (True, "none"),
                                                     (True, "dots"))),
                                           ("gpt2", ((True, "full"),))])
def test_pretrained_variants_agree(name, variants):
  cfg = hf_families.read_config(_fixture(name))
  params = jax.device_get(hf_weights.load_params(_fixture(name), cfg))
  tokens = jnp.asarray(np.load(os.path.join(_fixture(name), "reference.npz"))["tokens"])
  _check_variants_agree(cfg, params, tokens, variants)


def test_scanned_params_are_stacked_with_a_layers_axis():
  cfg = dataclasses.replace(_own_cfg(), scan_layers=True)
  boxed = decoder.Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert not any(k.startswith("block_") for k in boxed)
  query = boxed[decoder.SCANNED]["attn"]["query"]["kernel"]
  assert query.names == ("layers", "embed", "heads", "kv")
  assert query.value.shape == (3, 64, 2, 32)
  leaves = jax.tree.leaves(boxed[decoder.SCANNED],
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(x.names[0] == "layers" for x in leaves)
  unrolled = nn.meta.unbox(hf_weights.abstract_params(_own_cfg()))
  want = jax.tree.map(lambda x: x.shape, decoder.stack_layers(unrolled, 3))
  assert jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed)) == want
  # Every name has a rule ("layers" included): param_shardings works scanned.
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  shardings = hf_weights.param_shardings(cfg, mesh)
  assert shardings[decoder.SCANNED]["attn"]["query"]["kernel"].spec == jax.sharding.PartitionSpec(
      None, None, "model", None)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_greedy_decoding_with_cache_scanned_equals_unrolled(remat):
  cfg = _own_cfg()
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 3, cfg.vocab_size)
  params = nn.meta.unbox(decoder.Decoder(cfg).init(jax.random.key(0), tokens)["params"])
  # Tiny random weights give near-ties; sharpen the logits so the argmax is stable.
  params["embed"]["embedding"] = params["embed"]["embedding"] * 4.0
  prompts, mask = decode_lib.left_pad([[5, 6, 7], [8, 9, 10, 11, 12]], 5, pad_id=0)
  outs = []
  for scan in (False, True):
    variant = dataclasses.replace(cfg, scan_layers=scan, remat=remat)
    p = decoder.stack_layers(params, cfg.num_layers) if scan else params
    outs.append(np.asarray(decode_lib.generate(
        decoder.Decoder(variant), p, jnp.asarray(prompts), jnp.asarray(mask), jax.random.key(0),
        max_new_tokens=7, eos_id=-1, pad_id=0)))
  np.testing.assert_array_equal(outs[1], outs[0])
  # The cache written by a scanned prefill equals the unrolled one, layer by layer.
  caches = []
  for scan in (False, True):
    variant = dataclasses.replace(cfg, scan_layers=scan)
    p = decoder.stack_layers(params, cfg.num_layers) if scan else params
    _, cache = decoder.Decoder(variant).apply({"params": p}, jnp.asarray(prompts),
                                          cache=decoder.init_cache(variant, 2, 9), cache_index=0)
    # Unrolled: one buffer per layer; scanned: one stacked buffer.
    assert isinstance(cache["k"], tuple) != scan
    caches.append(jax.tree.map(jnp.stack, cache, is_leaf=lambda x: isinstance(x, tuple))
                  if not scan else cache)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               caches[1], caches[0])


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])  # GQA; fused c_attn; shards
def test_scanned_load_and_export_equal_unrolled(name, tmp_path):
  cfg = hf_families.read_config(_fixture(name))
  scfg = dataclasses.replace(cfg, scan_layers=True)
  params = jax.device_get(hf_weights.load_params(_fixture(name), cfg))
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  shardings = hf_weights.param_shardings(scfg, mesh)
  stacked = hf_weights.load_params(_fixture(name), scfg, shardings)
  jax.tree.map(np.testing.assert_array_equal, decoder.stack_layers(params, cfg.num_layers),
               jax.device_get(stacked))
  query = stacked[decoder.SCANNED]["attn"]["query"]["kernel"]
  assert query.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
  assert query.addressable_shards[0].data.shape[0] == cfg.num_layers  # layers never split
  a = hf_export.export(stacked, scfg, tmp_path / "scanned")
  b = hf_export.export(params, cfg, tmp_path / "unrolled")
  ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
  assert sorted(ta) == sorted(tb)
  for key in tb:
    np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
  assert (a / "config.json").read_text() == (b / "config.json").read_text()


def test_scanned_load_sharded_unsharded_and_layers_not_split_equal():
  # Unsharded scanned load (default device) equals the stacked unrolled load.
  cfg = hf_families.read_config(_fixture("gemma"))
  scfg = dataclasses.replace(cfg, scan_layers=True, remat="full")
  got = hf_weights.load_params(_fixture("gemma"), scfg)
  want = decoder.stack_layers(jax.device_get(hf_weights.load_params(_fixture("gemma"), cfg)),
                          cfg.num_layers)
  jax.tree.map(np.testing.assert_array_equal, want, jax.device_get(got))


def test_stack_unstack_round_trip():
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"embed": {"embedding": normal(5, 4)}, "final_norm": {"scale": normal(4)},
            **{f"block_{i}": {"attn": {"query": {"kernel": normal(4, 2, 2)}},
                              "mlp_norm": {"scale": normal(4)}}
               for i in range(3)}}
  stacked = decoder.stack_layers(params, 3)
  assert sorted(stacked) == ["blocks", "embed", "final_norm"]
  assert stacked["blocks"]["attn"]["query"]["kernel"].shape == (3, 4, 2, 2)
  assert isinstance(stacked["blocks"]["mlp_norm"]["scale"], np.ndarray)
  np.testing.assert_array_equal(stacked["blocks"]["mlp_norm"]["scale"][1],
                                params["block_1"]["mlp_norm"]["scale"])
  jax.tree.map(np.testing.assert_array_equal, decoder.unstack_layers(stacked), params)
  # jax arrays stay jax arrays.
  on_device = jax.tree.map(jnp.asarray, params)
  back = decoder.unstack_layers(decoder.stack_layers(on_device, 3))
  assert isinstance(back["block_2"]["mlp_norm"]["scale"], jax.Array)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # ShapeDtypeStructs: shapes only.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  s = decoder.stack_layers(abstract, 3)
  assert s["blocks"]["attn"]["query"]["kernel"] == jax.ShapeDtypeStruct((3, 4, 2, 2),
                                                                         np.float32)
  assert decoder.unstack_layers(s) == abstract
  with pytest.raises(ValueError, match="block_0 ... block_3"):
    decoder.stack_layers(params, 4)
  with pytest.raises(ValueError, match="'blocks'"):
    decoder.unstack_layers(params)


def test_bad_remat_is_a_clear_error():
  with pytest.raises(ValueError, match=r"remat='some'.*'none', 'full', 'dots'"):
    dataclasses.replace(_own_cfg(), remat="some")


def _config(**model):
  c = dialogue.get_config("smoke")
  c.model.preset = "tiny"
  for k, v in model.items():
    c.model[k] = v
  return c


def test_factory_fills_scan_and_remat_for_own_and_pretrained_models():
  own = factory.decoder_config(_config(scan_layers=True, remat="dots").model, 64)
  assert (own.scan_layers, own.remat, own.model_type) == (True, "dots", "pdl")
  hf = factory.decoder_config(_config(pretrained=_fixture("qwen2"), scan_layers=True,
                                    remat="full").model)
  assert (hf.scan_layers, hf.remat, hf.model_type) == (True, "full", "qwen2")
  assert factory.decoder_config(_config().model, 64).scan_layers is False


def test_fingerprint_keeps_scan_layers_and_leaves_out_remat():
  tok = types.SimpleNamespace(sha256="x", vocab_size=64)

  def fp(**model):
    c = _config(**model)
    return provenance.fingerprint(c, tok, factory.describe(factory.make_model(c.model, 64)))

  assert fp(remat="full") == fp(remat="none") == fp(remat="dots")
  assert "remat" not in fp()["model"]
  assert fp(scan_layers=True) != fp()
  # Unscanned runs fingerprint as before the field existed: they still resume.
  assert "scan_layers" not in fp()["model"]


def _save_run(workdir, params):
  mngr = ckpt_lib.manager(str(workdir))
  ckpt_lib.save(mngr, 1, {"params": params}, {"fingerprint": {}})
  mngr.wait_until_finished()
  mngr.close()


def test_init_from_a_run_of_the_other_layout_converts(tmp_path):
  cfg = hf_families.read_config(_fixture("llama"))
  params = jax.device_get(hf_weights.load_params(_fixture("llama"), cfg))
  stacked = decoder.stack_layers(params, cfg.num_layers)
  _save_run(tmp_path / "unrolled", params)
  _save_run(tmp_path / "scanned", stacked)
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  for scan, run, want in ((True, "unrolled", stacked), (False, "scanned", params)):
    variant = dataclasses.replace(cfg, scan_layers=scan)
    shardings = hf_weights.param_shardings(variant, mesh)
    abstract = ckpt_lib.abstract_like(nn.meta.unbox(hf_weights.abstract_params(variant)),
                                      shardings)
    got = ckpt_lib.load_params(str(tmp_path / run), abstract)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 got, shardings)
  # Another model besides the other layout: a clear error naming scan_layers.
  other = dataclasses.replace(cfg, scan_layers=True, num_layers=cfg.num_layers + 1)
  abstract = nn.meta.unbox(hf_weights.abstract_params(other))
  with pytest.raises(ValueError, match="do not match.*scan_layers=False there, True here"):
    ckpt_lib.load_params(str(tmp_path / "unrolled"), abstract)


def test_fingerprint_keys_of_a_run_written_before_gemma3_fields():
  """A full-finetune run's model fingerprint has the keys it had when the committed
  runs were written (results/real/*/runs/*/provenance.json): fields added since leave
  it at their defaults, so such a run resumes; set, they enter it."""
  import dataclasses
  import json
  import os
  from pdl_jax.models import config as model_config
  from pdl_jax.models import decoder
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with open(os.path.join(root, "results", "real", "summarization", "runs", "ce-seed0",
                         "provenance.json")) as f:
    stored = json.load(f)["model"]
  cfg = model_config.from_model_config(model_config.preset_config("tiny", vocab_size=64))
  # remat and an unscanned scan_layers: provenance.fingerprint leaves them out.
  assert set(factory.describe(decoder.Decoder(cfg))) - {"remat", "scan_layers"} == set(stored)
  capped = dataclasses.replace(cfg, final_logit_softcap=30.0)
  assert factory.describe(decoder.Decoder(capped))["final_logit_softcap"] == 30.0
