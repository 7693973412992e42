"""Greedy, beam-search and top-p decoding with a KV cache, jitted.

Prompts are left-padded ([pad ... pad, prompt, sep]) so every row's next token is
written at the same cache index; positions count real tokens only, so a row sees
the same positions as it would unpadded. After a row emits EOS it emits padding.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from pdl_jax.models import decoder
from pdl_jax.models import quant

METHODS = ("greedy", "beam", "top_p")
# A decoding name: a method, optionally with a logit-adjustment strength beta
# ("greedy_bias0.25": greedy on logits - 0.25 * log(freq + eps); see parse_method).
_NAME = re.compile(r"^(greedy|beam|top_p)(?:_bias([0-9]+(?:\.[0-9]+)?))?$")


def parse_method(name: str) -> tuple[str, float | None]:
  """(method, beta) of a decoding name: "greedy" -> ("greedy", None),
  "top_p_bias0.5" -> ("top_p", 0.5): nucleus sampling from the logits plus the
  frequency bias -0.5 * log(freq + eps) (losses/logit_adjustment.py).

  Raises:
    ValueError: naming the bad name and the accepted forms.
  """
  match = _NAME.match(str(name))
  if match is None:
    raise ValueError(f"decode method {name!r} is unknown; expected one of {METHODS}, "
                     "optionally followed by _bias<beta> (e.g. 'greedy_bias0.25': "
                     "logit-adjusted decoding).")
  return match.group(1), None if match.group(2) is None else float(match.group(2))


def method_name(method: str, beta: float | None) -> str:
  """The decoding name of (method, beta): parse_method's inverse."""
  return method if beta is None else f"{method}_bias{beta:g}"


