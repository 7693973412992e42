"""Hugging Face checkpoints -> Decoder params, loaded into their shardings; logits.

Loading builds the param tree abstractly (jax.eval_shape), then places every tensor
into its sharding with jax.make_array_from_callback: each device's slice is read
from the safetensors file with `get_slice`, so no process holds more of a tensor
than its devices need (a reshape to heads reads the rows of those heads). Every
missing / unexpected / mis-shaped tensor is collected and reported in one ValueError.

Paths go through etils.epath, so a model directory may be gs://...; safetensors
memory-maps local files only, so a non-local directory is first copied to a local
temporary folder (reading a remote checkpoint costs one download, as with
huggingface_hub's cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import safe_open

from pdl_jax import paths
from pdl_jax.models import decoder
from pdl_jax.models.decoder import Decoder
from pdl_jax.models.config import DecoderConfig
from pdl_jax.models.hf import families as hf_families
from pdl_jax.models.hf import offline
from pdl_jax.models.hf import locate

_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")
_GEMMA3_HUB = re.compile(r"^language_model\.(?:(lm_head)|model)(?=\.)")


def read_block(src, t: hf_families.Tensor, shape: Sequence[int], index: tuple[slice, ...]) -> np.ndarray:
  """The block `index` of param `t.path` (shape `shape`), read from the safetensors
  slice `src` with only the rows/columns it needs."""
  idx = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
  if t.kind == "copy":
    return src[idx] if idx else src[:]
  if t.kind == "T":
    return src[idx[1], idx[0]].T
  if t.kind in ("in_heads", "conv_in_heads"):
    d, h, k = idx
    width = shape[2]
    off = t.part * shape[1] * width  # q, k, v side by side in GPT-2's fused c_attn
    cols = slice(off + h.start * width, off + h.stop * width)
    a = src[cols, d].T if t.kind == "in_heads" else src[d, cols]  # [d, h*K]
    return a.reshape(a.shape[0], h.stop - h.start, width)[:, :, k]
  if t.kind in ("heads_out", "conv_heads_out"):
    h, k, d = idx
    width = shape[1]
    rows = slice(h.start * width, h.stop * width)
    a = src[d, rows].T if t.kind == "heads_out" else src[rows, d]  # [h*K, d]
    return a.reshape(h.stop - h.start, width, a.shape[1])[:, k, :]
  if t.kind in ("bias_heads", "conv_bias_heads"):
    h, k = idx
    width = shape[1]
    off = t.part * shape[0] * width
    a = src[off + h.start * width:off + h.stop * width]
    return a.reshape(h.stop - h.start, width)[:, k]
  raise AssertionError(t.kind)


def abstract_params(cfg: DecoderConfig) -> Any:
  """ShapeDtypeStruct tree of the decoder's params, with nn.LogicallyPartitioned boxes."""
  model = Decoder(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def param_shardings(cfg: DecoderConfig, mesh: jax.sharding.Mesh) -> Any:
  """NamedSharding tree of the decoder's params from their logical axis names: exactly
  the train state's shardings (`sharding.tree_shardings` with the project's rules)."""
  from pdl_jax import sharding
  return sharding.tree_shardings(mesh, abstract_params(cfg))


@contextlib.contextmanager
def _local_dir(model_dir: epath.Path):
  """model_dir itself if local, else its local cached copy (`cached_copy`)."""
  if os.path.isdir(os.fspath(model_dir)):
    yield model_dir
    return
  yield epath.Path(cached_copy(model_dir))


def _weight_file_names(model_dir: epath.Path) -> list[str]:
  """The files a checkpoint's weights are read from: model.safetensors, or the
  index and the shards it names (not an unrelated consolidated.safetensors)."""
  index = model_dir / "model.safetensors.index.json"
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors.index.json", *shards]
  return ["model.safetensors"]


def weights_sha256(model_dir: str | os.PathLike) -> str:
  """sha256 over a checkpoint's weight files (names and contents, in order): which
  base a run finetuned, checked equal across the points of a comparison."""
  root = epath.Path(model_dir)
  digest = hashlib.sha256()
  for name in _weight_file_names(root):
    digest.update(name.encode() + b"\0")
    with (root / name).open("rb") as f:
      for block in iter(lambda: f.read(1 << 24), b""):
        digest.update(block)
  return digest.hexdigest()


def base_weights_sha256(model_dir: str | os.PathLike) -> str:
  """weights_sha256 of a model folder; of the per-host local copy loading makes when
  it is on gs:// (the bytes that were loaded, not a listing of the bucket)."""
  if os.fspath(model_dir).startswith("gs://"):
    model_dir = cached_copy(model_dir)
  return weights_sha256(model_dir)


def cached_copy(model_dir: str | os.PathLike, cache_dir: str | None = None) -> str:
  """A local copy of a remote (e.g. gs://) model folder's weights, made once per host
  and reused by later runs and sweep points: under CACHE/remote/<hash of the path>/
  (CACHE: offline.cache_dir()), config.json and the weight files only, each copied
  (in parallel, to a temporary name, then renamed) when it is absent or its size or
  modification time differs from the source's. safetensors reads local files."""
  import concurrent.futures  # only remote folders need it

  src = epath.Path(model_dir)
  root = epath.Path(cache_dir or offline.cache_dir()) / "remote" / hashlib.sha256(
      os.fspath(src).encode()).hexdigest()[:16]
  root.mkdir(parents=True, exist_ok=True)
  manifest_path = root / "manifest.json"
  manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
  names = [n for n in ["config.json", *_weight_file_names(src)] if (src / n).exists()]

  def fetch(name: str) -> tuple[str, list[int]]:
    stat = (src / name).stat()
    key = [int(stat.length), int(stat.mtime)]
    if manifest.get(name) == key and (root / name).exists():
      return name, key  # unchanged since the last copy
    tmp = root / f".{name}.{os.getpid()}.tmp"
    (src / name).copy(tmp, overwrite=True)
    tmp.replace(root / name)  # atomic; another process's copy of the same file is equal
    return name, key

  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    manifest.update(dict(pool.map(fetch, names)))
  paths.atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
  return os.fspath(root)


def _weight_files(model_dir: epath.Path) -> tuple[dict[str, str], list[str]]:
  """{tensor name: file name} of the checkpoint, and the shard files it lacks."""
  index = model_dir / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    missing = sorted({f for f in weight_map.values() if not (model_dir / f).exists()})
    return weight_map, missing
  single = model_dir / "model.safetensors"
  if not single.exists():
    raise FileNotFoundError(f"{os.fspath(model_dir)!r} has neither model.safetensors nor "
                            "model.safetensors.index.json.")
  with safe_open(os.fspath(single), framework="numpy") as f:
    return {k: "model.safetensors" for k in f.keys()}, []


Readers = dict[tuple[str, ...], tuple[tuple[int, ...], Callable]]


def _canonical_names(weight_map: dict[str, str], cfg: DecoderConfig
                     ) -> tuple[dict[str, str], dict[str, str]]:
  """({canonical name: stored name}, {canonical name: file name}) of a checkpoint's
  {stored name: file name}, canonical being the transformers names of the table."""
  # Stored name of each canonical (transformers) name: the original GPT-2 checkpoints
  # name their tensors without the "transformer." prefix that save_pretrained writes.
  stored = {n: n for n in weight_map}
  if cfg.model_type == "gpt2" and "transformer.wte.weight" not in weight_map:
    stored = {("transformer." + n if n != "lm_head.weight" else n): n for n in weight_map}
  if cfg.model_type == "gemma3":
    # The Hub's multimodal Gemma 3 checkpoints (saved by transformers 4.50) name the
    # text model language_model.model.* and language_model.lm_head; v5 names them
    # model.language_model.* and lm_head.
    stored = {_GEMMA3_HUB.sub(lambda m: "lm_head" if m.group(1) else "model.language_model",
                              n): n for n in weight_map}
  return stored, {canonical: weight_map[n] for canonical, n in stored.items()}


def _mismatches(table: Sequence[hf_families.Tensor], cfg: DecoderConfig,
                weight_map: dict[str, str], stored: dict[str, str],
                missing_files: list[str], handles: dict[str, Any],
                flat_abstract: dict[tuple[str, ...], Any]) -> list[str]:
  """Every way the checkpoint fails its config: missing shard files, unexpected,
  missing and mis-shaped tensors (names canonical, as `_canonical_names`)."""
  # The tensors of a missing shard are covered by the error naming the file.
  errors = [f"shard file {f!r} named in model.safetensors.index.json does not exist"
            for f in missing_files]
  wanted = {t.name for t in table}
  skipped = hf_families.FAMILIES[cfg.model_type].skipped if cfg.model_type != "pdl" else None
  unexpected = sorted(n for n in weight_map if n not in wanted and not _IGNORED.search(n)
                      and not (cfg.tied_embeddings and n == "lm_head.weight")
                      and not (skipped and re.search(skipped, n)))
  errors += [f"unexpected tensor {stored[n]!r} (in {weight_map[n]})" for n in unexpected]
  checked = set()
  for t in table:
    if t.name in checked:  # GPT-2's fused c_attn feeds three params
      continue
    checked.add(t.name)
    if t.name not in weight_map:
      hub = ("; the Hub's checkpoints name it "
             f"{t.name.replace('model.language_model.', 'language_model.model.', 1)!r}"
             if cfg.model_type == "gemma3" and t.name.startswith("model.language_model.")
             else "")
      errors.append(f"missing tensor {t.name!r} (for param {'/'.join(t.path)}{hub})")
      continue
    if weight_map[t.name] in missing_files:
      continue
    src = handles[weight_map[t.name]].get_slice(stored[t.name])
    shape = flat_abstract[t.path].shape
    want, got = hf_families.source_shape(t, shape), tuple(src.get_shape())
    if want != got:
      errors.append(f"tensor {t.name!r} (in {weight_map[t.name]}) has shape {list(got)}; "
                    f"expected {list(want)} for param {'/'.join(t.path)}")
  return errors


def _param_readers(table: Sequence[hf_families.Tensor], weight_map: dict[str, str],
                   stored: dict[str, str], handles: dict[str, Any],
                   flat_abstract: dict[tuple[str, ...], Any]) -> Readers:
  """One reader per (unrolled) param: (shape, read(index) -> numpy block), reading
  only that block from the open safetensors handles."""
  readers: Readers = {}
  for t in table:
    src = handles[weight_map[t.name]].get_slice(stored[t.name])
    shape = tuple(flat_abstract[t.path].shape)
    readers[t.path] = (shape, lambda idx, src=src, t=t, shape=shape: np.asarray(
        read_block(src, t, shape, idx)))
  return readers


def _place(readers: Readers, dtypes: dict[tuple[str, ...], Any],
           flat_shardings: dict[tuple[str, ...], Any] | None, pdtype: Any
           ) -> dict[tuple[str, ...], jax.Array]:
  """{path: jax.Array} built in its sharding (default device: None) from each device's
  block as read, cast to dtypes[path] or else pdtype."""
  params: dict[tuple[str, ...], jax.Array] = {}
  for path, (shape, read) in readers.items():
    sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0])
                if flat_shardings is None else flat_shardings[path])
    params[path] = jax.make_array_from_callback(
        shape, sharding, lambda idx, read=read, dt=dtypes.get(path, pdtype): read(
            idx).astype(dt))
  return params


