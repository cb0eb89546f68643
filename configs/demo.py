"""Demo: a small tokenizer on the embedded data set, 64x64 crops, about 5 minutes on 2 CPU cores.

Variants: `configs/demo.py` and `configs/demo.py:smoke` (a few steps, the test suite's
tokenizer). The demo trains for reconstruction (L1 + LPIPS, EMA codebook with dead-code
restarts, Adam at 1e-3 with warmup and cosine decay, 600 steps of batch 8) and
leaves the adversarial term off: at this size and step count it costs PSNR without a
visible gain. It ends near 20 dB PSNR and LPIPS 0.32 on the 32 validation crops.
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
  else:
    # Widths 32, 32, 64 at 64, 32, 16px (cheaper than the shared (1, 2, 2)); 16x16 tokens.
    config_lib.set_autoencoder(c.model, ch_mult=(1, 1, 2))
    c.model.quantizer.restart_after = 20
    c.loss.disc_start = 10**9  # no adversarial term (see the docstring)
    c.optim.lr = 1e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.batch_size = 8
    c.train.log_every = 50
    c.train.image_every = 300
    c.train.checkpoint_every = 300
    c.eval.at_start = False
    c.eval.every_steps = 0  # only at the end
  c.lock()
  return c
