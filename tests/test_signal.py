"""A real SIGTERM to `python -m vqjax.main` saves a checkpoint, exits 75 (EX_TEMPFAIL), and
resumes."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT


def test_sigterm_saves_and_the_next_run_resumes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-u", "-m", "vqjax.main", "--config=configs/demo.py:smoke",
         f"--workdir={workdir}", "--config.train.steps=100000",
         "--config.train.checkpoint_every=100000", "--config.eval.every_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  deadline = time.time() + 600
  for line in proc.stdout:  # wait until training is under way
    lines.append(line)
    if line.startswith("step ") or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  output = "".join(lines) + out
  assert proc.returncode == 75, output[-3000:]  # EX_TEMPFAIL: stopped after saving
  assert "stopped at step" in output
  assert "stopped: a signal stopped --mode=train" in output and "(exit status 75)" in output
  stopped_at = int(output.split("stopped at step ")[1].split(";")[0])
  assert stopped_at >= 2
  assert os.path.isdir(workdir / "checkpoints" / str(stopped_at))

  resumed = subprocess.run(cmd[:-3] + [f"--config.train.steps={stopped_at + 1}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
  assert f"resumed from checkpoint at step {stopped_at}" in resumed.stdout
