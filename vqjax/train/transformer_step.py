"""The token transformer's state and jitted-step maths, apart from the training driver.

`vqjax.train.transformer` runs these with data, checkpoints and writers;
this module needs only JAX, Flax, Optax and the objectives, so a benchmark
or another project can build the step alone.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqjax import registry
from vqjax.core import partitioning, trees
from vqjax.nn.layers import compute_dtype
from vqjax.objectives.base import Conditions, Objective
from vqjax.train import accumulate


@flax.struct.dataclass
class TransformerState:
  step: jax.Array
  params: Any  # logically partitioned (boxed) parameters
  opt_state: Any
  rng: jax.Array


def conditions_of(config, condition_shape: tuple[int, ...] | None = None) -> Conditions:
  """The condition prefix (model.num_classes > 0, else none): the class label (length 1), or
  with model.condition = 'semantic_map' the token store's condition maps of `condition_shape`
  (length h' w')."""
  n, kind = config.model.num_classes, config.model.condition
  if kind == "semantic_map" and n:
    if condition_shape is None:
      raise ValueError("model.condition='semantic_map' needs the store's condition_shape")
    return Conditions(vocab=n, length=int(np.prod(condition_shape)), kind=kind)
  return Conditions(vocab=n, length=1 if n else 0, kind=kind)


def build_objective(config, token_shape: tuple[int, ...], codebook_size: int,
                    condition_shape: tuple[int, ...] | None = None) -> Objective:
  """`config.model.objective` for token maps of `token_shape` over `codebook_size` codes
  (and condition maps of `condition_shape` with model.condition = 'semantic_map'), its model
  computing in `config.precision`'s dtype (and rematerialised by `config.model.remat`)."""
  return registry.OBJECTIVES.build(config.model.objective, model_config=config.model,
                                   token_shape=tuple(token_shape), codebook_size=codebook_size,
                                   conditions=conditions_of(config, condition_shape),
                                   dtype=compute_dtype(config.get("precision", "float32")))


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW, linear warmup then cosine decay, global-norm clipping."""
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1),
                                                max(config.train.steps, o.warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def init_state(objective: Objective, tx, rng: jax.Array) -> TransformerState:
  """Fresh parameters, optimiser state and training rng from one key."""
  k_model, k_train = jax.random.split(rng)
  params = objective.init_params(k_model)
  return TransformerState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=k_train)


def sharded_init(objective: Objective, tx, config, mesh, rng: jax.Array):
  """(fresh state placed on `mesh`, its shardings from the parameters' logical axis names
  and `config.mesh`)."""
  init = functools.partial(init_state, objective, tx)
  shardings = partitioning.param_shardings(mesh, jax.eval_shape(init, rng),
                                           config.mesh.param_sharding, config.mesh.rules)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def make_train_step(objective: Objective, tx, grad_accum: int = 1, loop: str = "auto"):
  """(state, batch) -> (state, metrics). Pure; jit it with shardings.

  `grad_accum` (`config.train.grad_accum`) = k > 1 makes one update from k micro-batches
  of the batch (`vqjax.train.accumulate`, whose `loop` runs them). The masks and the
  condition dropout are drawn for the whole batch and split (`Objective.training_draws`),
  and each micro-batch's summed cross-entropy is divided by the whole batch's count of
  weighted entries, so loss, accuracy and gradient equal the big batch's up to float
  rounding (global-norm clipping then sees the big batch's gradient). Dropout inside the
  transformer draws per micro-batch (its own draws, from the same distribution).
  """
  def train_step(state: TransformerState, batch) -> tuple[TransformerState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    tokens = objective.flatten(batch["tokens"])
    cond = objective.conditions.from_batch(batch)
    if grad_accum > 1:
      return finish(state, *accumulated_loss(state.params, tokens, cond, rng))
    (loss, acc), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state.params, tokens, cond, rng, True)
    return finish(state, loss, acc, grads)

  def accumulated_loss(params, tokens, cond, rng):
    """(loss, accuracy, gradient) of the batch from `grad_accum` micro-batches."""
    cond, weights, dropout_rng = objective.training_draws(tokens, cond, rng)
    count = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)

    def micro(j, inputs, carry):
      def loss_fn(p):
        loss_sum, correct = objective.loss_sums(p, *inputs,
                                                jax.random.fold_in(dropout_rng, j))
        return loss_sum / count, correct / count

      (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return (loss, acc, grads), carry

    total, _ = accumulate.accumulate(
        micro, accumulate.split((tokens, cond, weights), grad_accum), (), loop)
    return total

  def finish(state, loss, acc, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = trees.all_finite(loss, grads)
    keep = lambda new, old: trees.select(finite, new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss/total": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


