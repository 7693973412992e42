"""Decoder params -> a Hugging Face checkpoint folder (transformers-loadable).
A run's workdir is exported by `python -m pdl_jax.cli.export_hf` (pdl_jax/cli/export_hf.py).

Writes DIR/config.json, safetensors shards of at most 5 GB (with an index when there
are several) and the tokenizer files, into a temporary folder next to the target
renamed at the end, so a crash never leaves a half export (on a local disk the rename
is atomic; on an object store such as GCS epath's rename copies, so a reader may
briefly see a partial folder under the final name while it runs).
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it;
`pdl_jax.models.hf.weights.logits(DIR, tokens)` gives its logits here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from etils import epath
from safetensors.numpy import save_file

from pdl_jax.tokenizers import chat
from pdl_jax.tokenizers import hf as hf_tokenizer
from pdl_jax.tokenizers import sentencepiece as sp_tokenizer
from pdl_jax import multihost
from pdl_jax.models import decoder
from pdl_jax.models.config import DecoderConfig
from pdl_jax.models.hf import families as hf_families

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike, out: epath.Path) -> None:
  """Copies the tokenizer files of tokenizer_dir into out, completed with what
  transformers needs of a chat model: the chat template both as chat_template.jinja
  (transformers v5) and as tokenizer_config.json's "chat_template" (v4 and other
  readers), and generation_config.json's eos_token_id listing every id that ends a
  generation (the tokenizer's EOS ids and the chat template's end-of-turn token)."""
  src = epath.Path(tokenizer_dir)
  for name in TOKENIZER_FILES:
    if (src / name).exists():
      (src / name).copy(out / name)
  if not (src / "tokenizer.json").exists():
    return  # the own model's SentencePiece files: no chat template, one EOS
  tok = hf_tokenizer.HFTokenizer.load(src)
  eos_ids = list(tok.eos_ids)
  if tok.chat_template is not None:
    (out / "chat_template.jinja").write_text(tok.chat_template)
    tok_config = (json.loads((out / "tokenizer_config.json").read_text())
                  if (out / "tokenizer_config.json").exists() else {})
    tok_config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2,
                                                          ensure_ascii=False) + "\n")
    try:
      end = chat.ChatTokenizer(tok, tok.chat_template, tok.special_tokens).end_id
      eos_ids += [end] if end not in eos_ids else []
    except ValueError:
      pass  # a template the chat format cannot split: nothing more to stop on
  if eos_ids:
    gen = (json.loads((out / "generation_config.json").read_text())
           if (out / "generation_config.json").exists() else {})
    gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def to_hf(t: hf_families.Tensor, value: np.ndarray) -> np.ndarray:
  """Inverse of _read on a whole param (export)."""
  if t.kind == "T":
    return value.T
  if t.kind == "in_heads":
    return value.reshape(value.shape[0], -1).T
  if t.kind == "heads_out":
    return value.reshape(-1, value.shape[-1]).T
  if t.kind == "bias_heads":
    return value.reshape(-1)
  if t.kind == "conv_heads_out":
    return value.reshape(-1, value.shape[-1])
  return value  # copy (conv_in_heads / conv_bias_heads are fused by the caller)


def own_model_hf_config(cfg: DecoderConfig, *,
                        bos_token_id: int | None = sp_tokenizer.BOS_ID,
                        eos_token_id: int | None = sp_tokenizer.EOS_ID,
                        pad_token_id: int | None = sp_tokenizer.PAD_ID) -> dict[str, Any]:
  """Llama config.json for a DecoderConfig in the own model's math (model_type "pdl").

  The special ids default to the project's SentencePiece ids (pdl_jax.tokenizers:
  pad 0, eos 1, bos 2).

  The own model ties its unembedding scaled by d_model**-0.5. That scale cannot be
  folded into a tied embedding without changing the input embedding, so the export is
  untied: embed_tokens = embedding, lm_head = embedding * scale (exact: the same float32
  products). RoPE, RMSNorm (eps 1e-6), SwiGLU and the bias-free projections are Llama's.
  """
  if cfg.model_type != "pdl":
    raise ValueError(f"own_model_hf_config is for the own model; got {cfg.model_type!r}.")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "tie_word_embeddings": False, "bos_token_id": bos_token_id,
      "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
      "torch_dtype": "float32",
  }


@dataclasses.dataclass(frozen=True)
class _Layer:
  """Layer `index` of a stacked [layers, ...] param (scanned layout), sliced only when
  exported: one layer's tensor at a time, never a per-layer copy of every param."""

  stacked: Any
  index: int

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(np.shape(self.stacked))[1:]


