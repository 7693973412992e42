"""Hugging Face decoder checkpoints <-> Decoder params: read config, load into shardings, export.

Supported families (model_type): llama (rope_scaling default / linear / llama3),
mistral, qwen2, qwen3, gemma, gpt2. Both config.json layouts are read: transformers v4
(top-level `rope_theta`, `rope_scaling` with `rope_type` or the legacy `type`,
`torch_dtype`) and v5 (`rope_parameters`, `dtype`).

Loading builds the param tree abstractly (jax.eval_shape), then places every tensor
into its sharding with jax.make_array_from_callback: each device's slice is read
from the safetensors file with `get_slice`, so no process holds more of a tensor
than its devices need (a reshape to heads reads the rows of those heads). Every
missing / unexpected / mis-shaped tensor is collected and reported in one ValueError.

Paths go through etils.epath, so a model directory may be gs://...; safetensors
memory-maps local files only, so a non-local directory is first copied to a local
temporary folder (reading a remote checkpoint costs one download, as with
huggingface_hub's cache). Export writes into a temporary folder next to the target
and renames it at the end, so a crash never leaves a half export (on a local disk the
rename is atomic; on an object store such as GCS epath's rename copies, so a reader
may briefly see a partial folder under the final name while it runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from pdl_jax import sentencepiece_tokenizer as sp_tokenizer
from pdl_jax import utils
from pdl_jax.models import decoder as decoder_lib
from pdl_jax.models.decoder import Decoder, DecoderConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")
# Activation names of transformers' ACT2FN -> the decoder's.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}
# tie_word_embeddings when config.json omits it (the family's config class default).
_TIED_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False,
                 "gemma": True, "gpt2": True}
# Tensors some checkpoints carry that are buffers, not weights.
_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")


# ------------------------------------------------------------------ config.json

def read_config(model_dir: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> DecoderConfig:
  """DecoderConfig of the Hugging Face checkpoint in model_dir (its config.json).

  Raises:
    FileNotFoundError: model_dir has no config.json.
    ValueError: unsupported model_type or option (names it and lists what is supported).
  """
  path = epath.Path(model_dir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{os.fspath(model_dir)!r} has no config.json ({os.fspath(path)}); give a Hugging "
        "Face model directory (config.json + *.safetensors).")
  text = path.read_text()
  return config_from_hf(json.loads(text), dtype=dtype, param_dtype=param_dtype,
                        source_config_json=text)


def _rope(hf: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
  """RoPE fields from either layout: v5 rope_parameters, v4 rope_theta + rope_scaling."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  merged = {**scaling, **params}
  theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = merged.get("rope_type", merged.get("type", "default"))
  if merged.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"partial_rotary_factor={merged['partial_rotary_factor']} is not "
                     "supported (RoPE over the full head_dim only).")
  if rope_type not in decoder_lib.ROPE_TYPES:
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                     f"{decoder_lib.ROPE_TYPES}.")
  out: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(merged["factor"])
  if rope_type == "llama3":
    out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
               rope_high_freq_factor=float(merged["high_freq_factor"]),
               rope_original_max_len=int(merged["original_max_position_embeddings"]))
  del head_dim
  return out


