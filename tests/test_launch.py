"""launch/slurm_gpu.sh and launch/tpu_pod.sh: their dry-run plans, their real-run paths
(with stand-ins for srun, scontrol and gcloud), and vqjax.launch_plan's host lists, all
checked against values worked out by hand. No SLURM, gcloud or accelerator needed."""

import os
import shlex
import socket
import stat
import subprocess
import sys

import pytest

from vqjax import launch_plan
from vqjax.launch_plan import LaunchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sh")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
PY = sys.executable

# A 2-node allocation, 8 GPUs a node, as `sbatch --nodes=2 --gpus-per-node=8` sets it.
SLURM_2X8 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "2",
    "SLURM_NNODES": "2",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "SLURM_GPUS_ON_NODE": "8",
}
# 4242 mod 4096 = 146; 61440 + 146 = 61586 (JAX's SLURM port rule).
SLURM_2X8_LINES = [
    "process 0/2 host=gpu07 coordinator=gpu07:61586 devices=0,1,2,3,4,5,6,7 via=flags "
    "command: python -m vqjax.main --distributed --coordinator=gpu07:61586 "
    "--num_processes=2 --process_id=0 --config=configs/demo.py:smoke --workdir=/ckpt/run 1 "
    "--config.train.steps=5",
    "process 1/2 host=gpu08 coordinator=gpu07:61586 devices=0,1,2,3,4,5,6,7 via=flags "
    "command: python -m vqjax.main --distributed --coordinator=gpu07:61586 "
    "--num_processes=2 --process_id=1 --config=configs/demo.py:smoke --workdir=/ckpt/run 1 "
    "--config.train.steps=5",
]
SLURM_ARGS = ["configs/demo.py:smoke", "/ckpt/run 1", "--config.train.steps=5"]
V4_32_WORKERS = "10.130.0.2,10.130.0.3,10.130.0.4,10.130.0.5"
TPU_ARGS = ["my-tpu", "us-central2-b", "configs/vqgan_imagenet.py", "gs://bucket/run1",
            "--config.train.steps=5"]
TPU_COMMAND = ("python -m vqjax.main --distributed --config=configs/vqgan_imagenet.py "
               "--workdir=gs://bucket/run1 --config.train.steps=5")


@pytest.fixture(scope="module")
def python_bin(tmp_path_factory):
  """A folder whose `python` and `python3` run this interpreter (the scripts' defaults)."""
  folder = tmp_path_factory.mktemp("python_bin")
  for name in ("python", "python3"):
    write_executable(folder / name, f'#!/bin/bash\nexec {PY} "$@"\n')
  return str(folder)


@pytest.fixture
def shell(python_bin):
  def run(script, args, env, path_first=None):
    """`bash script args` from the repository root with only `env`, HOME and PATH set."""
    path = ":".join(filter(None, [path_first, python_bin, "/usr/bin:/bin"]))
    full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=60)
  return run


def with_quoted(line):
  """The plan quotes the command with shlex.join: '/ckpt/run 1' becomes one word."""
  return line.replace("--workdir=/ckpt/run 1", shlex.quote("--workdir=/ckpt/run 1"))


def assert_error(result):
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert result.stdout == ""
  return lines[0]


# --- host lists ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, hosts", [
    ("a[1-3],b5,c[01-02,7]", ["a1", "a2", "a3", "b5", "c01", "c02", "c7"]),
    ("node[01-02,05]", ["node01", "node02", "node05"]),
    ("node001", ["node001"]),
    ("node001,host2", ["node001", "host2"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("x[3]", ["x3"]),
    ("r[1-2]-n[8-9]", ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]),
    ("gpu[07-08]", ["gpu07", "gpu08"]),
])
def test_expand_hostlist(text, hosts):
  assert launch_plan.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "a[1-2", "a]1", "a[1-2]]", "a[x]", "a[3-1]", "a,,b",
                                  "a[[1]]", "[1-2]", "a[1-2],", "a[1 -2]", "a[1-]"])
def test_expand_hostlist_rejects(text):
  with pytest.raises(LaunchError):
    launch_plan.expand_hostlist(text)


