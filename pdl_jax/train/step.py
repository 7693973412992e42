"""The update step: a pure function of (state, batch, weights), jitted by
train.run with shardings and donated state; exact gradient accumulation."""

from __future__ import annotations

from typing import Any
import jax
import jax.numpy as jnp
import optax
from pdl_jax.train import optimizer as opt_lib
from pdl_jax.train import state as state_lib
from pdl_jax.losses import pdl


def accumulate_gradients(params, batch, weights_V, loss_state_V, *, loss_fn,
                         reduction: str, steps: int, rng: jax.Array | None = None
                         ) -> tuple[jax.Array, pdl.LossAux, jax.Array, Any]:
  """Loss, LossAux, FACE counts and gradients of the whole batch from `steps`
  micro-batches, one at a time (a scan: one micro-batch's activations live at once).

  Exact, not an average of micro-batch losses: a loss is numerator / denominator
  (PDL: sum of weight x NLL over the sum of weights; CE: over the token count), so
  each micro-batch contributes loss_i x den_i (its numerator) and its gradient, and
  both are divided once by the batch's summed denominator. The denominators do not
  depend on the parameters. Micro-batch i is rows i, i + steps, ... of the batch:
  every device's rows feed every micro-batch, so no data moves between devices.
  FACE's counts advance once per micro-batch (with k=1 once per batch). With `rng`
  (dropout), micro-batch i gets fold_in(rng, i).
  """
  def micro(x):
    return x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)

  def numerator(p, mb, loss_state, i):
    kw = {} if rng is None else {"rng": jax.random.fold_in(rng, i)}
    loss, (aux, loss_state) = loss_fn(p, mb, weights_V, loss_state, **kw)
    den = jax.lax.stop_gradient(pdl.loss_denominator(aux, reduction))
    return loss * den, (aux, den, loss_state)

  def body(carry, xs):
    mb, i = xs
    grads, num, den, tokens, nll_sum, w2_sum, loss_state = carry
    (n, (aux, d, loss_state)), g = jax.value_and_grad(numerator, has_aux=True)(
        params, mb, loss_state, i)
    # sum of squared weights from the micro-batch's ESS: ess = (sum w)^2 / sum w^2.
    w2 = jnp.where(aux.ess > 0, jnp.square(aux.weight_sum) / jnp.maximum(aux.ess, 1e-30),
                   0.0)
    grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
    carry = (grads, num + n, den + d, tokens + aux.num_tokens,
             nll_sum + aux.nll * aux.num_tokens, w2_sum + w2, loss_state)
    return carry, aux.weight_sum

  zero = jnp.zeros((), jnp.float32)
  # float32 sums, whatever the parameter dtype.
  init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), zero, zero, zero, zero, zero, loss_state_V)
  (grads, num, den, tokens, nll_sum, w2_sum, loss_state_V), weight_sums_K = jax.lax.scan(
      body, init, (jax.tree.map(micro, batch), jnp.arange(steps)))
  safe = jnp.maximum(den, 1e-30)
  grads = jax.tree.map(lambda g, p: (g / safe).astype(p.dtype), grads, params)
  weight_sum = jnp.sum(weight_sums_K)
  aux = pdl.LossAux(
      nll=nll_sum / jnp.maximum(tokens, 1.0), weight_sum=weight_sum, num_tokens=tokens,
      ess=jnp.where(w2_sum > 0, jnp.square(weight_sum) / jnp.maximum(w2_sum, 1e-30), 0.0))
  return jnp.where(den > 0, num / safe, 0.0), aux, loss_state_V, grads


def train_step(state: state_lib.TrainState, batch, weights_V, *, loss_fn, tx,
               skip_nonfinite: bool = False, grad_accum_steps: int = 1,
               reduction: str = "weights", dropout_seed: int | None = None):
  """One optimizer step; returns the new state and scalar metrics.

  The loss sees the model's params (state.model_params(): with LoRA the frozen base
  and the adapters together); gradients, optimizer state and updates are those of
  the trained params (state.params) alone. dropout_seed (LoRA dropout): the step's
  dropout key is fold_in(key(dropout_seed), step), so a resumed run draws the same
  masks.

  With grad_accum_steps = k > 1 the batch is processed as k micro-batches
  (`accumulate_gradients`: the same loss and gradients as one batch; `reduction`
  is the loss's, from registry.resolve_reduction). A step with a non-finite loss,
  gradient or update is recorded in the state; with skip_nonfinite its update is
  dropped (params and optimizer state unchanged).
  """
  model_loss_fn = loss_fn
  loss_fn = lambda p, *a, **k: model_loss_fn(state.replace(params=p).model_params(), *a, **k)
  rng = (None if dropout_seed is None
         else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
  if grad_accum_steps == 1:
    kw = {} if rng is None else {"rng": rng}
    (loss, (aux, loss_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, weights_V, state.loss_state, **kw)
  else:
    loss, aux, loss_state, grads = accumulate_gradients(
        state.params, batch, weights_V, state.loss_state, loss_fn=loss_fn,
        reduction=reduction, steps=grad_accum_steps, rng=rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # The update too: a diverging learning rate makes finite gradients non-finite params.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    loss_state = keep(loss_state, state.loss_state)
  step = state.step + 1
  nonfinite_steps = state.nonfinite_steps + (~finite).astype(jnp.int32)
  first = jnp.where((state.first_nonfinite < 0) & ~finite, step, state.first_nonfinite)
  metrics = {
      "train/loss": loss, "train/nll": aux.nll,
      "train/weight_ess": aux.ess / jnp.maximum(aux.num_tokens, 1.0),
      "train/grad_norm": grad_norm,
      # The rate of the last applied update (unchanged by a skipped step).
      "train/learning_rate": opt_lib.learning_rate(opt_state),
      "train/tokens": aux.num_tokens, "train/nonfinite_steps": nonfinite_steps,
  }
  return state.replace(step=step, params=params, opt_state=opt_state,
                       nonfinite_steps=nonfinite_steps, first_nonfinite=first,
                       loss_state=loss_state), metrics
