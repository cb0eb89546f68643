"""Multi-process runs on this machine: P processes joined by jax.distributed on localhost
(CPU collectives over Gloo), each with fake CPU devices, against one process holding all
the devices. One pipeline runs every multi-process path: tokenizer training with
checkpoints, --mode=eval, --mode=tokenize and GPT training on the tokens.

The 2-process run is killed (process 1, SIGKILL) after its first checkpoint: process 0
must stop by itself, and the rerun of the same command resumes and ends bitwise where an
uninterrupted 2-process run ends, and close to the 1-process run (see `compare_close`).
Slow: `make test-slow` (about 10 minutes on 2 cores).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT as REPO

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

DEVICES = 4  # in every run: 1 process x 4, 2 x 2, 4 x 1
TOKENIZER_STEPS = 8
GPT_STEPS = 4
PIPELINE = f'''
from vqjax.train.pipeline import pipeline_config, stage


def get_config(arg=None):
  tok = "configs/demo.py:smoke"
  tok_over = {{"train.steps": {TOKENIZER_STEPS}, "train.checkpoint_every": 2,
              "train.image_every": 4, "eval.at_start": False, "eval.every_steps": 0}}
  on_tokens = {{"tokenizer.config": tok, "tokenizer.workdir": "{{tokenizer}}",
               "tokens.dir": "{{tokenizer}}/tokens_train", "eval.grid_images": 0,
               "eval.every_steps": 0, "train.steps": {GPT_STEPS}, "train.batch_size": 8}}
  return pipeline_config(
      stage("tokenizer", tok, overrides=tok_over),
      stage("eval", tok, mode="eval", workdir="{{tokenizer}}", overrides=tok_over),
      stage("tokens", tok, mode="tokenize", workdir="{{tokenizer}}", overrides=tok_over),
      stage("gpt", "configs/ar_imagenet.py:smoke", overrides=on_tokens),
  )
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


HEARTBEAT_S = 15


def start(config: Path, workdir: Path, processes: int, tag: str, extra=()) -> list:
  """Start `processes` copies of vqjax.main (DEVICES / processes fake devices each);
  returns [(Popen, log path)]."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // processes}"}
  port = free_port()
  started = []
  for i in range(processes):
    cmd = [sys.executable, "-m", "vqjax.main", f"--config={config}", f"--workdir={workdir}",
           *extra]
    if processes > 1:
      cmd += ["--distributed", f"--coordinator=localhost:{port}",
              f"--num_processes={processes}", f"--process_id={i}", "--init_timeout=120",
              f"--heartbeat_timeout={HEARTBEAT_S}"]
    log = workdir.parent / f"{workdir.name}_{tag}_{i}.log"
    with open(log, "w") as f:
      started.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                       stderr=subprocess.STDOUT), log))
  pids = workdir.parent / f"{workdir.name}_pids.json"  # process index -> pids of its starts
  known = json.loads(pids.read_text()) if pids.exists() else {}
  for i, (proc, _) in enumerate(started):
    known.setdefault(str(i), []).append(proc.pid)
  pids.write_text(json.dumps(known))
  return started


def finish(started: list, timeout: float = 1500) -> list[int]:
  """Wait for every process (killing all of them after `timeout` s); their exit codes."""
  deadline = time.monotonic() + timeout
  codes = []
  for proc, log in started:
    try:
      codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      for p, _ in started:
        p.kill()
      pytest.fail(f"a process did not finish within {timeout} s; log: {log.read_text()[-3000:]}")
  return codes


def run(config: Path, workdir: Path, processes: int, tag: str = "run") -> None:
  started = start(config, workdir, processes, tag)
  codes = finish(started)
  for code, (_, log) in zip(codes, started, strict=True):
    assert code == 0, log.read_text()[-5000:]


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.getbasetemp() / "multiprocess_pipeline.py"
  path.write_text(PIPELINE)
  return path


@pytest.fixture(scope="module")
def one_process(pipeline_file, tmp_path_factory) -> Path:
  workdir = tmp_path_factory.getbasetemp() / "multiprocess_one"
  run(pipeline_file, workdir, 1)
  return workdir


@pytest.fixture(scope="module")
def two_processes(pipeline_file, tmp_path_factory) -> Path:
  workdir = tmp_path_factory.getbasetemp() / "multiprocess_two_straight"
  run(pipeline_file, workdir, 2)
  return workdir


@pytest.fixture(scope="module")
def two_processes_killed_and_resumed(pipeline_file, tmp_path_factory) -> dict:
  """The 2-process pipeline; process 1 is killed once the first checkpoint exists, then
  the same command runs again."""
  workdir = tmp_path_factory.getbasetemp() / "multiprocess_two"
  started = start(pipeline_file, workdir, 2, "killed")
  first = workdir / "tokenizer" / "checkpoints" / "2"
  deadline = time.monotonic() + 1200
  while not first.exists():
    assert time.monotonic() < deadline, started[0][1].read_text()[-3000:]
    assert started[0][0].poll() is None, started[0][1].read_text()[-3000:]
    time.sleep(0.1)
  started[1][0].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  survivor_code = finish(started[:1], timeout=300)[0]
  info = {"survivor_code": survivor_code, "survivor_seconds": time.monotonic() - killed_at,
          "survivor_log": started[0][1].read_text()}
  run(pipeline_file, workdir, 2, "resumed")
  return {**info, "workdir": workdir}


