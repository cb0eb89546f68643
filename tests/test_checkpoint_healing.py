"""Checkpoints that heal, runs that never keep a diverged state, and stops a scheduler can read.

- A damaged newest checkpoint (a file overwritten with garbage, truncated, or its metadata
  emptied) is moved to `checkpoints_damaged/` with one warning, and training, --mode=eval
  and the sample/eval restores use the one before it; with none that restores, one error.
- A run stopped for non-finite or diverging losses keeps only checkpoints whose state gave a
  good loss, and its error names the newest of them (the last good step).
- A SIGTERM-stopped run makes `modes.run_mode` raise RunStopped (`vqjax.main` exits 75).
"""

import glob
import os
import shutil
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from tests.conftest import ROOT, load_config
from vqjax.core import checkpoint
from vqjax.errors import ConfigError, UserError
from vqjax.train import generate, modes, pipeline
from vqjax.train.loop import (
  DivergenceError,
  DivergenceGuard,
  NonFiniteLossError,
  StopRequest,
  TrainRun,
)
from vqjax.train.run import evaluate, setup, train_and_evaluate


def _largest_data_file(step_dir) -> str:
  """The largest array-chunk file of a checkpoint's state (an OCDBT data file)."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def overwrite_with_garbage(step_dir) -> None:
  path = _largest_data_file(step_dir)
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def truncate(step_dir) -> None:
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def empty_metadata(step_dir) -> None:
  open(os.path.join(step_dir, "state", "_METADATA"), "w").close()


DAMAGES = {"garbage": overwrite_with_garbage, "truncated": truncate,
           "empty_metadata": empty_metadata}


def kept_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def set_aside(workdir, folder) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, folder)))


def warnings_in(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("warning:")]


# --- A toy trainer on the real loop: the state counts its updates, the losses are given. ---

@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: jax.Array  # [2], each entry = the number of updates applied so far


class ToyData:
  """An endless iterator of dummy batches whose position is its checkpointed state."""

  def __init__(self):
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.position += 1
    return {"x": np.zeros((1, 1), np.float32)}

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = state["position"]


def toy_run(workdir, losses, stop=None, after_step=None, **train):
  """TrainRun over `losses` (step k reports losses[k-1]; a non-finite one skips the update)."""
  fields = dict(steps=len(losses), log_every=1, checkpoint_every=1, keep_checkpoints=3,
                max_consecutive_nonfinite=3, divergence_factor=10.0, divergence_steps=5)
  config = ml_collections.ConfigDict({"train": {**fields, **train}})

  def train_step(state, batch):
    loss = losses[int(state.step)]
    finite = bool(np.isfinite(loss))
    new = state.replace(step=state.step + 1, params=state.params + (1.0 if finite else 0.0))
    return new, {"loss/total": jnp.float32(loss), "nonfinite": jnp.float32(not finite)}

  r = TrainRun(config, str(workdir))
  data = ToyData()
  state = r.resume(ToyState(step=jnp.zeros((), jnp.int32), params=jnp.zeros(2)), data)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  return r.run(state, data, train_step, mesh, stop=stop, after_step=after_step)


def toy_params(workdir, step) -> float:
  template = ToyState(step=jnp.zeros((), jnp.int32), params=jnp.zeros(2))
  state, _, _ = checkpoint.restore_newest_good(str(workdir), template, with_data=False, step=step)
  return float(state.params[0])


def test_divergence_guard_on_a_synthetic_loss_sequence():
  guard = DivergenceGuard(factor=10.0, steps=3, window=4)
  for step, loss in enumerate([5.0, 2.0, 1.0], 1):  # fewer than `steps` losses: not judged
    guard.update(step, {"loss/total": loss})
  assert guard.first_bad is None
  guard.update(4, {"loss/total": 1.0})  # median(5, 2, 1) = 2
  guard.update(5, {"loss/total": 25.0})  # > 10 x median(5, 2, 1, 1) = 15
  assert (guard.streak, guard.first_bad) == (1, 5)
  guard.update(6, {"loss/total": np.nan, "nonfinite": 1.0})  # the NaN guard's: no change
  assert (guard.streak, guard.first_bad) == (1, 5)
  guard.update(7, {"loss/total": 14.0})  # median(2, 1, 1, 25) = 1.5: 14 <= 15 ends the streak
  assert (guard.streak, guard.first_bad) == (0, None)
  guard.update(8, {"loss/total": 100.0})  # median(1, 1, 25, 14) = 7.5: 100 > 75
  guard.update(9, {"loss/total": 200.0})  # median(1, 25, 14, 100) = 19.5: 200 > 195
  with pytest.raises(DivergenceError, match=r"above 10x its running median \(62.5\) for 3 "
                                            r"consecutive steps \(steps 8-10, last 700\)"):
    guard.update(10, {"loss/total": 700.0})  # median(25, 14, 100, 200) = 62.5: 700 > 625
  assert issubclass(DivergenceError, UserError) and issubclass(NonFiniteLossError, UserError)


def test_divergence_guard_off_and_nonpositive_median():
  off = DivergenceGuard(factor=0.0, steps=1)
  negative = DivergenceGuard(factor=10.0, steps=1)
  for step, loss in enumerate([-1.0, -1.0, 1e9, 1e9], 1):
    off.update(step, {"loss/total": loss})
    negative.update(step, {"loss/total": loss})
  assert off.first_bad is None and negative.first_bad is None


def test_diverging_run_keeps_only_good_checkpoints_and_names_the_last_good_step(tmp_path, capfd):
  losses = [1.0] * 30 + [100.0] * 10
  with pytest.raises(DivergenceError) as info:
    toy_run(tmp_path, losses)
  message = str(info.value)
  # Step 31's loss is the first bad one: it was computed on step 30's state, so checkpoint 30
  # is moved aside and nothing was saved during the streak (steps 31-35).
  assert "steps 31-35" in message and "The last good step is 29" in message
  assert "lower the learning rate" in message and "Checkpoint(s) [30]" in message
  assert kept_steps(tmp_path) == [28, 29]
  moved = set_aside(tmp_path, checkpoint.DIVERGED)
  assert len(moved) == 1 and moved[0].startswith("30-")
  assert toy_params(tmp_path, 29) == 29.0
  assert "not saved" not in capfd.readouterr().err  # a guard's stop saves nothing at all


def test_nonfinite_run_keeps_no_checkpoint_of_the_blown_up_state(tmp_path):
  # As with optim.lr=1e6: step 1's loss is fine but its update blows the state up, so every
  # later step is NaN. Checkpoint 1 holds that state: it is moved aside, none is kept.
  losses = [1.0] + [np.nan] * 5
  with pytest.raises(NonFiniteLossError, match=r"ending at step 4.*No checkpoint from before "
                                               r"step 1 is kept"):
    toy_run(tmp_path, losses)
  assert kept_steps(tmp_path) == []
  assert [name.split("-")[0] for name in set_aside(tmp_path, checkpoint.DIVERGED)] == ["1"]


def test_a_nonfinite_blip_is_survived_and_its_steps_are_not_saved(tmp_path):
  losses = [1.0] * 5 + [np.nan] + [1.0] * 4
  state = toy_run(tmp_path, losses, keep_checkpoints=20)
  assert int(state.step) == 10 and float(state.params[0]) == 9.0
  assert kept_steps(tmp_path) == [1, 2, 3, 4, 5, 7, 8, 9, 10]  # step 6 had the NaN
  assert not os.path.exists(tmp_path / checkpoint.DIVERGED)


def test_a_stop_inside_a_bad_streak_saves_nothing_and_the_rerun_resumes(tmp_path, capfd):
  stop = StopRequest()
  losses = [1.0] * 3 + [np.nan] * 2 + [1.0] * 5
  toy_run(tmp_path, losses, stop=stop, after_step=lambda step: step == 5 and stop.event.set())
  out, err = capfd.readouterr()
  assert "step 5 not saved" in err and "newest checkpoint (step 3)" in out
  assert kept_steps(tmp_path) == [1, 2, 3]
  state = toy_run(tmp_path, losses)
  assert int(state.step) == 10 and "resumed from checkpoint at step 3" in capfd.readouterr().out


def test_async_saves_after_a_fallback_keep_n(tmp_path, capfd):
  toy_run(tmp_path, [1.0] * 6, checkpoint_every=2, keep_checkpoints=2)
  assert kept_steps(tmp_path) == [4, 6]
  empty_metadata(tmp_path / "checkpoints" / "6")
  capfd.readouterr()
  state = toy_run(tmp_path, [1.0] * 10, checkpoint_every=2, keep_checkpoints=2)
  out, err = capfd.readouterr()
  assert "resumed from checkpoint at step 4" in out and len(warnings_in(err)) == 1
  assert int(state.step) == 10 and float(state.params[0]) == 10.0
  assert kept_steps(tmp_path) == [8, 10]  # 6 and 8 saved again, keep-2 applied
  assert [name.split("-")[0] for name in set_aside(tmp_path, checkpoint.DAMAGED)] == ["6"]
  assert toy_params(tmp_path, 10) == 10.0


# --- The real tokenizer (configs/demo.py:smoke). ---

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, run directory with checkpoints 2 and 4 of a 4-step smoke run)."""
  config = load_config("configs/demo.py:smoke")
  workdir = tmp_path_factory.mktemp("healing") / "run"
  train_and_evaluate(config, str(workdir))
  assert kept_steps(workdir) == [2, 4]
  return config, workdir


