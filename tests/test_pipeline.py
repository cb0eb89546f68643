"""Pipeline recipes: stages run in order under one --workdir, finished ones skipped, a stopped
one resumed; a bad pipeline stops before anything runs."""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from tests.conftest import ROOT, load_config

# Stage 1 trains the smoke tokenizer for 2 steps, stage 2 tokenizes its train split in its run
# directory, stage 3 trains a smoke MaskGIT on those tokens: 100 steps, a console line each.
TOKENIZER = {"train.steps": 2, "eval.at_start": False, "eval.every_steps": 2}
MASKGIT = {"tokens.dir": "{tokenizer}/tokens_train", "tokenizer.workdir": "{tokenizer}",
           "tokenizer.config": "configs/demo.py:smoke", "train.steps": 100, "train.log_every": 1,
           "train.checkpoint_every": 1000, "eval.every_steps": 0, "eval.grid_images": 0}


def write_recipe(path, tokenizer=None, tokens_workdir="{tokenizer}", maskgit=None) -> str:
  """A 3-stage pipeline recipe file (tokenizer -> tokens -> maskgit) with these overrides."""
  stages = [
      f"stage('tokenizer', 'configs/demo.py:smoke', overrides={tokenizer or TOKENIZER!r})",
      f"stage('tokens', 'configs/demo.py:smoke', mode='tokenize', workdir={tokens_workdir!r})",
      f"stage('maskgit', 'configs/maskgit_imagenet.py:smoke', overrides={maskgit or MASKGIT!r})",
  ]
  path.write_text(textwrap.dedent("""\
      from vqjax.train.pipeline import pipeline_config, stage


      def get_config(arg=None):
        return pipeline_config(
      """) + "".join(f"      {s},\n" for s in stages) + "  )\n")
  return str(path)


def main_command(recipe: str, workdir, *flags) -> list[str]:
  return [sys.executable, "-u", "-m", "vqjax.main", f"--config={recipe}", f"--workdir={workdir}",
          *flags]


def final_params(run_dir) -> dict:
  """The parameters of the latest checkpoint in `run_dir`, as host arrays keyed by path."""
  import jax
  import orbax.checkpoint as ocp

  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{run_dir}/checkpoints/[0-9]*"))
  tree = ocp.StandardCheckpointer().restore(os.path.join(run_dir, "checkpoints", str(steps[-1]),
                                                         "state"))
  leaves = jax.tree_util.tree_leaves_with_path(tree["params"])
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def token_arrays(store) -> list[np.ndarray]:
  return [np.load(f) for f in sorted(glob.glob(f"{store}/*.npy"))]


