"""MaskGIT over MoVQ's multichannel tokens (MoVQ 3.2): unconditional, [16, 16, 4] tokens.

Tokens come from a tokenizer with `quantizer.name='multichannel'` (channels 4)
run with --mode=tokenize; every (position, channel) entry is masked and
predicted on its own.

`smoke`: a tiny model on multichannel tokens from the `multichannel` variant
of configs/vq_variants.py (runs/multichannel/tokens_train).
"""

from vqjax import config_lib


def get_config(arg=None):
  c = config_lib.transformer_config("maskgit")
  c.model.num_classes = 0
  c.model.cond_dropout = 0.0
  if arg == "smoke":
    config_lib.transformer_smoke_overrides(c)
    c.tokens.dir = "runs/multichannel/tokens_train"
    c.tokenizer.config = "configs/vq_variants.py:multichannel"
    c.tokenizer.workdir = "runs/multichannel"
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for movq_maskgit_ffhq.py; use '' or 'smoke'")
  c.lock()
  return c
