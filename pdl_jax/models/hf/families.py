"""Hugging Face model families: one table entry per model_type.

Each entry says how its config.json becomes a DecoderConfig and which checkpoint
tensors (transformers' names and layouts) feed which params. Both config.json layouts
are read: transformers v4 (top-level `rope_theta`, `rope_scaling` with `rope_type` or
the legacy `type`, `torch_dtype`) and v5 (`rope_parameters`, `dtype`). Adding a family
is one `Family` entry (and its fixture in tests/fixtures/hf).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from etils import epath

from pdl_jax.models import config as model_config
from pdl_jax.models.config import DecoderConfig
from pdl_jax.models.hf import locate

# Activation names of transformers' ACT2FN -> the decoder's.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}


# ------------------------------------------------------------------ config.json

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
  if rope_type not in model_config.ROPE_TYPES:
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                     f"{model_config.ROPE_TYPES}.")
  out: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(merged["factor"])
  if rope_type == "llama3":
    out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
               rope_high_freq_factor=float(merged["high_freq_factor"]),
               rope_original_max_len=int(merged["original_max_position_embeddings"]))
  del head_dim
  return out


def _activation(name: str | None, family: "Family") -> str:
  name = family.activation_aliases.get(name, name)
  if name not in _ACTIVATIONS:
    raise ValueError(f"{family.model_type}: activation {name!r} is not supported; "
                     f"supported: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def _gpt2_config(hf: Mapping[str, Any], family: "Family", common: dict[str, Any]
                 ) -> DecoderConfig:
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
      activation=_activation(hf.get("activation_function", "gelu_new"), family),
      positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, **common)


def _llama_config(hf: Mapping[str, Any], family: "Family", common: dict[str, Any]
                  ) -> DecoderConfig:
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or d // heads)
  act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
  sliding = hf.get("sliding_window")
  if family.sliding_window_flag and not hf.get(family.sliding_window_flag, False):
    sliding = None  # Qwen configs carry a window that is off unless use_sliding_window
  attention_bias = bool(hf.get("attention_bias", False))
  local: tuple[bool, ...] = ()
  if family.sliding_window_flag and sliding is not None:
    # Qwen: only layers from max_window_layers on are windowed (or as layer_types say).
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else
        "full_attention" for i in range(n)]
    local = tuple(t == "sliding_attention" for t in types)
    if not any(local):
      sliding, local = None, ()
    elif all(local):
      local = ()
  return DecoderConfig(
      d_model=d, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
      mlp_dim=int(hf["intermediate_size"]),
      max_len=int(hf.get("max_position_embeddings", 2048)), norm=family.norm,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="gated",
      activation=_activation(act, family), positions="rope",
      qkv_bias=attention_bias or family.qkv_bias, out_bias=attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=family.qk_norm,
      embed_scale=family.embed_scale,
      sliding_window=None if sliding is None else int(sliding), local_layers=local,
      **_rope(hf, head_dim), **common)


# Gemma3TextConfig's defaults (transformers 5.25): a config.json lists only what
# differs from them, as the text_config of the Hub's multimodal Gemma 3 configs does
# (gemma-3-4b-it's names neither its heads nor its vocabulary).
GEMMA3_TEXT_DEFAULTS: Mapping[str, Any] = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    rms_norm_eps=1e-6, attention_bias=False, query_pre_attn_scalar=256,
    sliding_window=4096, tie_word_embeddings=True)


def gemma3_text_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The text model's config.json of a multimodal Gemma 3 config (model_type "gemma3",
  Gemma3ForConditionalGeneration): its text_config completed with Gemma3TextConfig's
  defaults, the top level's tie_word_embeddings (which transformers ties by), as a
  gemma3_text / Gemma3ForCausalLM config (what a finetuned text model exports as)."""
  text = {**GEMMA3_TEXT_DEFAULTS, **dict(hf.get("text_config") or {})}
  # transformers ties by the top level's own value, True when it says none (whatever
  # text_config says).
  text["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)
  for key in ("dtype", "torch_dtype"):
    if key in hf and key not in text:
      text[key] = hf[key]
  text.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"])
  return text


def _gemma3_text_defaults(hf: Mapping[str, Any]) -> dict[str, Any]:
  """A gemma3_text config.json completed with Gemma3TextConfig's defaults."""
  return {**GEMMA3_TEXT_DEFAULTS, **hf}


def _gemma3_config(hf: Mapping[str, Any], family: "Family", common: dict[str, Any]
                   ) -> DecoderConfig:
  """Gemma 3's text model (gemma3_text, Gemma3ForCausalLM; of a multimodal gemma3
  config, gemma3_text_config's), completed with Gemma3TextConfig's defaults before:
  local (sliding-window) and global layers in `layer_types` (or every
  `sliding_window_pattern`-th layer global), each kind with its RoPE (v5
  rope_parameters per layer type; v4 rope_theta + rope_scaling for global layers and
  rope_local_base_freq for local ones), q/k norms and norms after attention and MLP,
  all x * (1 + w), scores scaled by query_pre_attn_scalar**-0.5, optional final
  logit soft-capping. attn_logit_softcapping is read by transformers' Gemma 3 but
  never applied to the scores (its attention passes no softcap), so neither here."""
  if hf.get("use_bidirectional_attention"):
    raise ValueError(f"{family.model_type}: use_bidirectional_attention=True (an "
                     "embedding model) is not supported; causal decoders only.")
  n = int(hf["num_hidden_layers"])
  types = hf.get("layer_types") or [
      "sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 6)) else
      "full_attention" for i in range(n)]
  bad = sorted(set(types) - {"sliding_attention", "full_attention"})
  if len(types) != n or bad:
    raise ValueError(f"{family.model_type}: layer_types {types} should list "
                     f"num_hidden_layers={n} entries of 'sliding_attention' / 'full_attention'.")
  rope = dict(hf.get("rope_parameters") or {})
  if "full_attention" in rope:  # v5: one RoPE per layer type
    full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or {})
  else:  # v4: rope_theta (+ rope_scaling) global, rope_local_base_freq local
    full = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 1e6))
    local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 1e4)}
  if local.get("rope_type", "default") != "default":
    raise ValueError(f"{family.model_type}: local layers' rope type "
                     f"{local['rope_type']!r} is not supported (default only).")
  local_theta = float(local.get("rope_theta", 1e4))
  full.setdefault("rope_theta", 1e6)
  llama_hf = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
  llama_hf.update(rope_parameters=full, max_position_embeddings=hf.get(
      "max_position_embeddings", 131072), sliding_window=hf.get("sliding_window", 4096))
  cfg = _llama_config(llama_hf, family, common)
  cap = hf.get("final_logit_softcapping")
  return dataclasses.replace(
      cfg, local_layers=tuple(t == "sliding_attention" for t in types),
      local_rope_theta=local_theta, post_norms=True,
      query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
      final_logit_softcap=None if cap is None else float(cap))


