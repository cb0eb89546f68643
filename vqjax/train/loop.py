"""The loop every trainer runs, and its pieces: stop signals, progress, guards, images.

`TrainRun` owns a run directory (writer, checkpoint manager, resume) and the
step loop; a trainer brings its jitted step, its data iterator and hooks
(image grids, evaluations) that run after each step.

Only states from a healthy stretch are kept. The loss of step k is computed
on the state after step k-1, so a bad loss (non-finite, or diverging: see
`DivergenceGuard`) first seen at step b condemns the state of step b-1. While
a guard has a bad streak open no checkpoint is taken (not even on a stop);
when a guard stops the run, the checkpoints from step b-1 on are moved to
`<workdir>/checkpoints_diverged/`, and the error names the newest one left:
the last good step to resume from with a lower learning rate.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from typing import Callable, Iterable

import jax
import numpy as np
from clu import periodic_actions

from vqjax.console import console, warn
from vqjax.core import checkpoint, partitioning
from vqjax.core.writers import flat_dict, make_writer, write_json
from vqjax.errors import ConfigError, UserError

# hook(step, state, host_batch, device_batch), called after every step.
Hook = Callable[[int, object, dict, dict], None]


class StopRequest:
  """Set by SIGTERM/SIGINT (or a caller); the loop saves a checkpoint and returns."""

  def __init__(self, event: threading.Event | None = None):
    self.event = event or threading.Event()
    self._previous = {}

  def install(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    warn(f"received signal {signum}: saving a checkpoint and stopping")
    self.event.set()

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def __bool__(self) -> bool:
    return self.event.is_set()


class NonFiniteLossError(UserError, FloatingPointError):
  """Too many consecutive steps had NaN/inf losses or gradients."""


class DivergenceError(UserError, FloatingPointError):
  """The loss stayed far above its running median for too many consecutive steps."""


def validate_guards(train) -> None:
  """ConfigError unless `train.divergence_factor` is 0 (off) or > 1 and
  `train.divergence_steps` >= 1 (the `DivergenceGuard`'s fields)."""
  factor, steps = train.divergence_factor, train.divergence_steps
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
      factor == 0 or factor > 1):
    raise ConfigError(f"train.divergence_factor={factor!r} must be 0 (off) or > 1: the loss "
                      "counts as diverging above that many times its running median.")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ConfigError(f"train.divergence_steps={steps!r} must be an integer >= 1: the "
                      "diverging steps in a row that stop a run.")


class NonFiniteGuard:
  """Counts steps whose update was skipped for NaN/inf and stops after `limit` in a row.

  `first_bad` is the first step of the current run of non-finite steps (None when the
  last step was finite).
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.consecutive = 0
    self.total = 0
    self.first_bad: int | None = None
    self.last_finite: dict | None = None
    self.last_finite_step = -1

  def update(self, step: int, metrics: dict) -> None:
    """Count `step`'s outcome; NonFiniteLossError at `limit` non-finite steps in a row."""
    if metrics.get("nonfinite", 0.0) > 0:
      self.consecutive += 1
      self.total += 1
      if self.first_bad is None:
        self.first_bad = step
      warn(f"step {step}: non-finite loss or gradient, update skipped "
           f"({self.consecutive} in a row)")
      if self.consecutive >= self.limit:
        raise NonFiniteLossError(
            f"{self.consecutive} consecutive non-finite steps ending at step {step}; updates "
            f"were skipped and no NaN was saved. Last finite values (step "
            f"{self.last_finite_step}): {self.last_finite}. Lower the learning rate or check "
            "the data.")
    else:
      self.consecutive = 0
      self.first_bad = None
      self.last_finite = {k: round(float(v), 6) for k, v in metrics.items()
                          if k.startswith("loss/")}
      self.last_finite_step = step


