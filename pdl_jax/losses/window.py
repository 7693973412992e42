"""Logits only where the loss is: a static window per row over the prefix-LM target span.

In the prefix-LM layout (`pdl_jax.data.batches.make_batch`) each row's loss mask is 1 on one
contiguous span, the target tokens + EOS, which is at most max_target_len + 1 long
and often a fifth of the row. The logits (and their gradient, the biggest tensors
of a small model's step) are only needed there. So before the unembedding take,
per row, the hidden states of a static window of `capacity` positions that starts
at the row's first loss position:

    hidden_BxLxD, _ = model.apply(..., return_hidden=True)
    hidden_BxCxD, labels_BxC, mask_BxC = gather_window(hidden_BxLxD, labels_BxL,
                                                       mask_BxL, capacity)
    logits_BxCxV = model.apply(..., hidden_BxCxD, method=Decoder.unembed_logits)
    loss, aux = loss_fn(logits_BxCxV, labels_BxC, weights_V, mask=mask_BxC)

or, chunked, `pdl_loss_from_hidden_and_aux(hidden_BxCxD.reshape(-1, D), ...)`;
`window_loss_and_aux` and `window_chunked_loss_and_aux` do either in one call.
Every position the mask counts is inside the window, positions of the window the
mask does not count keep mask 0, so loss, aux and gradients equal the full
computation's (up to float32 summation order). The window's shape is static
(capacity), so it jits once; the start is data-dependent, taken with a batched
dynamic slice (differentiable; its gradient scatters back into [B, L, D]) that
shards over the batch axis like the hidden states.

A span longer than the capacity would silently lose its tail: the data pipeline
calls `check_capacity(loss_mask, capacity)` once per split (host side, numpy), and
`dropped_tokens` counts such losses inside a jitted step if one wants to log it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def capacity_for(max_target_len: int, seq_len: int, multiple: int = 1) -> int:
  """Window capacity for a prefix-LM split: the longest loss span, max_target_len + 1
  (target tokens + EOS), rounded up to `multiple` (e.g. 8, for even matmul tiles) and
  capped at seq_len.

  Raises:
    ValueError: for max_target_len < 1, seq_len < 1 or multiple < 1.
  """
  if max_target_len < 1 or seq_len < 1 or multiple < 1:
    raise ValueError(f"max_target_len, seq_len and multiple must be >= 1; got "
                     f"{max_target_len}, {seq_len}, {multiple}.")
  return min(seq_len, -(-(max_target_len + 1) // multiple) * multiple)


def gather_loss_positions(hidden_BxLxD: jax.Array, labels_BxL: jax.Array,
                          mask_BxL: jax.Array, capacity: int
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """gather_window for packed rows, whose loss positions form several spans: the
  first `capacity` positions with mask > 0 of each row, in order (then positions
  the mask gives 0), gathered (their gradient scatters back). Exact when no row has
  more than `capacity` loss positions, which the packer guarantees."""
  _check_shapes(hidden_BxLxD, labels_BxL, mask_BxL, capacity)
  if capacity >= hidden_BxLxD.shape[1]:
    return hidden_BxLxD, labels_BxL, mask_BxL
  # A stable sort of "not a loss position" puts the loss positions first, in order.
  idx_BxC = jnp.argsort(mask_BxL <= 0, axis=1, stable=True)[:, :capacity]
  take = lambda x: jnp.take_along_axis(x, idx_BxC.reshape(idx_BxC.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  return take(hidden_BxLxD), take(labels_BxL), take(mask_BxL)


def window_start(mask_BxL: jax.Array) -> jax.Array:
  """Int32 [B]: each row's first position with mask > 0 (0 for a row without any)."""
  return jnp.argmax(mask_BxL > 0, axis=1).astype(jnp.int32)


def _window_offsets(mask_BxL: jax.Array, capacity: int) -> jax.Array:
  # Clamped so the window lies inside the row: a span ending at L still fits, as
  # the window then starts before the span (positions the mask gives 0).
  return jnp.minimum(window_start(mask_BxL), mask_BxL.shape[1] - capacity)


def _check_shapes(hidden_BxLxD, labels_BxL, mask_BxL, capacity):
  if hidden_BxLxD.ndim != 3 or labels_BxL.shape != hidden_BxLxD.shape[:2] \
      or mask_BxL.shape != labels_BxL.shape:
    raise ValueError(f"gather_window needs hidden [B, L, D], labels and mask [B, L]; got "
                     f"{hidden_BxLxD.shape}, {labels_BxL.shape}, {mask_BxL.shape}.")
  if capacity < 1:
    raise ValueError(f"window capacity must be >= 1; got {capacity}.")


