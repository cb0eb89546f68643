"""One tokenizer per quantiser option, at the demo's sizes on the embedded set (issue 3).

`--config=configs/vq_variants.py:VARIANT` or `:VARIANT,smoke`, VARIANT one of

  plain         VQGAN baseline: nearest code, loss-learned codebook
  entropy       + SeQ-GAN codebook entropy regulariser (gamma = 0.01)
  multichannel  MoVQ: 4 channel chunks, one shared codebook, tokens [h, w, 4]
  regvq         Reg-VQ: stochastic mask 0.4, Gumbel temperature 0.9, prior KL
  kmeans        + k-means initialisation from the first batch
  restart       + dead-code restart after 100 unused steps
  l2            + ViT-VQGAN factorised (d = 8) l2-normalised codes
  fq            FQ-GAN's EMA dictionary (decay 0.9) as the tokenizer's quantiser

Every variant but `fq` learns its codebook by gradient, so they differ from
`plain` only in the option named. `benchmarks/codebook_usage.py` trains them
for equal steps and compares codebook usage and reconstruction quality.
"""

from vqjax import config_lib

K, D = 256, 32  # the demo's codebook

VARIANTS = {
    "plain": lambda: config_lib.quantizer_config("vq", codebook_size=K, embed_dim=D),
    "entropy": lambda: config_lib.quantizer_config(
        "vq", codebook_size=K, embed_dim=D, entropy_weight=0.01),
    "multichannel": lambda: config_lib.quantizer_config(
        "multichannel", codebook_size=K, embed_dim=D, channels=4),
    "regvq": lambda: config_lib.quantizer_config(
        "regvq", codebook_size=K, embed_dim=D, mask_ratio=0.4, temperature=0.9),
    "kmeans": lambda: config_lib.quantizer_config(
        "vq", codebook_size=K, embed_dim=D, kmeans_init=True),
    "restart": lambda: config_lib.quantizer_config(
        "vq", codebook_size=K, embed_dim=D, restart_after=100),
    "l2": lambda: config_lib.quantizer_config(
        "vq", codebook_size=K, embed_dim=8, l2_normalize=True),
    "fq": lambda: config_lib.quantizer_config("fq", codebook_size=K, embed_dim=D, decay=0.9),
}


def get_config(arg=None):
  parts = [p for p in (arg or "plain").split(",") if p]
  smoke = "smoke" in parts
  names = [p for p in parts if p != "smoke"] or ["plain"]
  if len(names) != 1 or names[0] not in VARIANTS:
    raise ValueError(f"vq_variants.py takes one of {sorted(VARIANTS)}, optionally with "
                     f"',smoke' (e.g. 'entropy,smoke'); got {arg!r}")
  c = config_lib.tokenizer_config()
  config_lib.demo_overrides(c)
  c.model.quantizer = VARIANTS[names[0]]()
  c.train.steps = 2000
  c.train.log_every = 100
  c.train.image_every = 500
  c.train.checkpoint_every = 500
  c.eval.every_steps = 1000
  c.eval.at_start = False
  if smoke:
    config_lib.smoke_overrides(c)
    if c.model.quantizer.get("restart_after", 0):
      c.model.quantizer.restart_after = 1  # restarts happen within the 4 smoke steps
  c.lock()
  return c
