"""VQGAN baseline on ImageNet 256px (SPEC section 1): f16, K=1024, d=256.

Variants: `configs/vqgan_imagenet.py` (full) and `configs/vqgan_imagenet.py:smoke`
(a few CPU steps on the embedded data set).
"""

from vqjax import config_lib


def get_config(arg=None):
  c = config_lib.tokenizer_config()
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  if arg == "smoke":
    config_lib.smoke_overrides(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for vqgan_imagenet.py; use '' or 'smoke'")
  c.lock()
  return c