def test_sigterm_in_a_stage_stops_unmarked_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
  recipe = write_recipe(tmp_path / "three_stages.py")
  reference_dir, stopped_dir = tmp_path / "reference", tmp_path / "stopped"
  # The uninterrupted run goes alongside the one that is stopped (2 processes, less waiting).
  reference = subprocess.Popen(main_command(recipe, reference_dir), cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  reference_out = []
  reader = threading.Thread(target=lambda: reference_out.append(reference.stdout.read()))
  reader.start()

  # SIGTERM once stage 3 has logged its first training step. The loop's signal handler is
  # installed before that line is printed, and 99 steps (seconds of work) remain, so the signal
  # lands in the loop: stages 1-2 are finished (marked), stage 3 saves a checkpoint mid-way.
  stderr_path = tmp_path / "stopped_stderr.txt"
  with open(stderr_path, "w") as stderr:  # a file: a full stderr pipe would block the child
    proc = subprocess.Popen(main_command(recipe, stopped_dir), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=stderr)
  timer = threading.Timer(900, proc.kill)
  timer.start()
  lines, in_stage_3 = [], False
  for line in proc.stdout:
    lines.append(line)
    in_stage_3 = in_stage_3 or line.startswith("pipeline stage 3/3")
    if in_stage_3 and line.startswith("step "):
      proc.send_signal(signal.SIGTERM)
      break
  out, _ = proc.communicate(timeout=600)
  timer.cancel()
  err = stderr_path.read_text()
  output = "".join(lines) + out
  assert proc.returncode == 75, output[-3000:] + err[-3000:]  # EX_TEMPFAIL: requeue
  assert "Traceback" not in err
  assert "stopped: stage 3/3 'maskgit'" in err and "not marked finished" in err
  stopped_at = int(output.split("stopped at step ")[1].split(";")[0])
  assert 1 <= stopped_at < MASKGIT["train.steps"]
  assert os.path.exists(stopped_dir / "tokenizer" / "stage_finished.json")
  assert os.path.exists(stopped_dir / "tokens" / "stage_finished.json")
  assert not os.path.exists(stopped_dir / "maskgit" / "stage_finished.json")

  rerun = subprocess.run(main_command(recipe, stopped_dir), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "pipeline stage 1/3 'tokenizer' (configs/demo.py:smoke): finished earlier, skipped" \
      in rerun.stdout
  assert "pipeline stage 2/3 'tokens' (configs/demo.py:smoke): finished earlier, skipped" \
      in rerun.stdout
  assert "pipeline stage 3/3 'maskgit' (configs/maskgit_imagenet.py:smoke): --mode=train in " \
      f"{stopped_dir}/maskgit; 0 stage(s) after it" in rerun.stdout
  assert f"resumed from checkpoint at step {stopped_at}" in rerun.stdout
  assert os.path.exists(stopped_dir / "maskgit" / "stage_finished.json")

  reference.wait(timeout=900)
  reader.join()
  assert reference.returncode == 0, reference_out[0][-3000:]
  assert "skipped" not in reference_out[0] and "pipeline finished: 3 stage(s)" in reference_out[0]
  expected_tokens = token_arrays(reference_dir / "tokenizer" / "tokens_train")
  assert len(expected_tokens) >= 2
  for got, want in zip(token_arrays(stopped_dir / "tokenizer" / "tokens_train"), expected_tokens,
                       strict=True):
    np.testing.assert_array_equal(got, want)
  want, got = final_params(reference_dir / "maskgit"), final_params(stopped_dir / "maskgit")
  assert sorted(got) == sorted(want) and want
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  # A finished stage whose recipe changed since is an error, not silently reused.
  changed = write_recipe(tmp_path / "changed.py", tokenizer={**TOKENIZER, "train.steps": 3})
  proc = subprocess.run(main_command(changed, stopped_dir), cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"})
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "stage 1/3 'tokenizer'" in proc.stderr and "train.steps: 2 -> 3" in proc.stderr
  assert "pipeline stage" not in proc.stdout


@pytest.mark.parametrize("recipe_args, flags, message", [
    ({"tokens_workdir": "{tokeniser}"}, (),
     "stage 2/3 'tokens' (configs/demo.py:smoke) workdir: '{tokeniser}' refers to {tokeniser}, "
     "which is not a stage; the stages before it are ['tokenizer']."),
    ({"tokenizer": {"train.steps": 2, "tokenize.output_dir": "{maskgit}/tokens"}}, (),
     "refers to {maskgit}, stage 3, which does not run before it"),
    ({"maskgit": {**MASKGIT, "train.stepz": 3}}, (),
     "stage 3/3 'maskgit' (configs/maskgit_imagenet.py:smoke): override key 'train.stepz' does "
     "not exist in its config; did you mean 'train.steps'?"),
    ({}, ("--mode=eval",), "--mode=eval does not apply to a pipeline config"),
], ids=["unknown_stage", "later_stage", "bad_override_key", "non_train_mode"])
def test_a_bad_pipeline_stops_with_one_line_before_running(tmp_path, recipe_args, flags, message):
  recipe = write_recipe(tmp_path / "bad.py", **recipe_args)
  workdir = tmp_path / "run"
  # Without oneDNN, TensorFlow's import prints nothing on stderr, so the error is its one line.
  proc = subprocess.run(main_command(recipe, workdir, *flags), cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"})
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert proc.stderr.startswith("error: ") and message in proc.stderr
  assert not os.path.exists(workdir)


def test_references_resolve_to_earlier_stage_directories():
  from vqjax.errors import ConfigError
  from vqjax.train.pipeline import resolve

  dirs = {"tok": "/d/tok", "mg": "/d/mg"}
  order = ["tok", "mg", "late"]
  assert resolve("{tok}/tokens_train", dirs, order, "s") == "/d/tok/tokens_train"
  assert resolve(("{mg}", "{{literal}}", 3), dirs, order, "s") == ("/d/mg", "{literal}", 3)
  assert resolve(7, dirs, order, "s") == 7
  with pytest.raises(ConfigError, match="which does not run before it"):
    resolve("{late}", dirs, order, "s")
  with pytest.raises(ConfigError, match="no format or conversion"):
    resolve("{tok!r}", dirs, order, "s")


@pytest.mark.parametrize("variant, tokenizer, maskgit", [
    ("", "configs/demo.py", "configs/maskgit_imagenet.py:demo"),
    ("smoke", "configs/demo.py:smoke", "configs/maskgit_imagenet.py:smoke"),
])
def test_demo_pipeline_is_the_six_demo_commands(monkeypatch, variant, tokenizer, maskgit):
  from vqjax.train.pipeline import plan

  monkeypatch.chdir(ROOT)  # stage recipes are paths relative to the repository root

  stages = plan(load_config(f"configs/demo_pipeline.py:{variant}"), "/runs/demo")
  assert [(s.name, s.mode, s.spec["config"], s.workdir) for s in stages] == [
      ("tokenizer", "train", tokenizer, "/runs/demo/tokenizer"),
      ("tokens_train", "tokenize", tokenizer, "/runs/demo/tokenizer"),
      ("tokens_val", "tokenize", tokenizer, "/runs/demo/tokenizer"),
      ("maskgit", "train", maskgit, "/runs/demo/maskgit"),
      ("samples", "sample", maskgit, "/runs/demo/maskgit"),
      ("sample_eval", "eval", maskgit, "/runs/demo/maskgit")]
  assert [s.stage_dir for s in stages] == [f"/runs/demo/{s.name}" for s in stages]
  assert stages[2].config.tokenize.split == "validation"
  for s in stages[3:]:
    assert s.config.tokens.dir == "/runs/demo/tokenizer/tokens_train"
    assert s.config.tokens.val_dir == "/runs/demo/tokenizer/tokens_validation"
    assert (s.config.tokenizer.workdir, s.config.tokenizer.config) == (
        "/runs/demo/tokenizer", tokenizer)
  # The markers record the config with the run directory written <DIR>: a moved one matches.
  assert stages[3].identity["config"]["tokens"]["dir"] == "<DIR>/tokenizer/tokens_train"
  assert stages[3].identity == plan(load_config(f"configs/demo_pipeline.py:{variant}"),
                                    "/elsewhere")[3].identity


def test_demo_pipeline_smoke_runs_every_stage_and_a_rerun_skips_them(tmp_path):
  """configs/demo_pipeline.py:smoke end to end: the six stages leave their outputs and
  markers, and running the same command again skips all of them."""
  workdir = tmp_path / "demo"
  env = dict(os.environ, VQJAX_CACHE_DIR=str(tmp_path / "cache"))
  cmd = [sys.executable, "-m", "vqjax.main", "--config=configs/demo_pipeline.py:smoke",
         f"--workdir={workdir}"]
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  stages = ["tokenizer", "tokens_train", "tokens_val", "maskgit", "samples", "sample_eval"]
  for name in stages:
    assert (workdir / name / "stage_finished.json").exists(), name
  assert (workdir / "tokenizer" / "tokens_validation" / "meta.json").exists()
  samples = glob.glob(str(workdir / "maskgit" / "samples" / "samples_*.npz"))
  assert len(samples) == 1 and np.load(samples[0])["images"].dtype == np.uint8
  assert glob.glob(str(workdir / "maskgit" / "eval_*.json"))
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout.count("finished earlier, skipped") == len(stages)