class DivergenceGuard:
  """Stops a run whose loss stays far above its recent level (`train.divergence_*`).

  A finite step's `loss/total` is suspicious when it exceeds `factor` times the
  median of the last `window` finite losses before it; `steps` suspicious steps
  in a row raise DivergenceError. The rule judges once `steps` losses are in
  the window and only while their median is > 0 (a loss that can be negative,
  such as one with a hinge GAN term, should turn it off). Non-finite steps are
  the NonFiniteGuard's: they neither extend nor break a streak. `factor` 0 = off.
  `first_bad` is the first step of the current streak (None outside one).
  """

  def __init__(self, factor: float, steps: int, window: int = 200):
    self.factor, self.steps = factor, steps
    self.history: collections.deque = collections.deque(maxlen=window)
    self.streak = 0
    self.first_bad: int | None = None

  def update(self, step: int, metrics: dict) -> None:
    """Judge `step`'s loss against the running median; DivergenceError after `steps` in a row."""
    loss = float(metrics.get("loss/total", np.nan))
    if not self.factor or metrics.get("nonfinite", 0.0) > 0 or not np.isfinite(loss):
      return
    median = float(np.median(self.history)) if len(self.history) >= self.steps else None
    self.history.append(loss)
    if median is None or median <= 0 or loss <= self.factor * median:
      self.streak, self.first_bad = 0, None
      return
    self.streak += 1
    if self.first_bad is None:
      self.first_bad = step
    if self.streak >= self.steps:
      raise DivergenceError(
          f"loss/total stayed above {self.factor:g}x its running median ({median:.4g}) for "
          f"{self.streak} consecutive steps (steps {self.first_bad}-{step}, last {loss:.4g}).")