def _activation(name: str | None, model_type: str) -> str:
  if model_type == "gemma" and name == "gelu":
    # Official Gemma configs say "gelu", a legacy value meaning the tanh approximation
    # (transformers rewrites it to gelu_pytorch_tanh).
    return "gelu_tanh"
  if name not in _ACTIVATIONS:
    raise ValueError(f"{model_type}: activation {name!r} is not supported; supported: "
                     f"{sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                   param_dtype: str = "float32", source_config_json: str | None = None
                   ) -> DecoderConfig:
  """DecoderConfig from a parsed Hugging Face config.json (see read_config)."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {FAMILIES}.")
  for moe_key in ("num_experts", "num_local_experts", "n_routed_experts"):
    if hf.get(moe_key):
      raise ValueError(f"{model_type}: mixture-of-experts ({moe_key}={hf[moe_key]}) is not "
                       "supported; dense decoders only.")
  if source_config_json is None:
    source_config_json = json.dumps(dict(hf))
  common = dict(dtype=dtype, param_dtype=param_dtype, model_type=model_type,
                source_config_json=source_config_json,
                tied_embeddings=bool(hf.get("tie_word_embeddings", _TIED_DEFAULT[model_type])),
                vocab_size=int(hf["vocab_size"]))
  if model_type == "gpt2":
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                    ("scale_attn_weights", True)):
      if hf.get(key, ok) != ok:
        raise ValueError(f"gpt2: {key}={hf[key]} is not supported (only {ok}).")
    d, heads = int(hf["n_embd"]), int(hf["n_head"])
    return DecoderConfig(
        d_model=d, num_layers=int(hf["n_layer"]), num_heads=heads, num_kv_heads=heads,
        head_dim=d // heads, mlp_dim=int(hf.get("n_inner") or 4 * d),
        max_len=int(hf["n_positions"]), norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="plain",
        activation=_activation(hf.get("activation_function", "gelu_new"), model_type),
        positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, **common)

  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or d // heads)
  act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
  sliding = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    sliding = None  # Qwen configs carry a window that is off unless use_sliding_window
  attention_bias = bool(hf.get("attention_bias", False))
  return DecoderConfig(
      d_model=d, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
      mlp_dim=int(hf["intermediate_size"]),
      max_len=int(hf.get("max_position_embeddings", 2048)),
      norm="rms_plus_one" if model_type == "gemma" else "rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="gated",
      activation=_activation(act, model_type), positions="rope",
      qkv_bias=attention_bias or model_type == "qwen2", out_bias=attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
      embed_scale=model_type == "gemma",
      sliding_window=None if sliding is None else int(sliding),
      **_rope(hf, head_dim), **common)


# ------------------------------------------------------------------ tensor table

@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One checkpoint tensor -> one param, with the layout transform between them.

  kind: "copy"; "T" (Linear [out, in] -> [in, out]); "in_heads" (Linear [H*K, D] ->
  [D, H, K]); "heads_out" (Linear [D, H*K] -> [H, K, D]); "bias_heads" ([H*K] -> [H, K]);
  GPT-2 Conv1D ([in, out] already): "conv_in_heads" (fused c_attn [D, 3*H*K], `part`
  0/1/2 = q/k/v -> [D, H, K]), "conv_bias_heads" ([3*H*K] -> [H, K]), "conv_heads_out"
  ([H*K, D] -> [H, K, D]).
  """

  name: str
  path: tuple[str, ...]
  kind: str = "copy"
  part: int = 0


def _tensor_table(cfg: DecoderConfig) -> list[_Tensor]:
  """The checkpoint tensors of cfg's family, in transformers' names and layouts."""
  out: list[_Tensor] = []
  add = lambda name, *path, kind="copy", part=0: out.append(_Tensor(name, path, kind, part))
  if cfg.model_type == "gpt2":
    p = "transformer."
    add(p + "wte.weight", "embed", "embedding")
    add(p + "wpe.weight", "pos_embed", "embedding")
    for i in range(cfg.num_layers):
      b, blk = f"{p}h.{i}.", f"block_{i}"
      for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        add(f"{b}{hf_norm}.weight", blk, norm, "scale")
        add(f"{b}{hf_norm}.bias", blk, norm, "bias")
      for part, proj in enumerate(("query", "key", "value")):
        add(f"{b}attn.c_attn.weight", blk, "attn", proj, "kernel", kind="conv_in_heads",
            part=part)
        add(f"{b}attn.c_attn.bias", blk, "attn", proj, "bias", kind="conv_bias_heads",
            part=part)
      add(f"{b}attn.c_proj.weight", blk, "attn", "out", "kernel", kind="conv_heads_out")
      add(f"{b}attn.c_proj.bias", blk, "attn", "out", "bias")
      add(f"{b}mlp.c_fc.weight", blk, "mlp", "up", "kernel")
      add(f"{b}mlp.c_fc.bias", blk, "mlp", "up", "bias")
      add(f"{b}mlp.c_proj.weight", blk, "mlp", "down", "kernel")
      add(f"{b}mlp.c_proj.bias", blk, "mlp", "down", "bias")
    add(p + "ln_f.weight", "final_norm", "scale")
    add(p + "ln_f.bias", "final_norm", "bias")
  else:
    add("model.embed_tokens.weight", "embed", "embedding")
    for i in range(cfg.num_layers):
      b, blk = f"model.layers.{i}.", f"block_{i}"
      add(f"{b}input_layernorm.weight", blk, "attn_norm", "scale")
      add(f"{b}post_attention_layernorm.weight", blk, "mlp_norm", "scale")
      for hf_proj, proj in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        add(f"{b}self_attn.{hf_proj}.weight", blk, "attn", proj, "kernel", kind="in_heads")
        if cfg.qkv_bias:
          add(f"{b}self_attn.{hf_proj}.bias", blk, "attn", proj, "bias", kind="bias_heads")
      add(f"{b}self_attn.o_proj.weight", blk, "attn", "out", "kernel", kind="heads_out")
      if cfg.out_bias:
        add(f"{b}self_attn.o_proj.bias", blk, "attn", "out", "bias")
      if cfg.qk_norm:
        add(f"{b}self_attn.q_norm.weight", blk, "attn", "q_norm", "scale")
        add(f"{b}self_attn.k_norm.weight", blk, "attn", "k_norm", "scale")
      for hf_proj, proj in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        add(f"{b}mlp.{hf_proj}.weight", blk, "mlp", proj, "kernel", kind="T")
        if cfg.mlp_bias:
          add(f"{b}mlp.{hf_proj}.bias", blk, "mlp", proj, "bias")
    add("model.norm.weight", "final_norm", "scale")
  if not cfg.tied_embeddings:
    add("lm_head.weight", "unembed", kind="T")
  return out


