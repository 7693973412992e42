"""pdl_jax.losses.pdl against an independent float64 numpy reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdl_jax import losses
from pdl_jax.losses import pdl


# ---------------------------------------------------------------------------
# Independent numpy reference (float64), written from the formula, not the code.
# ---------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_pdl(logits, labels, weights, mask):
  logp = np_log_softmax(logits)
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  tw = mask * np.asarray(weights, np.float64)[labels]
  return (tw * nll).sum() / tw.sum()


def np_pdl_grad(logits, labels, weights, mask):
  """d loss / d logits = tw_i / W * (softmax_i - onehot(y_i))."""
  p = np.exp(np_log_softmax(logits))
  onehot = np.eye(logits.shape[-1])[labels]
  tw = mask * np.asarray(weights, np.float64)[labels]
  return (tw / tw.sum())[..., None] * (p - onehot)


def np_weights(counts, alpha, eps, relative=True):
  counts = np.asarray(counts, np.float64)
  freq = counts / counts.sum() if relative else counts
  w = 1.0 / (freq + eps) ** alpha
  return w * counts.sum() / (counts * w).sum()


def random_case(seed, shape, vocab, mask_p=0.3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 3, shape + (vocab,)).astype(np.float32)
  labels = rng.integers(0, vocab, shape).astype(np.int32)
  mask = (rng.random(shape) > mask_p).astype(np.float32)
  mask.reshape(-1)[0] = 1.0  # never all masked in these cases
  counts = rng.zipf(1.3, vocab).astype(np.int64)
  counts[rng.random(vocab) < 0.1] = 0  # some unseen tokens
  return logits, labels, mask, counts


CASES = [((4, 7), 11, 0.0), ((2, 3, 5), 64, 0.5), ((16,), 300, 1.0),
         ((3, 9), 1000, 2.0)]


# ---------------------------------------------------------------------------
# power_law_weights
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.5])
def test_weights_match_formula_and_mean_one(alpha):
  counts = np.array([1000, 100, 10, 1, 0, 5000], np.int64)
  total = counts.sum()
  w = pdl.power_law_weights(counts, alpha)
  assert w.dtype == np.float32 and w.shape == (6,)
  np.testing.assert_allclose(w, np_weights(counts, alpha, 1.0 / total),
                             rtol=1e-6)
  assert np.dot(counts, w.astype(np.float64)) / total == pytest.approx(1.0, 1e-6)


def test_alpha_zero_is_all_ones():
  w = pdl.power_law_weights(np.array([3, 0, 7]), 0.0, frequency="count",
                          normalize=False)
  np.testing.assert_array_equal(w, np.ones(3, np.float32))
  np.testing.assert_array_equal(pdl.power_law_weights(np.array([3, 0, 7]), 0.0),
                                np.ones(3, np.float32))


def test_count_and_relative_agree_up_to_scale_with_default_eps():
  counts = np.array([50, 3, 1, 0, 900])
  wr = pdl.power_law_weights(counts, 1.0, frequency="relative", normalize=False)
  wc = pdl.power_law_weights(counts, 1.0, frequency="count", normalize=False)
  np.testing.assert_allclose(wr / wr[0], wc / wc[0], rtol=1e-6)
  # Normalised, they are identical.
  np.testing.assert_allclose(pdl.power_law_weights(counts, 1.0, frequency="count"),
                             pdl.power_law_weights(counts, 1.0), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_default_eps_bounds_unseen_over_singleton(alpha):
  counts = np.array([0, 1, 10, 10000])
  w = pdl.power_law_weights(counts, alpha)
  assert w[0] / w[1] == pytest.approx(2.0 ** alpha, rel=1e-5)
  assert w[0] / w[1] <= 2.0 ** alpha * (1 + 1e-6)


def test_reference_setting_warns_and_collapses_ess():
  """Authors' setting (raw counts, eps=1e-7, alpha=1): one unseen label dominates."""
  vocab = 32000
  counts = np.floor(2e6 / np.arange(1, vocab + 1)).astype(np.int64)  # Zipf's law
  counts[-1] = 0
  rng = np.random.default_rng(0)
  labels = rng.choice(vocab - 1, 4095, p=counts[:-1] / counts[:-1].sum())
  labels = np.append(labels, vocab - 1)  # one unseen label in a 4096-token batch
  with pytest.warns(UserWarning, match="unseen token weigh"):
    w = pdl.power_law_weights(counts, 1.0, 1e-7, frequency="count")
  tw = w[labels].astype(np.float64)
  assert tw[-1] / tw.sum() > 0.9999
  assert float(pdl.effective_sample_size(jnp.asarray(w[labels]))) < 1.01
  # The safe default (add-one smoothing) keeps the batch informative, no warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    w_safe = pdl.power_law_weights(counts, 1.0)
  tw_safe = w_safe[labels].astype(np.float64)
  assert tw_safe[-1] / tw_safe.sum() < 0.2
  assert float(pdl.effective_sample_size(jnp.asarray(w_safe[labels]))) > 40


