"""Who runs what in a multi-host launch: the per-process plan behind launch/*.sh.

`launch/slurm_gpu.sh` and `launch/tpu_pod.sh` call this module (standard library only, so
it runs wherever the launcher runs) to work out, for every process of an allocation, its
coordinator address, process count and id, host and local devices, and the exact
`python -m vqjax.main` command it runs. With `--dry-run` the scripts print that plan and
stop; without it the SLURM tasks run exactly the command printed for them.

  python -m vqjax.launch_plan hostnames 'gpu[07-08],cpu3'
      one host a line, like `scontrol show hostnames`.
  python -m vqjax.launch_plan slurm [--python=PY] -- --config=C --workdir=W [overrides...]
      the plan of a SLURM allocation, from the batch script's SLURM_* variables.
  python -m vqjax.launch_plan slurm --task [--python=PY] -- ...
      inside one srun task: print this task's line, then exec its command.
  python -m vqjax.launch_plan tpu --accelerator-type=v4-32 [--workers=IP0,IP1,...]
      [--python=PY] [--remote-command] -- ...
      the plan of a TPU VM slice (or, with --remote-command, the one command line that
      every worker runs).

Plan lines (stdout, one per process, in process-id order):

  process I/N host=HOST coordinator=HOST0:PORT devices=D via=V command: CMD

I is the process id (0-based) and N the process count. D lists the local device indices
(`0,1,2,3`; `all` when the allocation does not say). V is `flags` when the command passes
--coordinator/--num_processes/--process_id itself (SLURM), or `jax-tpu-autodetect` when
every worker runs the same command and JAX reads these values from the TPU VM metadata (the
line then shows what JAX will find). CMD is shell-quoted. Bad input (a missing SLURM_*
variable, a node list that does not parse, an unknown TPU type) prints one line starting
`error: ` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence

from vqjax.console import console
from vqjax.errors import UserError

# JAX's SLURM detection (jax/_src/clusters/slurm_cluster.py) puts the coordinator on the
# first host of the step's node list, at a port in the top 2**12 of the port range chosen
# by the job id; the same rule here, so an explicit launch and an auto-detected one agree.
_SLURM_PORT_SPAN = 2**12
_SLURM_PORT_BASE = 65536 - _SLURM_PORT_SPAN  # 61440
# JAX's Cloud TPU detection (jax/_src/clusters/cloud_tpu_cluster.py, `coordinator_port`
# in jax 0.10; older releases used 8476): worker 0's address at this port.
TPU_COORDINATOR_PORT = 8482
# The flags this module sets; an override that sets them too would silently win.
_LAUNCHER_FLAGS = ("distributed", "nodistributed", "coordinator", "num_processes",
                   "process_id")
_MAX_HOSTS = 100_000


class LaunchError(UserError):
  """An allocation or slice that cannot be planned; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Process:
  """One process of a launch: where it runs, what it joins, and the command it runs."""

  process_id: int
  num_processes: int
  host: str
  coordinator: str
  devices: str
  via: str
  command: tuple[str, ...]

  def line(self) -> str:
    return (f"process {self.process_id}/{self.num_processes} host={self.host} "
            f"coordinator={self.coordinator} devices={self.devices} via={self.via} "
            f"command: {shlex.join(self.command)}")


# --- SLURM host lists -------------------------------------------------------------------


def expand_hostlist(text: str) -> list[str]:
  """SLURM's compressed host list -> host names in order (`scontrol show hostnames`).

  `a[1-3],b5,c[01-02,7]` -> a1 a2 a3 b5 c01 c02 c7: comma-separated names, each with
  bracketed groups of numbers and ranges; a range keeps the zero padding of its lower bound
  (`[08-10]` -> 08 09 10). Several groups in one name give every combination, in order.
  """
  if not text or not text.strip():
    raise LaunchError("the node list is empty")
  if any(ch.isspace() for ch in text.strip()):
    raise LaunchError(f"cannot parse the node list {text!r}: it contains white space")
  hosts: list[str] = []
  for item in _split_names(text.strip()):
    hosts.extend(_expand_name(item, text))
    if len(hosts) > _MAX_HOSTS:
      raise LaunchError(f"the node list {text!r} names more than {_MAX_HOSTS} hosts")
  return hosts