def left_pad(prompts: list[list[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] left-padded tokens and mask; prompts longer than `length` keep
  their last `length` tokens (the end, with the separator, matters most)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    p = p[-length:]
    if p:
      tokens[i, length - len(p):] = p
      mask[i, length - len(p):] = 1
  return tokens, mask


def _positions(mask_BxP: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)


def decoding_model(model, params):
  """(model, params) to decode with: the unrolled layout and params cast to the
  compute dtype. Called inside the jitted decoders, so it runs once per decode, not
  per token.

  Why unrolled: a scan over layers slices each layer's cache out of the stacked
  buffer and stacks the results again, a copy of the whole cache per token; the
  unrolled decoder keeps one cache buffer per layer and updates each in place. The
  scanned layout pays off in the backward pass's compile time, not here. Why cast:
  with bfloat16 compute and float32 params, every projection would otherwise cast
  its float32 kernel at every token; the projections cast to the compute dtype
  anyway, so the values are the same. Norm scales and biases (1-D) stay as they are,
  and so does a tied embedding with an unembedding scale. The cost: during a decode
  the params exist twice on the device (cast, or unstacked from the scanned layout),
  and a scanned model compiles an unrolled decoder.
  """
  cfg = model.cfg
  if cfg.scan_layers:
    model = decoder.Decoder(dataclasses.replace(cfg, scan_layers=False, remat="none"))
    params = decoder.unstack_layers(params)
  dtype = jnp.dtype(cfg.dtype)
  if dtype != jnp.dtype(cfg.param_dtype):
    # A quantised kernel's scales stay float32: dequantisation computes in float32
    # and rounds once, as the training forward does.
    scales = {names[1] for names in quant.PARAM_NAMES.values()}
    cast = lambda path, x: (x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(
        x.dtype, jnp.floating) and getattr(path[-1], "key", None) not in scales else x)
    # A tied embedding with an unembedding scale (the own model) is scaled before its
    # cast to the compute dtype (bf16(w * s)); cast first, it would round twice.
    keep = cfg.tied_embeddings and cfg.unembed_scale not in (None, 1, 1.0)
    params = {k: (v if keep and k == "embed" else jax.tree_util.tree_map_with_path(cast, v))
              for k, v in params.items()}
  return model, params


def _prefill(model, params, tokens_BxP, mask_BxP, total_len):
  b, p = tokens_BxP.shape
  cache = decoder.init_cache(model.cfg, b, total_len)
  key_mask_BxS = jnp.concatenate(
      [mask_BxP, jnp.ones((b, total_len - p), mask_BxP.dtype)], axis=1)
  hidden_BxPxD, cache = model.apply({"params": params}, tokens_BxP, _positions(mask_BxP),
                                    key_mask_BxS, cache, 0, return_hidden=True)
  # Only the last position is unembedded: the [B, P, V] float32 logits of the whole
  # prompt (3 GB at batch 64, prompt 256, V 49152) are never made.
  logits_BxV = model.apply({"params": params}, hidden_BxPxD[:, -1],
                           method=decoder.Decoder.unembed_logits)
  next_pos_B = jnp.sum(mask_BxP, axis=1)
  return logits_BxV, cache, key_mask_BxS, next_pos_B


def _step(model, params, token_B, pos_B, key_mask_BxS, cache, index):
  logits_Bx1xV, cache = model.apply({"params": params}, token_B[:, None], pos_B[:, None],
                                    key_mask_BxS, cache, index)
  return logits_Bx1xV[:, 0], cache


def _eos_ids(eos_id: int | tuple[int, ...]) -> tuple[int, ...]:
  """Every id that ends a generation (Llama 3 instruct has three, Qwen2.5 two)."""
  return tuple(eos_id) if isinstance(eos_id, (tuple, list)) else (eos_id,)


def _is_eos(token: jax.Array, eos_id: int | tuple[int, ...]) -> jax.Array:
  return jnp.isin(token, jnp.asarray(_eos_ids(eos_id), jnp.int32))


def first_argmax(logits_BxV: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first index of the maximum), int32, as a max
  then a min over indices: two plain reductions, 3x faster on XLA:CPU than argmax's
  variadic (value, index) reduction (2 vs 7 ms at batch 64, V 49152, every token).
  Equal to argmax for rows without NaN (a NaN row gives the last index)."""
  v = logits_BxV.shape[-1]
  max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
  idx_B = jnp.min(jnp.where(logits_BxV == max_Bx1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(idx_B, v - 1)  # NaN rows (never equal): the last index, not v


def _ban(logits_BxV: jax.Array, banned: tuple[int, ...]) -> jax.Array:
  """Ids that are never outputs (pad, bos, the separator) get -inf."""
  if not banned:
    return logits_BxV
  return logits_BxV.at[:, jnp.asarray(banned)].set(-jnp.inf)


def _adjust(logits_BxV: jax.Array, bias_V: jax.Array | None,
            banned: tuple[int, ...]) -> jax.Array:
  """The logits a decoder chooses from: plus the frequency bias (logit-adjusted
  decoding; None: the logits as they are, bit for bit), banned ids at -inf. Top-p
  divides these by its temperature: with a temperature T the bias's strength is
  beta / T (the evaluation's top-p uses T = 1)."""
  if bias_V is not None:
    logits_BxV = logits_BxV + bias_V.astype(logits_BxV.dtype)[None, :]
  return _ban(logits_BxV, banned)


TOP_P_CANDIDATES = 64  # the sampler's first try: the nucleus within the top 64 logits


def _bisect_cutoff(logits_BxV, probs_BxV, top_p):
  """Exact cutoff [B, 1] by bisection on the logit value: the largest c with
  mass(logits >= c) >= top_p, found without sorting the vocabulary (a full sort of
  V = 49152 costs 8 ms a row on XLA:CPU, one masked sum ~0.5 ms). Ends when no
  float lies strictly between the bounds, so the lower bound is then a logit value
  (or has no logit between it and the cutoff): the kept set is exact."""
  mass = lambda c_B1: jnp.sum(jnp.where(logits_BxV >= c_B1, probs_BxV, 0.0), axis=-1,
                              keepdims=True)
  # The smallest logit with any mass (banned ids are -inf: a -inf bound would make
  # every midpoint NaN and keep the whole vocabulary). Mass 1 >= top_p from there.
  lo_B1 = jnp.min(jnp.where(probs_BxV > 0, logits_BxV, jnp.inf), axis=-1, keepdims=True)
  hi_B1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
  top_B1 = mass(hi_B1) >= top_p  # the argmax alone holds top_p: the cutoff is the max

  def split(lo_B1, hi_B1):
    return lo_B1 + (hi_B1 - lo_B1) / 2

  def running(carry):
    lo_B1, hi_B1, i = carry
    mid_B1 = split(lo_B1, hi_B1)
    return (i < 300) & jnp.any((mid_B1 > lo_B1) & (mid_B1 < hi_B1))

  def body(carry):
    lo_B1, hi_B1, i = carry
    mid_B1 = split(lo_B1, hi_B1)
    ok_B1 = mass(mid_B1) >= top_p
    return jnp.where(ok_B1, mid_B1, lo_B1), jnp.where(ok_B1, hi_B1, mid_B1), i + 1

  lo_B1, hi_B1, _ = jax.lax.while_loop(running, body, (lo_B1, hi_B1, 0))
  return jnp.where(top_B1, hi_B1, lo_B1)


def typed_key(rng: jax.Array) -> jax.Array:
  """A typed key array (jax.random.key) from a typed or a raw uint32 key
  (jax.random.PRNGKey): the per-row branches read the keys' ndim, which a raw key's
  trailing axis would skew."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def _sample_from(rng, probs_BxN):
  """One index per row with probability proportional to probs_BxN (zeros never
  chosen), by the inverse CDF: one uniform a row instead of V Gumbel draws.
  rng: one key for the batch, or [B] keys, one per row."""
  cum_BxN = jnp.cumsum(probs_BxN, axis=-1)
  total_B1 = cum_BxN[:, -1:]
  rng = typed_key(rng)
  if rng.ndim == 0:
    u_B1 = jax.random.uniform(rng, total_B1.shape)
  else:
    u_B1 = jax.vmap(jax.random.uniform)(rng)[:, None]
  u_B1 = u_B1 * total_B1
  above_BxN = cum_BxN > u_B1
  # u rounds up to the total at worst: then the last index with mass.
  return jnp.where(jnp.any(above_BxN, axis=-1), jnp.argmax(above_BxN, axis=-1),
                   jnp.argmax(cum_BxN >= total_B1, axis=-1))


def nucleus_cutoff(logits_BxV: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Cutoff logit [B, 1] of nucleus sampling: the smallest set of tokens whose
  softmax mass reaches top_p is {logits >= cutoff} (ties at the cutoff kept)."""
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  return _bisect_cutoff(logits_BxV, probs_BxV, top_p)


def _top_p_sample(rng, logits_BxV, top_p, temperature):
  """Nucleus sampling: a token with probability softmax(logits / temperature)
  renormalised over the smallest set whose mass reaches top_p.

  Fast path: when, in every row, the top TOP_P_CANDIDATES logits (`lax.top_k`, a
  partial selection) hold top_p of the mass, as a trained LM's next-token
  distribution almost always does, the cutoff and the sample come from those
  candidates alone. Otherwise the exact cutoff comes from `_bisect_cutoff` and the
  sample from all V. Neither sorts the vocabulary (the previous sampler did, at
  every step: 0.5 s a step at batch 64, V 49152), and sampling is by inverse CDF,
  not V Gumbel draws. The distribution is the one of a full sort
  (tests/eval/test_model_decode.py); the tokens drawn for a given key differ from it.
  rng: one key for the batch, or [B] keys, one per row.
  """
  logits_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  n = min(TOP_P_CANDIDATES, logits_BxV.shape[-1])
  top_probs_BxN, top_ids_BxN = jax.lax.top_k(probs_BxV, n)  # descending
  cum_BxN = jnp.cumsum(top_probs_BxN, axis=-1)
  cut_B = jnp.sum(cum_BxN < top_p, axis=-1)  # index of the last token kept
  cutoff_B1 = jnp.take_along_axis(top_probs_BxN, jnp.minimum(cut_B, n - 1)[:, None], axis=-1)
  # The candidates hold the nucleus, and no token outside them ties with the cutoff
  # (the last candidate is below it), in every row.
  # The last candidate as a min, not top_probs_BxN[:, -1]: slicing the last column of
  # lax.top_k's output makes XLA:CPU lower the top_k as a full sort of the vocabulary
  # (406 vs 5 ms at 64 x 49152), at every top-p step.
  found_B = (cut_B < n) & (jnp.min(top_probs_BxN, axis=-1) < cutoff_B1[:, 0])

  def from_candidates(_):
    kept_BxN = jnp.where(top_probs_BxN >= cutoff_B1, top_probs_BxN, 0.0)
    pick_B = _sample_from(rng, kept_BxN)
    return jnp.take_along_axis(top_ids_BxN, pick_B[:, None], axis=-1)[:, 0]

  def from_vocabulary(_):
    # Only the rows whose nucleus the candidates miss sample from the vocabulary: the
    # others keep the candidates' draw, so a row's token (for its key) does not depend
    # on the other rows of its batch. Both draws use the row's same uniform.
    cutoff_B1 = _bisect_cutoff(logits_BxV, probs_BxV, top_p)
    full_B = _sample_from(rng, jnp.where(logits_BxV >= cutoff_B1, probs_BxV, 0.0))
    return jnp.where(found_B, from_candidates(None), full_B)

  return jax.lax.cond(jnp.all(found_B), from_candidates, from_vocabulary,
                      None).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "method",
                                             "eos_id", "pad_id", "banned_ids"))
def generate(model, params, tokens_BxP, mask_BxP, rng, *, max_new_tokens: int,
             method: str = "greedy", eos_id: int | tuple[int, ...] = 1, pad_id: int = 0,
             top_p: float = 0.9, temperature: float = 1.0,
             banned_ids: tuple[int, ...] = (), row_ids_B: jax.Array | None = None,
             bias_V: jax.Array | None = None) -> jax.Array:
  """Greedy or top-p continuations [B, max_new_tokens] of left-padded prompts.

  bias_V: [V] added to the logits before every choice (logit-adjusted decoding,
  losses/logit_adjustment.frequency_bias); None: the plain logits.

  Top-p's draws at step t come from fold_in(rng, t) for the whole batch or, with
  row_ids_B (e.g. each prompt's index in the evaluation set), from
  fold_in(fold_in(rng, row_ids_B[b]), t) for row b: then a prompt's sample does not
  depend on which batch, row or padded length it was decoded in.
  """
  if method not in ("greedy", "top_p"):
    raise ValueError(f"method must be one of ('greedy', 'top_p') here; got {method!r}; "
                     "use beam_search for 'beam'.")
  model, params = decoding_model(model, params)
  b, p = tokens_BxP.shape
  logits_BxV, cache, key_mask, pos_B = _prefill(model, params, tokens_BxP, mask_BxP,
                                                p + max_new_tokens)

  def choose(logits_BxV, t):
    logits_BxV = _adjust(logits_BxV, bias_V, banned_ids)
    if method == "greedy":
      return first_argmax(logits_BxV)
    if row_ids_B is None:
      key = jax.random.fold_in(rng, t)
    else:
      key = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, i), t))(
          row_ids_B)
    return _top_p_sample(key, logits_BxV, top_p, temperature).astype(jnp.int32)

  # A while loop, not a scan over max_new_tokens: it ends when every row is done
  # (short synopses end long before the limit); what the rows would emit after that
  # is padding, which the output already holds.
  def running(carry):
    t, _, _, done_B, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    t, logits_BxV, cache, done_B, tokens_BxT = carry
    token_B = jnp.where(done_B, pad_id, choose(logits_BxV, t))
    done_B = done_B | _is_eos(token_B, eos_id)
    tokens_BxT = jax.lax.dynamic_update_slice_in_dim(tokens_BxT, token_B[:, None], t,
                                                     axis=1)
    logits_BxV, cache = _step(model, params, token_B, pos_B + t, key_mask, cache, p + t)
    return t + 1, logits_BxV, cache, done_B, tokens_BxT

  init = (jnp.zeros((), jnp.int32), logits_BxV, cache, jnp.zeros(b, bool),
          jnp.full((b, max_new_tokens), pad_id, jnp.int32))
  return jax.lax.while_loop(running, body, init)[4]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "beam_size",
                                             "eos_id", "pad_id", "banned_ids"))
