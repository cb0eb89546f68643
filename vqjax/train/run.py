"""The tokenizer's train and eval drivers: data, mesh, checkpoints, writers, hooks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from clu import parameter_overview, periodic_actions

from vqjax.console import console
from vqjax.core import checkpoint, partitioning, trees
from vqjax.core.writers import image_grid, make_writer, write_images
from vqjax.data.pipeline import train_dataset
from vqjax.eval.codebook_plots import plot_paths, write_codebook_plots
from vqjax.eval.evaluator import class_probabilities, evaluate_tokenizer, is_notes, write_eval
from vqjax.eval.inception_features import InceptionExtractor
from vqjax.losses.terms import Perceptual
from vqjax.train.loop import StopRequest, TrainRun, every
from vqjax.train.tokenizer import (
  PhasedStep,
  build_models,
  make_eval_step,
  make_train_step,
  sharded_init,
  tokenizer_variables,
  validate_tokenizer_config,
)
from vqjax.weights.lpips_vgg16 import load_lpips_params


@dataclass
class Setup:
  """Everything a tokenizer run needs, built once from the config."""
  config: object
  models: object
  mesh: object
  state: object
  state_shardings: object
  lpips_params: object  # the eval metric's network
  term_params: dict  # loss-term label -> its fixed network's params (replicated)
  train_step: Callable
  eval_step: Callable
  inception: InceptionExtractor | None

  def evaluate(self, state, return_counts: bool = False) -> tuple:
    """(metrics, grid), plus the pass's code counts [K] with `return_counts`."""
    return evaluate_tokenizer(self.eval_step, state.params, state.vq_stats, self.lpips_params,
                              self.config, self.mesh, self.inception, return_counts)

  def codebook(self, state) -> np.ndarray:
    """The quantiser's codebook [K, d'] as its look-up uses it, on the host.

    Read through the model with the state's vq_stats too: an EMA (or FQ) codebook lives
    in that collection, and a loss-learned one adds its k-means/restart shift from it.
    Every process runs this (the codebook may be sharded); the result is replicated.
    """
    read = jax.jit(lambda v: self.models.vqgan.apply(v, method=lambda m: m.quantizer.codebook()),
                   out_shardings=partitioning.replicated(self.mesh))
    return np.asarray(jax.device_get(read(tokenizer_variables(state))))

  @property
  def notes(self) -> list[str]:
    return is_notes(self.config) if self.inception is not None else []


def setup(config, devices=None) -> Setup:
  """Models, mesh, initial state and jitted steps; `devices` defaults to all."""
  devices = list(devices if devices is not None else jax.devices())
  validate_tokenizer_config(config, len(devices), jax.process_count())
  mesh = partitioning.make_mesh(config, devices)
  models = build_models(config)
  state, shardings = sharded_init(models, config, mesh, jax.random.PRNGKey(config.seed))
  rep = partitioning.replicated(mesh)
  lpips_params = jax.device_put(load_lpips_params(), rep)
  term_params = {label: lpips_params if isinstance(term, Perceptual) else
                 jax.device_put(term.load_params(), rep)
                 for label, term in models.terms.items() if term.weight}
  batch_sh = partitioning.batch_sharding(mesh)
  train_step = PhasedStep(*(
      jax.jit(make_train_step(models, config, gan=gan), in_shardings=(shardings, batch_sh, rep),
              out_shardings=(shardings, rep), donate_argnums=0)
      for gan in (False, True)), disc_start=config.loss.disc_start)
  eval_step = jax.jit(
      make_eval_step(models, config),
      in_shardings=(shardings.params, shardings.vq_stats, batch_sh, rep),
      out_shardings=(rep, batch_sh))
  inception = InceptionExtractor(mesh) if config.eval.fid else None
  if inception is not None:
    class_probabilities(config, inception)  # reads the IS head now (cached), not at the 1st eval
  return Setup(config, models, mesh, state, shardings, lpips_params, term_params, train_step,
               eval_step, inception)


