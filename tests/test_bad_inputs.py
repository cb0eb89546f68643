"""Bad inputs stop `python -m vqjax.main` before anything is compiled: exit status 2, one line on
stderr that says what is wrong and what to do, no traceback, no TensorFlow start-up noise.

The ranged fields come from the same tables the validators check (`vqjax.checks` rules), so
each field with a range or a set of choices is exercised with a value its rule refuses.
"""

import errno
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import ROOT, load_config
from vqjax.checks import parse_rule
from vqjax.errors import ConfigError, WorkdirError

TOKENIZER = "configs/demo.py:smoke"
TRANSFORMER = "configs/maskgit_imagenet.py:smoke"
# The subprocesses must quiet TensorFlow themselves: vqjax.main sets these, not the test.
# The weight files a developer may have set up would hide the errors for missing ones.
_ENV = {k: v for k, v in os.environ.items()
        if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "VQJAX_VGG16_CLASSIFIER",
                     "VQJAX_INCEPTION_LOGITS")}


def bad_value(rule, default) -> str:
  """A command-line value (typed like `default`) that `rule` refuses."""
  r = parse_rule(rule)
  if r.choices is not None:
    return "bogus"
  if r.low is not None and not r.low_closed:
    bad = r.low
  elif r.high is not None and not r.high_closed:
    bad = r.high
  elif r.low is not None:
    bad = r.low - 1
  else:
    bad = r.high + 1
  assert not r.admits(bad), (rule, bad)
  return str(int(bad)) if isinstance(default, int) and not isinstance(default, bool) else repr(
      float(bad))


def rule_cases(spec: str, tables: list[dict]) -> list[tuple[str, str]]:
  """(override key, bad value) for every field of `tables` that the recipe `spec` has."""
  config = load_config(spec)
  cases = []
  for table in tables:
    for where, rules in table.items():
      section = config
      for key in where.split(".") if where else ():  # '': the top-level fields
        section = section[key]
      for name, rule in rules.items():
        if name in section:
          cases.append((f"{where}.{name}" if where else name, bad_value(rule, section[name])))
  return cases


def run_main(args: list[str], workdir: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "vqjax.main", f"--workdir={workdir}", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=240, env=_ENV)


def problems(proc: subprocess.CompletedProcess, expected: str) -> str | None:
  """What is wrong with how `proc` failed (None when it failed as a bad input should)."""
  lines = proc.stderr.strip().splitlines()
  if proc.returncode != 2:
    return f"exit status {proc.returncode}"
  if len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in proc.stderr:
    return f"stderr is not one 'error: ' line: {proc.stderr[-600:]!r}"
  if expected not in lines[0]:
    return f"{expected!r} not in {lines[0]!r}"
  return None


def run_table(cases: list[tuple], tmp_path) -> None:
  """Run each (args, expected text[, workdir]) case, two at a time, and report every one
  that failed; a workdir not given is a fresh path that must not be created."""
  def one(i_case):
    i, (args, expected, *given) = i_case
    workdir = given[0] if given else tmp_path / f"run{i}"
    proc = run_main(args, str(workdir))
    problem = problems(proc, expected)
    if problem is None and not given and os.path.exists(workdir):
      problem = "the workdir was created"
    return None if problem is None else f"{' '.join(args)}: {problem}"

  with ThreadPoolExecutor(2) as pool:
    failures = [f for f in pool.map(one, enumerate(cases)) if f]
  assert not failures, "\n".join(failures)


def _tokenizer_tables():
  from vqjax.data.sources import DATA_RULES
  from vqjax.eval.settings import FID_RULES
  from vqjax.train.tokenizer import TOKENIZER_RULES

  return [TOKENIZER_RULES, {"data": DATA_RULES}, {"eval": FID_RULES}]


def _transformer_tables():
  from vqjax.eval.settings import FID_RULES
  from vqjax.train.transformer import TRANSFORMER_RULES

  return [TRANSFORMER_RULES, {"eval": FID_RULES}]


def test_every_ranged_tokenizer_field_is_one_line(tmp_path):
  cases = rule_cases(TOKENIZER, _tokenizer_tables())
  cases += [("model.encoder.norm_groups", "0"), ("model.decoder.num_res_blocks", "-1"),
            ("disc.ndf", "0"), ("model.quantizer.beta", "-1.0"),
            ("model.quantizer.ema_epsilon", "0.0")]
  assert len(cases) > 40
  run_table([([f"--config={TOKENIZER}", f"--config.{key}={value}"], f"{key}=")
             for key, value in cases], tmp_path)


def test_every_ranged_transformer_field_is_refused_by_its_validator():
  from vqjax.train.transformer import validate_transformer_config

  cases = rule_cases(TRANSFORMER, _transformer_tables())
  assert len(cases) > 30
  for key, value in cases:
    config = load_config(TRANSFORMER)
    section_key, _, name = key.rpartition(".")
    section = config
    for part in section_key.split(".") if section_key else ():
      section = section[part]
    with config.unlocked():
      section[name] = value if value == "bogus" else type(section[name])(float(value))
    with pytest.raises(ConfigError, match=f"{key}="):
      validate_transformer_config(config, 1)