def gather_window(hidden_BxLxD: jax.Array, labels_BxL: jax.Array, mask_BxL: jax.Array,
                  capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The loss span's window of each row: (hidden [B, C, D], labels [B, C], mask [B, C]).

  Args:
    hidden_BxLxD: final hidden states (before the unembedding), any float dtype.
    labels_BxL: target ids.
    mask_BxL: the loss mask; its nonzero entries in each row must lie within
      `capacity` positions of the row's first one (a contiguous span no longer than
      the capacity; see `check_capacity`).
    capacity: window length C (static). C >= L returns the inputs unchanged.

  Returns:
    The window of C positions starting at min(first loss position, L - C) of each
    row; the mask keeps its values there, so positions outside the span stay 0.
  """
  _check_shapes(hidden_BxLxD, labels_BxL, mask_BxL, capacity)
  if capacity >= hidden_BxLxD.shape[1]:
    return hidden_BxLxD, labels_BxL, mask_BxL
  start_B = _window_offsets(mask_BxL, capacity)

  def rows(x, s):  # one row's window: a dynamic slice of the length axis
    return jax.lax.dynamic_slice_in_dim(x, s, capacity, axis=0)

  take = jax.vmap(rows)
  return take(hidden_BxLxD, start_B), take(labels_BxL, start_B), take(mask_BxL, start_B)


def dropped_tokens(mask_BxL: jax.Array, capacity: int) -> jax.Array:
  """Float32 scalar: sum of the mask outside the windows (0 when the capacity fits).

  Jittable; for a step metric or a `checkify` check where the host-side
  `check_capacity` cannot run.
  """
  l = mask_BxL.shape[1]
  if capacity >= l:
    return jnp.zeros((), jnp.float32)
  start_B = _window_offsets(mask_BxL, capacity)
  pos_BxL = jnp.arange(l)[None, :]
  inside_BxL = (pos_BxL >= start_B[:, None]) & (pos_BxL < start_B[:, None] + capacity)
  return jnp.sum(jnp.where(inside_BxL, 0.0, mask_BxL.astype(jnp.float32)))


def check_capacity(loss_mask: np.ndarray, capacity: int, *, name: str = "loss_mask"
                   ) -> None:
  """Host-side check that every row's loss positions fit one window of `capacity`.

  Call once per split on the whole [N, L] mask (numpy; e.g. of `make_batch` over all
  rows): the span of a row is first to last nonzero position, inclusive.

  Raises:
    ValueError: naming the first row whose span exceeds the capacity, its span
      length, and how many rows do.
  """
  mask = np.asarray(loss_mask) > 0
  if mask.ndim != 2:
    raise ValueError(f"{name} must be [N, L]; got shape {mask.shape}.")
  if capacity < 1:
    raise ValueError(f"window capacity must be >= 1; got {capacity}.")
  if capacity >= mask.shape[1]:
    return
  any_N = mask.any(axis=1)
  first_N = np.argmax(mask, axis=1)
  last_N = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  span_N = np.where(any_N, last_N - first_N + 1, 0)
  bad = np.flatnonzero(span_N > capacity)
  if bad.size:
    row = int(bad[0])
    raise ValueError(
        f"{name}: row {row} has a loss span of {int(span_N[row])} positions "
        f"({int(first_N[row])}..{int(last_N[row])}), more than the loss window's capacity "
        f"{capacity} ({bad.size} of {len(span_N)} rows exceed it, longest "
        f"{int(span_N.max())}); raise the capacity (max_target_len + 1) or lower "
        "max_target_len.")


def window_loss_and_aux(loss_fn: Callable[..., Any], logits_fn: Callable[[jax.Array], jax.Array],
                        hidden_BxLxD: jax.Array, labels_BxL: jax.Array,
                        weights_V: jax.Array | None, mask_BxL: jax.Array, capacity: int):
  """`loss_fn(logits_fn(hidden), labels, weights_V, mask=mask)` with logits on the window only.

  loss_fn: a `pdl_jax.losses.get_loss(name)` function; logits_fn: hidden [..., D] ->
  float32 logits [..., V], e.g. `lambda h: model.apply(v, h, method=Decoder.unembed_logits)`.
  Returns what loss_fn returns: (loss, LossAux), equal to the full computation's.
  """
  hidden_BxCxD, labels_BxC, mask_BxC = gather_window(hidden_BxLxD, labels_BxL, mask_BxL,
                                                     capacity)
  return loss_fn(logits_fn(hidden_BxCxD), labels_BxC, weights_V, mask=mask_BxC)


def window_chunked_loss_and_aux(chunked_fn: Callable[..., Any], hidden_BxLxD: jax.Array,
                                unembed_DxV: jax.Array, labels_BxL: jax.Array,
                                weights_V: jax.Array | None, mask_BxL: jax.Array,
                                capacity: int, **kwargs):
  """The chunked loss on the window's [B * C, D] hidden states.

  chunked_fn: a `pdl_jax.losses.chunked.get_loss_from_hidden(name)` function (or
  `pdl_loss_from_hidden_and_aux`); kwargs (e.g. chunk_size) go to it. Returns
  (loss, LossAux), equal to the full computation's.
  """
  hidden_BxCxD, labels_BxC, mask_BxC = gather_window(hidden_BxLxD, labels_BxL, mask_BxL,
                                                     capacity)
  d = hidden_BxCxD.shape[-1]
  return chunked_fn(hidden_BxCxD.reshape(-1, d), unembed_DxV, labels_BxC.reshape(-1),
                    weights_V, mask_N=mask_BxC.reshape(-1), **kwargs)
