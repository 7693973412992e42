"""Greedy, beam-search and top-p decoding with a KV cache, jitted.

Prompts are left-padded ([pad ... pad, prompt, sep]) so every row's next token is
written at the same cache index; positions count real tokens only, so a row sees
the same positions as it would unpadded. After a row emits EOS it emits padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pdl_jax.models import decoder as decoder_lib

METHODS = ("greedy", "beam", "top_p")


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


def _prefill(model, params, tokens_BxP, mask_BxP, total_len):
  b, p = tokens_BxP.shape
  cache = decoder_lib.init_cache(model.cfg, b, total_len)
  key_mask_BxS = jnp.concatenate(
      [mask_BxP, jnp.ones((b, total_len - p), mask_BxP.dtype)], axis=1)
  hidden_BxPxD, cache = model.apply({"params": params}, tokens_BxP, _positions(mask_BxP),
                                    key_mask_BxS, cache, 0, return_hidden=True)
  # Only the last position is unembedded: the [B, P, V] float32 logits of the whole
  # prompt (3 GB at batch 64, prompt 256, V 49152) are never made.
  logits_BxV = model.apply({"params": params}, hidden_BxPxD[:, -1],
                           method=decoder_lib.Decoder.unembed_logits)
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


def _ban(logits_BxV: jax.Array, banned: tuple[int, ...]) -> jax.Array:
  """Ids that are never outputs (pad, bos, the separator) get -inf."""
  if not banned:
    return logits_BxV
  return logits_BxV.at[:, jnp.asarray(banned)].set(-jnp.inf)


def _top_p_sample(rng, logits_BxV, top_p, temperature):
  logits_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
  # Smallest set whose mass reaches top_p: keep logits >= the cutoff logit.
  cutoff_idx_B = jnp.sum(cum_BxV < top_p, axis=-1)
  cutoff_B = jnp.take_along_axis(sorted_BxV, cutoff_idx_B[:, None], axis=-1)
  logits_BxV = jnp.where(logits_BxV >= cutoff_B, logits_BxV, -jnp.inf)
  return jax.random.categorical(rng, logits_BxV, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "method",
                                             "eos_id", "pad_id", "banned_ids"))
def generate(model, params, tokens_BxP, mask_BxP, rng, *, max_new_tokens: int,
             method: str = "greedy", eos_id: int | tuple[int, ...] = 1, pad_id: int = 0,
             top_p: float = 0.9, temperature: float = 1.0,
             banned_ids: tuple[int, ...] = ()) -> jax.Array:
  """Greedy or top-p continuations [B, max_new_tokens] of left-padded prompts."""
  if method not in ("greedy", "top_p"):
    raise ValueError(f"method must be one of ('greedy', 'top_p') here; got {method!r}; "
                     "use beam_search for 'beam'.")
  b, p = tokens_BxP.shape
  logits_BxV, cache, key_mask, pos_B = _prefill(model, params, tokens_BxP, mask_BxP,
                                                p + max_new_tokens)

  def choose(logits_BxV, t):
    logits_BxV = _ban(logits_BxV, banned_ids)
    if method == "greedy":
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return _top_p_sample(jax.random.fold_in(rng, t), logits_BxV, top_p,
                         temperature).astype(jnp.int32)

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
                banned_ids: tuple[int, ...] = ()) -> jax.Array:
  """Best beam [B, max_new_tokens] by log-prob / length ** length_penalty."""
  b, p = tokens_BxP.shape
  w = beam_size
  logits_BxV, cache, key_mask, pos_B = _prefill(model, params, tokens_BxP, mask_BxP,
                                                p + max_new_tokens)
  vocab = logits_BxV.shape[-1]
  tile = lambda x: jnp.repeat(x, w, axis=0)  # [B, ...] -> [B*W, ...]
  cache = jax.tree.map(lambda c: jnp.repeat(c, w, axis=1), cache)  # [layers, B*W, ...]
  logits = tile(logits_BxV)
  key_mask, pos = tile(key_mask), tile(pos_B)
  # Only beam 0 is alive at the start, so the first step does not pick W copies.
  scores_BxW = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (w - 1)), (b, 1))
  seqs_BxWxT = jnp.full((b, w, max_new_tokens), pad_id, jnp.int32)
  done_BxW = jnp.zeros((b, w), bool)
  lengths_BxW = jnp.zeros((b, w), jnp.int32)

  def body(carry, t):
    logits, cache, scores_BxW, seqs_BxWxT, done_BxW, lengths_BxW = carry
    logp_BxWxV = jax.nn.log_softmax(_ban(logits.astype(jnp.float32), banned_ids)
                                    ).reshape(b, w, vocab)
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
    cache = jax.tree.map(lambda c: c[:, flat], cache)
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
           banned_ids: tuple[int, ...] = ()) -> jax.Array:
  """Dispatch by method name ("greedy", "beam", "top_p").

  eos_id: the id, or a tuple of ids, that end a generation (any of them).
  banned_ids: ids never generated (the caller passes pad, bos and the separator).
  """
  if method not in METHODS:
    raise ValueError(f"decode method {method!r} is unknown; expected one of {METHODS}.")
  if method == "beam":
    return beam_search(model, params, tokens_BxP, mask_BxP, max_new_tokens=max_new_tokens,
                       beam_size=beam_size, eos_id=eos_id, pad_id=pad_id,
                       banned_ids=banned_ids)
  return generate(model, params, tokens_BxP, mask_BxP, rng, max_new_tokens=max_new_tokens,
                  method=method, eos_id=eos_id, pad_id=pad_id, top_p=top_p,
                  temperature=temperature, banned_ids=banned_ids)


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