def load_params(model_dir: str | os.PathLike, cfg: DecoderConfig, shardings: Any = None,
                transform: Callable[[Readers], tuple[Readers, dict]] | None = None
                ) -> dict[str, Any]:
  """Params of the checkpoint in model_dir, each placed into its sharding.

  Args:
    model_dir: Hugging Face model directory (local or any epath, e.g. gs://), or the
      name of an offline model (models.hf.offline).
    cfg: its DecoderConfig (read_config); params are cast to cfg.param_dtype.
    shardings: a tree of jax.sharding.Sharding like the params (e.g. param_shardings),
      or None for the default device.
    transform: readers -> (readers, {path: dtype}): rewrites the per-param readers
      ({path: (shape, read(index) -> numpy block)}) before anything is placed, e.g.
      to store some params in another form (a LoRA base quantised tensor by tensor,
      pdl_jax.train.state.load_base); the paths it makes are placed in their dtype (others
      cast to cfg.param_dtype) and `shardings` must name them.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor and every
      missing shard file at once.
  """
  model_dir = epath.Path(locate.local_dir(os.fspath(model_dir)))
  # The table and every check speak of per-layer params (block_i): their shapes come
  # from the unrolled layout whatever cfg.scan_layers is.
  abstract = nn.meta.unbox(abstract_params(dataclasses.replace(cfg, scan_layers=False)))
  flat_abstract = flax.traverse_util.flatten_dict(abstract)
  flat_shardings = (None if shardings is None
                    else flax.traverse_util.flatten_dict(flax.core.unfreeze(shardings)))
  table = hf_families.tensor_table(cfg)
  pdtype = jnp.dtype(cfg.param_dtype)
  with _local_dir(model_dir) as local:
    weight_map, missing_files = _weight_files(local)
    stored, weight_map = _canonical_names(weight_map, cfg)
    with contextlib.ExitStack() as stack:
      handles = {f: stack.enter_context(safe_open(os.fspath(local / f), framework="numpy"))
                 for f in sorted(set(weight_map.values()) - set(missing_files))}
      errors = _mismatches(table, cfg, weight_map, stored, missing_files, handles,
                           flat_abstract)
      if errors:
        raise ValueError(f"checkpoint {os.fspath(model_dir)!r} does not match its config "
                         f"({cfg.model_type}): " + "; ".join(errors))
      # Scanned, the params of the same path in every block are one stacked
      # [layers, ...] array whose reader reads the layers of the index's first slice
      # (all of them: the "layers" axis is never sharded) and stacks them. So each
      # device's block is still read straight from the files into its sharding (no
      # full per-layer arrays first, no jit to stack them, no second copy on the
      # devices).
      readers = _param_readers(table, weight_map, stored, handles, flat_abstract)
      if cfg.scan_layers:
        readers = _stacked_readers(readers, cfg.num_layers)
      dtypes: dict[tuple[str, ...], Any] = {}
      if transform is not None:
        readers, dtypes = transform(readers)
      params = _place(readers, dtypes, flat_shardings, pdtype)
  want = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
  missing = sorted(set(want) - set(params))
  if missing and transform is None:  # the table covers every param: a bug here
    raise AssertionError(f"params without a checkpoint tensor: {missing}")
  return flax.traverse_util.unflatten_dict(params)


