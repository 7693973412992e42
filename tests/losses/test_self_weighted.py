"""DFT, GEM and MiLe (losses/self_weighted.py) against float64 numpy references
written from the papers' formulas: values, gradients (finite differences), DFT's
gradient as that of -p_t, and MiLe's exact accumulation over micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdl_jax import losses
from pdl_jax.losses import pdl
from pdl_jax.losses import registry
from pdl_jax.losses import self_weighted


def np_logp(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def case(seed, shape=(3, 5), vocab=9):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2.0, shape + (vocab,))
  labels = rng.integers(0, vocab, shape)
  mask = (rng.random(shape) > 0.3).astype(np.float64)
  mask.reshape(-1)[0] = 1.0
  return logits, labels, mask


def np_dft(logits, labels, mask):
  """mean over target tokens of p_t * (-log p_t), p_t a constant (its value)."""
  logp = np.take_along_axis(np_logp(logits), labels[..., None], -1)[..., 0]
  return (mask * np.exp(logp) * -logp).sum() / mask.sum()


def np_gem(logits, labels, mask, beta):
  """mean over target tokens of -log p(y) + sum_v q_v log p(v), q = softmax(z / beta)."""
  logp = np_logp(logits)
  q = np.exp(np_logp(np.asarray(logits) / beta))
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return (mask * (nll + (q * logp).sum(-1))).sum() / mask.sum()


def np_mile(logits, labels, mask, gamma):
  """sum f nll / sum f over target tokens, f = (1 + H(p))^gamma."""
  logp = np_logp(logits)
  f = (1 + -(np.exp(logp) * logp).sum(-1)) ** gamma
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return (mask * f * nll).sum() / (mask * f).sum()


def dft_grad_reference(logits, labels, mask):
  """d/dlogits of mean over target tokens of p_t * (-log p_t) with p_t held
  constant: p_t (softmax - onehot) / count, analytically."""
  p = np.exp(np_logp(logits))
  pt = np.take_along_axis(p, labels[..., None], -1)
  onehot = np.eye(logits.shape[-1])[labels]
  return mask[..., None] * pt * (p - onehot) / mask.sum()


def gem_grad_reference(logits, labels, mask, beta):
  """d/dlogits of GEM with q held constant: (q - onehot) / count per target token."""
  q = np.exp(np_logp(np.asarray(logits) / beta))
  onehot = np.eye(logits.shape[-1])[labels]
  return mask[..., None] * (q - onehot) / mask.sum()


def mile_fd_grad(logits, labels, mask, gamma, h=1e-6):
  """Finite differences of sum f nll / sum f with f held at its value (stopgrad)."""
  logp0 = np_logp(logits)
  f = (1 + -(np.exp(logp0) * logp0).sum(-1)) ** gamma
  def value(x):
    nll = -np.take_along_axis(np_logp(x), labels[..., None], -1)[..., 0]
    return (mask * f * nll).sum() / (mask * f).sum()
  grad = np.zeros_like(logits)
  for idx in np.ndindex(logits.shape):
    up, down = logits.copy(), logits.copy()
    up[idx] += h
    down[idx] -= h
    grad[idx] = (value(up) - value(down)) / (2 * h)
  return grad


def value_and_grad(name, params, logits, labels, mask):
  fn = losses.get_loss(name, **params)
  f = jax.value_and_grad(lambda x: fn(x, jnp.asarray(labels), None,
                                      mask=jnp.asarray(mask, jnp.float32))[0])
  value, grad = f(jnp.asarray(logits, jnp.float32))
  return float(value), np.asarray(grad, np.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_dft_value_and_gradient_is_that_of_minus_p(seed):
  logits, labels, mask = case(seed)
  value, grad = value_and_grad("dft", {}, logits, labels, mask)
  assert value == pytest.approx(np_dft(logits, labels, mask), rel=1e-5)
  np.testing.assert_allclose(grad, dft_grad_reference(logits, labels, mask), atol=1e-6)
  # The gradient of DFT equals that of -mean(p_t), differentiated by JAX.
  minus_p = jax.grad(lambda x: -jnp.sum(jnp.asarray(mask) * jnp.exp(-pdl.token_nll(
      x, jnp.asarray(labels)))) / mask.sum())(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(grad, np.asarray(minus_p), atol=1e-6)


@pytest.mark.parametrize("beta", [0.7, 1.0, 2.5])
def test_gem_value_and_gradient(beta):
  logits, labels, mask = case(2)
  value, grad = value_and_grad("gem", {"gem_beta": beta}, logits, labels, mask)
  assert value == pytest.approx(np_gem(logits, labels, mask, beta), rel=1e-5, abs=1e-6)
  np.testing.assert_allclose(grad, gem_grad_reference(logits, labels, mask, beta), atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
def test_mile_value_and_gradient(gamma):
  logits, labels, mask = case(3)
  value, grad = value_and_grad("mile", {"mile_gamma": gamma}, logits, labels, mask)
  assert value == pytest.approx(np_mile(logits, labels, mask, gamma), rel=1e-5)
  np.testing.assert_allclose(grad, mile_fd_grad(logits, labels, mask, gamma),
                             rtol=1e-3, atol=1e-6)


def test_mile_gamma_zero_and_defaults():
  logits, labels, mask = case(4)
  args = (jnp.asarray(logits, jnp.float32), jnp.asarray(labels), None)
  ce, _ = losses.get_loss("ce")(*args, mask=jnp.asarray(mask))
  mile0, _ = losses.get_loss("mile", mile_gamma=0.0)(*args, mask=jnp.asarray(mask))
  assert float(mile0) == pytest.approx(float(ce), rel=1e-6)
  # None means the paper's default.
  assert float(losses.get_loss("gem", gem_beta=None)(*args, mask=jnp.asarray(mask))[0]) == \
      pytest.approx(np_gem(logits, labels, mask, 0.7), rel=1e-5, abs=1e-6)
  assert float(losses.get_loss("mile")(*args, mask=jnp.asarray(mask))[0]) == \
      pytest.approx(np_mile(logits, labels, mask, 1.0), rel=1e-5)


def test_mile_accumulates_exactly_by_its_weight_sum():
  """MiLe normalises by the batch's sum of f: two micro-batches give the whole
  batch's loss when their numerators (loss * weight_sum) and weight sums are summed
  before one division, which is what the train step and the evaluator do with the
  "weights" reduction the registry gives MiLe; a mean of the halves' losses is not."""
  logits, labels, mask = case(5, shape=(4, 6))
  fn = losses.get_loss("mile")
  assert registry.resolve_reduction("mile") == "weights"
  run = lambda sl: fn(jnp.asarray(logits[sl], jnp.float32), jnp.asarray(labels[sl]), None,
                      mask=jnp.asarray(mask[sl]))
  whole, _ = run(slice(None))
  parts = [run(slice(0, 1)), run(slice(1, 4))]
  dens = [float(pdl.loss_denominator(aux, "weights")) for _, aux in parts]
  num = sum(float(loss) * den for (loss, _), den in zip(parts, dens))
  assert num / sum(dens) == pytest.approx(float(whole), rel=1e-6)
  assert np.mean([float(l) for l, _ in parts]) != pytest.approx(float(whole), rel=1e-4)


@pytest.mark.parametrize("name, params, match", [
    ("gem", {"gem_beta": 0.0}, "gem_beta must be > 0"),
    ("gem", {"gem_beta": -1.0}, "gem_beta"),
    ("mile", {"mile_gamma": -0.5}, "mile_gamma must be >= 0"),
    ("dft", {"gamma": 1.0}, "takes parameters"),
])
def test_bad_parameters(name, params, match):
  with pytest.raises(ValueError, match=match):
    losses.get_loss(name, **params)


def test_mile_weights_have_no_gradient():
  x = jnp.asarray(case(6)[0], jnp.float32)
  g = jax.grad(lambda z: jnp.sum(self_weighted.mile_token_weights(z, 1.0)))(x)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
