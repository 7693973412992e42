"""Every loss's value and gradient norm pinned, through the objective a run uses
(config -> weights from the token counts -> loss of a batch), and three steps of a
chunked-loss PDL run. The values were recorded before the losses/ regroup (commit
6df21f9) on the same inputs: the layout may change, the math may not."""

import functools

import jax
import numpy as np
import optax
import pytest

from configs import dialogue
from pdl_jax.data import token_stats
from pdl_jax.losses import weights as loss_weights
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import run as run_lib
from pdl_jax.models import factory

VOCAB, B, L = 64, 4, 16

# name -> (loss, grad norm, FACE counts sum after the batch)
PINNED = {
    'ce': (6.189159393310547, 2.3065361976623535, 0, 6.189159393310547),
    'face': (6.6981048583984375, 2.6401517391204834, 48, 6.189159870147705),
    'focal': (6.144848346710205, 2.383035182952881, 0, 6.189159870147705),
    'itf': (2.2694504261016846, 0.9390606880187988, 0, 6.189159870147705),
    'label_smoothing': (6.182653427124023, 2.1742403507232666, 0, 6.189159870147705),
    'pdl': (6.45245885848999, 2.8383777141571045, 0, 6.189159870147705),
    'tlat_chi2': (12.272822380065918, 4.824139595031738, 0, 6.189159870147705),
    'tlat_exp': (11.388805389404297, 4.3483476638793945, 0, 6.189159870147705),
    'unlikelihood': (6.3339524269104, 2.3915460109710693, 0, 6.189159870147705),
}


def _setup(name: str, **loss):
  c = dialogue.get_config("smoke")
  c.mesh.data = 1
  c.num_steps, c.optimizer.warmup_steps = 10, 2
  c.loss.name = name
  for k, v in loss.items():
    c.loss[k] = v
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, VOCAB, (B, L)).astype(np.int32),
           "labels": rng.integers(0, VOCAB, (B, L)).astype(np.int32),
           "loss_mask": (rng.random((B, L)) > 0.3).astype(np.float32)}
  counts = rng.integers(0, 50, VOCAB).astype(np.int64)
  stats = token_stats.TokenStats(counts=counts, num_tokens=int(counts.sum()), num_examples=10,
                               vocab_size=VOCAB, tokenizer_sha256="x", dataset="d",
                               split="train", fields=("target",))
  weights = loss_weights.loss_weights(c.loss, stats, eos_id=1)
  model = factory.make_model(c.model, VOCAB)
  return c, model, batch, weights


def _value(name: str, **loss):
  c, model, batch, weights = _setup(name, **loss)
  tx = opt_lib.make_optimizer(c.optimizer, c.num_steps)
  state, _ = state_lib.create_state(model, tx, run_lib.make_mesh(c), 0, L)
  fn = run_lib.make_loss_fn(c, model)
  (value, (aux, face)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(
      state.params, batch, weights, state.loss_state)
  return float(value), float(optax.tree.norm(grads)), int(face.sum()), float(aux.nll)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_each_loss_matches_its_pinned_value(name):
  got = _value(name)
  want = PINNED[name]
  assert got[0] == pytest.approx(want[0], rel=1e-5)
  assert got[1] == pytest.approx(want[1], rel=1e-5)
  assert got[2] == want[2]
  assert got[3] == pytest.approx(want[3], rel=1e-5)


# (loss, grad norm) of 3 steps (the first update has learning rate 0).
CHUNKED_PDL = [(6.457655906677246, 2.8647305965423584), (6.457655906677246, 2.8647305965423584),
               (5.527314186096191, 2.7455005645751953)]


def test_three_chunked_pdl_steps_match_the_pinned_numbers():
  c, model, batch, weights = _setup("pdl", chunked=True, chunk_size=16, window=True)
  c.max_target_len = L - 2
  tx = opt_lib.make_optimizer(c.optimizer, c.num_steps)
  state, _ = state_lib.create_state(model, tx, run_lib.make_mesh(c), 0, L)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=run_lib.make_loss_fn(c, model),
                                   tx=tx))
  seen = []
  for _ in range(3):
    state, m = step(state, batch, weights)
    seen.append((float(m["train/loss"]), float(m["train/grad_norm"])))
  assert np.allclose(seen, CHUNKED_PDL, rtol=1e-5)