class ProgressLine:
  """Console line: step, loss, steps/s and ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.last_step = start_step
    self.last_time = time.time()

  def __call__(self, step: int, loss: float) -> str:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    line = (f"step {step}/{self.total} | loss {loss:.4f} | {rate:.2f} steps/s | "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    console(line)
    return line


def mean_metrics(history: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def every(n: int, total: int, fn: Callable[[int, object, dict, dict], None]) -> Hook:
  """A hook that runs `fn` at multiples of `n` (0 = never) and at the last step."""
  def hook(step, state, batch, device_batch):
    if (n and step % n == 0) or step == total:
      fn(step, state, batch, device_batch)
  return hook


class TrainRun:
  """One run directory: metric writer, checkpoints, resume, and the training loop.

  The loop (`run`) feeds `train_step(state, device_batch) -> (state, metrics)`
  batches from a Grain iterator, guards against non-finite steps, logs mean
  metrics every `train.log_every` steps, checkpoints state and iterator every
  `train.checkpoint_every` steps, calls the hooks, and on any exit (end,
  stop signal, error) saves the current step before closing. No checkpoint is
  taken while a guard has a bad streak open, and a guard's stop moves the
  condemned checkpoints aside (see the module docstring).
  """

  def __init__(self, config, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.writer = make_writer(workdir, self.is_main)
    self.manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)

  def resume(self, state, data_iter):
    """The newest checkpoint's state (and iterator position), or `state` for a new run.

    A newest checkpoint that does not restore is moved aside and the one before
    it used (`checkpoint.restore_newest_good`); later saves go on as usual.
    """
    if self.manager.latest_step() is not None:
      state, data_state, step = checkpoint.restore_newest_good(self.workdir, state)
      self.manager.reload()  # steps moved aside leave its cached list
      data_iter.set_state(data_state)
      console(f"resumed from checkpoint at step {step} in {self.workdir}")
      return state
    if self.is_main:
      write_json(os.path.join(self.workdir, "config.json"), self.config.to_dict())
    self.writer.write_hparams({k: str(v) for k, v in flat_dict(self.config.to_dict()).items()})
    return state

  def run(self, state, data_iter, train_step, mesh, hooks: Iterable[Hook] = (),
          scalars: Callable[[], dict] | None = None, stop: StopRequest | None = None,
          after_step: Callable[[int], None] | None = None):
    """Steps until `train.steps` (or a stop request); returns the final state.

    `scalars()` adds host values to each log line; `after_step(step)` is a
    caller's hook (tests use it to stop or break a run at a chosen step).
    """
    config = self.config
    total = config.train.steps
    step = int(state.step)
    stop = (stop if stop is not None else StopRequest()).install()
    guard = NonFiniteGuard(config.train.max_consecutive_nonfinite)
    guards = (guard, DivergenceGuard(config.train.divergence_factor,
                                     config.train.divergence_steps))
    progress = ProgressLine(total, step)
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=self.writer,
                                             every_steps=config.train.log_every)
    history = []
    stopped_by_guard = False
    try:
      while step < total and not stop:
        batch = next(data_iter)
        device_batch = partitioning.shard_batch(batch, mesh)
        state, metrics = train_step(state, device_batch)
        step += 1
        metrics = jax.device_get(metrics)
        try:
          for g in guards:
            g.update(step, metrics)
        except (NonFiniteLossError, DivergenceError) as e:
          stopped_by_guard = True
          raise type(e)(f"{e} {self._set_aside_diverged(_first_bad(guards))}") from None
        history.append(metrics)
        report(step)
        if step % config.train.log_every == 0 or step == total:
          logged = {**mean_metrics(history), **(scalars() if scalars else {}),
                    "nonfinite_total": guard.total}
          self.writer.write_scalars(step, logged)
          progress(step, logged["loss/total"])
          history = []
        if step % config.train.checkpoint_every == 0 and _first_bad(guards) is None:
          checkpoint.save(self.manager, step, state, data_iter.get_state())
        for hook in hooks:
          hook(step, state, batch, device_batch)
        if after_step is not None:
          after_step(step)
    finally:
      if not stopped_by_guard:
        self._save_last(step, state, data_iter, _first_bad(guards))
      if hasattr(data_iter, "close"):  # stops the input pipeline's worker processes
        data_iter.close()
      self.manager.wait_until_finished()
      newest = self.manager.latest_step()
      self.manager.close()
      self.writer.flush()
      stop.uninstall()
    if stop:
      console(f"stopped at step {step}; " + (
          f"checkpoint saved in {self.workdir}/checkpoints" if newest == step else
          f"newest checkpoint (step {newest}) in {self.workdir}/checkpoints"))
    return state

  def _save_last(self, step: int, state, data_iter, first_bad: int | None) -> None:
    """Save `step` on the way out, unless it is saved already or a bad streak is open."""
    if self.manager.latest_step() == step:
      return
    if first_bad is None:
      checkpoint.save(self.manager, step, state, data_iter.get_state(), force=True)
      return
    warn(f"step {step} not saved: the losses since step {first_bad} are non-finite or "
         f"diverging; the newest checkpoint is step {self.manager.latest_step()}")

  def _set_aside_diverged(self, first_bad: int) -> str:
    """Move the checkpoints from step `first_bad` - 1 on (the state that gave the first bad
    loss, and later ones) to `<workdir>/checkpoints_diverged/`; returns advice that names
    the newest checkpoint left, the last good step."""
    self.manager.wait_until_finished()
    condemned = sorted(s for s in self.manager.all_steps() if s >= first_bad - 1)
    for s in condemned:
      checkpoint.set_aside(self.workdir, s, checkpoint.DIVERGED)
    self.manager.reload()
    good = self.manager.latest_step()
    folder = checkpoint.checkpoint_dir(self.workdir)
    moved = (f"Checkpoint(s) {condemned} (from step {first_bad - 1}, whose state gave the first "
             f"bad loss) moved to {os.path.join(self.workdir, checkpoint.DIVERGED)}. "
             if condemned else "")
    if good is None:
      return (moved + f"No checkpoint from before step {first_bad - 1} is kept in {folder}: "
              "lower the learning rate (--config.optim.lr) and train again (a rerun in this "
              "--workdir starts from step 0).")
    return (moved + f"The last good step is {good}, the newest checkpoint in {folder}: lower "
            "the learning rate (--config.optim.lr) and rerun the same command to resume from "
            "it.")


def _first_bad(guards) -> int | None:
  """The first step of the bad streak a guard has open (the earliest), or None."""
  starts = [g.first_bad for g in guards if g.first_bad is not None]
  return min(starts) if starts else None