def beam_search(model, params, tokens_BxP, mask_BxP, *, max_new_tokens: int,
                beam_size: int = 4, eos_id: int | tuple[int, ...] = 1,
                pad_id: int = 0, length_penalty: float = 0.6,
                banned_ids: tuple[int, ...] = (), bias_V: jax.Array | None = None
                ) -> jax.Array:
  """Best beam [B, max_new_tokens] by log-prob / length ** length_penalty; with
  bias_V, the log-probs are those of the adjusted logits (logits + bias_V)."""
  model, params = decoding_model(model, params)
  b, p = tokens_BxP.shape
  w = beam_size
  logits_BxV, cache, key_mask, pos_B = _prefill(model, params, tokens_BxP, mask_BxP,
                                                p + max_new_tokens)
  vocab = logits_BxV.shape[-1]
  tile = lambda x: jnp.repeat(x, w, axis=0)  # [B, ...] -> [B*W, ...]
  cache = jax.tree.map(tile, cache)  # per layer [B*W, KV, S, K]
  logits = tile(logits_BxV)
  key_mask, pos = tile(key_mask), tile(pos_B)
  # Only beam 0 is alive at the start, so the first step does not pick W copies.
  scores_BxW = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (w - 1)), (b, 1))
  seqs_BxWxT = jnp.full((b, w, max_new_tokens), pad_id, jnp.int32)
  done_BxW = jnp.zeros((b, w), bool)
  lengths_BxW = jnp.zeros((b, w), jnp.int32)

  def body(carry, t):
    logits, cache, scores_BxW, seqs_BxWxT, done_BxW, lengths_BxW = carry
    logp_BxWxV = jax.nn.log_softmax(_adjust(logits.astype(jnp.float32), bias_V,
                                            banned_ids)).reshape(b, w, vocab)
    # A finished beam continues only with padding, at no cost.
    finished_V = jnp.full((vocab,), -jnp.inf).at[pad_id].set(0.0)
    logp_BxWxV = jnp.where(done_BxW[..., None], finished_V, logp_BxWxV)
    cand_BxWV = (scores_BxW[..., None] + logp_BxWxV).reshape(b, w * vocab)
    scores_BxW, idx_BxW = jax.lax.top_k(cand_BxWV, w)
    beam_BxW, token_BxW = idx_BxW // vocab, (idx_BxW % vocab).astype(jnp.int32)
    gather = lambda x: jnp.take_along_axis(x, beam_BxW, axis=1)
    seqs_BxWxT = jnp.take_along_axis(seqs_BxWxT, beam_BxW[..., None], axis=1)
    seqs_BxWxT = seqs_BxWxT.at[:, :, t].set(token_BxW)
    was_done = gather(done_BxW)
    lengths_BxW = gather(lengths_BxW) + (~was_done).astype(jnp.int32)
    done_BxW = was_done | _is_eos(token_BxW, eos_id)
    flat = (jnp.arange(b)[:, None] * w + beam_BxW).reshape(-1)
    cache = jax.tree.map(lambda c: c[flat], cache)
    logits, cache = _step(model, params, token_BxW.reshape(-1), pos + t, key_mask, cache,
                          p + t)
    return (logits, cache, scores_BxW, seqs_BxWxT, done_BxW, lengths_BxW), None

  carry = (logits, cache, scores_BxW, seqs_BxWxT, done_BxW, lengths_BxW)
  (_, _, scores_BxW, seqs_BxWxT, _, lengths_BxW), _ = jax.lax.scan(
      body, carry, jnp.arange(max_new_tokens))
  normed = scores_BxW / jnp.maximum(lengths_BxW, 1).astype(jnp.float32) ** length_penalty
  best_B = jnp.argmax(normed, axis=1)
  return jnp.take_along_axis(seqs_BxWxT, best_B[:, None, None], axis=1)[:, 0]


