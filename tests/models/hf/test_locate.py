"""pdl_jax/models/hf/locate.py: what a model.pretrained string names, and Hub ids
resolved from a Hugging Face cache filled beforehand, without the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pdl_jax.models.hf import locate

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(TESTS)
FIXTURE = os.path.join(TESTS, "fixtures", "hf", "llama")


@pytest.mark.parametrize("text,kind", [
    ("smollm2-135m-instruct", "name"),
    ("model.gguf", "gguf"), ("gs://bucket/m/Model.GGUF", "gguf"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"), ("meta-llama/Llama-3.2-1B", "hub"),
    ("gs://bucket/model", "folder"), ("/abs/model", "folder"), ("./org/name", "folder"),
    ("a/b/c", "folder"),
])
def test_kind(text, kind):
  assert locate.kind(text) == kind


def test_an_existing_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
  (tmp_path / "org" / "name").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  assert locate.kind("org/name") == "folder"


def fill_cache(hub: str, repo_id: str, revision: str = "0" * 40) -> str:
  """A Hugging Face Hub cache holding repo_id's snapshot (the llama fixture), laid out
  as huggingface_hub writes it: refs/main names the snapshot folder."""
  repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
  snapshot = os.path.join(repo, "snapshots", revision)
  shutil.copytree(FIXTURE, snapshot)
  os.makedirs(os.path.join(repo, "refs"))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(revision)
  return snapshot


RESOLVE = """
import json, sys
from pdl_jax.models.hf import families, locate
try:
  folder = locate.local_dir(sys.argv[1], is_primary=True, wait=lambda _: None)
  print(json.dumps({"folder": folder, "layers": families.read_config(sys.argv[1]).num_layers}))
except FileNotFoundError as e:
  print(json.dumps({"error": str(e)}))
"""


def resolve_offline(hub: str, repo_id: str) -> dict:
  env = dict(os.environ, HF_HUB_CACHE=hub, HF_HUB_OFFLINE="1")
  done = subprocess.run([sys.executable, "-c", RESOLVE, repo_id], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_hub_id_resolves_from_a_filled_cache_offline(tmp_path):
  hub = str(tmp_path / "hub")
  snapshot = fill_cache(hub, "org/tiny-llama")
  out = resolve_offline(hub, "org/tiny-llama")
  with open(os.path.join(FIXTURE, "config.json")) as f:
    layers = json.load(f)["num_hidden_layers"]
  assert out == {"folder": snapshot, "layers": layers}


def test_a_hub_id_neither_cached_nor_reachable_is_one_clear_error(tmp_path):
  out = resolve_offline(str(tmp_path / "empty"), "org/absent")
  assert out["error"].startswith("config.model.pretrained='org/absent': not a folder here "
                                 "and not in the Hugging Face cache")
  assert "HF_HUB_CACHE" in out["error"]