def test_hostnames_command():
  ok = subprocess.run([PY, "-m", "vqjax.launch_plan", "hostnames", "a[1-3],b5,c[01-02,7]"],
                      cwd=ROOT, capture_output=True, text=True, timeout=30)
  assert ok.returncode == 0 and ok.stdout.split() == ["a1", "a2", "a3", "b5", "c01", "c02",
                                                      "c7"]
  bad = subprocess.run([PY, "-m", "vqjax.launch_plan", "hostnames", "gpu[07-08"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
  assert "'[' without ']'" in assert_error(bad)


def test_tasks_per_node():
  assert launch_plan.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
  assert launch_plan.expand_tasks_per_node("4") == [4]
  with pytest.raises(LaunchError):
    launch_plan.expand_tasks_per_node("2(3)")


# --- SLURM ----------------------------------------------------------------------------------


def test_slurm_dry_run_two_nodes(shell):
  result = shell(SLURM, ["--dry-run", *SLURM_ARGS], {**SLURM_2X8})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [with_quoted(line) for line in SLURM_2X8_LINES]
  assert result.stderr == ""
  # DRY_RUN=1 is the same as --dry-run; SLURM_TASKS_PER_NODE is optional.
  env = {k: v for k, v in SLURM_2X8.items() if k != "SLURM_TASKS_PER_NODE"}
  again = shell(SLURM, SLURM_ARGS, {**env, "DRY_RUN": "1"})
  assert again.returncode == 0 and again.stdout == result.stdout


def test_slurm_dry_run_port_override_devices_and_tasks_per_node(shell):
  env = {"SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "a[1-2],b5", "SLURM_NTASKS": "4",
         "SLURM_TASKS_PER_NODE": "2,1(x2)", "SLURM_JOB_GPUS": "4,5",
         "VQJAX_COORDINATOR_PORT": "12345", "PYTHON": "python3"}
  result = shell(SLURM, ["--dry-run", "c.py", "w"], env)
  assert result.returncode == 0, result.stderr
  expected = [(0, "a1"), (1, "a1"), (2, "a2"), (3, "b5")]
  assert result.stdout.splitlines() == [
      f"process {i}/4 host={host} coordinator=a1:12345 devices=4,5 via=flags command: "
      f"python3 -m vqjax.main --distributed --coordinator=a1:12345 --num_processes=4 "
      f"--process_id={i} --config=c.py --workdir=w" for i, host in expected]
  # No GPU variable at all: the task sees whatever the node has.
  env = {"SLURM_JOB_ID": "4096", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1",
         "PYTHON": "python"}
  result = shell(SLURM, ["--dry-run", "c.py", "w"], env)
  assert result.stdout.startswith("process 0/1 host=n1 coordinator=n1:61440 devices=all ")


@pytest.mark.parametrize("drop, message", [
    ("SLURM_JOB_ID", "SLURM_JOB_ID is not set"),
    ("SLURM_JOB_NODELIST", "SLURM_JOB_NODELIST or SLURM_NODELIST is not set"),
    ("SLURM_NTASKS", "SLURM_NTASKS is not set"),
])
def test_slurm_dry_run_missing_variable(drop, message, shell):
  env = {k: v for k, v in SLURM_2X8.items() if k != drop}
  assert message in assert_error(shell(SLURM, ["--dry-run", *SLURM_ARGS], env))


@pytest.mark.parametrize("change, message", [
    ({"SLURM_JOB_NODELIST": "gpu[07-08"}, "cannot parse the node list"),
    ({"SLURM_JOB_NODELIST": "gpu[08-07]"}, "runs backwards"),
    ({"SLURM_NNODES": "3"}, "SLURM_NNODES=3"),
    ({"SLURM_JOB_ID": "x1"}, "SLURM_JOB_ID='x1'"),
    ({"VQJAX_COORDINATOR_PORT": "70000"}, "VQJAX_COORDINATOR_PORT"),
    ({"SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": ""}, "does not divide evenly"),
])
def test_slurm_dry_run_bad_input(change, message, shell):
  assert message in assert_error(shell(SLURM, ["--dry-run", *SLURM_ARGS],
                                       {**SLURM_2X8, **change}))


def test_slurm_usage_and_outside_allocation(shell):
  assert "usage:" in assert_error(shell(SLURM, ["--dry-run", "only-config"], SLURM_2X8))
  assert "--coordinator=h:1 is set by the launcher" in assert_error(
      shell(SLURM, ["--dry-run", "c.py", "w", "--coordinator=h:1"], SLURM_2X8))
  # Not a dry run and not inside an allocation: no srun is tried.
  assert "not inside a SLURM allocation" in assert_error(shell(SLURM, ["c.py", "w"], {}))


def write_executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


@pytest.fixture
def fake_tools(tmp_path):
  """A bin/ folder with srun (runs each task of SLURM_NTASKS in turn, with the variables
  srun gives a task), scontrol and gcloud (both log their arguments), and a `python` that
  logs vqjax.main commands instead of training (FAKE_STATUS is their exit status)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "log"
  write_executable(bin_dir / "srun", f"""#!/bin/bash
hosts=($({PY} -m vqjax.launch_plan hostnames "$SLURM_JOB_NODELIST"))
worst=0
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURMD_NODENAME=${{hosts[$i]}} \\
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 "$@" || {{ s=$?; (( s > worst )) && worst=$s; }}
done
exit $worst
""")
  write_executable(bin_dir / "scontrol", f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
  write_executable(bin_dir / "gcloud", f"""#!/bin/bash
echo "gcloud $*" >> {log}
case "$*" in
  *describe*acceleratorType*) echo v4-32 ;;
  *describe*networkEndpoints*) echo '10.0.0.2;10.0.0.3;10.0.0.4;10.0.0.5' ;;
  *ssh*) printf '%s\\n' "$@" > {tmp_path / "ssh_args"} ;;
