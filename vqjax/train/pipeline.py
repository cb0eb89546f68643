"""Staged recipes: a config whose `stages` run one after another under one --workdir.

A pipeline recipe returns `pipeline_config(stage(...), ...)`, e.g.

  stage("tokenizer", "configs/demo.py"),
  stage("tokens_train", "configs/demo.py", mode="tokenize", workdir="{tokenizer}"),
  stage("maskgit", "configs/maskgit_imagenet.py:demo",
        overrides={"tokens.dir": "{tokenizer}/tokens_train"}),

Stage fields: `name` (letters, digits, `_`, `-`), `config` (a recipe spec
`path.py[:variant]`), `mode` (train, eval, tokenize, sample, visualize;
default train), `workdir` (where the mode runs; default `<DIR>/<name>`) and
`overrides` (dotted config key -> value). In `workdir` and in string override
values (also inside lists and tuples) `{name}` stands for the directory an
earlier stage ran in, so `"{tokenizer}/tokens_train"` is
`<DIR>/tokenizer/tokens_train`; `{{` and `}}` are literal braces.

`plan` checks the whole pipeline before stage 1 runs: the stage fields,
references, each stage's recipe loaded with its overrides applied and
validated for its mode, and the markers of finished stages. A stage that
ends normally gets `<DIR>/<name>/stage_finished.json` (written atomically):
its spec as written, its resolved config with the --workdir written `<DIR>`
(so a moved run directory still matches), and a digest of the stages before
it. A rerun skips a finished stage, or stops with a PipelineError when its
spec, resolved config or an earlier stage has changed since; an unfinished
stage is run again and resumes (the trainers from their checkpoints,
--mode=tokenize from its store). A SIGTERM/SIGINT during a training stage
makes the trainer save and return early: that stage is not marked and the
pipeline stops with PipelineStopped (a `modes.RunStopped`: exit status 75).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import re
import string

import ml_collections

from vqjax.console import console
from vqjax.core.config_files import load_config_file
from vqjax.errors import ConfigError
from vqjax.train.modes import RunStopped

MARKER = "stage_finished.json"
STAGE_FIELDS = ("name", "config", "mode", "workdir", "overrides")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ROOT_PLACEHOLDER = "<DIR>"


class PipelineError(ConfigError):
  """A pipeline that cannot run as written, or that disagrees with what DIR already holds."""


class PipelineStopped(RunStopped):
  """A signal stopped a stage before it finished; rerunning the command resumes it."""


def stage(name: str, config: str, mode: str = "train", workdir: str = "",
          overrides: dict | None = None) -> ml_collections.ConfigDict:
  """One stage of a pipeline recipe (fields as in the module docstring).

  `overrides` is stored as a tuple of (dotted key, value) pairs: a ConfigDict
  cannot hold dotted keys.
  """
  return ml_collections.ConfigDict({
      "name": name, "config": config, "mode": mode, "workdir": workdir,
      "overrides": tuple((overrides or {}).items())})


def pipeline_config(*stages: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The locked config of a pipeline recipe: `trainer='pipeline'` and its `stages` in order."""
  c = ml_collections.ConfigDict()
  c.trainer = "pipeline"
  c.stages = list(stages)
  c.lock()
  return c


@dataclasses.dataclass
class Stage:
  """One stage, checked and resolved against a --workdir."""
  index: int  # 1-based position in the pipeline
  total: int
  name: str
  spec: dict  # as written: name, config, mode, workdir, overrides (key -> value)
  config: ml_collections.ConfigDict  # the stage's recipe with its overrides applied
  workdir: str  # where its mode runs
  stage_dir: str  # <DIR>/<name>: holds the marker
  identity: dict  # what the marker records and a rerun compares (JSON values)
  upstream: str  # digest of the identities of the stages before it
  finished: bool = False

  @property
  def mode(self) -> str:
    return self.spec["mode"]

  @property
  def label(self) -> str:
    return f"stage {self.index}/{self.total} {self.name!r} ({self.spec['config']})"

  @property
  def marker(self) -> str:
    return os.path.join(self.stage_dir, MARKER)


