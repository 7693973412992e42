"""TPU slices as compile targets (pdl_jax/train/tpu_targets.py) and `--plan`
(pdl_jax/cli/plan.py): the TPU compiler (libtpu) on this CPU machine, tiny models.
Skipped where libtpu is not installed (requirements-tpu.txt)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from configs.common import load_config
from pdl_jax.cli import plan
from pdl_jax.models import decoder
from pdl_jax.train import tpu_targets

needs_libtpu = pytest.mark.skipif(not tpu_targets.has_libtpu(),
                                  reason="libtpu not installed (requirements-tpu.txt)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**over):
  """The dialogue task's own model at the tiny preset, sized for seconds of compile."""
  c = load_config("configs/dialogue.py:pretrained=none")
  c.model.preset = "tiny"
  c.tokenizer.vocab_size = 256
  c.seq_len, c.batch_size, c.eval.batch_size, c.eval.max_new_tokens = 128, 8, 8, 8
  for k, v in over.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return c


@pytest.mark.parametrize("name,chips,topology,devices", [
    ("v5e-4", 4, "v5e:2x2", 4), ("v5litepod-16", 16, "v5e:4x4", 16),
    ("v5p-8", 4, "v5p:2x2x1", 4), ("v5p-64", 32, "v5p:2x4x4", 32),
    ("v4-8", 4, "v4:2x2x1", 4), ("v6e-256", 256, "v6e:16x16", 256)])
def test_slice_names_count_chips_or_cores_as_cloud_does(name, chips, topology, devices):
  s = tpu_targets.parse_slice(name)
  assert (s.chips, s.topology, s.num_devices) == (chips, topology, devices)


def test_unknown_slice_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"'v5e-3' is unknown.*known slices: .*v5e-4.*v6e-8"):
    tpu_targets.parse_slice("v5e-3")
  with pytest.raises(ValueError, match="single chips"):
    tpu_targets.parse_slice("v6e-1")


@needs_libtpu
@pytest.mark.parametrize("name", ["v5e-8", "v5p-16", "v4-8"])
def test_libtpu_topologies_have_the_tables_devices(name):
  s = tpu_targets.parse_slice(name)
  found = tpu_targets.devices(s)
  assert len(found) == s.num_devices
  assert found[0].platform == "tpu"


@needs_libtpu
def test_impossible_meshes_and_batches_are_refused_before_compiling():
  with pytest.raises(ValueError, match=r"needs 8 devices; 4 are available.*v5e-4"):
    plan.check_target(tiny_config(**{"mesh.data": 1, "mesh.model": 8}), "v5e-4")
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible.*v5e-4"):
    plan.check_target(tiny_config(batch_size=6), "v5e-4")


@needs_libtpu
def test_plan_of_a_tiny_config_fits_and_times_its_steps():
  # With the chunked loss (a loop the cost model counts once) the step is timed from
  # unrolled compiles with the plain loss.
  text, fits = plan.report(tiny_config(**{"loss.chunked": True}), "v5e-4")
  assert fits, text
  assert "plain loss" in text, text
  assert "train step:" in text and "decode step" in text and ": fits" in text
  assert "attention compiled: splash" in text  # model.attention "auto" on a TPU
  # The step-time estimate is positive once the cost model's sentinels are removed.
  ms = float(text.split("(optimal_seconds) ")[1].split(" ms")[0])
  assert 0 < ms < 1000, text


@needs_libtpu
def test_splash_train_step_compiles_to_the_tpu_kernel_with_fewer_temporaries():
  c = tiny_config(seq_len=2048, batch_size=2, **{"mesh.data": 1, "model.dtype": "bfloat16",
                                                  "loss.window": False})
  _, mesh = plan.check_target(c, "v5e-4")
  out = {}
  for impl in ("xla", "splash"):
    c.model.attention = impl
    out[impl] = tpu_targets.compile_train(c, plan.model_of(c), mesh)
  assert "tpu_custom_call" in out["splash"].compiled.as_text()
  assert "tpu_custom_call" not in out["xla"].compiled.as_text()
  # The dense path keeps [B, H, L, L] scores (2 x 2 x 2048^2 float32: 64 MiB; at seq
  # 1024 the TPU compiler kept them no larger than splash did).
  assert out["splash"].temp_bytes * 4 < out["xla"].temp_bytes, (
      out["splash"].temp_bytes, out["xla"].temp_bytes)


