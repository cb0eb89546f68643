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

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/demo.py or configs/vqgan_imagenet.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "tokenize", "sample", "visualize"],
                          "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host GPU or TPU pod).")
flags.mark_flags_as_required(["config", "workdir"])

# Exit status after a SIGTERM/SIGINT stopped training and its checkpoint was saved:
# EX_TEMPFAIL ("try again"), which requeueing job scripts check for.
EXIT_STOPPED = 75


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()
  config = _CONFIG.value
  from vqjax.train import modes

  try:
    modes.run_mode(config, _WORKDIR.value, _MODE.value)
  except modes.RunStopped as e:  # a pipeline's PipelineStopped too
    print(f"stopped: {e} (exit status {EXIT_STOPPED})", file=sys.stderr, flush=True)
    sys.exit(EXIT_STOPPED)
  except Exception as e:  # re-raised (with its traceback) unless the user can fix it
    message = user_error_message(e)
    if message is None:
      raise
    fail(message)


def fail(message: str) -> None:
  """Print `message` as one line on stderr, prefixed 'error: ', and exit with status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(2)


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