esac
""")
  python = write_executable(tmp_path / "python", f"""#!/bin/bash
if [[ "$1 $2" == "-m vqjax.main" ]]; then
  echo "TRAIN $*" >> {log}
  exit "${{FAKE_STATUS:-0}}"
fi
exec {PY} "$@"
""")
  return {"bin": str(bin_dir), "log": log, "python": python, "ssh_args": tmp_path / "ssh_args"}


@pytest.mark.parametrize("status", [0, 75])
def test_slurm_run_passes_each_task_its_flags_and_requeues_on_75(fake_tools, status, shell):
  env = {**SLURM_2X8, "PYTHON": fake_tools["python"], "FAKE_STATUS": str(status)}
  result = shell(SLURM, SLURM_ARGS, env, path_first=fake_tools["bin"])
  assert result.returncode == status, result.stderr
  python = fake_tools["python"]
  # Each task prints its plan line (the dry run's, with the task's own GPUs), then runs it.
  assert result.stdout.splitlines() == [
      with_quoted(line).replace("command: python", f"command: {python}")
      for line in SLURM_2X8_LINES]
  log = fake_tools["log"].read_text().splitlines()
  train = [line for line in log if line.startswith("TRAIN")]
  assert train == [
      f"TRAIN -m vqjax.main --distributed --coordinator=gpu07:61586 --num_processes=2 "
      f"--process_id={i} --config=configs/demo.py:smoke --workdir=/ckpt/run 1 "
      "--config.train.steps=5" for i in (0, 1)]
  requeues = [line for line in log if line.startswith("scontrol")]
  assert requeues == (["scontrol requeue 4242"] if status == 75 else [])


def test_slurm_command_is_accepted_by_vqjax_main(tmp_path, shell):
  """The command planned for a 1-process allocation parses with vqjax.main's own flag
  parser and joins (as the only process) the coordinator it names."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "1",
         "VQJAX_COORDINATOR_PORT": str(port)}
  result = shell(SLURM, ["--dry-run", "configs/demo.py:smoke", str(tmp_path / "run"),
                         "--config.train.steps=3", "--init_timeout=30"], env)
  assert result.returncode == 0, result.stderr
  (line,) = result.stdout.splitlines()
  command = shlex.split(line.split(" command: ", 1)[1])
  assert command[:3] == ["python", "-m", "vqjax.main"]
  check = """
import sys
from vqjax import main
main.parse_flags(["vqjax.main", *sys.argv[1:]])
print(main._DISTRIBUTED.value, main._COORDINATOR.value, main._NUM_PROCESSES.value,
      main._PROCESS_ID.value, main._INIT_TIMEOUT.value, main._CONFIG.value.train.steps)
main.initialize_distributed(main._COORDINATOR.value, main._NUM_PROCESSES.value,
                            main._PROCESS_ID.value, main._INIT_TIMEOUT.value)
import jax
print(jax.process_count(), jax.process_index())
"""
  ran = subprocess.run([PY, "-c", check, *command[3:]], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert ran.returncode == 0, ran.stderr
  assert ran.stdout.splitlines() == [f"True localhost:{port} 1 0 30 3", "1 0"]


# --- TPU ------------------------------------------------------------------------------------


def test_tpu_dry_run_v4_32(shell):
  result = shell(TPU, ["--dry-run", "--accelerator-type=v4-32", f"--workers={V4_32_WORKERS}",
                       *TPU_ARGS], {})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"process {i}/4 host=10.130.0.{i + 2} coordinator=10.130.0.2:8482 devices=0,1,2,3 "
      f"via=jax-tpu-autodetect command: {TPU_COMMAND}" for i in range(4)]
  # The same from the environment, the flags spelt with a space.
  again = shell(TPU, ["--dry-run", *TPU_ARGS],
                {"VQJAX_TPU_TYPE": "v4-32", "VQJAX_TPU_WORKERS": V4_32_WORKERS})
  assert again.returncode == 0 and again.stdout == result.stdout
  spaced = shell(TPU, ["--dry-run", "--accelerator-type", "v4-32", "--workers",
                       V4_32_WORKERS.replace(",", ";"), *TPU_ARGS], {})
  assert spaced.returncode == 0 and spaced.stdout == result.stdout
  # Without worker addresses the hosts are named by worker number.
  named = shell(TPU, ["--dry-run", "--accelerator-type=v4-32", *TPU_ARGS], {})
  assert [line.split(" command:")[0] for line in named.stdout.splitlines()] == [
      f"process {i}/4 host=worker{i} coordinator=worker0:8482 devices=0,1,2,3 "
      "via=jax-tpu-autodetect" for i in range(4)]