def _source_shape(t: _Tensor, shape: Sequence[int]) -> tuple[int, ...]:
  """The checkpoint shape that the param shape `shape` comes from."""
  if t.kind == "T":
    return tuple(reversed(shape))
  if t.kind == "in_heads":
    return (shape[1] * shape[2], shape[0])
  if t.kind == "heads_out":
    return (shape[2], shape[0] * shape[1])
  if t.kind == "bias_heads":
    return (shape[0] * shape[1],)
  if t.kind == "conv_in_heads":
    return (shape[0], 3 * shape[1] * shape[2])
  if t.kind == "conv_bias_heads":
    return (3 * shape[0] * shape[1],)
  if t.kind == "conv_heads_out":
    return (shape[0] * shape[1], shape[2])
  return tuple(shape)


def _read(src, t: _Tensor, shape: Sequence[int], index: tuple[slice, ...]) -> np.ndarray:
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


def _to_hf(t: _Tensor, value: np.ndarray) -> np.ndarray:
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


# ------------------------------------------------------------------ loading

def abstract_params(cfg: DecoderConfig) -> Any:
  """ShapeDtypeStruct tree of the decoder's params, with nn.LogicallyPartitioned boxes."""
  model = Decoder(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def param_shardings(cfg: DecoderConfig, mesh: jax.sharding.Mesh) -> Any:
  """NamedSharding tree of the decoder's params from their logical axis names: exactly
  the train state's shardings (`sharding.tree_shardings` with the project's rules)."""
  from pdl_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  return sharding_lib.tree_shardings(mesh, abstract_params(cfg))


@contextlib.contextmanager
def _local_dir(model_dir: epath.Path):
  """model_dir itself if local, else a local temporary copy of its *.safetensors/index."""
  if os.path.isdir(os.fspath(model_dir)):
    yield model_dir
    return
  with tempfile.TemporaryDirectory(prefix="pdl_hf_") as tmp:
    for f in model_dir.iterdir():
      if f.name.endswith((".safetensors", ".json")):
        f.copy(epath.Path(tmp) / f.name)
    yield epath.Path(tmp)


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


def load_params(model_dir: str | os.PathLike, cfg: DecoderConfig, shardings: Any = None
                ) -> dict[str, Any]:
  """Params of the checkpoint in model_dir, each placed into its sharding.

  Args:
    model_dir: Hugging Face model directory (local or any epath, e.g. gs://).
    cfg: its DecoderConfig (read_config); params are cast to cfg.param_dtype.
    shardings: a tree of jax.sharding.Sharding like the params (e.g. param_shardings),
      or None for the default device.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor and every
      missing shard file at once.
  """
  model_dir = epath.Path(model_dir)
  # The table and every check speak of per-layer params (block_i): their shapes come
  # from the unrolled layout whatever cfg.scan_layers is.
  abstract = nn.meta.unbox(abstract_params(dataclasses.replace(cfg, scan_layers=False)))
  flat_abstract = flax.traverse_util.flatten_dict(abstract)
  flat_shardings = (None if shardings is None
                    else flax.traverse_util.flatten_dict(flax.core.unfreeze(shardings)))
  table = _tensor_table(cfg)
  pdtype = jnp.dtype(cfg.param_dtype)
  with _local_dir(model_dir) as local:
    weight_map, missing_files = _weight_files(local)
    # Stored name of each canonical (transformers) name: the original GPT-2 checkpoints
    # name their tensors without the "transformer." prefix that save_pretrained writes.
    stored = {n: n for n in weight_map}
    if cfg.model_type == "gpt2" and "transformer.wte.weight" not in weight_map:
      stored = {("transformer." + n if n != "lm_head.weight" else n): n for n in weight_map}
    weight_map = {canonical: weight_map[n] for canonical, n in stored.items()}
    # The tensors of a missing shard are covered by the error naming the file.
    errors = [f"shard file {f!r} named in model.safetensors.index.json does not exist"
              for f in missing_files]
    with contextlib.ExitStack() as stack:
      handles = {f: stack.enter_context(safe_open(os.fspath(local / f), framework="numpy"))
                 for f in sorted(set(weight_map.values()) - set(missing_files))}
      wanted = {t.name for t in table}
      unexpected = sorted(n for n in weight_map if n not in wanted and not _IGNORED.search(n)
                          and not (cfg.tied_embeddings and n == "lm_head.weight"))
      errors += [f"unexpected tensor {stored[n]!r} (in {weight_map[n]})" for n in unexpected]
      checked = set()
      for t in table:
        if t.name in checked:  # GPT-2's fused c_attn feeds three params
          continue
        checked.add(t.name)
        if t.name not in weight_map:
          errors.append(f"missing tensor {t.name!r} (for param {'/'.join(t.path)})")
          continue
        if weight_map[t.name] in missing_files:
          continue
        src = handles[weight_map[t.name]].get_slice(stored[t.name])
        shape = flat_abstract[t.path].shape
        want, got = _source_shape(t, shape), tuple(src.get_shape())
        if want != got:
          errors.append(f"tensor {t.name!r} (in {weight_map[t.name]}) has shape {list(got)}; "
                        f"expected {list(want)} for param {'/'.join(t.path)}")
      if errors:
        raise ValueError(f"checkpoint {os.fspath(model_dir)!r} does not match its config "
                         f"({cfg.model_type}): " + "; ".join(errors))
      # One reader per param: (shape, read(index) -> numpy block). Scanned, the
      # params of the same path in every block are one stacked [layers, ...] array
      # whose reader reads the layers of the index's first slice (all of them: the
      # "layers" axis is never sharded) and stacks them. So each device's block is
      # still read straight from the files into its sharding (no full per-layer
      # arrays first, no jit to stack them, no second copy on the devices).
      readers: dict[tuple[str, ...], tuple[tuple[int, ...], Callable]] = {}
      for t in table:
        src = handles[weight_map[t.name]].get_slice(stored[t.name])
        shape = tuple(flat_abstract[t.path].shape)
        readers[t.path] = (shape, lambda idx, src=src, t=t, shape=shape: np.asarray(
            _read(src, t, shape, idx)))
      if cfg.scan_layers:
        readers = _stacked_readers(readers, cfg.num_layers)
      params: dict[tuple[str, ...], jax.Array] = {}
      for path, (shape, read) in readers.items():
        sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0])
                    if flat_shardings is None else flat_shardings[path])
        params[path] = jax.make_array_from_callback(
            shape, sharding, lambda idx, read=read: read(idx).astype(pdtype))
  want = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
  missing = sorted(set(want) - set(params))
  if missing:  # the table covers every param; a gap is a bug here, not in the checkpoint
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

    out[(decoder_lib.SCANNED,) + rest] = ((num_layers,) + shape, read)
  return out