def test_max_weight_clips():
  counts = np.array([100000, 10, 1, 0])
  w = pdl.power_law_weights(counts, 1.0, max_weight=5.0)
  assert w.max() == pytest.approx(5.0)
  unclipped = pdl.power_law_weights(counts, 1.0)
  np.testing.assert_allclose(w, np.minimum(unclipped, 5.0), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(counts=[1, 2], alpha=-0.5), "alpha must be >= 0.*-0.5"),
    (dict(counts=[1, 2], alpha=float("nan")), "alpha.*nan"),
    (dict(counts=[1, 2], alpha=1.0, epsilon=0.0), "epsilon must be > 0.*0.0"),
    (dict(counts=[1, 2], alpha=1.0, epsilon=-1e-3), "epsilon.*-0.001"),
    (dict(counts=[1, -2], alpha=1.0), r"counts must be >= 0; counts\[1\] = -2"),
    (dict(counts=[1.0, float("inf")], alpha=1.0), r"finite; counts\[1\] = inf"),
    (dict(counts=[1.0, float("nan")], alpha=1.0), r"finite; counts\[1\] = nan"),
    (dict(counts=[0, 0, 0], alpha=1.0), "all zero"),
    (dict(counts=[[1, 2]], alpha=1.0), r"1-D.*\(1, 2\)"),
    (dict(counts=[], alpha=1.0), "empty"),
    (dict(counts=[1, 2], alpha=1.0, frequency="log"), "frequency.*'log'"),
    (dict(counts=[1, 2], alpha=1.0, max_weight=0.0), "max_weight.*0.0"),
])
def test_weights_bad_input(kwargs, match):
  kwargs = dict(kwargs)
  counts = np.asarray(kwargs.pop("counts"))
  with pytest.raises(ValueError, match=match):
    pdl.power_law_weights(counts, **kwargs)


# ---------------------------------------------------------------------------
# pdl_loss value and gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape, vocab, alpha", CASES)
def test_pdl_matches_numpy_reference(shape, vocab, alpha):
  logits, labels, mask, counts = random_case(1, shape, vocab)
  weights = pdl.power_law_weights(counts, alpha)
  got = pdl.pdl_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
                   mask=jnp.asarray(mask))
  want = np_pdl(logits, labels, weights, mask)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("shape, vocab, alpha", CASES)
def test_pdl_gradient_matches_analytic_reference(shape, vocab, alpha):
  logits, labels, mask, counts = random_case(2, shape, vocab)
  weights = pdl.power_law_weights(counts, alpha)
  grad = jax.grad(pdl.pdl_loss)(jnp.asarray(logits), jnp.asarray(labels),
                              jnp.asarray(weights), mask=jnp.asarray(mask))
  want = np_pdl_grad(logits, labels, weights, mask)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5,
                             atol=1e-6 * np.abs(want).max())


