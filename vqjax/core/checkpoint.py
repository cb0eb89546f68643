"""Orbax checkpoints: model state plus the data iterator's state, async, keep-N.

Restores heal (`restore_newest_good`): a newest checkpoint that no longer
restores while an older one does is damaged; it is moved, never deleted, to
`<workdir>/checkpoints_damaged/<step>-<UTC time>` (out of Orbax's sight) and
the older one is used. Checkpoints a diverging run wrote after its last good
step go to `<workdir>/checkpoints_diverged/` the same way (`vqjax.train.loop`).
"""

from __future__ import annotations

import os
import time

import jax
import orbax.checkpoint as ocp

from vqjax.console import warn
from vqjax.errors import CheckpointNotFoundError

DAMAGED = "checkpoints_damaged"  # <workdir>/<this>/<step>-<time>: checkpoints that did not restore
DIVERGED = "checkpoints_diverged"  # ... and those taken after a diverging run's last good step


class CheckpointError(CheckpointNotFoundError):
  """No checkpoint of a run directory restores; the message names the folder and what to do.

  To a caller, a checkpoint that does not restore is one that is not there.
  """


def checkpoint_dir(workdir: str) -> str:
  """The folder of `workdir` that Orbax keeps its step directories in."""
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None,
         force: bool = False) -> bool:
  """Queue an (async) save of `state` and the iterator state at `step`."""
  args = {"state": ocp.args.StandardSave(state)}
  if data_state is not None:
    args["data"] = ocp.args.JsonSave(data_state)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state):
  """ShapeDtypeStructs with the shardings of `state`, the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(manager: ocp.CheckpointManager, step: int, state_template, with_data: bool = True):
  """(state, data_state or None) at `step`, placed like `state_template`."""
  args = {"state": ocp.args.StandardRestore(abstract_like(state_template))}
  if with_data:
    args["data"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored["state"], (restored["data"] if with_data else None)


def set_aside(workdir: str, step: int, folder: str) -> str:
  """Move `<workdir>/checkpoints/<step>` to `<workdir>/<folder>/<step>-<UTC time>`; its new path.

  Nothing is deleted and Orbax no longer lists the step (reload or re-create a
  manager that has it cached). Process 0 moves it; every process waits for that.
  """
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  target = os.path.join(os.path.abspath(workdir), folder, f"{step}-{stamp}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(os.path.abspath(workdir), folder, f"{step}-{stamp}-{suffix}")
      suffix += 1
    os.rename(os.path.join(checkpoint_dir(workdir), str(step)), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
  return target


def _reason(error: BaseException, limit: int = 200) -> str:
  """'ErrorType: first line of its message' (less TensorStore's spec dump), cut to `limit`."""
  lines = str(error).split(" See full TensorStore details")[0].strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
  return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_newest_good(workdir: str, template, with_data: bool = True, step: int = -1):
  """(state, data_state or None, step) of the newest checkpoint in `workdir` that restores.

  `state` is placed like `template`. Checkpoints are tried newest first; those
  that fail before one restores (a file overwritten, truncated or emptied) are
  damaged: they are moved to `<workdir>/checkpoints_damaged/` (`set_aside`) and
  named in one warning. When none restores nothing is moved (the template, i.e.
  the config, may be what changed) and CheckpointError says so; with no
  checkpoint at all it is CheckpointNotFoundError. `step` >= 0 asks for exactly
  that step (CheckpointNotFoundError when it is missing, CheckpointError when it
  does not restore; nothing is moved).
  """
  folder = checkpoint_dir(workdir)
  manager = make_manager(workdir, 1, async_save=False)
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    wanted = steps if step < 0 else [s for s in steps if s == step]
    if not wanted:
      raise CheckpointNotFoundError(
          f"no checkpoint{'' if step < 0 else f' at step {step}'} in {folder} (steps there: "
          f"{sorted(steps)}): train first, or point --workdir at a run directory.")
    failures = []
    for candidate in wanted:
      try:
        state, data = restore(manager, candidate, template, with_data)
        break
      except Exception as e:  # noqa: BLE001 - TensorStore raises plain Exceptions
        failures.append((candidate, e))
    else:
      raise _none_restores(workdir, failures, explicit=step >= 0)
  finally:
    manager.close()
  if failures:
    moved = [set_aside(workdir, bad, DAMAGED) for bad, _ in failures]
    names = ", ".join(str(bad) for bad, _ in failures)
    warn(f"checkpoint {names} in {folder} does not restore ({_reason(failures[0][1])}): moved "
         f"to {moved[0] if len(moved) == 1 else os.path.dirname(moved[0])}; using step "
         f"{candidate}")
  return state, data, candidate


def _none_restores(workdir: str, failures: list, explicit: bool) -> CheckpointError:
  """The error for a run directory none of whose (or whose requested) checkpoints restores."""
  folder = checkpoint_dir(workdir)
  newest, error = failures[0]
  what = (f"checkpoint {newest} in {folder} does not restore" if explicit else
          f"none of the {len(failures)} checkpoint(s) in {folder} (steps "
          f"{sorted(s for s, _ in failures)}) restores")
  return CheckpointError(
      f"{what} (step {newest}: {_reason(error)}). If the config changed since it was written, "
      f"use the one in {os.path.join(os.path.abspath(workdir), 'config.json')}; if the "
      f"checkpoints are damaged, move {folder} away (or use a new --workdir) and train again.")


def restore_tree(workdir: str, step: int = -1) -> tuple[dict, int]:
  """(the saved state as a nested dict of host arrays, its step) from another run's
  checkpoint (`step` -1 = the latest); FileNotFoundError when there is none."""
  manager = make_manager(workdir, 1, async_save=False)
  steps = list(manager.all_steps())
  chosen = (max(steps) if steps else None) if step < 0 else step
  if chosen is None or chosen not in steps:
    manager.close()
    raise FileNotFoundError(
        f"no checkpoint{'' if step < 0 else f' at step {step}'} in "
        f"{os.path.join(workdir, 'checkpoints')} (steps there: {sorted(steps)}): train that "
        "run first, or fix init_from.workdir / init_from.step")
  restored = manager.restore(chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return restored["state"], chosen
