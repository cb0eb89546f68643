"""The one dispatch from (config.trainer, mode) to the function that runs it.

`python -m vqjax.main` and the stages of a pipeline (`vqjax.train.pipeline`)
both call `run_mode`, so a mode runs the same way from either. Each runner is
imported when it is called: a tokenizer run never imports the sampler.
"""

from __future__ import annotations

from typing import Callable

from vqjax.config_lib import ConfigError


def _tokenizer_train(config, workdir: str, stop):
  from vqjax.train import run

  return run.train_and_evaluate(config, workdir, stop=stop)


def _tokenizer_eval(config, workdir: str, stop):
  from vqjax.train import run

  return run.evaluate(config, workdir)


def _tokenize(config, workdir: str, stop):
  from vqjax.train.tokenize import tokenize

  return tokenize(config, workdir)


def _transformer_train(config, workdir: str, stop):
  from vqjax.train import transformer

  return transformer.train(config, workdir, stop=stop)


def _transformer_eval(config, workdir: str, stop):
  from vqjax.train import transformer

  return transformer.evaluate(config, workdir)


def _sample(config, workdir: str, stop):
  from vqjax.train.sample import sample

  return sample(config, workdir)


def _visualize(config, workdir: str, stop):
  from vqjax.train.visualize import visualize

  return visualize(config, workdir)


def _pipeline(config, workdir: str, stop):
  from vqjax.train.pipeline import run_pipeline

  return run_pipeline(config, workdir, stop=stop)


# (config.trainer, mode) -> runner(config, workdir, stop). Only the training runners take
# `stop`; the others end with the process on a signal (each resumes or is repeatable).
RUNNERS: dict[tuple[str, str], Callable] = {
    ("tokenizer", "train"): _tokenizer_train,
    ("tokenizer", "eval"): _tokenizer_eval,
    ("tokenizer", "tokenize"): _tokenize,
    ("transformer", "train"): _transformer_train,
    ("transformer", "eval"): _transformer_eval,
    ("transformer", "sample"): _sample,
    ("transformer", "visualize"): _visualize,
    ("pipeline", "train"): _pipeline,
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

  `stop` (a `vqjax.train.loop.StopRequest`) reaches the training loops: when a
  signal or the caller sets it, they save a checkpoint and return early, and
  the caller can tell by `bool(stop)`. Without one the loop makes its own.
  """
  check_mode(config, mode)
  return RUNNERS[(config.trainer, mode)](config, workdir, stop)


def validate_config(config, num_devices: int, process_count: int = 1) -> None:
  """The config checks its trainer's setup starts with (ConfigError), without building anything."""
  from vqjax import config_lib

  validators = {"tokenizer": config_lib.validate_tokenizer_config,
                "transformer": config_lib.validate_transformer_config}
  if config.trainer in validators:
    validators[config.trainer](config, num_devices, process_count)