def _split_names(text: str) -> list[str]:
  """Split at the commas outside brackets; brackets must pair up and not nest."""
  items, start, inside = [], 0, False
  for i, ch in enumerate(text):
    if ch == "[":
      if inside:
        raise LaunchError(f"cannot parse the node list {text!r}: nested '['")
      inside = True
    elif ch == "]":
      if not inside:
        raise LaunchError(f"cannot parse the node list {text!r}: ']' without '['")
      inside = False
    elif ch == "," and not inside:
      items.append(text[start:i])
      start = i + 1
  if inside:
    raise LaunchError(f"cannot parse the node list {text!r}: '[' without ']'")
  items.append(text[start:])
  if not all(items):
    raise LaunchError(f"cannot parse the node list {text!r}: an empty host name")
  return items


def _expand_name(name: str, text: str) -> list[str]:
  # re.split with one group alternates literal text and the contents of the brackets.
  parts = re.split(r"\[([^\[\]]*)\]", name)
  choices = [[part] if k % 2 == 0 else _expand_group(part, text)
             for k, part in enumerate(parts)]
  if not "".join(parts[0::2]):
    raise LaunchError(f"cannot parse the node list {text!r}: {name!r} has no name part")
  count = 1
  for choice in choices:
    count *= len(choice)
  if count > _MAX_HOSTS:
    raise LaunchError(f"the node list {text!r} names more than {_MAX_HOSTS} hosts")
  return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_group(group: str, text: str) -> list[str]:
  out: list[str] = []
  for piece in group.split(","):
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
    if match is None:
      raise LaunchError(f"cannot parse the node list {text!r}: {piece!r} in [{group}] is "
                        "not a number or a range like 01-04")
    low, high = match.group(1), match.group(2) or match.group(1)
    if int(high) < int(low):
      raise LaunchError(f"cannot parse the node list {text!r}: the range {piece!r} runs "
                        "backwards")
    if int(high) - int(low) >= _MAX_HOSTS:
      raise LaunchError(f"the node list {text!r} names more than {_MAX_HOSTS} hosts")
    out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
  return out


def expand_tasks_per_node(text: str) -> list[int]:
  """SLURM_TASKS_PER_NODE (`2(x3),1`) -> tasks on each node in order ([2, 2, 2, 1])."""
  counts: list[int] = []
  for piece in text.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", piece.strip())
    if match is None:
      raise LaunchError(f"cannot parse SLURM_TASKS_PER_NODE={text!r} (expected e.g. "
                        "'2(x3),1')")
    counts.extend([int(match.group(1))] * int(match.group(2) or 1))
  return counts


# --- SLURM plans ------------------------------------------------------------------------


def _get(env: Mapping[str, str], *names: str, what: str = "") -> tuple[str, str]:
  """(name, value) of the first of `names` set (non-empty) in env; a LaunchError if none."""
  for name in names:
    value = env.get(name, "").strip()
    if value:
      return name, value
  listed = " or ".join(names)
  raise LaunchError(f"{listed} is not set{what}: run inside a SLURM allocation (sbatch "
                    "launch/slurm_gpu.sh ...), or set the SLURM_* variables for a dry run")


def _get_int(env: Mapping[str, str], *names: str, what: str = "", low: int = 0) -> int:
  name, value = _get(env, *names, what=what)
  if not value.isdigit() or int(value) < low:
    raise LaunchError(f"{name}={value!r} must be a whole number >= {low}")
  return int(value)