# ------------------------------------------------------------------ tensor table

@dataclasses.dataclass(frozen=True)
class Tensor:
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


def _gpt2_tensors(cfg: DecoderConfig, add: Callable[..., None]) -> None:
  """GPT-2's tensors (Conv1D layouts, fused c_attn)."""
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


def _llama_tensors(cfg: DecoderConfig, add: Callable[..., None]) -> None:
  """The Llama layout (Linear [out, in]) that Mistral, Qwen and Gemma share; biases
  and q/k norms where the config has them."""
  add("model.embed_tokens.weight", "embed", "embedding")
  for i in range(cfg.num_layers):
    b, blk = f"model.layers.{i}.", f"block_{i}"
    add(f"{b}input_layernorm.weight", blk, "attn_norm", "scale")
    if cfg.post_norms:  # Gemma 2/3: post_attention_layernorm is on the attention's output
      add(f"{b}post_attention_layernorm.weight", blk, "attn_post_norm", "scale")
      add(f"{b}pre_feedforward_layernorm.weight", blk, "mlp_norm", "scale")
      add(f"{b}post_feedforward_layernorm.weight", blk, "mlp_post_norm", "scale")
    else:
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


def _gemma3_mm_tensors(cfg: DecoderConfig, add: Callable[..., None]) -> None:
  """A multimodal Gemma 3's text tensors: the Llama layout under model.language_model.
  (transformers v5's names; the Hub's checkpoints say language_model.model., which
  weights.py reads as these)."""
  _llama_tensors(cfg, lambda name, *path, **kw: add(
      "model.language_model." + name.removeprefix("model."), *path, **kw))


def tensor_table(cfg: DecoderConfig) -> list[Tensor]:
  """The checkpoint tensors of cfg's family, in transformers' names and layouts."""
  out: list[Tensor] = []
  add = lambda name, *path, kind="copy", part=0: out.append(Tensor(name, path, kind, part))
  # The own model ("pdl") is exported in Llama's layout (export.own_model_hf_config).
  FAMILIES["llama" if cfg.model_type == "pdl" else cfg.model_type].tensors(cfg, add)
  if not cfg.tied_embeddings:
    add("lm_head.weight", "unembed", kind="T")
  return out