def _stacked_readers(readers: dict[tuple[str, ...], tuple[tuple[int, ...], Callable]],
                     num_layers: int
                     ) -> dict[tuple[str, ...], tuple[tuple[int, ...], Callable]]:
  """Per-layer readers (paths block_i/...) -> readers of the scanned layout's stacked
  params (blocks/..., shape [layers, ...]); other readers unchanged."""
  out, per_layer = {}, {}
  for path, reader in readers.items():
    m = re.fullmatch(r"block_(\d+)", path[0])
    if m is None:
      out[path] = reader
    else:
      per_layer.setdefault(path[1:], {})[int(m.group(1))] = reader
  for rest, layers in per_layer.items():
    shape = layers[0][0]
    reads = [layers[i][1] for i in range(num_layers)]

    def read(idx, reads=reads, shape=shape):
      layer_slice, block = (idx[0], idx[1:]) if idx else (slice(None), ())
      block = block + (slice(None),) * (len(shape) - len(block))
      return np.stack([reads[i](block) for i in range(*layer_slice.indices(num_layers))])

    out[(decoder.SCANNED,) + rest] = ((num_layers,) + shape, read)
  return out


def load(model_dir: str | os.PathLike, *, dtype: str = "float32",
         param_dtype: str = "float32", shardings: Any = None, scan_layers: bool = False,
         remat: str = "none") -> tuple[Decoder, dict[str, Any]]:
  """(Decoder module, params) of a Hugging Face checkpoint directory; scan_layers and
  remat as in DecoderConfig (scanned: params in the stacked layout)."""
  cfg = dataclasses.replace(hf_families.read_config(model_dir, dtype=dtype, param_dtype=param_dtype),
                            scan_layers=scan_layers, remat=remat)
  return Decoder(cfg), load_params(model_dir, cfg, shardings)


def logits(model_dir: str, tokens_BxL: np.ndarray, *, scan_layers: bool = False
           ) -> np.ndarray:
  """float32 [B, L, V] logits of the checkpoint for int32 ids (no padding), computed
  by the unrolled or (scan_layers) the scanned decoder.

  Computed in float32 with full-precision matmuls: the accelerators' default for
  float32 dots (TF32 on recent GPUs, bfloat16 passes on TPU) would not be a reference.
  """
  model, params = load(model_dir, scan_layers=scan_layers)
  tokens = jnp.asarray(np.asarray(tokens_BxL, np.int32))
  with jax.default_matmul_precision("highest"):
    out, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
  return np.asarray(out, np.float32)