def _per_layer_flat(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  """Flat {path: value} of params in either layout, keyed by the unrolled paths
  (block_i/...) the tensor table uses; a scanned tree's leaves become _Layer views."""
  if decoder.SCANNED not in params:
    return flax.traverse_util.flatten_dict(params)
  flat = flax.traverse_util.flatten_dict(
      {k: v for k, v in params.items() if k != decoder.SCANNED})
  for rest, stacked in flax.traverse_util.flatten_dict(params[decoder.SCANNED]).items():
    for i in range(np.shape(stacked)[0]):
      flat[(f"block_{i}",) + rest] = _Layer(stacked, i)
  return flat


def _gather(x: Any) -> np.ndarray:
  """The full value of a (possibly sharded, possibly multi-host) array on this host;
  of a _Layer, its layer (sliced on the devices first: a global jax.Array is indexed
  by every process alike, as export's collective gathering needs)."""
  if isinstance(x, _Layer):
    x = x.stacked[x.index]
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _hf_config(cfg_or_hf_config: DecoderConfig | Mapping[str, Any], dtype: str
               ) -> tuple[DecoderConfig, dict[str, Any]]:
  """(DecoderConfig, config.json dict) of export's config argument; the dict is a
  copy with its dtype entry set to `dtype`."""
  if isinstance(cfg_or_hf_config, DecoderConfig):
    cfg = cfg_or_hf_config
    if cfg.model_type == "pdl":
      hf = own_model_hf_config(cfg)
    elif cfg.source_config_json is not None:
      hf = json.loads(cfg.source_config_json)
    else:
      raise ValueError("export needs the config.json of a pretrained DecoderConfig; pass "
                       "the config read by read_config or the config.json dict.")
  else:
    hf = dict(cfg_or_hf_config)
    cfg = hf_families.config_from_hf(hf)
  hf = dict(hf)
  if cfg.model_type == "gemma3":
    # A multimodal Gemma 3's finetuned text model exports as Gemma3ForCausalLM (its
    # vision tower is not in the params: the folder is the text model alone).
    hf = hf_families.gemma3_text_config(hf)
    cfg = dataclasses.replace(cfg, model_type="gemma3_text")
  # v5 configs name it "dtype", v4 ones "torch_dtype": update the one the config has.
  hf["dtype" if "dtype" in hf or "torch_dtype" not in hf else "torch_dtype"] = dtype
  return cfg, hf


def _tensor_thunks(flat: Mapping[tuple[str, ...], Any], cfg: DecoderConfig,
                   out_cfg: DecoderConfig, untie_scaled: bool
                   ) -> dict[str, Callable[[], np.ndarray]]:
  """name -> thunk producing the transformers tensor, in table order, fused c_attn
  once. Thunks, so each tensor is gathered only when its shard is written."""
  tensors: dict[str, Callable[[], np.ndarray]] = {}
  for t in hf_families.tensor_table(out_cfg):
    if t.name in tensors:
      continue
    if t.kind in ("conv_in_heads", "conv_bias_heads"):
      parts = [tt for tt in hf_families.tensor_table(out_cfg) if tt.name == t.name]
      def fused(parts=parts):
        vals = [_gather(flat[p.path]) for p in parts]
        if parts[0].kind == "conv_in_heads":
          return np.concatenate([v.reshape(v.shape[0], -1) for v in vals], axis=1)
        return np.concatenate([v.reshape(-1) for v in vals])
      tensors[t.name] = fused
    elif untie_scaled and t.path == ("unembed",):
      tensors[t.name] = lambda: _gather(flat[("embed", "embedding")]) * np.float32(
          cfg.unembed_scale)
    else:
      tensors[t.name] = lambda t=t: to_hf(t, _gather(flat[t.path]))
  return tensors


def _plan_shards(flat: Mapping[tuple[str, ...], Any], out_cfg: DecoderConfig,
                 untie_scaled: bool, itemsize: int, max_shard_bytes: float
                 ) -> tuple[dict[str, int], list[list[str]]]:
  """({name: bytes}, shards as lists of names, in table order), planned from the
  shapes alone (no values needed): a new shard is started before a tensor would
  exceed max_shard_bytes."""
  flat_shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
  sizes = {}
  for t in hf_families.tensor_table(out_cfg):
    shape = (flat_shapes[("embed", "embedding")] if untie_scaled and t.path == ("unembed",)
             else hf_families.source_shape(t, flat_shapes[t.path]))
    sizes[t.name] = int(np.prod(shape)) * itemsize
  shards: list[list[str]] = [[]]
  used = 0
  for name, size in sizes.items():
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += size
  return sizes, shards


def _write_files(folder: epath.Path, tensors: Mapping[str, Callable[[], np.ndarray]],
                 sizes: Mapping[str, int], shards: list[list[str]], np_dtype: Any,
                 hf: Mapping[str, Any], tokenizer_dir: str | os.PathLike | None,
                 is_writer: bool) -> None:
  """Writes the safetensors shards (with the index when there are several),
  config.json and the tokenizer files into folder. Every process gathers each
  tensor (collective); only the writer writes."""
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for fname, shard in zip(names, shards):
    values = {n: np.ascontiguousarray(tensors[n]().astype(np_dtype)) for n in shard}
    if is_writer:
      save_safetensors(values, folder / fname)
    weight_map.update({n: fname for n in shard})
  if is_writer:
    if len(shards) > 1:
      index = {"metadata": {"total_size": int(sum(sizes.values()))},
               "weight_map": dict(sorted(weight_map.items()))}
      (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
      copy_tokenizer_files(tokenizer_dir, folder)


def export(params: Mapping[str, Any], cfg_or_hf_config: DecoderConfig | Mapping[str, Any],
           out_dir: str | os.PathLike, *, dtype: str = "float32",
           tokenizer_dir: str | os.PathLike | None = None,
           max_shard_bytes: float = 5e9) -> epath.Path:
  """Writes params as a Hugging Face checkpoint directory (transformers-loadable).

  Args:
    params: the decoder's params (sharded arrays are gathered tensor by tensor).
    cfg_or_hf_config: the DecoderConfig (read_config keeps the original config.json,
      which is written back with its dtype updated; the own model's gets a Llama
      config, see own_model_hf_config; a multimodal Gemma 3's text model gets its
      text_config, as Gemma3ForCausalLM) or a config.json dict.
    out_dir: target directory; must not exist yet (never overwritten).
    dtype: "float32" or "bfloat16" for the safetensors files.
    tokenizer_dir: a directory whose tokenizer files are copied beside the weights.
    max_shard_bytes: a new shard is started before a tensor would exceed it; with more
      than one shard the files are model-0000k-of-0000n.safetensors plus the index json.

  On multi-host runs every process must call it (gathering is collective); process 0
  writes. Returns the output path.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"export dtype must be 'float32' or 'bfloat16'; got {dtype!r}.")
  cfg, hf = _hf_config(cfg_or_hf_config, dtype)
  untie_scaled = cfg.tied_embeddings and cfg.unembed_scale not in (None, 1, 1.0)
  out_cfg = dataclasses.replace(cfg, tied_embeddings=False, unembed_scale=None) \
      if untie_scaled else cfg
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16

  flat = _per_layer_flat(flax.core.unfreeze(nn.meta.unbox(params)))
  tensors = _tensor_thunks(flat, cfg, out_cfg, untie_scaled)
  hf["tie_word_embeddings"] = out_cfg.tied_embeddings
  sizes, shards = _plan_shards(flat, out_cfg, untie_scaled, np.dtype(np_dtype).itemsize,
                               max_shard_bytes)

  out_dir = epath.Path(out_dir)
  if out_dir.exists():
    raise FileExistsError(f"export target {os.fspath(out_dir)!r} exists; give a new folder.")
  is_writer = jax.process_index() == 0
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
  if is_writer:
    tmp.mkdir(parents=True, exist_ok=False)
  try:
    _write_files(tmp, tensors, sizes, shards, np_dtype, hf, tokenizer_dir, is_writer)
    if is_writer:
      tmp.rename(out_dir)
  except BaseException:
    if is_writer and tmp.exists():
      tmp.rmtree()
    raise
  multihost.sync(f"pdl_jax.models.hf.export {os.fspath(out_dir)}")  # folder exists for all
  return out_dir


def _readable(local: str) -> None:
  """Mode 0644: safetensors writes 0600, which other users of a shared model folder
  could not read. (Not 0666 less the umask: reading the umask means setting it, which
  races with other threads' files.)"""
  os.chmod(local, 0o644)


def save_safetensors(values: dict[str, np.ndarray], path: epath.Path) -> None:
  """safetensors file with transformers' metadata (format=pt), via a local file."""
  if os.path.isdir(os.fspath(path.parent)):
    save_file(values, os.fspath(path), metadata={"format": "pt"})
    _readable(os.fspath(path))
    return
  with tempfile.TemporaryDirectory(prefix="pdl_hf_") as tmp:
    local = os.path.join(tmp, path.name)
    save_file(values, local, metadata={"format": "pt"})
    _readable(local)
    epath.Path(local).copy(path)

