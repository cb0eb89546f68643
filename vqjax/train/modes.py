"""The one dispatch from (config.trainer, mode) to the function that runs it.

`python -m vqjax.main` and the stages of a pipeline (`vqjax.train.pipeline`)
both call `run_mode`, so a mode runs the same way from either. Each runner is
imported when it is called: a tokenizer run never imports the sampler.
"""

from __future__ import annotations

import importlib
from typing import Callable

from vqjax.errors import ConfigError


class RunStopped(Exception):
  """A signal (SIGTERM/SIGINT) stopped a training run after its loop saved what it could;
  rerunning the same command resumes it. `python -m vqjax.main` exits with EX_TEMPFAIL (75)."""


def _runner(module: str, function: str, takes_stop: bool) -> Callable:
  """runner(config, workdir, stop) calling `module.function`, imported when first called."""
  def run(config, workdir: str, stop):
    target = getattr(importlib.import_module(module), function)
    return target(config, workdir, stop=stop) if takes_stop else target(config, workdir)
  return run


# (config.trainer, mode) -> runner(config, workdir, stop). Only the training runners take
# `stop`; the others end with the process on a signal (each resumes or is repeatable).
RUNNERS: dict[tuple[str, str], Callable] = {
    ("tokenizer", "train"): _runner("vqjax.train.run", "train_and_evaluate", True),
    ("tokenizer", "eval"): _runner("vqjax.train.run", "evaluate", False),
    ("tokenizer", "tokenize"): _runner("vqjax.train.tokenize", "tokenize", False),
    ("transformer", "train"): _runner("vqjax.train.transformer", "train", True),
    ("transformer", "eval"): _runner("vqjax.train.transformer", "evaluate", False),
    ("transformer", "sample"): _runner("vqjax.train.sample", "sample", False),
    ("transformer", "visualize"): _runner("vqjax.train.visualize", "visualize", False),
    ("gan", "train"): _runner("vqjax.train.gan", "train", True),
    ("gan", "eval"): _runner("vqjax.train.gan", "evaluate", False),
    ("gan", "sample"): _runner("vqjax.train.gan", "sample", False),
    ("pipeline", "train"): _runner("vqjax.train.pipeline", "run_pipeline", True),
}
TRAINERS = tuple(dict.fromkeys(trainer for trainer, _ in RUNNERS))


def modes_of(trainer: str) -> tuple[str, ...]:
  """The modes a config with `config.trainer == trainer` can run."""
  return tuple(mode for t, mode in RUNNERS if t == trainer)


def check_mode(config, mode: str) -> None:
  """ConfigError unless `mode` applies to `config.trainer`."""
  trainer = config.get("trainer")
  if trainer not in TRAINERS:
    raise ConfigError(f"config.trainer={trainer!r} is not one this version runs {TRAINERS}.")
  if (trainer, mode) in RUNNERS:
    return
  if trainer == "pipeline":
    raise ConfigError(f"--mode={mode} does not apply to a pipeline config: each stage names "
                      "its own mode; run the pipeline with --mode=train (the default).")
  raise ConfigError(f"--mode={mode} does not apply to a {trainer} config; use one of "
                    f"{modes_of(trainer)}.")


def run_mode(config, workdir: str, mode: str, stop=None):
  """Run `mode` of `config` in `workdir` and return what its runner returns.

  `stop` (a `vqjax.train.loop.StopRequest`, made here when not given) reaches
  the training loops: when a signal or the caller sets it, they save a
  checkpoint and return early, and then this raises RunStopped.
  Before the runner builds anything, `check_inputs` checks the config, the
  data set and the directories the mode writes (a pipeline checks its stages'
  configs and directories itself, then each stage again as it starts).
  """
  check_mode(config, mode)
  check_inputs(config, workdir, mode)
  from vqjax.train.loop import StopRequest

  stop = stop if stop is not None else StopRequest()
  if mode == "train" and config.trainer != "pipeline":
    resolve_epochs(config)
  result = RUNNERS[(config.trainer, mode)](config, workdir, stop)
  if stop:
    raise RunStopped(f"a signal stopped --mode={mode} in {workdir} after it saved a checkpoint; "
                     "run the same command again to resume it")
  return result


# The data splits a tokenizer mode reads (train evaluates on the val split as it goes).
_TOKENIZER_SPLITS = {"train": lambda c: (c.data.train_split, c.data.val_split),
                     "eval": lambda c: (c.data.val_split,),
                     "tokenize": lambda c: (c.tokenize.split,)}


