"""Entry point: python -m vqjax.main --config=configs/<recipe>.py[:variant] --workdir=DIR.

  --mode=train (default) trains, resuming from the latest checkpoint in DIR;
  --mode=eval evaluates the latest (or config.eval.checkpoint_step) checkpoint;
  --mode=tokenize writes that checkpoint's token maps of config.tokenize.split
  to a token store (DIR/tokens_<split> unless config.tokenize.output_dir).
  Transformer configs: --mode=train, --mode=sample (images decoded by the
  tokenizer named in config.tokenizer), --mode=eval (FID/KID of those samples
  against the tokenizer data set's val split, and validation loss with
  config.tokens.val_dir), or --mode=visualize (GPT only: the teacher-forced
  [input | reconstruction | AR top-1] grid and its accuracy).
  Any config field can be overridden: --config.train.steps=50. Configs are
  locked, so a misspelt key stops here, before anything is built.
  Pipeline configs (config.trainer='pipeline', e.g. configs/demo_pipeline.py)
  run their stages in order in DIR/<stage>, skipping finished ones; they take
  only --mode=train (see vqjax/train/pipeline.py).
  Exit status 75 (EX_TEMPFAIL): a SIGTERM/SIGINT stopped training after its
  checkpoint was saved; the same command resumes it (requeue on 75).
"""

from __future__ import annotations

import os

# Before anything imports TensorFlow (tensorflow_datasets, clu): no C++ start-up lines
# ("oneDNN custom operations ...", "All log messages before absl::InitializeLog() ...").
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import errno  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/demo.py or configs/vqgan_imagenet.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "tokenize", "sample", "visualize"],
                          "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host GPU or TPU pod). Without the three "
    "flags below, JAX reads the coordinator and process ids from the cluster (SLURM, TPU VM).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", "", "With --distributed: HOST:PORT of process 0's coordinator service.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "With --distributed: the number of processes (0 = from the cluster).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "With --distributed: this process's id, 0..num_processes-1 "
    "(-1 = from the cluster).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout", 300, "With --distributed: seconds to wait for every process to reach the "
    "coordinator before giving up with exit status 2.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "With --distributed: seconds without a heartbeat after which "
    "JAX's coordination service declares a process dead and ends the others (status 134).")
flags.mark_flags_as_required(["config", "workdir"])

# Exit status after a SIGTERM/SIGINT stopped training and its checkpoint was saved:
# EX_TEMPFAIL ("try again"), which requeueing job scripts check for.
EXIT_STOPPED = 75


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
  config = _CONFIG.value
  from vqjax.train import modes

  try:
    modes.run_mode(config, _WORKDIR.value, _MODE.value)
  except modes.RunStopped as e:  # a pipeline's PipelineStopped too
    print(f"stopped: {e} (exit status {EXIT_STOPPED})", file=sys.stderr, flush=True)
    _exit(EXIT_STOPPED)
  except Exception as e:  # re-raised (with its traceback) unless the user can fix it
    message = user_error_message(e)
    if message is None and _peer_failure(e):
      print(f"error: another process of this run failed ({_first_line(e)}); this one stops "
            f"with exit status {EXIT_STOPPED}. Run the same command on every process to "
            "resume from the last checkpoint.", file=sys.stderr, flush=True)
      _exit(EXIT_STOPPED)
    if message is None:
      if _multi_process():
        traceback.print_exc()
        _exit(1)
      raise
    fail(message)


def _multi_process() -> bool:
  jax = sys.modules.get("jax")
  return jax is not None and jax.process_count() > 1


def _exit(status: int) -> None:
  """Exit with `status`. In a multi-process run without JAX's shutdown barrier, which would
  wait for the other processes' heartbeats (minutes) and then abort: a failed process
  leaves at once, and the others' next collective fails and ends them too."""
  if _multi_process():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return (lines[0] if lines else type(e).__name__)[:300]


def _peer_failure(e: BaseException) -> bool:
  """A collective that failed because another process went away (Gloo/NCCL connection
  errors, the coordination service reporting a dead task)."""
  if not _multi_process():
    return False
  text = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
  return any(s in text for s in ("Connection reset by peer", "Connection closed by peer",
                                 "heartbeat timeout", "Gloo", "NCCL", "coordination service"))