def restore(path: Path) -> dict:
  """A checkpoint's arrays on this process's first device (saved with any topology)."""
  import jax
  import orbax.checkpoint as ocp

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    tree = c.metadata(path.absolute()).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree)
    return c.restore(path.absolute(), target)


def leaves(workdir: Path, run: str, step: int, collection: str | None = None) -> dict:
  import jax

  tree = restore(workdir / run / "checkpoints" / f"{step}/state")
  tree = tree[collection] if collection else tree
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def lr_of(workdir: Path, run: str) -> float:
  return json.loads((workdir / run / "config.json").read_text())["optim"]["lr"]


def token_maps(workdir: Path) -> tuple[np.ndarray, np.ndarray, list]:
  from vqjax.data.tokens import TokenStore

  s = TokenStore(str(workdir / "tokenizer" / "tokens_train"))
  return (np.stack([s[i]["tokens"] for i in range(len(s))]),
          np.array([s[i]["label"] for i in range(len(s))]), s.meta["shards"])


def eval_json(workdir: Path) -> dict:
  """The eval stage's metrics (its wall time left out)."""
  out = json.loads((workdir / "tokenizer" / f"eval_{TOKENIZER_STEPS}.json").read_text())
  out.pop("seconds", None)
  return out


def written_files(workdir: Path) -> set[str]:
  """Files outside checkpoints (whose per-process parts are Orbax's), events by count."""
  out = set()
  for p in workdir.rglob("*"):
    rel = p.relative_to(workdir).as_posix()
    if p.is_file() and "/checkpoints/" not in f"/{rel}" and not rel.endswith(".log"):
      out.add("events" if "tfevents" in p.name else rel)
  return out


def compare_exact(a: Path, b: Path) -> None:
  """Two runs with the same processes and devices: bitwise the same results."""
  for run, step in (("tokenizer", TOKENIZER_STEPS), ("gpt", GPT_STEPS)):
    la, lb = leaves(a, run, step), leaves(b, run, step)
    assert la.keys() == lb.keys() and len(la) > 10
    for key in la:
      np.testing.assert_array_equal(lb[key], la[key], err_msg=f"{run}: {key}")
  for x, y in zip(token_maps(a), token_maps(b), strict=True):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert eval_json(a) == eval_json(b)


def compare_close(one: Path, many: Path) -> None:
  """A P-process run against the 1-process run on the same global batches.

  Not bitwise: the cross-process all-reduce adds the devices' partial gradients in another
  order, and Adam turns the rounding differences of near-zero gradients (e.g. attention key
  biases, whose true gradient is 0) into full steps of up to lr. So every parameter is
  within 2 x lr x steps (both runs moving up to lr per step in opposite directions), the
  eval metrics within 2%, and the tokens nearly all the same.
  """
  for run, step in (("tokenizer", TOKENIZER_STEPS), ("gpt", GPT_STEPS)):
    la, lb = leaves(one, run, step, "params"), leaves(many, run, step, "params")
    assert la.keys() == lb.keys() and len(la) > 10
    bound = 2 * lr_of(one, run) * step
    for key in la:
      np.testing.assert_allclose(lb[key], la[key], rtol=0, atol=bound, err_msg=f"{run}: {key}")
  (t1, l1, shards1), (t2, l2, shards2) = token_maps(one), token_maps(many)
  assert t1.shape == t2.shape and (t1 == t2).mean() > 0.9
  np.testing.assert_array_equal(l2, l1)  # the same examples, in the same order
  assert shards1 == shards2  # counts and source positions
  a, b = eval_json(one), eval_json(many)
  assert a.keys() == b.keys() and a["num_examples"] == b["num_examples"]
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=0.02, atol=0.02, err_msg=key)
  # Only process 0 writes event files, images and JSON: the same files as one process,
  # and every event file from a process-0 pid (its name ends in <host>.<pid>.<n>.v2).
  assert written_files(many) == written_files(one)
  primary = set(json.loads((many.parent / f"{many.name}_pids.json").read_text())["0"])
  events = [p for p in many.rglob("*") if "tfevents" in p.name]
  assert events and all(int(p.name.split(".")[-3]) in primary for p in events)


def test_two_processes_equal_one_after_a_kill_and_resume(one_process, two_processes,
                                                         two_processes_killed_and_resumed):
  r = two_processes_killed_and_resumed
  # The survivor stopped by itself: at its next collective (one line, status 75) or when
  # the coordination service missed the dead process's heartbeats (it aborts: 134).
  log = r["survivor_log"]
  assert r["survivor_seconds"] < HEARTBEAT_S + 45, log[-3000:]
  if r["survivor_code"] == 75:
    assert "error: another process of this run failed" in log
  else:
    assert r["survivor_code"] in (-signal.SIGABRT, 134) and "stopped sending heartbeats" in log
  compare_exact(two_processes, r["workdir"])  # the resume continued exactly
  compare_close(one_process, r["workdir"])


def test_four_processes_equal_one(one_process, pipeline_file, tmp_path_factory):
  workdir = tmp_path_factory.getbasetemp() / "multiprocess_four"
  run(pipeline_file, workdir, 4)
  compare_close(one_process, workdir)
