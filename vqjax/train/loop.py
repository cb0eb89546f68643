"""The loop every trainer runs, and its pieces: stop signals, progress, non-finite guard, images.

`TrainRun` owns a run directory (writer, checkpoint manager, resume) and the
step loop; a trainer brings its jitted step, its data iterator and hooks
(image grids, evaluations) that run after each step.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Iterable

import jax
import numpy as np
from clu import periodic_actions

from vqjax.console import console, warn
from vqjax.core.writers import flat_dict, make_writer, write_json
from vqjax.train import checkpoint, partitioning

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


class NonFiniteLossError(FloatingPointError):
  """Too many consecutive steps had NaN/inf losses or gradients."""


class NonFiniteGuard:
  """Counts steps whose update was skipped for NaN/inf and stops after `limit` in a row."""

  def __init__(self, limit: int):
    self.limit = limit
    self.consecutive = 0
    self.total = 0
    self.last_finite: dict | None = None
    self.last_finite_step = -1

  def update(self, step: int, metrics: dict) -> None:
    if metrics.get("nonfinite", 0.0) > 0:
      self.consecutive += 1
      self.total += 1
      warn(f"step {step}: non-finite loss or gradient, update skipped "
           f"({self.consecutive} in a row)")
      if self.consecutive >= self.limit:
        raise NonFiniteLossError(
            f"{self.consecutive} consecutive non-finite steps ending at step {step}; updates "
            f"were skipped and no NaN was saved. Last finite values (step "
            f"{self.last_finite_step}): {self.last_finite}. Lower the learning rate or check "
            "the data, then resume from the last checkpoint.")
    else:
      self.consecutive = 0
      self.last_finite = {k: round(float(v), 6) for k, v in metrics.items()
                          if k.startswith("loss/")}
      self.last_finite_step = step


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
  stop signal, error) saves the current step before closing.
  """

  def __init__(self, config, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.writer = make_writer(workdir, self.is_main)
    self.manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)

  def resume(self, state, data_iter):
    """The latest checkpoint's state (and iterator position), or `state` for a new run."""
    latest = self.manager.latest_step()
    if latest is not None:
      state, data_state = checkpoint.restore(self.manager, latest, state)
      data_iter.set_state(data_state)
      console(f"resumed from checkpoint at step {latest} in {self.workdir}")
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
    progress = ProgressLine(total, step)
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=self.writer,
                                             every_steps=config.train.log_every)
    history = []
    try:
      while step < total and not stop:
        batch = next(data_iter)
        device_batch = partitioning.shard_batch(batch, mesh)
        state, metrics = train_step(state, device_batch)
        step += 1
        metrics = jax.device_get(metrics)
        guard.update(step, metrics)
        history.append(metrics)
        report(step)
        if step % config.train.log_every == 0 or step == total:
          logged = {**mean_metrics(history), **(scalars() if scalars else {}),
                    "nonfinite_total": guard.total}
          self.writer.write_scalars(step, logged)
          progress(step, logged["loss/total"])
          history = []
        if step % config.train.checkpoint_every == 0:
          checkpoint.save(self.manager, step, state, data_iter.get_state())
        for hook in hooks:
          hook(step, state, batch, device_batch)
        if after_step is not None:
          after_step(step)
    finally:
      if self.manager.latest_step() != step:
        checkpoint.save(self.manager, step, state, data_iter.get_state(), force=True)
      self.manager.wait_until_finished()
      self.manager.close()
      self.writer.flush()
      stop.uninstall()
    if stop:
      console(f"stopped at step {step}; checkpoint saved in {self.workdir}/checkpoints")
    return state
