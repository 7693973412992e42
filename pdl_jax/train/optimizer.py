"""The optimizer of a run: global-norm clipping, then AdamW on a warmup + cosine
learning-rate schedule."""

from __future__ import annotations

import jax
import optax


def schedule(o, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, cosine decay to end_fraction of it at num_steps
  (o: the optimizer settings, config.optimizer)."""
  warmup = min(o.warmup_steps, num_steps - 1)  # short runs still decay
  return optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, warmup, max(num_steps, warmup + 1),
      end_value=o.learning_rate * o.end_fraction)


def make_optimizer(o, num_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with the schedule of the optimizer settings `o`
  (config.optimizer) over `num_steps`.

  The learning rate is an injected hyperparameter, so the state holds the rate of
  the last applied update: a skipped (non-finite) step keeps the old state and the
  logged rate stays the one actually used.
  """
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.inject_hyperparams(optax.adamw)(learning_rate=schedule(o, num_steps), b2=o.b2,
                                            weight_decay=o.weight_decay))


def learning_rate(opt_state) -> jax.Array:
  """The learning rate of the last update applied to `opt_state`."""
  return opt_state[1].hyperparams["learning_rate"]