@pytest.mark.parametrize("accelerator_type, workers, hosts, per_host", [
    ("v4-8", None, 1, 4),        # 4 chips, one host
    ("v4-32", 4, 4, 4),          # 32 TensorCores = 16 chips
    ("v4-128", None, 16, 4),     # 64 chips
    ("v5p-16", None, 2, 4),      # 8 chips
    ("v3-32", None, 4, 8),       # 32 TensorCores, each a device, 8 per host
    ("v2-8", None, 1, 8),
    ("v5litepod-1", None, 1, 1),
    ("v5litepod-8", None, 1, 8),
    ("v5litepod-16", 4, 4, 4),   # 16 chips over 4 VMs
    ("v5litepod-256", 32, 32, 8),
])
def test_tpu_hosts(accelerator_type, workers, hosts, per_host):
  assert launch_plan.tpu_hosts(accelerator_type, workers) == (hosts, per_host)


@pytest.mark.parametrize("accelerator_type, workers, message", [
    ("v9-8", None, "unknown TPU accelerator type 'v9-8'"),
    ("v4-12", None, "a multiple of 8"),
    ("v5litepod-2", None, "1, 4, 8, 16"),
    ("v5litepod-16", None, "give the worker addresses"),
    ("v5litepod-16", 3, "do not split into 3 VMs"),
    ("v4-32", 3, "lists 3 worker(s) but a v4-32 has 4 host(s)"),
])
def test_tpu_hosts_rejects(accelerator_type, workers, message):
  with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
    launch_plan.tpu_hosts(accelerator_type, workers)


def test_tpu_bad_input(shell):
  assert "unknown TPU accelerator type 'v9-8'" in assert_error(
      shell(TPU, ["--dry-run", "--accelerator-type=v9-8", *TPU_ARGS], {}))
  assert "lists 3 worker(s)" in assert_error(
      shell(TPU, ["--dry-run", "--accelerator-type=v4-32", "--workers=a,b,c", *TPU_ARGS], {}))
  assert "needs the accelerator type" in assert_error(shell(TPU, ["--dry-run", *TPU_ARGS], {}))
  assert "usage:" in assert_error(shell(TPU, ["--dry-run", "my-tpu", "zone"], {}))
  assert "unknown option --bogus" in assert_error(shell(TPU, ["--bogus", *TPU_ARGS], {}))


def test_tpu_run_reads_the_slice_and_runs_one_command_on_all_workers(fake_tools, shell):
  result = shell(TPU, TPU_ARGS, {}, path_first=fake_tools["bin"])
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"process {i}/4 host=10.0.0.{i + 2} coordinator=10.0.0.2:8482 devices=0,1,2,3 "
      f"via=jax-tpu-autodetect command: {TPU_COMMAND}" for i in range(4)]
  assert fake_tools["ssh_args"].read_text().splitlines() == [
      "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all",
      f"--command={TPU_COMMAND}"]
  # An override with a space stays one word on the workers.
  result = shell(TPU, [*TPU_ARGS, "--config.name=a b"], {}, path_first=fake_tools["bin"])
  command = fake_tools["ssh_args"].read_text().splitlines()[-1].split("=", 1)[1]
  assert shlex.split(command)[-1] == "--config.name=a b"
