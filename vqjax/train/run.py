"""The tokenizer's train and eval drivers: data, mesh, checkpoints, writers, hooks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from clu import parameter_overview, periodic_actions

from vqjax.config_lib import validate_tokenizer_config
from vqjax.data.pipeline import train_dataset
from vqjax.eval.evaluator import IS_UNAVAILABLE, evaluate_tokenizer, write_eval
from vqjax.eval.inception_features import InceptionExtractor
from vqjax.train import checkpoint, partitioning
from vqjax.train.loop import (
  NonFiniteGuard,
  ProgressLine,
  StopRequest,
  image_grid,
  make_writer,
  write_images,
  write_json,
)
from vqjax.train.tokenizer import build_models, init_state, make_eval_step, make_train_step
from vqjax.weights.lpips_vgg16 import load_lpips_params


@dataclass
class Setup:
  """Everything a tokenizer run needs, built once from the config."""
  config: object
  models: object
  mesh: object
  state: object
  state_shardings: object
  lpips_params: object
  train_step: Callable
  eval_step: Callable
  inception: InceptionExtractor | None

  def evaluate(self, state) -> tuple[dict, object]:
    return evaluate_tokenizer(self.eval_step, state.params, state.vq_stats, self.lpips_params,
                              self.config, self.mesh, self.inception)

  @property
  def notes(self) -> list[str]:
    return [IS_UNAVAILABLE] if self.inception is not None else []


def setup(config, devices=None) -> Setup:
  """Models, mesh, initial state and jitted steps; `devices` defaults to all."""
  devices = list(devices if devices is not None else jax.devices())
  validate_tokenizer_config(config, len(devices), jax.process_count())
  mesh = partitioning.make_mesh(config, devices)
  models = build_models(config)
  mode = config.mesh.param_sharding
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(lambda r: init_state(models, config, r), rng)
  shardings = partitioning.tree_shardings(mesh, abstract, mode)
  state = jax.jit(lambda r: init_state(models, config, r), out_shardings=shardings)(rng)
  rep = partitioning.replicated(mesh)
  lpips_params = jax.device_put(load_lpips_params(), rep)
  batch_sh = partitioning.batch_sharding(mesh)
  train_step = jax.jit(
      make_train_step(models, config),
      in_shardings=(shardings, batch_sh, rep), out_shardings=(shardings, rep), donate_argnums=0)
  eval_step = jax.jit(
      make_eval_step(models, config),
      in_shardings=(shardings.params, shardings.vq_stats, batch_sh, rep),
      out_shardings=(rep, batch_sh))
  inception = InceptionExtractor(mesh) if config.eval.fid else None
  return Setup(config, models, mesh, state, shardings, lpips_params, train_step, eval_step,
               inception)


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def train_and_evaluate(config, workdir: str, stop: StopRequest | None = None,
                       after_step: Callable[[int], None] | None = None):
  """Train (resuming from the latest checkpoint in `workdir`) and evaluate periodically.

  `stop` (set by SIGTERM/SIGINT or a caller) makes the loop save and return
  early; `after_step(step)` is called on the host after each step.
  Returns the final state.
  """
  os.makedirs(workdir, exist_ok=True)
  s = setup(config)
  is_main = jax.process_index() == 0
  writer = make_writer(workdir, is_main)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  dataset, preprocess = train_dataset(config, jax.process_index(), jax.process_count())
  data_iter = iter(dataset)
  state = s.state
  latest = manager.latest_step()
  if latest is not None:
    state, data_state = checkpoint.restore(manager, latest, state)
    data_iter.set_state(data_state)
    print(f"resumed from checkpoint at step {latest} in {workdir}", flush=True)
  else:
    if is_main:
      write_json(os.path.join(workdir, "config.json"), config.to_dict())
    writer.write_hparams({k: str(v) for k, v in _flat(config.to_dict()).items()})
  if is_main:
    with open(os.path.join(workdir, "parameters.txt"), "w") as f:
      f.write(parameter_overview.get_parameter_overview(state.params) + "\n")
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_disc = sum(x.size for x in jax.tree.leaves(state.disc_params))
  print(f"VQGAN {n_params:,} parameters, discriminator {n_disc:,}; mesh "
        f"{dict(s.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"per-parameter table in {workdir}/parameters.txt",
        flush=True)

  total = config.train.steps
  step = int(state.step)
  stop = (stop if stop is not None else StopRequest()).install()
  guard = NonFiniteGuard(config.train.max_consecutive_nonfinite)
  progress = ProgressLine(total, step)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.train.log_every)
  history = []
  if step == 0 and config.eval.at_start:
    write_eval(writer, workdir, 0, *s.evaluate(state), notes=s.notes)
  current = {}
  periodic_eval = periodic_actions.PeriodicCallback(
      every_steps=config.eval.every_steps, on_steps=[total], pass_step_and_time=True,
      callback_fn=lambda step, t: write_eval(writer, workdir, step, *s.evaluate(current["state"]),
                                             notes=s.notes))
  try:
    while step < total and not stop:
      batch = next(data_iter)
      device_batch = partitioning.shard_batch(batch, s.mesh)
      state, metrics = s.train_step(state, device_batch, s.lpips_params)
      step += 1
      metrics = jax.device_get(metrics)
      guard.update(step, metrics)
      history.append(metrics)
      report(step)
      if step % config.train.log_every == 0 or step == total:
        scalars = _mean_metrics(history)
        scalars["data/corrupt_images"] = preprocess.num_corrupt
        scalars["nonfinite_total"] = guard.total
        writer.write_scalars(step, scalars)
        progress(step, scalars["loss/total"])
        history = []
      if step % config.train.image_every == 0 or step == total:
        x_hat, _ = s.models.vqgan.apply(
            {"params": state.params, **({"vq_stats": state.vq_stats} if state.vq_stats else {})},
            device_batch["image"])
        write_images(writer, workdir, step, "reconstructions",
                     image_grid([batch["image"], np.asarray(jax.device_get(x_hat))]))
      if step % config.train.checkpoint_every == 0:
        checkpoint.save(manager, step, state, data_iter.get_state())
      current["state"] = state
      periodic_eval(step)
      if after_step is not None:
        after_step(step)
  finally:
    if manager.latest_step() != step:
      checkpoint.save(manager, step, state, data_iter.get_state(), force=True)
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    stop.uninstall()
  if stop:
    print(f"stopped at step {step}; checkpoint saved in {workdir}/checkpoints", flush=True)
  return state


def restore_for_eval(config, workdir: str, s: Setup):
  """(state, step) of the latest checkpoint, or of `config.eval.checkpoint_step`."""
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints, async_save=False)
  step = config.eval.checkpoint_step if config.eval.checkpoint_step >= 0 else manager.latest_step()
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(
        f"no checkpoint{'' if step is None else f' at step {step}'} in "
        f"{os.path.join(workdir, 'checkpoints')}: train first, or set --workdir to a run "
        f"directory (available steps: {list(manager.all_steps())}).")
  state, _ = checkpoint.restore(manager, step, s.state, with_data=False)
  manager.close()
  return state, step


def evaluate(config, workdir: str) -> dict:
  """--mode=eval: metrics of a saved checkpoint (latest, or config.eval.checkpoint_step)."""
  s = setup(config)
  state, step = restore_for_eval(config, workdir, s)
  writer = make_writer(workdir, jax.process_index() == 0)
  start = time.time()
  metrics, grid = s.evaluate(state)
  metrics["seconds"] = round(time.time() - start, 2)
  write_eval(writer, workdir, step, metrics, grid, notes=s.notes)
  writer.flush()
  return metrics


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
