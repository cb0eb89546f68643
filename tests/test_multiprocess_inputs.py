"""Bad multi-process input: one line on stderr, exit status 2, and no process left running."""

import os
import socket
import subprocess
import sys

from conftest import ROOT

SMOKE = "configs/demo.py:smoke"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def main_command(workdir, *args):
  return [sys.executable, "-m", "vqjax.main", f"--config={SMOKE}", f"--workdir={workdir}",
          *args]


def env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def one_error_line(proc) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
  proc = subprocess.run(
      main_command(tmp_path, "--distributed", f"--coordinator=localhost:{free_port()}",
                   "--num_processes=2", "--process_id=1", "--init_timeout=2"),
      cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=120)
  line = one_error_line(proc)
  assert "could not be reached within 2 s" in line and "process 1 of 2" in line


def test_partial_or_out_of_range_process_flags(tmp_path):
  for args, expected in [
      (["--coordinator=localhost:1234"], "go together"),
      (["--coordinator=localhost:1234", "--num_processes=2", "--process_id=2"],
       "--process_id=2 must be in 0..1"),
  ]:
    proc = subprocess.run(main_command(tmp_path, "--distributed", *args), cwd=ROOT, env=env(1),
                          capture_output=True, text=True, timeout=120)
    assert expected in one_error_line(proc)


def test_batch_that_two_processes_cannot_split_stops_both(tmp_path):
  port = free_port()
  procs = [subprocess.Popen(
      main_command(tmp_path, "--config.train.batch_size=6", "--distributed",
                   f"--coordinator=localhost:{port}", "--num_processes=2",
                   f"--process_id={i}", "--init_timeout=60"),
      cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    p.stdout_text, p.stderr = p.communicate(timeout=240)
  for p in procs:
    line = one_error_line(p)
    assert "train.batch_size=6" in line and "2 process(es)" in line and "multiple of 4" in line
  assert not (tmp_path / "checkpoints").exists()