def source_shape(t: Tensor, shape: Sequence[int]) -> tuple[int, ...]:
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


# ------------------------------------------------------------------ the table

@dataclasses.dataclass(frozen=True)
class Family:
  """One model_type: its config translation, tensor names and quirks."""

  model_type: str
  config: Callable[[Mapping[str, Any], "Family", dict[str, Any]], DecoderConfig]
  tensors: Callable[[DecoderConfig, Callable[..., None]], None]
  tied_default: bool = False  # tie_word_embeddings when config.json omits it
  norm: str = "rms"
  qkv_bias: bool = False  # q/k/v biases whatever attention_bias says (Qwen2)
  qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
  embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
  sliding_window_flag: str | None = None  # config key that switches sliding_window on
  # Legacy activation names -> transformers' current ones.
  activation_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # config.json -> the flat text model's config.json the rest of the reading sees
  # (vocab_size, tie_word_embeddings, the MoE keys): a composite (multimodal) config's
  # text_config, or defaults filled in.
  text_config: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
  # A regex (re.search) of the checkpoint tensors that are not the decoder's (a vision
  # tower): never read, never reported as unexpected.
  skipped: str | None = None


_LLAMA = dict(config=_llama_config, tensors=_llama_tensors)
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", **_LLAMA),
    Family("mistral", **_LLAMA),
    Family("qwen2", **_LLAMA, qkv_bias=True, sliding_window_flag="use_sliding_window"),
    Family("qwen3", **_LLAMA, qk_norm=True, sliding_window_flag="use_sliding_window"),
    # Official Gemma configs say "gelu", a legacy value meaning the tanh approximation
    # (transformers rewrites it to gelu_pytorch_tanh); its norm scales by 1 + weight.
    Family("gemma", **_LLAMA, tied_default=True, norm="rms_plus_one", embed_scale=True,
           activation_aliases={"gelu": "gelu_pytorch_tanh"}),
    Family("gemma3_text", config=_gemma3_config, tensors=_llama_tensors, tied_default=True,
           norm="rms_plus_one", embed_scale=True, qk_norm=True,
           activation_aliases={"gelu": "gelu_pytorch_tanh"}, text_config=_gemma3_text_defaults),
    # The multimodal Gemma 3 (gemma-3-4b and up): its text model; the vision tower
    # and projector are skipped.
    Family("gemma3", config=_gemma3_config, tensors=_gemma3_mm_tensors,
           tied_default=True, norm="rms_plus_one", embed_scale=True, qk_norm=True,
           activation_aliases={"gelu": "gelu_pytorch_tanh"}, text_config=gemma3_text_config,
           skipped=r"^(model\.)?(vision_tower|multi_modal_projector)\."),
    Family("gpt2", config=_gpt2_config, tensors=_gpt2_tensors, tied_default=True),
)}


def read_config(model_dir: str | os.PathLike, *, dtype: str = "float32",
                param_dtype: str = "float32") -> DecoderConfig:
  """DecoderConfig of the Hugging Face checkpoint in model_dir (its config.json; a
  named offline model, e.g. "smollm2-135m-instruct", is its cached folder).

  Raises:
    FileNotFoundError: model_dir has no config.json.
    ValueError: unsupported model_type or option (names it and lists what is supported).
  """
  model_dir = locate.local_dir(os.fspath(model_dir))
  path = epath.Path(model_dir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{os.fspath(model_dir)!r} has no config.json ({os.fspath(path)}); give a Hugging "
        "Face model directory (config.json + *.safetensors).")
  text = path.read_text()
  return config_from_hf(json.loads(text), dtype=dtype, param_dtype=param_dtype,
                        source_config_json=text)


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                   param_dtype: str = "float32", source_config_json: str | None = None
                   ) -> DecoderConfig:
  """DecoderConfig from a parsed Hugging Face config.json (see read_config)."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                     f"{tuple(FAMILIES)}.")
  family = FAMILIES[model_type]
  if source_config_json is None:
    source_config_json = json.dumps(dict(hf))
  if family.text_config is not None:
    hf = family.text_config(hf)
  for moe_key in ("num_experts", "num_local_experts", "n_routed_experts"):
    if hf.get(moe_key):
      raise ValueError(f"{model_type}: mixture-of-experts ({moe_key}={hf[moe_key]}) is not "
                       "supported; dense decoders only.")
  common = dict(dtype=dtype, param_dtype=param_dtype, model_type=model_type,
                source_config_json=source_config_json,
                tied_embeddings=bool(hf.get("tie_word_embeddings", family.tied_default)),
                vocab_size=int(hf["vocab_size"]))
  return family.config(hf, family, common)