def generate_without_cache(model, params, tokens_BxP, mask_BxP, *, max_new_tokens: int,
                           eos_id: int = 1, pad_id: int = 0) -> np.ndarray:
  """Greedy decoding by a full forward pass per token: the slow reference."""
  tokens, mask = np.asarray(tokens_BxP), np.asarray(mask_BxP)
  b = tokens.shape[0]
  out = np.full((b, max_new_tokens), pad_id, np.int32)
  done = np.zeros(b, bool)
  apply = jax.jit(lambda prm, t, pos, km: model.apply({"params": prm}, t, pos, km)[0])
  for t in range(max_new_tokens):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = np.asarray(apply(params, tokens, positions, mask))
    nxt = np.where(done, pad_id, logits[:, -1].argmax(-1)).astype(np.int32)
    out[:, t] = nxt
    done |= np.isin(nxt, _eos_ids(eos_id))
    tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
    mask = np.concatenate([mask, np.ones((b, 1), mask.dtype)], axis=1)
  return out


def decode(model, params, tokens_BxP, mask_BxP, rng, *, method: str, max_new_tokens: int,
           eos_id: int | tuple[int, ...], pad_id: int, beam_size: int = 4,
           top_p: float = 0.9, temperature: float = 1.0,
           banned_ids: tuple[int, ...] = (), row_ids_B: jax.Array | None = None,
           bias_V: jax.Array | None = None) -> jax.Array:
  """Dispatch by method name ("greedy", "beam", "top_p").

  eos_id: the id, or a tuple of ids, that end a generation (any of them).
  banned_ids: ids never generated (the caller passes pad, bos and the separator).
  row_ids_B: top-p's per-row keys (see generate).
  bias_V: [V] added to the logits before each choice (logit-adjusted decoding).
  """
  if method not in METHODS:
    raise ValueError(f"decode method {method!r} is unknown; expected one of {METHODS}.")
  if method == "beam":
    return beam_search(model, params, tokens_BxP, mask_BxP, max_new_tokens=max_new_tokens,
                       beam_size=beam_size, eos_id=eos_id, pad_id=pad_id,
                       banned_ids=banned_ids, bias_V=bias_V)
  return generate(model, params, tokens_BxP, mask_BxP, rng, max_new_tokens=max_new_tokens,
                  method=method, eos_id=eos_id, pad_id=pad_id, top_p=top_p,
                  temperature=temperature, banned_ids=banned_ids, row_ids_B=row_ids_B,
                  bias_V=bias_V)


def strip_after_eos(tokens: np.ndarray, eos_id: int | tuple[int, ...], pad_id: int
                    ) -> list[list[int]]:
  """Token lists cut at the first EOS (any of several ids), padding removed."""
  eos = set(_eos_ids(eos_id))
  out = []
  for row in np.asarray(tokens).tolist():
    cut = next((i for i, t in enumerate(row) if t in eos), None)
    if cut is not None:
      row = row[:cut]
    out.append([t for t in row if t != pad_id])
  return out