def damaged_copy(trained, tmp_path, damage, steps=(4,)):
  config, workdir = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  for step in steps:
    DAMAGES[damage](copy / "checkpoints" / str(step))
  return copy


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_training_resumes_from_the_checkpoint_before_a_damaged_one(trained, tmp_path, capfd,
                                                                    damage):
  config, workdir = trained
  copy = damaged_copy(trained, tmp_path, damage)
  capfd.readouterr()
  state = train_and_evaluate(config, str(copy))
  out, err = capfd.readouterr()
  assert "resumed from checkpoint at step 2" in out
  (line,) = warnings_in(err)
  assert f"checkpoint 4 in {copy / 'checkpoints'} does not restore" in line
  assert "using step 2" in line and checkpoint.DAMAGED in line
  (moved,) = set_aside(copy, checkpoint.DAMAGED)
  assert moved.startswith("4-") and os.listdir(copy / checkpoint.DAMAGED / moved)  # kept whole
  assert int(state.step) == 4 and kept_steps(copy) == [2, 4]
  # Steps 3-4 again from checkpoint 2 give exactly the state the uninterrupted run saved at 4.
  original, _, _ = checkpoint.restore_newest_good(str(workdir), setup(config).state, step=4)
  for a, b in zip(jax.tree.leaves(jax.device_get(original)),
                  jax.tree.leaves(jax.device_get(state)), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_eval_and_restore_latest_fall_back_past_a_damaged_checkpoint(trained, tmp_path, capfd,
                                                                     damage):
  config, _ = trained
  copy = damaged_copy(trained, tmp_path, damage)
  capfd.readouterr()
  metrics = evaluate(config, str(copy))  # --mode=eval
  assert np.isfinite(metrics["psnr"]) and os.path.exists(copy / "eval_2.json")
  assert not os.path.exists(copy / "eval_4.json") or os.path.exists(trained[1] / "eval_4.json")
  assert len(warnings_in(capfd.readouterr().err)) == 1
  assert kept_steps(copy) == [2] and len(set_aside(copy, checkpoint.DAMAGED)) == 1
  # The restore sample/eval/visualize use for the transformer and its tokenizer.
  copy2 = damaged_copy(trained, tmp_path / "again", damage)
  _, step = generate.restore_latest(str(copy2), setup(config).state, "tokenizer")
  assert step == 2 and kept_steps(copy2) == [2]


def test_no_checkpoint_that_restores_is_one_error_and_nothing_moves(trained, tmp_path):
  copy = damaged_copy(trained, tmp_path, "empty_metadata", steps=(2, 4))
  proc = subprocess.run(
      [sys.executable, "-m", "vqjax.main", "--config=configs/demo.py:smoke",
       f"--workdir={copy}", "--mode=eval"], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"none of the 2 checkpoint(s) in {copy / 'checkpoints'} (steps [2, 4])" in errors[0]
  assert "config.json" in errors[0] and "move" in errors[0]
  assert kept_steps(copy) == [2, 4] and not os.path.exists(copy / checkpoint.DAMAGED)


def test_a_blown_up_learning_rate_keeps_only_good_checkpoints(trained, tmp_path):
  """optim.lr=1e6 on resume: step 3's loss is fine, its update blows the state up (~1e6),
  every later step is NaN. The error names step 2, which is the newest checkpoint kept, and
  no kept checkpoint holds blown-up parameters."""
  config, workdir = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "4")  # resume from 2
  with config.unlocked():
    config = config.copy_and_resolve_references()
  with config.unlocked():
    config.optim.lr = 1e6
    config.train.steps = 20
    config.train.checkpoint_every = 1
    config.train.max_consecutive_nonfinite = 3
    config.eval.every_steps = 100
  with pytest.raises(NonFiniteLossError) as info:
    train_and_evaluate(config, str(copy))
  assert "The last good step is 2" in str(info.value)
  assert kept_steps(copy) == [2]
  assert [name.split("-")[0] for name in set_aside(copy, checkpoint.DIVERGED)] == ["3"]
  template = setup(config).state
  for step in kept_steps(copy):
    state, _, _ = checkpoint.restore_newest_good(str(copy), template, step=step)
    leaves = jax.tree.leaves(jax.device_get(state.params))
    assert all(np.all(np.isfinite(x)) and np.max(np.abs(x)) < 1e3 for x in leaves)


def test_guard_fields_are_validated(smoke_config):
  for field, value in (("divergence_factor", 0.5), ("divergence_factor", -1.0),
                       ("divergence_steps", 0)):
    c = smoke_config.copy_and_resolve_references()
    with c.unlocked():
      c.train[field] = value
    with pytest.raises(ConfigError, match=f"train.{field}"):
      modes.validate_config(c, 1)


def test_a_stopped_run_raises_run_stopped(smoke_config, tmp_path, monkeypatch):
  def stopped_runner(config, workdir, stop):
    stop.event.set()  # what SIGTERM does; the loop then saves and returns
    return "state"

  monkeypatch.setitem(modes.RUNNERS, ("tokenizer", "train"), stopped_runner)
  with pytest.raises(modes.RunStopped, match="run the same command again to resume"):
    modes.run_mode(smoke_config, str(tmp_path), "train")
  monkeypatch.setitem(modes.RUNNERS, ("tokenizer", "train"), lambda c, w, stop: "done")
  assert modes.run_mode(smoke_config, str(tmp_path), "train") == "done"
  assert issubclass(pipeline.PipelineStopped, modes.RunStopped)
