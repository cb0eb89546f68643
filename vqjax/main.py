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
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/demo.py or configs/vqgan_imagenet.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "tokenize", "sample", "visualize"],
                          "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host GPU or TPU pod).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()
  config = _CONFIG.value
  from vqjax.config_lib import ConfigError
  from vqjax.data.sources import DataSetNotFoundError
  from vqjax.data.tokens import TokenStoreError
  from vqjax.eval.feature_stats import FIDError
  from vqjax.train import loop, modes, pipeline

  try:
    modes.run_mode(config, _WORKDIR.value, _MODE.value)
  except (ConfigError, DataSetNotFoundError, FIDError, TokenStoreError, pipeline.PipelineError,
          loop.NonFiniteLossError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except pipeline.PipelineStopped as e:
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def parse_flags(argv):
  """absl parsing, with a config-key typo reported as one line naming the nearest keys."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    message = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
    if len(message) > 1 and message[0] == message[-1] == "'":
      message = message[1:-1]
    print(f"error: bad command line or config override: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