def check_inputs(config, workdir: str, mode: str) -> None:
  """UserError before anything is built: the config (`validate_config`), the tokenizer's
  data set (`check_data_exists` of the splits the mode reads), the run directory and the
  token store's folder (`check_workdir`), and for the modes that restore a trained run, a
  checkpoint in the run directory."""
  from vqjax.core.workdir import check_workdir

  if config.trainer != "pipeline":
    import jax

    validate_config(config, jax.device_count(), jax.process_count())
  if config.trainer == "tokenizer":
    from vqjax.data.sources import check_data_exists

    check_data_exists(config.data, _TOKENIZER_SPLITS[mode](config))
  if config.trainer == "gan":
    from vqjax.data.sources import check_data_exists
    from vqjax.train.gan import check_data_classes

    splits = (config.data.train_split,) + (
        (config.eval.reference_split,) if mode != "sample" and config.eval.fid else ())
    check_data_exists(config.data, tuple(dict.fromkeys(splits)))
    check_data_classes(config)
  check_workdir(workdir)
  if mode != "train" and config.trainer != "pipeline":  # these modes restore a trained run
    from vqjax.train.generate import require_checkpoints

    require_checkpoints(workdir, config.trainer)
  if mode == "tokenize" and config.tokenize.output_dir:
    check_workdir(config.tokenize.output_dir, "tokenize.output_dir")
  if mode == "train" and config.get("init_from", {}).get("workdir"):
    _check_init_from(config.init_from, workdir)


def _check_init_from(cfg, workdir: str) -> None:
  """CheckpointNotFoundError when a run that has not started yet would copy from a run
  directory without checkpoints (e.g. SeQ-GAN's phase 2 before its phase 1)."""
  import os

  from vqjax.errors import CheckpointNotFoundError

  def has_checkpoint(folder: str) -> bool:
    folder = os.path.join(folder, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))

  if has_checkpoint(workdir):
    return  # a resumed run restores its own checkpoint; init_from applies to new runs only
  if not has_checkpoint(cfg.workdir):
    raise CheckpointNotFoundError(
        f"init_from.workdir={cfg.workdir!r} has no checkpoint to start this run from: train "
        "that run first (for a pipeline, its earlier stage) or set init_from.workdir to a run "
        "directory that has one ('' starts from scratch).")


def epochs_to_steps(epochs: float, num_examples: int, batch_size: int) -> int:
  """The optimiser steps of `epochs` passes over `num_examples` at `batch_size` (rounded up)."""
  return max(1, -(-round(epochs * num_examples) // batch_size))


def resolve_epochs(config) -> None:
  """With `train.epochs` > 0, set `train.steps` from the size of the data the trainer reads
  (the tokenizer's train split, the transformer's token store), so a recipe states epochs
  as its paper does and the step count follows the data set."""
  epochs = config.train.get("epochs", 0)
  if not epochs:
    return
  if config.trainer in ("tokenizer", "gan"):
    from vqjax.data.sources import build_source

    num_examples, what = len(build_source(config.data, config.data.train_split)), "examples"
  else:
    from vqjax.data.tokens import TokenStore

    num_examples, what = len(TokenStore(config.tokens.dir)), "token maps"
  # A GAN step reads n_critic real batches (BigGAN-PyTorch's epoch of G steps).
  per_step = config.train.batch_size * config.train.get("n_critic", 1)
  config.train.steps = epochs_to_steps(epochs, num_examples, per_step)
  from vqjax.console import console

  console(f"train.epochs={epochs} over {num_examples:,} {what} at batch "
          f"{config.train.batch_size}: train.steps={config.train.steps:,}")


def validate_config(config, num_devices: int, process_count: int = 1) -> None:
  """The config checks its trainer's setup starts with (ConfigError), without building
  anything; only the validating trainer's module is imported."""
  if config.trainer == "tokenizer":
    from vqjax.train.tokenizer import validate_tokenizer_config

    validate_tokenizer_config(config, num_devices, process_count)
  elif config.trainer == "transformer":
    from vqjax.train.transformer import validate_transformer_config

    validate_transformer_config(config, num_devices, process_count)
  elif config.trainer == "gan":
    from vqjax.train.gan import validate_gan_config

    validate_gan_config(config, num_devices, process_count)