def test_pdl_gradient_matches_finite_differences_float64():
  logits, labels, mask, counts = random_case(3, (3, 4), 13)
  weights = pdl.power_law_weights(counts, 1.0)
  with jax.enable_x64(True):
    x = jnp.asarray(logits, jnp.float64)
    f = lambda z: pdl.pdl_loss(z, jnp.asarray(labels), jnp.asarray(weights, jnp.float64),
                             mask=jnp.asarray(mask, jnp.float64))
    # The loss accumulates in float32 by design; compare its float64-input
    # gradient with central differences of the float64 reference.
    grad = np.asarray(jax.grad(f)(x))
  rng = np.random.default_rng(0)
  h = 1e-5
  for _ in range(20):
    idx = tuple(rng.integers(0, s) for s in logits.shape)
    up, down = logits.astype(np.float64), logits.astype(np.float64)
    up[idx] += h
    down[idx] -= h
    fd = (np_pdl(up, labels, weights, mask) - np_pdl(down, labels, weights, mask)) / (2 * h)
    assert grad[idx] == pytest.approx(fd, abs=2e-6)


@pytest.mark.parametrize("shape, vocab, _", CASES)
def test_alpha_zero_equals_optax_cross_entropy(shape, vocab, _):
  logits, labels, mask, counts = random_case(4, shape, vocab)
  weights = pdl.power_law_weights(counts, 0.0)
  pdl_value = pdl.pdl_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
                           mask=jnp.asarray(mask))
  ce = pdl.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels),
                            mask=jnp.asarray(mask))
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits), jnp.asarray(labels))
  want = float((per_token * mask).sum() / mask.sum())
  assert float(pdl_value) == pytest.approx(want, rel=1e-6)
  assert float(ce) == pytest.approx(want, rel=1e-6)
  g_pdl = jax.grad(pdl.pdl_loss)(jnp.asarray(logits), jnp.asarray(labels),
                               jnp.asarray(weights), mask=jnp.asarray(mask))
  g_ce = jax.grad(pdl.cross_entropy_loss)(jnp.asarray(logits), jnp.asarray(labels),
                                        mask=jnp.asarray(mask))
  np.testing.assert_allclose(g_pdl, g_ce, rtol=1e-6, atol=1e-9)


def test_default_mask_is_all_ones():
  logits, labels, _, counts = random_case(5, (5, 6), 20)
  w = jnp.asarray(pdl.power_law_weights(counts, 1.0))
  np.testing.assert_allclose(
      float(pdl.pdl_loss(jnp.asarray(logits), jnp.asarray(labels), w)),
      np_pdl(logits, labels, np.asarray(w), np.ones((5, 6))), rtol=1e-5)


def test_bfloat16_logits_accumulate_in_float32():
  logits, labels, mask, counts = random_case(6, (8, 32), 512)
  w = pdl.power_law_weights(counts, 1.0)
  bf = jnp.asarray(logits, jnp.bfloat16)
  got = pdl.pdl_loss(bf, jnp.asarray(labels), jnp.asarray(w), mask=jnp.asarray(mask))
  assert got.dtype == jnp.float32
  # The reference sees exactly the bfloat16-rounded logits.
  want = np_pdl(np.asarray(bf.astype(jnp.float32)), labels, w, mask)
  assert float(got) == pytest.approx(want, rel=1e-5)
  g = jax.grad(pdl.pdl_loss)(bf, jnp.asarray(labels), jnp.asarray(w),
                           mask=jnp.asarray(mask))
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("fn", ["pdl", "ce"])
def test_all_masked_gives_exact_zero_and_zero_grads(fn):
  logits, labels, _, counts = random_case(7, (3, 4), 9)
  mask = jnp.zeros((3, 4))
  w = jnp.asarray(pdl.power_law_weights(counts, 1.0))
  loss_fn = losses.get_loss(fn)
  f = lambda x: loss_fn(x, jnp.asarray(labels), w, mask=mask)[0]
  value, grad = jax.value_and_grad(f)(jnp.asarray(logits))
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  _, aux = loss_fn(jnp.asarray(logits), jnp.asarray(labels), w, mask=mask)
  assert float(aux.nll) == 0.0 and float(aux.num_tokens) == 0.0


