"""Causal GPT (SPEC 6; SeQ-GAN AR): class-conditional, 16x16 tokens, 24 layers x 1024, 16 heads.

  python -m vqjax.main --config=configs/ar_imagenet.py --workdir=DIR \
      --config.tokens.dir=<tokenizer workdir>/tokens_train

`smoke`: a tiny model on the demo tokenizer's tokens, a few CPU steps.
"""

from vqjax import config_lib


def get_config(arg=None):
  c = config_lib.transformer_config("gpt")
  c.model.width = 1024
  c.model.heads = 16
  c.model.mlp_dim = 4096
  if arg == "smoke":
    config_lib.transformer_smoke_overrides(c)
    c.tokens.dir = "runs/demo/tokenizer/tokens_train"
    c.model.num_classes = 12  # the embedded set's images are its classes
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for ar_imagenet.py; use '' or 'smoke'")
  c.lock()
  return c
