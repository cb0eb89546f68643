"""MaskGIT (SPEC 6; SeQ-GAN NAR): class-conditional, 16x16 tokens, 24 layers x 768, 12 heads.

  python -m vqjax.main --config=configs/maskgit_imagenet.py --workdir=DIR \
      --config.tokens.dir=<tokenizer workdir>/tokens_train

`smoke`: a tiny model on the demo tokenizer's tokens (`make demo` writes
runs/demo/tokens_train), a few CPU steps.
"""

from vqjax import config_lib


def get_config(arg=None):
  c = config_lib.transformer_config("maskgit")
  if arg == "smoke":
    config_lib.transformer_smoke_overrides(c)
    c.tokens.dir = "runs/demo/tokens_train"
    c.model.num_classes = 8
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for maskgit_imagenet.py; use '' or 'smoke'")
  c.lock()
  return c