def _stage_specs(config) -> list[dict]:
  """The stages of a pipeline config as plain dicts, their fields and names checked."""
  stages = config.get("stages")
  if not isinstance(stages, (list, tuple)) or not stages:
    raise PipelineError("config.stages must list the pipeline's stages "
                        "(see vqjax.train.pipeline.stage).")
  specs, names = [], set()
  for i, raw in enumerate(stages, 1):
    if not isinstance(raw, (dict, ml_collections.ConfigDict)):
      raise PipelineError(f"config.stages[{i - 1}] is a {type(raw).__name__}, not a stage "
                          "(see vqjax.train.pipeline.stage).")
    fields = {k: raw[k] for k in raw.keys()}
    for key in fields:
      if key not in STAGE_FIELDS:
        near = difflib.get_close_matches(key, STAGE_FIELDS, n=1)
        raise PipelineError(f"config.stages[{i - 1}] has no field {key!r}"
                            + (f"; did you mean {near[0]!r}?" if near else "")
                            + f" Stage fields: {STAGE_FIELDS}.")
    name = fields.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise PipelineError(f"config.stages[{i - 1}].name={name!r}: a stage name is a directory "
                          "name of letters, digits, '_' and '-'.")
    if name in names:
      raise PipelineError(f"two stages are named {name!r}: each stage needs its own name.")
    names.add(name)
    if not isinstance(fields.get("config"), str) or not fields["config"]:
      raise PipelineError(f"stage {name!r} has no config (a recipe spec 'configs/x.py:variant').")
    overrides = {}
    for pair in fields.get("overrides") or ():
      if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
        raise PipelineError(f"stage {name!r}: overrides must be (dotted key, value) pairs, as "
                            f"vqjax.train.pipeline.stage stores them; got {pair!r}.")
      overrides[pair[0]] = pair[1]
    specs.append({"name": name, "config": fields["config"],
                  "mode": fields.get("mode") or "train", "workdir": fields.get("workdir") or "",
                  "overrides": overrides})
  return specs


def resolve(value, dirs: dict[str, str], order: list[str], where: str):
  """`value` with each `{stage}` in its strings replaced by that stage's directory.

  `dirs` holds the stages before the current one; `order` lists all stage names,
  so a reference to a later stage is told apart from a misspelt one.
  """
  if isinstance(value, (list, tuple)):
    return type(value)(resolve(v, dirs, order, where) for v in value)
  if not isinstance(value, str):
    return value
  try:
    parts = list(string.Formatter().parse(value))
  except ValueError as e:
    raise PipelineError(
        f"{where}: {value!r}: {e} (write {{{{ and }}}} for literal braces).") from None
  out = []
  for literal, field, format_spec, conversion in parts:
    out.append(literal)
    if field is None:
      continue
    if field not in dirs:
      if field in order:
        raise PipelineError(
            f"{where}: {value!r} refers to {{{field}}}, stage {order.index(field) + 1}, which "
            "does not run before it: a stage can only use the directories of earlier stages.")
      raise PipelineError(f"{where}: {value!r} refers to {{{field}}}, which is not a stage; "
                          f"the stages before it are {list(dirs)}.")
    if format_spec or conversion:
      raise PipelineError(f"{where}: {value!r}: a reference is just {{{field}}}, with no "
                          "format or conversion.")
    out.append(dirs[field])
  return "".join(out)


def _dotted_keys(node, prefix: str = ""):
  for key in node.keys():
    yield prefix + key
    if isinstance(node[key], ml_collections.ConfigDict):
      yield from _dotted_keys(node[key], f"{prefix}{key}.")


def apply_override(config: ml_collections.ConfigDict, key: str, value, where: str) -> None:
  """Set the existing field `key` (dotted) of `config` to `value`; PipelineError otherwise."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      near = difflib.get_close_matches(key, list(_dotted_keys(config)), n=1, cutoff=0.6)
      raise PipelineError(f"{where}: override key {key!r} does not exist in its config"
                          + (f"; did you mean {near[0]!r}?" if near else "."))
    if i < len(parts) - 1:
      node = node[part]
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError, AttributeError) as e:
    raise PipelineError(f"{where}: override {key}={value!r}: {e}") from None


def _load_stage(spec: dict, where: str, dirs: dict[str, str], order: list[str],
                root: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the stage's config with overrides applied, the directory its mode runs in) under `root`."""
  from vqjax.train import modes

  workdir = (resolve(spec["workdir"], dirs, order, f"{where} workdir") if spec["workdir"]
             else os.path.join(root, spec["name"]))
  try:
    config = load_config_file(spec["config"])
  except ValueError as e:  # ConfigError (file not found) or the recipe's unknown variant
    raise PipelineError(f"{where}: {e}") from None
  if config.get("trainer") == "pipeline":
    raise PipelineError(f"{where}: is itself a pipeline; a stage runs a tokenizer or "
                        "transformer recipe.")
  try:
    modes.check_mode(config, spec["mode"])
  except ConfigError as e:
    raise PipelineError(f"{where}: {e}") from None
  for key, value in spec["overrides"].items():
    apply_override(config, key, resolve(value, dirs, order, f"{where} override {key}"), where)
  return config, workdir