def train_and_evaluate(config, workdir: str, stop: StopRequest | None = None,
                       after_step: Callable[[int], None] | None = None):
  """Train (resuming from the latest checkpoint in `workdir`) and evaluate periodically.

  `stop` (set by SIGTERM/SIGINT or a caller) makes the loop save and return
  early; `after_step(step)` is called on the host after each step.
  Returns the final state.
  """
  s = setup(config)
  r = TrainRun(config, workdir)
  dataset, preprocess = train_dataset(config, jax.process_index(), jax.process_count())
  data_iter = iter(dataset)
  fresh = r.manager.latest_step() is None
  state = r.resume(s.state, data_iter)
  if fresh and config.init_from.workdir:
    state = init_from(config.init_from, state, s.state_shardings)
  if r.is_main:
    with open(os.path.join(workdir, "parameters.txt"), "w") as f:
      f.write(parameter_overview.get_parameter_overview(state.params) + "\n")
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_disc = sum(x.size for x in jax.tree.leaves(state.disc_params))
  console(f"VQGAN {n_params:,} parameters, discriminator {n_disc:,}; mesh "
        f"{dict(s.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"per-parameter table in {workdir}/parameters.txt")
  total = config.train.steps
  if int(state.step) == 0 and config.eval.at_start:
    write_eval(r.writer, workdir, 0, *s.evaluate(state), notes=s.notes)

  def reconstructions(step, state, batch, device_batch):
    x_hat, _ = s.models.vqgan.apply(tokenizer_variables(state), device_batch["image"])
    write_images(r.writer, workdir, step, "reconstructions",
                 image_grid([batch["image"], partitioning.local_rows(x_hat)]))

  current = {}
  periodic_eval = periodic_actions.PeriodicCallback(
      every_steps=config.eval.every_steps or None, on_steps=[total], pass_step_and_time=True,
      callback_fn=lambda step, t: write_eval(r.writer, workdir, step,
                                             *s.evaluate(current["state"]), notes=s.notes))

  def evaluation(step, state, batch, device_batch):
    current["state"] = state
    periodic_eval(step)

  return r.run(state, data_iter, lambda st, b: s.train_step(st, b, s.term_params), s.mesh,
               hooks=[every(config.train.image_every, total, reconstructions), evaluation],
               scalars=lambda: {"data/corrupt_images": preprocess.num_corrupt},
               stop=stop, after_step=after_step)


def init_from(cfg, state, shardings):
  """`state` with the leaves matching `cfg.patterns` copied from `cfg.workdir`'s checkpoint.

  Only model leaves (params, vq_stats, disc_params, disc_stats) are copied;
  step, optimiser states and rng start fresh.
  """
  source, step = checkpoint.restore_tree(cfg.workdir, cfg.step)
  models = {k: getattr(state, k) for k in ("params", "vq_stats", "disc_params", "disc_stats")}
  copied, names = trees.copy_matching(models, {k: source.get(k, {}) for k in models},
                                      tuple(cfg.patterns), f"{cfg.workdir} (step {step})")
  console(f"init_from: copied {len(names)} arrays from {cfg.workdir} at step {step}")
  return jax.device_put(state.replace(**copied), shardings)


def restore_for_eval(config, workdir: str, s: Setup):
  """(state, step) of the newest checkpoint that restores (damaged newer ones are moved
  aside: `checkpoint.restore_newest_good`), or of `config.eval.checkpoint_step`."""
  state, _, step = checkpoint.restore_newest_good(workdir, s.state, with_data=False,
                                                  step=config.eval.checkpoint_step)
  return state, step


def evaluate(config, workdir: str) -> dict:
  """--mode=eval: metrics of a saved checkpoint (latest, or config.eval.checkpoint_step)."""
  s = setup(config)
  state, step = restore_for_eval(config, workdir, s)
  writer = make_writer(workdir, jax.process_index() == 0)
  start = time.time()
  metrics, grid, counts = s.evaluate(state, return_counts=True)
  metrics["seconds"] = round(time.time() - start, 2)
  extra = {}
  if config.eval.get("codebook_plots", False):
    extra["codebook_plots"] = codebook_plots(s, state, counts, workdir, step)
  write_eval(writer, workdir, step, metrics, grid, notes=s.notes, extra=extra)
  writer.flush()
  return metrics


def codebook_plots(s: Setup, state, counts: np.ndarray, workdir: str, step: int
                   ) -> dict[str, str]:
  """`workdir/codebook_usage_<step>.png` and `codebook_pca_<step>.png` of the eval pass's
  code counts and the restored codebook (written by the primary process); their paths."""
  codebook = s.codebook(state)
  if jax.process_index() != 0:
    return plot_paths(workdir, step)
  paths = write_codebook_plots(workdir, step, codebook, counts)
  console(f"codebook plots: {paths['usage']}, {paths['pca']}")
  return paths

