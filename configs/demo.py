"""Demo: a small tokenizer on the embedded data set, 64x64 crops, a few minutes on 2 CPU cores.

Variants: `configs/demo.py` and `configs/demo.py:smoke`.
"""

from vqjax import config_lib


def get_config(arg=None):
  c = config_lib.tokenizer_config()
  c.data.source = "embedded"
  c.data.image_size = 64
  c.data.resize_shorter = 160
  c.data.crops_per_image = 256
  c.data.eval_crops_per_image = 16
  c.data.eval_random_crop = True  # fixed-seed crops: 16 distinct views of each val image
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = ()
  c.model.z_channels = 64
  c.model.norm_groups = 16
  c.model.quantizer.codebook_size = 256
  c.model.quantizer.embed_dim = 32
  c.model.quantizer.learning = "ema"
  c.disc.ndf = 32
  c.disc.num_layers = 2
  c.loss.disc_start = 200
  c.optim.lr = 4e-4
  c.optim.disc_lr = 4e-4
  c.train.steps = 300
  c.train.batch_size = 4
  c.train.log_every = 25
  c.train.image_every = 100
  c.train.checkpoint_every = 100
  c.eval.every_steps = 150
  c.eval.at_start = True
  c.eval.batch_size = 16
  c.eval.max_examples = 32
  if arg == "smoke":
    config_lib.smoke_overrides(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for demo.py; use '' or 'smoke'")
  c.lock()
  return c
