"""Orbax checkpoints: model state plus the data iterator's state, async, keep-N."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=("state", "data"))


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
