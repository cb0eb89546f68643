"""Demo: a small tokenizer on the embedded data set, 64x64 crops, a few minutes on 2 CPU cores.

Variants: `configs/demo.py` and `configs/demo.py:smoke`.
"""

from vqjax import config_lib


def get_config(arg=None):
  c = config_lib.tokenizer_config()
  config_lib.demo_overrides(c)
  c.model.quantizer.learning = "ema"  # the loss-learned codebook collapses at this size
  if arg == "smoke":
    config_lib.smoke_overrides(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for demo.py; use '' or 'smoke'")
  c.lock()
  return c