def test_transformer_sections_on_the_command_line(tmp_path):
  """One field of each section of the transformer's table, through `python -m vqjax.main`
  (each run imports TensorFlow with the trainer: every field is the slow test below)."""
  first = {}
  for key, value in rule_cases(TRANSFORMER, _transformer_tables()):
    first.setdefault(key.rsplit(".", 1)[0], (key, value))
  run_table([([f"--config={TRANSFORMER}", f"--config.{key}={value}"], f"{key}=")
             for key, value in first.values()], tmp_path)


@pytest.mark.slow
def test_every_ranged_transformer_field_on_the_command_line(tmp_path):
  run_table([([f"--config={TRANSFORMER}", f"--config.{key}={value}"], f"{key}=")
             for key, value in rule_cases(TRANSFORMER, _transformer_tables())], tmp_path)


def test_bad_files_modes_and_directories_are_one_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  empty = tmp_path / "empty_folder"
  empty.mkdir()
  smoke = f"--config={TOKENIZER}"
  cases = [
      (["--config=configs/does_not_exist.py"], "configs/does_not_exist.py' not found"),
      (["--config=configs/demo.py:smok"], "'smoke'"),
      ([smoke, "--mode=sample"], "--mode=sample does not apply"),
      ([smoke, "--config.train.stepz=5"], 'Did you mean "steps"'),
      ([smoke, "--config.data.source=folder"], "needs data.folder"),
      ([smoke, "--config.data.source=folder", f"--config.data.folder={tmp_path / 'nope'}"],
       "does not exist"),
      ([smoke, "--config.data.source=folder", f"--config.data.folder={empty}"],
       "no .png"),
      ([smoke, "--config.data.source=tfds", f"--config.data.data_dir={tmp_path / 'tfds'}"],
       "tfds build"),
      ([smoke, "--mode=eval"], "no tokenizer checkpoint"),
      ([smoke, "--mode=tokenize"], "no tokenizer checkpoint"),
      ([f"--config={TRANSFORMER}", f"--config.tokens.dir={tmp_path / 'no_tokens'}"],
       "no token store"),
  ]
  for spec in (TOKENIZER, "configs/demo_pipeline.py:smoke"):
    cases += [([f"--config={spec}"], "is a file, not a directory", a_file),
              ([f"--config={spec}"], "which is a file, not a directory", a_file / "run")]
  run_table(cases, tmp_path)


def test_workdir_check(tmp_path, monkeypatch):
  from vqjax.core import workdir as wd

  wd.check_workdir(str(tmp_path))
  wd.check_workdir(str(tmp_path / "new" / "deeper"))
  assert not os.path.exists(tmp_path / "new")  # checked, not created
  with pytest.raises(WorkdirError, match="is empty"):
    wd.check_workdir("")

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(wd.tempfile, "mkstemp", read_only)
  with pytest.raises(WorkdirError, match="cannot write to it: read-only file system"):
    wd.check_workdir(str(tmp_path))
  with pytest.raises(WorkdirError, match="cannot create it inside .*: read-only"):
    wd.check_workdir(str(tmp_path / "new"))


def test_user_errors_and_internal_errors_are_told_apart():
  from vqjax.errors import UserError, WeightsNotFoundError
  from vqjax.eval.feature_stats import FIDError
  from vqjax.main import user_error_message
  from vqjax.weights.numpy_pickle import UnsafePickleError

  for error in (FIDError("x"), UnsafePickleError("x"), WeightsNotFoundError("x")):
    assert isinstance(error, UserError) and user_error_message(error) == "x"
  message = user_error_message(PermissionError(errno.EACCES, "Permission denied", "/runs/a"))
  assert "Permission denied (/runs/a)" in message and "--workdir" in message
  assert user_error_message(RuntimeError("a bug")) is None
  assert user_error_message(OSError(errno.EIO, "I/O error")) is None


def test_json_files_are_valid_json_with_non_finite_values_noted(tmp_path):
  from vqjax.core.writers import write_json

  path = str(tmp_path / "eval.json")
  write_json(path, {"step": 3, "psnr": float("nan"), "fid": np.float32("inf"), "ok": 1.5,
                    "nested": {"kid": -math.inf}, "notes": ["an earlier note"]})
  with open(path) as f:
    text = f.read()

  def refuse(constant):
    raise ValueError(f"{constant} is not JSON")

  payload = json.loads(text, parse_constant=refuse)
  assert payload["psnr"] is None and payload["fid"] is None and payload["nested"]["kid"] is None
  assert payload["ok"] == 1.5 and payload["notes"][0] == "an earlier note"
  assert payload["notes"][1].endswith("written as null: fid, nested.kid, psnr")


def test_eval_grid_shows_only_real_rows():
  from vqjax.eval.evaluator import real_rows_grid

  images = np.stack([np.full((4, 4, 3), v, np.float32) for v in (-1.0, 0.0, 1.0, 1.0)])
  batch = {"image": images, "mask": np.array([1, 1, 1, 0], np.float32)}
  grid = real_rows_grid(batch, images)
  assert grid.shape == (3 * 4, 2 * 4, 3)
  assert real_rows_grid({"image": images, "mask": np.zeros(4, np.float32)}, images) is None