def slurm_coordinator_port(env: Mapping[str, str], job_id: int) -> int:
  """VQJAX_COORDINATOR_PORT if set, else JAX's choice: 61440 + job_id mod 4096."""
  override = env.get("VQJAX_COORDINATOR_PORT", "").strip()
  if override:
    if not override.isdigit() or not 1 <= int(override) <= 65535:
      raise LaunchError(f"VQJAX_COORDINATOR_PORT={override!r} must be a port, 1..65535")
    return int(override)
  return _SLURM_PORT_BASE + job_id % _SLURM_PORT_SPAN


def local_devices(env: Mapping[str, str]) -> str:
  """The GPUs a SLURM task sees: CUDA_VISIBLE_DEVICES, else SLURM_STEP_GPUS, else
  SLURM_JOB_GPUS (comma lists), else 0..SLURM_GPUS_ON_NODE-1; `all` when none is set."""
  for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
    value = env.get(name, "").strip()
    if value:
      return ",".join(part.strip() for part in value.split(",") if part.strip())
  count = env.get("SLURM_GPUS_ON_NODE", "").strip()
  if count:
    if not count.isdigit():
      raise LaunchError(f"SLURM_GPUS_ON_NODE={count!r} must be a whole number")
    return ",".join(str(i) for i in range(int(count))) or "none"
  return "all"


def _check_main_args(main_args: Sequence[str]) -> None:
  for arg in main_args:
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and name in _LAUNCHER_FLAGS:
      raise LaunchError(f"{arg} is set by the launcher (each process gets its own "
                        "--coordinator, --num_processes and --process_id): leave it out")


def _slurm_command(python: str, coordinator: str, num_processes: int, process_id: int,
                   main_args: Sequence[str]) -> tuple[str, ...]:
  return (python, "-m", "vqjax.main", "--distributed", f"--coordinator={coordinator}",
          f"--num_processes={num_processes}", f"--process_id={process_id}", *main_args)


