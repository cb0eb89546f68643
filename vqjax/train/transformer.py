"""Token transformer training (SPEC 6): MaskGIT masked-token or GPT next-token steps.

Tokens come from a `vqjax.data.tokens` store through Grain; parameters are
sharded by their logical axes (`config.mesh.rules`); the step is jitted with
donated state and skips (and counts) updates whose loss or gradients are
not finite. Checkpoints hold the state and the data iterator, so a resumed
run continues exactly.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import periodic_actions

from vqjax.config_lib import ConfigError, validate_transformer_config
from vqjax.data.tokens import TokenStore
from vqjax.nn.transformers import GPT, MaskGITTransformer
from vqjax.ops.losses import masked_token_loss, next_token_loss
from vqjax.sampling.maskgit import training_mask
from vqjax.train import checkpoint, partitioning
from vqjax.train.loop import NonFiniteGuard, ProgressLine, StopRequest, make_writer, write_json


@flax.struct.dataclass
class TransformerState:
  step: jax.Array
  params: Any  # logically partitioned (boxed) parameters
  opt_state: Any
  rng: jax.Array


def build_model(config, token_shape: tuple[int, ...], codebook_size: int) -> nn.Module:
  """MaskGIT over h*w positions (x c channels), or a GPT over h*w codes."""
  m = config.model
  seq_len = int(np.prod(token_shape[:2]))
  channels = token_shape[2] if len(token_shape) == 3 else 1
  if m.kind == "maskgit":
    return MaskGITTransformer(codebook_size=codebook_size, seq_len=seq_len, channels=channels,
                              num_classes=m.num_classes, width=m.width, depth=m.depth,
                              heads=m.heads, mlp_dim=m.mlp_dim, dropout=m.dropout)
  if channels > 1:
    raise ValueError("the GPT models [h, w] tokens; multichannel tokens need model.kind=maskgit")
  return GPT(codebook_size=codebook_size, seq_len=seq_len, num_conditions=m.num_classes,
             cond_len=1, width=m.width, depth=m.depth, heads=m.heads, mlp_dim=m.mlp_dim,
             dropout=m.dropout)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW, linear warmup then cosine decay, global-norm clipping."""
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1),
                                                max(config.train.steps, o.warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def _flat_tokens(tokens):
  """[B, h, w(, c)] -> [B, h*w(, c)]."""
  return tokens.reshape(tokens.shape[:1] + (-1,) + tokens.shape[3:])


def _conditions(config, labels, rng):
  """Labels with `cond_dropout` of them replaced by the "no class" id (or all, if unconditional)."""
  n = config.model.num_classes
  if n == 0:
    return jnp.zeros_like(labels)
  drop = jax.random.bernoulli(rng, config.model.cond_dropout, labels.shape)
  return jnp.where(drop, n, labels)


def make_loss_fn(model, config):
  def loss_fn(params, tokens, labels, rng, train: bool):
    r_mask, r_drop, r_cond = jax.random.split(rng, 3)
    tokens = _flat_tokens(tokens)
    cond = _conditions(config, labels, r_cond) if train else labels
    rngs = {"dropout": r_drop}
    if config.model.kind == "maskgit":
      mask = training_mask(r_mask, tokens.shape)
      inputs = jnp.where(mask, model.mask_id, tokens)
      logits = model.apply({"params": params}, inputs, cond if config.model.num_classes else None,
                           train=train, rngs=rngs)
      return masked_token_loss(logits, tokens, mask, config.loss.label_smoothing)
    logits = model.apply({"params": params}, tokens, cond, train=train, rngs=rngs)
    return next_token_loss(logits, tokens)

  return loss_fn


def make_train_step(model, tx, config):
  loss_fn = make_loss_fn(model, config)

  def train_step(state: TransformerState, batch) -> tuple[TransformerState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch["tokens"], batch["label"], rng, True)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss/total": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


def token_dataset(config, store: TokenStore, process_index: int = 0, process_count: int = 1):
  per_process = config.train.batch_size // process_count
  ds = grain.MapDataset.source(store)[process_index::process_count]
  ds = ds.shuffle(seed=config.seed).repeat(None)
  return ds.to_iter_dataset().batch(per_process, drop_remainder=True)


def setup(config, devices=None):
  """(model, tx, mesh, state, shardings, jitted train step, store)."""
  devices = list(devices if devices is not None else jax.devices())
  validate_transformer_config(config, len(devices), jax.process_count())
  store = TokenStore(config.tokens.dir)
  if config.model.num_classes and store.max_label() >= config.model.num_classes:
    raise ConfigError(f"the token store has labels up to {store.max_label()}, but "
                      f"model.num_classes={config.model.num_classes}: raise it, or set 0 for "
                      "an unconditional model")
  model = build_model(config, store.token_shape, store.codebook_size)
  tx = make_optimizer(config)
  mesh = partitioning.make_mesh(config, devices)
  b = 2
  tokens = jnp.zeros((b,) + store.token_shape, jnp.int32)

  def init(rng):
    k_model, k_train = jax.random.split(rng)
    flat = _flat_tokens(tokens)
    if config.model.kind == "maskgit":
      labels = jnp.zeros((b,), jnp.int32) if config.model.num_classes else None
      params = model.init(k_model, flat, labels)["params"]
    else:
      params = model.init(k_model, flat, jnp.zeros((b,), jnp.int32))["params"]
    return TransformerState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), rng=k_train)

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = partitioning.logical_shardings(mesh, abstract, config.mesh.rules)
  state = jax.jit(init, out_shardings=shardings)(rng)
  rep = partitioning.replicated(mesh)
  step = jax.jit(make_train_step(model, tx, config),
                 in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                 out_shardings=(shardings, rep), donate_argnums=0)
  return model, tx, mesh, state, shardings, step, store


def train(config, workdir: str, stop: StopRequest | None = None,
          after_step=None) -> TransformerState:
  """Train (resuming from the latest checkpoint in `workdir`); returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  model, _, mesh, state, _, train_step, store = setup(config)
  is_main = jax.process_index() == 0
  writer = make_writer(workdir, is_main)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  data_iter = iter(token_dataset(config, store, jax.process_index(), jax.process_count()))
  latest = manager.latest_step()
  if latest is not None:
    state, data_state = checkpoint.restore(manager, latest, state)
    data_iter.set_state(data_state)
    print(f"resumed from checkpoint at step {latest} in {workdir}", flush=True)
  elif is_main:
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
  n_params = sum(x.size for x in jax.tree.leaves(nn.unbox(state.params)))
  print(f"{type(model).__name__} {n_params:,} parameters over {len(store):,} token maps of "
        f"shape {store.token_shape}; mesh {dict(mesh.shape)}", flush=True)
  total = config.train.steps
  step = int(state.step)
  stop = (stop if stop is not None else StopRequest()).install()
  guard = NonFiniteGuard(config.train.max_consecutive_nonfinite)
  progress = ProgressLine(total, step)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.train.log_every)
  history = []
  try:
    while step < total and not stop:
      batch = partitioning.shard_batch(next(data_iter), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      metrics = jax.device_get(metrics)
      guard.update(step, metrics)
      history.append(metrics)
      report(step)
      if step % config.train.log_every == 0 or step == total:
        scalars = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        writer.write_scalars(step, scalars)
        progress(step, scalars["loss/total"])
        history = []
      if step % config.train.checkpoint_every == 0:
        checkpoint.save(manager, step, state, data_iter.get_state())
      if after_step is not None:
        after_step(step)
  finally:
    if manager.latest_step() != step:
      checkpoint.save(manager, step, state, data_iter.get_state(), force=True)
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    stop.uninstall()
  return state
