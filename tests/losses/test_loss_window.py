"""Loss window: losses and gradients on the target-span window equal the full ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax import losses
from pdl_jax.losses import chunked as chunked_loss
from pdl_jax.losses import window

B, L, D, V = 12, 24, 8, 37
CAPACITY = 10


def _spans_mask(starts, lengths, l=L):
  mask = np.zeros((len(starts), l), np.float32)
  for b, (s, n) in enumerate(zip(starts, lengths)):
    mask[b, s:s + n] = 1.0
  return mask


def _masks():
  """Masks covering: every span length 1..CAPACITY, spans at the row's start and
  end (the clamped window), empty rows, and an all-empty batch."""
  r = np.random.default_rng(0)
  lengths = np.arange(1, CAPACITY + 1)
  random_starts = [int(r.integers(0, L - n + 1)) for n in lengths]
  yield "random", _spans_mask(random_starts + [0, 3], list(lengths) + [0, 4])
  yield "at_end", _spans_mask([L - n for n in lengths] + [L - 1, 0],
                              list(lengths) + [1, 0])
  yield "at_start", _spans_mask([0] * CAPACITY + [5, 6], list(lengths) + [CAPACITY, 2])
  yield "empty", np.zeros((B, L), np.float32)


MASKS = dict(_masks())


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  hidden = jnp.asarray(r.normal(size=(B, L, D)), jnp.float32)
  unembed = jnp.asarray(r.normal(size=(D, V)) * 0.5, jnp.float32)
  labels = jnp.asarray(r.integers(0, V, (B, L)), jnp.int32)
  weights = jnp.asarray(r.uniform(0.2, 3.0, V), jnp.float32)
  return hidden, unembed, labels, weights


def _plain(name, weights):
  fn = losses.get_loss(name)
  return lambda logits, labels, mask: fn(logits, labels, weights, mask=mask)


def _chunked(name, weights):
  fn = chunked_loss.get_loss_from_hidden(name)

  def loss(hidden_xD, unembed, labels, mask):
    d = hidden_xD.shape[-1]
    return fn(hidden_xD.reshape(-1, d), unembed, labels.reshape(-1), weights,
              mask_N=mask.reshape(-1), chunk_size=16)
  return loss


def _assert_close(a, b, atol=1e-5, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("loss_name", ["ce", "pdl"])
def test_plain_window_equals_full(mask_name, loss_name):
  hidden, unembed, labels, weights = _inputs()
  mask = jnp.asarray(MASKS[mask_name])
  lossf = _plain(loss_name, weights)

  def full(h, w):
    return lossf(jnp.einsum("bld,dv->blv", h, w), labels, mask)

  @jax.jit
  def windowed(h, w):
    h_c, y_c, m_c = window.gather_window(h, labels, mask, CAPACITY)
    assert h_c.shape == (B, CAPACITY, D) and y_c.shape == m_c.shape == (B, CAPACITY)
    return lossf(jnp.einsum("bcd,dv->bcv", h_c, w), y_c, m_c)

  (l_full, aux_full), g_full = jax.value_and_grad(full, (0, 1), has_aux=True)(hidden, unembed)
  (l_win, aux_win), g_win = jax.value_and_grad(windowed, (0, 1), has_aux=True)(hidden,
                                                                                unembed)
  _assert_close((l_win, aux_win), (l_full, aux_full))
  _assert_close(g_win, g_full)
  helper = window.window_loss_and_aux(losses.get_loss(loss_name), lambda h: h @ unembed,
                                  hidden, labels, weights, mask, CAPACITY)
  _assert_close(helper, (l_win, aux_win))
  if mask_name != "empty":
    assert float(l_full) > 0 and float(jnp.abs(g_full[0]).sum()) > 0


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("loss_name", ["ce", "pdl"])
def test_chunked_window_equals_full(mask_name, loss_name):
  hidden, unembed, labels, weights = _inputs(1)
  mask = jnp.asarray(MASKS[mask_name])
  chunked = _chunked(loss_name, weights)
  plain = _plain(loss_name, weights)

  def full(h, w):
    return plain(jnp.einsum("bld,dv->blv", h, w), labels, mask)

  def windowed(h, w):
    return window.window_chunked_loss_and_aux(
        chunked_loss.get_loss_from_hidden(loss_name), h, w, labels, weights, mask,
        CAPACITY, chunk_size=16)

  def full_chunked(h, w):
    return chunked(h, w, labels, mask)

  (l_full, aux_full), g_full = jax.value_and_grad(full, (0, 1), has_aux=True)(hidden, unembed)
  (l_win, aux_win), g_win = jax.value_and_grad(windowed, (0, 1), has_aux=True)(hidden,
                                                                                unembed)
  _assert_close((l_win, aux_win), (l_full, aux_full))
  _assert_close(g_win, g_full)
  (l_fc, aux_fc), g_fc = jax.value_and_grad(full_chunked, (0, 1), has_aux=True)(hidden,
                                                                                 unembed)
  _assert_close((l_win, aux_win), (l_fc, aux_fc))
  _assert_close(g_win, g_fc)


def test_window_holds_the_span():
  mask = jnp.asarray(MASKS["random"])
  labels = jnp.arange(B * L, dtype=jnp.int32).reshape(B, L)
  hidden = jnp.zeros((B, L, 1))
  _, y_c, m_c = window.gather_window(hidden, labels, mask, CAPACITY)
  for b in range(B):
    want = np.asarray(labels[b])[np.asarray(mask[b]) > 0]
    got = np.asarray(y_c[b])[np.asarray(m_c[b]) > 0]
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(window.window_start(mask), np.argmax(np.asarray(mask) > 0, 1))


def test_capacity_at_least_length_is_identity():
  hidden, _, labels, _ = _inputs()
  mask = jnp.asarray(MASKS["random"])
  out = window.gather_window(hidden, labels, mask, L)
  assert out[0] is hidden and out[1] is labels and out[2] is mask
  assert float(window.dropped_tokens(mask, L)) == 0.0


def test_window_shards_over_batch():
  devices = np.array(jax.devices()[:4])
  mesh = jax.sharding.Mesh(devices, ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  hidden, unembed, labels, weights = _inputs()
  mask = jnp.asarray(MASKS["random"])
  args = [jax.device_put(x, spec) for x in (hidden, labels, mask)]
  h_c, y_c, m_c = jax.jit(lambda h, y, m: window.gather_window(h, y, m, CAPACITY))(*args)
  want = window.gather_window(hidden, labels, mask, CAPACITY)
  _assert_close((h_c, y_c, m_c), want, atol=0, rtol=0)
  assert h_c.sharding.spec[0] == "data"


def test_capacity_for():
  assert window.capacity_for(31, 128) == 32
  assert window.capacity_for(30, 128, multiple=8) == 32
  assert window.capacity_for(200, 128) == 128
  with pytest.raises(ValueError, match="max_target_len"):
    window.capacity_for(0, 128)


def test_check_capacity_passes_and_names_the_row():
  mask = MASKS["random"]
  window.check_capacity(mask, CAPACITY)  # longest span is exactly the capacity
  window.check_capacity(mask, L)
  with pytest.raises(ValueError, match=r"row 9 has a loss span of 10 positions.*"
                                       r"capacity 9 \(1 of 12 rows"):
    window.check_capacity(mask, CAPACITY - 1)
  gappy = np.zeros((2, L), np.float32)
  gappy[1, [2, 14]] = 1.0  # first to last counts, gaps included
  with pytest.raises(ValueError, match="row 1 has a loss span of 13"):
    window.check_capacity(gappy, 12)
  with pytest.raises(ValueError, match=r"\[N, L\]"):
    window.check_capacity(mask[0], CAPACITY)


def test_dropped_tokens_counts_what_the_window_misses():
  mask = jnp.asarray(MASKS["random"])
  assert float(jax.jit(window.dropped_tokens, static_argnums=1)(mask, CAPACITY)) == 0.0
  # Capacity 7: rows with spans 8, 9, 10 lose 1 + 2 + 3 tokens.
  assert float(window.dropped_tokens(mask, 7)) == 6.0


def test_bad_shapes_are_errors():
  hidden, _, labels, _ = _inputs()
  with pytest.raises(ValueError, match="hidden"):
    window.gather_window(hidden[0], labels, labels, 4)
  with pytest.raises(ValueError, match="capacity"):
    window.gather_window(hidden, labels, labels.astype(jnp.float32), 0)