def slurm_plan(env: Mapping[str, str], main_args: Sequence[str],
               python: str = "python") -> list[Process]:
  """Every process of the allocation described by a batch script's SLURM_* variables.

  Tasks fill the nodes in order (SLURM's default block distribution): SLURM_TASKS_PER_NODE
  when set, else SLURM_NTASKS spread evenly. Every process is shown with the devices of
  this environment (the nodes of an --exclusive job are alike).
  """
  _check_main_args(main_args)
  job_id = _get_int(env, "SLURM_JOB_ID")
  list_name, node_list = _get(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
  try:
    nodes = expand_hostlist(node_list)
  except LaunchError as e:
    raise LaunchError(f"{list_name}: {e}") from None
  num_nodes = env.get("SLURM_NNODES", "").strip()
  if num_nodes and num_nodes != str(len(nodes)):
    raise LaunchError(f"SLURM_NNODES={num_nodes} but {list_name}={node_list!r} names "
                      f"{len(nodes)} node(s)")
  num_tasks = _get_int(env, "SLURM_NTASKS", low=1)
  tasks_text = env.get("SLURM_TASKS_PER_NODE", "").strip()
  if tasks_text:
    per_node = expand_tasks_per_node(tasks_text)
    if len(per_node) != len(nodes) or sum(per_node) != num_tasks:
      raise LaunchError(f"SLURM_TASKS_PER_NODE={tasks_text!r} does not fit "
                        f"SLURM_NTASKS={num_tasks} on {len(nodes)} node(s)")
  elif num_tasks % len(nodes) == 0:
    per_node = [num_tasks // len(nodes)] * len(nodes)
  else:
    raise LaunchError(f"SLURM_NTASKS={num_tasks} does not divide evenly over "
                      f"{len(nodes)} node(s): set SLURM_TASKS_PER_NODE")
  coordinator = f"{nodes[0]}:{slurm_coordinator_port(env, job_id)}"
  devices = local_devices(env)
  hosts = [node for node, count in zip(nodes, per_node, strict=True) for _ in range(count)]
  return [Process(i, num_tasks, host, coordinator, devices, "flags",
                  _slurm_command(python, coordinator, num_tasks, i, main_args))
          for i, host in enumerate(hosts)]


def slurm_task(env: Mapping[str, str], main_args: Sequence[str],
               python: str = "python") -> Process:
  """This srun task's process, from the variables srun gives each task (as JAX reads them:
  SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_JOB_ID)."""
  _check_main_args(main_args)
  what = " in this srun task"
  job_id = _get_int(env, "SLURM_JOB_ID", what=what)
  list_name, node_list = _get(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", what=what)
  try:
    first = expand_hostlist(node_list)[0]
  except LaunchError as e:
    raise LaunchError(f"{list_name}: {e}") from None
  num_tasks = _get_int(env, "SLURM_NTASKS", what=what, low=1)
  task = _get_int(env, "SLURM_PROCID", what=what)
  if task >= num_tasks:
    raise LaunchError(f"SLURM_PROCID={task} must be below SLURM_NTASKS={num_tasks}")
  host = env.get("SLURMD_NODENAME", "").strip() or socket.gethostname()
  coordinator = f"{first}:{slurm_coordinator_port(env, job_id)}"
  return Process(task, num_tasks, host, coordinator, local_devices(env), "flags",
                 _slurm_command(python, coordinator, num_tasks, task, main_args))


# --- TPU VM slices ----------------------------------------------------------------------

# Generation -> (what N counts in `GEN-N`, JAX devices per N, devices per TPU VM host).
# Cloud TPU docs: v2/v3 chips have 2 TensorCores, each its own JAX device, 8 per host;
# v4 and v5p chips have 2 TensorCores run as one JAX device (megacore), 4 chips per host
# (v4-8 and v5p-8 are one host); v5e (v5litepod-N) has one TensorCore per chip and N
# chips, in VMs of 1, 4 or 8 chips: v5litepod-1/-4/-8 are one VM, and the larger slices
# (16..256 chips) are planned from their worker list (4 or 8 chips per VM).
_TPU_GENERATIONS = {
    "v2": ("cores", 1, 8),
    "v3": ("cores", 1, 8),
    "v4": ("cores", 2, 4),
    "v5p": ("cores", 2, 4),
    "v5litepod": ("chips", 1, None),
}
_V5E_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
_TPU_TYPES_HELP = ("v2-N, v3-N, v4-N or v5p-N (N TensorCores, a multiple of 8) or "
                   "v5litepod-N (N chips: 1, 4, 8, 16, 32, 64, 128 or 256)")


def parse_workers(text: str) -> list[str]:
  """Worker addresses separated by commas, semicolons (gcloud's list separator) or
  white space."""
  return [w for w in re.split(r"[,;\s]+", text.strip()) if w]


def tpu_hosts(accelerator_type: str, num_workers: int | None = None) -> tuple[int, int]:
  """(hosts, devices per host) of a TPU slice type such as v4-32; `num_workers`, when
  known, must match (and decides the VM size of a multi-host v5litepod slice)."""
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod)-(\d+)", accelerator_type.strip())
  if match is None:
    raise LaunchError(f"unknown TPU accelerator type {accelerator_type!r}: expected "
                      f"{_TPU_TYPES_HELP}")
  generation, size = match.group(1), int(match.group(2))
  unit, per_device, per_host = _TPU_GENERATIONS[generation]
  if unit == "cores":
    if size < 8 or size % 8:
      raise LaunchError(f"unknown TPU accelerator type {accelerator_type!r}: a {generation} "
                        "size counts TensorCores, a multiple of 8 (e.g. "
                        f"{generation}-8, {generation}-32)")
    devices = size // per_device
    hosts = devices // per_host
  elif size not in _V5E_SIZES:
    raise LaunchError(f"unknown TPU accelerator type {accelerator_type!r}: v5litepod "
                      "slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips")
  elif size <= 8:
    hosts, per_host = 1, size
  elif num_workers is None:
    raise LaunchError(f"{accelerator_type} spans several TPU VMs of 4 or 8 chips each: "
                      "give the worker addresses (--workers=IP0,IP1,... or "
                      "VQJAX_TPU_WORKERS) so that the host count is known")
  elif num_workers and size % num_workers == 0 and size // num_workers in (4, 8):
    hosts, per_host = num_workers, size // num_workers
  else:
    raise LaunchError(f"{accelerator_type} has {size} chips, which do not split into "
                      f"{num_workers} VMs of 4 or 8 chips each")
  if num_workers is not None and num_workers != hosts:
    raise LaunchError(f"the slice lists {num_workers} worker(s) but a {accelerator_type} "
                      f"has {hosts} host(s) of {per_host} device(s) each: check the "
                      "accelerator type and the worker list")
  return hosts, per_host


def tpu_command(main_args: Sequence[str], python: str = "python") -> tuple[str, ...]:
  """The one command every worker runs (JAX reads the coordinator and ids itself)."""
  _check_main_args(main_args)
  return (python, "-m", "vqjax.main", "--distributed", *main_args)


def tpu_plan(accelerator_type: str, workers: Sequence[str], main_args: Sequence[str],
             python: str = "python") -> list[Process]:
  """Every worker of a TPU VM slice, as JAX's TPU detection numbers them: worker i is
  process i and worker 0 hosts the coordinator. Without a worker list the hosts are
  named worker0, worker1, ..."""
  hosts, per_host = tpu_hosts(accelerator_type, len(workers) if workers else None)
  names = list(workers) or [f"worker{i}" for i in range(hosts)]
  coordinator = f"{names[0]}:{TPU_COORDINATOR_PORT}"
  devices = ",".join(str(i) for i in range(per_host))
  command = tpu_command(main_args, python)
  return [Process(i, hosts, name, coordinator, devices, "jax-tpu-autodetect", command)
          for i, name in enumerate(names)]


# --- command line -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, status 2, like every other bad input here
    raise LaunchError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m vqjax.launch_plan",
                   description="Per-process launch plans (see the module docstring).")
  sub = parser.add_subparsers(dest="what", required=True)
  names = sub.add_parser("hostnames", help="expand a SLURM node list, one host a line")
  names.add_argument("node_list")
  slurm = sub.add_parser("slurm", help="plan of a SLURM allocation")
  slurm.add_argument("--python", default="python")
  slurm.add_argument("--task", action="store_true",
                     help="inside one srun task: print its line, then exec its command")
  tpu = sub.add_parser("tpu", help="plan of a TPU VM slice")
  tpu.add_argument("--accelerator-type", required=True)
  tpu.add_argument("--workers", default="")
  tpu.add_argument("--python", default="python")
  tpu.add_argument("--remote-command", action="store_true",
                   help="print only the shell-quoted command every worker runs")
  return parser


def run(argv: Sequence[str], env: Mapping[str, str]) -> int:
  """The command line without error handling; see `main`."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  options, main_args = argv[:split], argv[split + 1:]
  args = _parser().parse_args(options)
  if args.what == "hostnames":
    for host in expand_hostlist(args.node_list):
      console(host)
  elif args.what == "slurm" and args.task:
    process = slurm_task(env, main_args, args.python)
    console(process.line())
    try:
      os.execvp(process.command[0], list(process.command))
    except OSError as e:
      raise LaunchError(f"cannot run {process.command[0]!r}: {e.strerror or e}") from None
  elif args.what == "slurm":
    for process in slurm_plan(env, main_args, args.python):
      console(process.line())
  elif args.remote_command:
    tpu_hosts(args.accelerator_type, len(parse_workers(args.workers)) or None)
    console(shlex.join(tpu_command(main_args, args.python)))
  else:
    for process in tpu_plan(args.accelerator_type, parse_workers(args.workers), main_args,
                            args.python):
      console(process.line())
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Run the command line; a LaunchError is one `error: ` line on stderr and status 2."""
  try:
    return run(sys.argv[1:] if argv is None else argv, os.environ)
  except LaunchError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
  sys.exit(main())
