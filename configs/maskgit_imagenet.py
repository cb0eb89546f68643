"""MaskGIT (SPEC 6; SeQ-GAN NAR): class-conditional, 16x16 tokens, 24 layers x 768, 12 heads.

  python -m vqjax.main --config=configs/maskgit_imagenet.py --workdir=DIR \
      --config.tokens.dir=<tokenizer workdir>/tokens_train

`smoke`: a tiny model on the demo tokenizer's tokens (`make demo` writes
runs/demo/tokenizer/tokens_train), a few CPU steps. `demo`: the small MaskGIT that
`make demo` trains on those tokens (about 2.5 minutes on 2 CPU cores), with
validation loss on runs/demo/tokenizer/tokens_validation and sample grids every 225
steps, and a 16-sample FID/KID in --mode=eval.
"""

from vqjax import config_lib


def get_config(arg=None):
  c = config_lib.transformer_config("maskgit")
  if arg in ("smoke", "demo"):
    config_lib.transformer_smoke_overrides(c)
    c.tokens.dir = "runs/demo/tokenizer/tokens_train"
    c.model.num_classes = 12  # the embedded set's images are its classes
  if arg == "demo":
    c.model.width = 128
    c.model.depth = 4
    c.model.heads = 4
    c.model.mlp_dim = 512
    c.model.dropout = 0.0  # 2,560 token maps for a few epochs: no need, and faster steps
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = 450
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.checkpoint_every = 225
    c.sample.num_images = 16
    c.sample.batch_size = 16
    c.eval.every_steps = 225
    c.eval.batch_size = 16
    c.eval.max_examples = 0
    c.eval.grid_images = 16
    c.eval.num_samples = 16
    c.eval.reference_examples = 32  # as the demo tokenizer's rFID: its cached statistics
  elif arg not in (None, "", "smoke"):
    raise ValueError(f"unknown variant {arg!r} for maskgit_imagenet.py; use '', smoke or demo")
  c.lock()
  return c