def load(model_dir: str | os.PathLike, *, dtype: str = "float32",
         param_dtype: str = "float32", shardings: Any = None, scan_layers: bool = False,
         remat: str = "none") -> tuple[Decoder, dict[str, Any]]:
  """(Decoder module, params) of a Hugging Face checkpoint directory; scan_layers and
  remat as in DecoderConfig (scanned: params in the stacked layout)."""
  cfg = dataclasses.replace(read_config(model_dir, dtype=dtype, param_dtype=param_dtype),
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


# ------------------------------------------------------------------ export

def own_model_hf_config(cfg: DecoderConfig, *,
                        bos_token_id: int | None = sp_tokenizer.BOS_ID,
                        eos_token_id: int | None = sp_tokenizer.EOS_ID,
                        pad_token_id: int | None = sp_tokenizer.PAD_ID) -> dict[str, Any]:
  """Llama config.json for a DecoderConfig in the own model's math (model_type "pdl").

  The special ids default to the project's SentencePiece ids (pdl_jax.tokenizer:
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
  if decoder_lib.SCANNED not in params:
    return flax.traverse_util.flatten_dict(params)
  flat = flax.traverse_util.flatten_dict(
      {k: v for k, v in params.items() if k != decoder_lib.SCANNED})
  for rest, stacked in flax.traverse_util.flatten_dict(params[decoder_lib.SCANNED]).items():
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


def export(params: Mapping[str, Any], cfg_or_hf_config: DecoderConfig | Mapping[str, Any],
           out_dir: str | os.PathLike, *, dtype: str = "float32",
           tokenizer_dir: str | os.PathLike | None = None,
           max_shard_bytes: float = 5e9) -> epath.Path:
  """Writes params as a Hugging Face checkpoint directory (transformers-loadable).

  Args:
    params: the decoder's params (sharded arrays are gathered tensor by tensor).
    cfg_or_hf_config: the DecoderConfig (read_config keeps the original config.json,
      which is written back with its dtype updated; the own model's gets a Llama
      config, see own_model_hf_config) or a config.json dict.
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
    cfg = config_from_hf(hf)
  hf = dict(hf)
  untie_scaled = cfg.tied_embeddings and cfg.unembed_scale not in (None, 1, 1.0)
  # v5 configs name it "dtype", v4 ones "torch_dtype": update the one the config has.
  hf["dtype" if "dtype" in hf or "torch_dtype" not in hf else "torch_dtype"] = dtype
  out_cfg = dataclasses.replace(cfg, tied_embeddings=False, unembed_scale=None) \
      if untie_scaled else cfg
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16

  flat = _per_layer_flat(flax.core.unfreeze(nn.meta.unbox(params)))
  # name -> thunk producing the transformers tensor, in table order, fused c_attn once.
  tensors: dict[str, Callable[[], np.ndarray]] = {}
  for t in _tensor_table(out_cfg):
    if t.name in tensors:
      continue
    if t.kind in ("conv_in_heads", "conv_bias_heads"):
      parts = [tt for tt in _tensor_table(out_cfg) if tt.name == t.name]
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
      tensors[t.name] = lambda t=t: _to_hf(t, _gather(flat[t.path]))
  hf["tie_word_embeddings"] = out_cfg.tied_embeddings

  # Plan shards from the shapes (no values needed).
  itemsize = np.dtype(np_dtype).itemsize
  flat_shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
  sizes = {}
  for t in _tensor_table(out_cfg):
    shape = (flat_shapes[("embed", "embedding")] if untie_scaled and t.path == ("unembed",)
             else _source_shape(t, flat_shapes[t.path]))
    sizes[t.name] = int(np.prod(shape)) * itemsize
  shards: list[list[str]] = [[]]
  used = 0
  for name, size in sizes.items():
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += size

  out_dir = epath.Path(out_dir)
  if out_dir.exists():
    raise FileExistsError(f"export target {os.fspath(out_dir)!r} exists; give a new folder.")
  is_writer = jax.process_index() == 0
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
  if is_writer:
    tmp.mkdir(parents=True, exist_ok=False)
  try:
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards):
      values = {n: np.ascontiguousarray(tensors[n]().astype(np_dtype)) for n in shard}
      if is_writer:
        _save_safetensors(values, tmp / fname)
      weight_map.update({n: fname for n in shard})
    if is_writer:
      if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(sizes.values()))},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
      (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
      if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
          src = epath.Path(tokenizer_dir) / name
          if src.exists():
            src.copy(tmp / name)
      tmp.rename(out_dir)
  except BaseException:
    if is_writer and tmp.exists():
      tmp.rmtree()
    raise
  utils.sync(f"pdl_jax.pretrained.export {os.fspath(out_dir)}")  # folder exists for all
  return out_dir


def _save_safetensors(values: dict[str, np.ndarray], path: epath.Path) -> None:
  """safetensors file with transformers' metadata (format=pt), via a local file."""
  if os.path.isdir(os.fspath(path.parent)):
    save_file(values, os.fspath(path), metadata={"format": "pt"})
    return
  with tempfile.TemporaryDirectory(prefix="pdl_hf_") as tmp:
    local = os.path.join(tmp, path.name)
    save_file(values, local, metadata={"format": "pt"})
    epath.Path(local).copy(path)
