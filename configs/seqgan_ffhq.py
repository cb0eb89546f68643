"""SeQ-GAN on FFHQ 256px (Gu et al. 2023, Tables 2-3): unconditional, from an image folder.

  VQJAX_FFHQ_DIR=/data/ffhq python -m vqjax.main --config=configs/seqgan_ffhq.py --workdir=DIR

FFHQ has no TFDS builder: the images are read from the folder in VQJAX_FFHQ_DIR
(default data/ffhq; every image under it, recursively), 5% of them held out for
validation. The pipeline and its variants are those of configs/seqgan_imagenet.py
(phase 1 500k steps, phase 2 200k steps), with unconditional transformers trained
500k steps each (Sec. 4.2; the paper omits the FFHQ AR result, which overfits).
"""

import os

from vqjax import config_lib

FILE = "configs/seqgan_ffhq.py"
imagenet = config_lib.recipe_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "seqgan_imagenet.py"))


def get_config(arg=None):
  word, smoke, row = imagenet.parse_variant(arg, FILE)
  if word is None:
    return imagenet.pipeline(FILE, smoke)
  ffhq = {"source": "folder", "folder": os.environ.get("VQJAX_FFHQ_DIR", "data/ffhq"),
          "image_size": 256, "val_fraction": 0.05}
  c = imagenet.stage_config(word, ffhq, smoke, "runs/seqgan_ffhq/phase1", num_classes=0)
  if row:
    imagenet.apply_table6(c, row)
  if word not in ("phase1", "phase2"):
    c.train.epochs = 0.0
    c.train.steps = 4 if smoke else 500_000
    imagenet.on_phase2(c, f"{FILE}:phase2{',smoke' if smoke else ''}", "runs/seqgan_ffhq")
  c.lock()
  return c