@needs_libtpu
def test_plan_of_qlora_on_a_windowed_scanned_base_with_accumulation():
  # Gemma 3's local / global layers (a traced flag picks each layer's splash kernel),
  # an int8 base, two micro-batches: the step time comes from unrolled 1- and 2-layer
  # compiles of one micro-batch.
  c = tiny_config(**{"model.pretrained": os.path.join(ROOT, "tests/fixtures/hf/gemma3"),
                     "model.lora.rank": 4, "model.lora.base_quant": "int8",
                     "model.scan_layers": True, "optimizer.grad_accum_steps": 2})
  text, fits = plan.report(c, "v5e-4", decode=False)
  assert fits, text
  assert "LoRA r4, base int8" in text and "attention compiled: splash" in text
  assert "x 2 micro-batches" in text, text


@needs_libtpu
def test_plan_says_what_to_change_when_it_does_not_fit(monkeypatch):
  # A 2^23-wide MLP in both layers: 12 GiB of params, 36 GiB with AdamW's moments, on
  # each 16 GiB v5e chip (data parallel: unsharded): the compiler refuses it. (Not a
  # 2^25-row vocabulary: the TPU compiler's host memory grows with vocab x d_model,
  # 8.9 GB at its peak for 2^25 x 64 measured, enough to kill a CI worker.)
  model_of = plan.model_of
  monkeypatch.setattr(plan, "model_of", lambda config: decoder.Decoder(
      dataclasses.replace(model_of(config).cfg, mlp_dim=2 ** 23)))
  text, fits = plan.report(tiny_config(), "v5e-4", decode=False)
  assert not fits, text
  assert "DOES NOT FIT" in text and "--config.mesh.fsdp=4" in text, text


@needs_libtpu
def test_main_plan_flag_bad_slice_is_one_line_error():
  out = subprocess.run([sys.executable, "-m", "pdl_jax.main",
                        "--config=configs/dialogue.py:pretrained=none", "--plan=v9-8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1, out.stderr
  assert "'v9-8' is unknown" in out.stderr and "Traceback" not in out.stderr


def test_every_offline_base_plans_without_its_download(tmp_path, monkeypatch):
  """An offline base's name needs no converted folder (a plan downloads nothing): its
  config values are NAMED_CONFIGS', which equal what its GGUF converts to where this
  machine has the converted folder; a folder named by a path is read through the path
  layer; anything else is refused by name."""
  from pdl_jax.models.hf import families as hf_families
  from pdl_jax.models.hf import offline
  monkeypatch.setenv("PDL_JAX_CACHE", str(tmp_path / "empty_cache"))
  assert offline.cache_dir() == str(tmp_path / "empty_cache")
  for name in offline.OFFLINE_MODELS:
    c = load_config(f"configs/dialogue.py:pretrained={name}")
    assert plan.model_of(c).cfg.vocab_size == plan.NAMED_CONFIGS[name]["vocab_size"]
  monkeypatch.delenv("PDL_JAX_CACHE")
  for name in offline.OFFLINE_MODELS:  # the converter's own values, where converted here
    folder = os.path.join(offline.cache_dir(), "models", name, "hf")
    if os.path.exists(os.path.join(folder, "config.json")):
      assert hf_families.config_from_hf(plan.NAMED_CONFIGS[name]) == (
          hf_families.read_config(folder)), name
  folder = tmp_path / "a base"  # any folder with a config.json, through the path layer
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(plan.NAMED_CONFIGS["qwen2.5-0.5b"]))
  c = load_config("configs/dialogue.py:pretrained=none")
  c.model.pretrained = str(folder)
  assert plan.model_of(c).cfg.vocab_size == 151936
  c = load_config("configs/dialogue.py:pretrained=org/not-here")
  with pytest.raises(ValueError, match="'org/not-here'.*downloads nothing"):
    plan.model_of(c)