def initialize_distributed(coordinator: str, num_processes: int, process_id: int,
                           timeout_s: int, heartbeat_timeout_s: int = 100) -> None:
  """jax.distributed.initialize with the given (or the cluster's) coordinator and ids.

  CPU devices talk over Gloo (the only CPU collectives), so a multi-process run also works
  on CPU hosts. A coordinator that does not answer within `timeout_s`, or ids that do not
  fit, end the process with one line and exit status 2 rather than a hang. When a process
  dies, the others stop at their next collective (one line, exit status 75) or, at the
  latest, `heartbeat_timeout_s` later when JAX's coordination service ends them.
  """
  import jax

  given = [bool(coordinator), num_processes > 0, process_id >= 0]
  if any(given) and not all(given):
    fail("--coordinator, --num_processes and --process_id go together: give all three, or "
         "none to read them from the cluster (SLURM, TPU VM).")
  if all(given) and not 0 <= process_id < num_processes:
    fail(f"--process_id={process_id} must be in 0..{num_processes - 1} "
         f"(--num_processes={num_processes}).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if all(given):
    kwargs = {"coordinator_address": coordinator, "num_processes": num_processes,
              "process_id": process_id}
    if process_id > 0:  # JAX's client aborts the process when it cannot register in time
      _wait_for_coordinator(coordinator, timeout_s, process_id, num_processes)
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s, **kwargs)
  except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
    where = coordinator or "the cluster's coordinator"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    fail(f"could not join the distributed run at {where} within {timeout_s} s "
         f"(process {process_id} of {num_processes}): {first[:300]}. Check that every process "
         "was started with the same --coordinator and --num_processes and that process 0 is "
         "reachable on that port; raise --init_timeout for slow starts.")


def _wait_for_coordinator(coordinator: str, timeout_s: int, process_id: int,
                          num_processes: int) -> None:
  """Return once HOST:PORT accepts a TCP connection; exit 2 with one line after `timeout_s`."""
  import socket
  import time

  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    fail(f"--coordinator={coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:1234.")
  deadline = time.monotonic() + timeout_s
  last = "no answer"
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)),
                                    timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        return
    except OSError as e:
      last = e.strerror or str(e)
    if time.monotonic() >= deadline:
      fail(f"the coordinator {coordinator} could not be reached within {timeout_s} s "
           f"(process {process_id} of {num_processes}; last attempt: {last}): start process 0 "
           "with the same --coordinator, check the host and port, or raise --init_timeout.")
    time.sleep(0.25)


def fail(message: str) -> None:
  """Print `message` as one line on stderr, prefixed 'error: ', and exit with status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  _exit(2)


# OSError numbers that mean a path the user gave cannot be used as it is.
_FILE_SYSTEM_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                       errno.EDQUOT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}


def _user_error_types() -> tuple[type, ...]:
  """`vqjax.errors.UserError` and the user-facing errors not (yet) derived from it, of the
  modules imported so far: an exception of a class whose module was never imported cannot
  have been raised, so nothing is imported here."""
  from vqjax.errors import UserError

  types = [UserError]
  for module, name in (("vqjax.data.sources", "DataSetNotFoundError"),
                       ("vqjax.data.tokens", "TokenStoreError"),
                       ("vqjax.train.loop", "NonFiniteLossError")):
    found = getattr(sys.modules.get(module), name, None)
    if isinstance(found, type):
      types.append(found)
  return tuple(types)


def user_error_message(e: BaseException) -> str | None:
  """The one line to print for an error the user can fix, or None for an internal error
  (which keeps its traceback): UserError and its kin, a missing file, and a file-system
  refusal (permissions, read-only, full, not a directory) on a path the user gave."""
  if isinstance(e, _user_error_types()):
    return str(e)
  if isinstance(e, OSError) and e.errno in _FILE_SYSTEM_ERRNOS:
    where = f" ({e.filename})" if e.filename else ""
    return (f"{e.strerror or e}{where}: check the path and its permissions (and the free "
            "space), or choose another --workdir or data location.")
  return None


def _config_spec(argv) -> str | None:
  """The value of --config in `argv` (either '--config=X' or '--config X'), if given."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _root_cause(e: BaseException) -> BaseException:
  """The first exception of the chain that led to `e` (what the recipe itself raised)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return e


def parse_flags(argv):
  """absl parsing, each failure one line with exit status 2: a --config file that does not
  exist, a recipe that raises (e.g. an unknown variant), or a config-key typo (naming the
  nearest keys)."""
  spec = _config_spec(argv)
  if spec is not None and not os.path.isfile(spec.split(":", 1)[0]):
    fail(f"config file {spec.split(':', 1)[0]!r} not found (from --config={spec}): relative "
         "paths start at the current directory; run from the repository root or give an "
         "absolute path.")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    if "Error whilst parsing config file" in str(e):  # the recipe's get_config raised
      root = _root_cause(e)
      plain = type(root) is ValueError or isinstance(root, _user_error_types())
      fail(f"--config={spec}: {root}" if plain else
           f"--config={spec}: {type(root).__name__}: {root}")
    message = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
    if len(message) > 1 and message[0] == message[-1] == "'":
      message = message[1:-1]
    fail(f"bad command line or config override: {message}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