def _as_json(value):
  """`value` as JSON would give it back (tuples become lists, odd types their repr)."""
  return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _flat(d, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _differences(old: dict, new: dict, limit: int = 4) -> str:
  """'a.b: 1 -> 2, ...' for the leaves that differ between two nested dicts."""
  old, new = _flat(old), _flat(new)
  show = lambda d, k: repr(d[k]) if k in d else "(absent)"
  changed = [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
             if k not in old or k not in new or old[k] != new[k]]
  more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
  return ", ".join(changed[:limit]) + more


def _check_marker(s: Stage) -> bool:
  """True when `s` finished earlier with the same spec; PipelineError when it differs."""
  if not os.path.exists(s.marker):
    return False
  with open(s.marker) as f:
    record = json.load(f)
  again = (f"to run it again, delete {s.stage_dir} and what it wrote in {s.workdir} (or use a "
           "new --workdir); to keep it, restore the recipe as it was")
  if record.get("identity") != s.identity:
    raise PipelineError(f"{s.label} finished earlier in {s.workdir} with a different spec "
                        f"({_differences(record.get('identity', {}), s.identity)}): {again}.")
  if record.get("upstream") != s.upstream:
    raise PipelineError(f"{s.label} finished earlier after stages that have changed since "
                        f"(a stage before it was added, removed or edited): {again}.")
  return True


def plan(config, workdir: str) -> list[Stage]:
  """Every stage checked and resolved against `workdir`, before any of them runs.

  Raises PipelineError for a bad stage field or name, a reference to an
  unknown or later stage, a recipe that does not load, a mode that does not
  apply, an override key that does not exist, a config its trainer rejects,
  or a finished stage whose marker disagrees with the recipe; WorkdirError
  for a stage directory that cannot be written.
  """
  import jax

  from vqjax.core.workdir import check_workdir
  from vqjax.train import modes

  specs = _stage_specs(config)
  order = [spec["name"] for spec in specs]
  dirs: dict[str, str] = {}
  symbolic_dirs: dict[str, str] = {}
  identities: list[dict] = []
  stages = []
  for index, spec in enumerate(specs, 1):
    where = f"stage {index}/{len(specs)} {spec['name']!r} ({spec['config']})"
    stage_config, run_dir = _load_stage(spec, where, dirs, order, workdir)
    symbolic_config, symbolic_dir = _load_stage(spec, where, symbolic_dirs, order,
                                                _ROOT_PLACEHOLDER)
    try:
      modes.validate_config(stage_config, jax.device_count(), jax.process_count())
    except ConfigError as e:
      raise PipelineError(f"{where}: {e}") from None
    check_workdir(os.path.join(workdir, spec["name"]), f"{where}: stage directory")
    check_workdir(run_dir, f"{where}: workdir")
    identity = _as_json({"spec": spec, "config": symbolic_config.to_dict()})
    stages.append(Stage(index, len(specs), spec["name"], spec, stage_config, run_dir,
                        os.path.join(workdir, spec["name"]), identity, _digest(identities)))
    identities.append(identity)
    dirs[spec["name"]] = run_dir
    symbolic_dirs[spec["name"]] = symbolic_dir
  for s in stages:
    s.finished = _check_marker(s)
  return stages


def _mark_finished(s: Stage) -> None:
  """Write `s`'s marker (atomically, from process 0), then wait for every process."""
  import jax

  from vqjax.core.writers import write_json

  if jax.process_index() == 0:
    os.makedirs(s.stage_dir, exist_ok=True)
    write_json(s.marker, {
        "stage": s.name, "index": s.index, "of": s.total, "workdir": s.workdir,
        "identity": s.identity, "upstream": s.upstream,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"pipeline stage {s.name} finished")


def run_pipeline(config, workdir: str, stop=None) -> list[Stage]:
  """Run the stages of a pipeline config in order, each in its own directory under `workdir`.

  Finished stages are skipped (a line each); the others run in-process through
  `vqjax.train.modes.run_mode` and are marked when they end normally. `stop`
  (a `StopRequest`, one per stage by default) reaches the training stages; when
  a signal sets it, the stage is left unmarked and PipelineStopped is raised.
  Returns the stages.
  """
  from vqjax.train.loop import StopRequest
  from vqjax.train.modes import run_mode

  stages = plan(config, workdir)
  for s in stages:
    if s.finished:
      console(f"pipeline {s.label}: finished earlier, skipped (marker {s.marker})")
      continue
    console(f"pipeline {s.label}: --mode={s.mode} in {s.workdir}; "
          f"{s.total - s.index} stage(s) after it")
    request = stop if stop is not None else StopRequest()
    try:
      run_mode(s.config, s.workdir, s.mode, stop=request)
    except RunStopped:
      raise PipelineStopped(f"{s.label} was stopped by a signal and is not marked finished; "
                            "run the same command again to resume it.") from None
    _mark_finished(s)
  console(f"pipeline finished: {len(stages)} stage(s) in {workdir}")
  return stages