def test_out_of_range_labels_are_ignored_without_nan():
  logits, labels, mask, counts = random_case(8, (4, 5), 10)
  w = jnp.asarray(pdl.power_law_weights(counts, 1.0))
  bad = labels.copy()
  bad[0, :] = -100
  bad[1, 0] = 10  # == vocab
  keep = mask.copy()
  keep[0, :] = 0
  keep[1, 0] = 0
  value, grad = jax.value_and_grad(pdl.pdl_loss)(
      jnp.asarray(logits), jnp.asarray(bad), w, mask=jnp.asarray(mask))
  assert float(value) == pytest.approx(np_pdl(logits, np.where(keep > 0, bad, 0),
                                              np.asarray(w), keep), rel=1e-5)
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[0], 0.0)


def test_aux_reports_nll_and_ess():
  logits, labels, mask, counts = random_case(9, (6, 10), 50)
  w = pdl.power_law_weights(counts, 1.0)
  loss, aux = pdl.pdl_loss_and_aux(jnp.asarray(logits), jnp.asarray(labels),
                                 jnp.asarray(w), mask=jnp.asarray(mask))
  ones = np.ones_like(w)
  assert float(aux.nll) == pytest.approx(np_pdl(logits, labels, ones, mask), rel=1e-5)
  assert float(aux.num_tokens) == mask.sum()
  tw = mask * w[labels].astype(np.float64)
  assert float(aux.weight_sum) == pytest.approx(tw.sum(), rel=1e-5)
  assert float(aux.ess) == pytest.approx(tw.sum() ** 2 / (tw ** 2).sum(), rel=1e-5)
  assert float(loss) == pytest.approx(np_pdl(logits, labels, w, mask), rel=1e-5)


def test_effective_sample_size_edge_cases():
  assert float(pdl.effective_sample_size(jnp.ones(37))) == pytest.approx(37.0)
  assert float(pdl.effective_sample_size(jnp.array([0.0, 5.0, 0.0]))) == pytest.approx(1.0)
  assert float(pdl.effective_sample_size(jnp.zeros(4))) == 0.0


# ---------------------------------------------------------------------------
# Bad input to the losses: ValueError at trace time, naming the value.
# ---------------------------------------------------------------------------


def _ok():
  return jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), jnp.ones(5)


@pytest.mark.parametrize("mutate, match", [
    (lambda lg, lb, w: (lg, lb, jnp.ones(6)), r"last axis \(5\).*len\(weights\) \(6\)"),
    (lambda lg, lb, w: (lg, jnp.zeros((2, 4), jnp.int32), w),
     r"labels shape \(2, 4\).*leading shape \(2, 3\)"),
    (lambda lg, lb, w: (lg, jnp.zeros((2, 3)), w), "integer.*float32"),
    (lambda lg, lb, w: (lg, lb, jnp.ones((5, 1))), r"weights must be 1-D.*\(5, 1\)"),
    (lambda lg, lb, w: (lg.astype(jnp.int32), lb, w), "floating point.*int32"),
])
def test_pdl_bad_input(mutate, match):
  lg, lb, w = mutate(*_ok())
  with pytest.raises(ValueError, match=match):
    pdl.pdl_loss(lg, lb, w)


def test_bad_mask_shape_and_loss_name():
  lg, lb, w = _ok()
  with pytest.raises(ValueError, match=r"mask shape \(3,\)"):
    pdl.pdl_loss(lg, lb, w, mask=jnp.ones(3))
  with pytest.raises(ValueError, match=r"labels shape \(2, 4\)"):
    pdl.cross_entropy_loss(lg, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="'hinge'"):
    losses.get_loss("hinge")


def test_bad_input_is_caught_at_trace_time_inside_jit():
  lg, lb, _ = _ok()

  @jax.jit
  def step(lg, lb, w):
    return pdl.pdl_loss(lg, lb, w)

  with pytest.raises(ValueError, match="len\\(weights\\) \\(4\\)"):
    step.trace(lg, lb, jnp.ones(4))
