"""MoVQ on FFHQ 256px (Zheng et al. 2022, Table 1, Fig. 6): unconditional, from an image folder.

  VQJAX_FFHQ_DIR=/data/ffhq python -m vqjax.main --config=configs/movq_ffhq.py --workdir=DIR

FFHQ has no TFDS builder: the images are read from the folder in VQJAX_FFHQ_DIR
(default data/ffhq; every image under it, recursively), 5% of them held out for
validation. Stages and variants are those of configs/movq_imagenet.py (`tokenizer`,
`mask`, `auto`, `smoke`), with unconditional transformers.
"""

import os

from vqjax import config_lib

FILE = "configs/movq_ffhq.py"
imagenet = config_lib.recipe_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "movq_imagenet.py"))


def get_config(arg=None):
  word, smoke = imagenet.parse_variant(arg, FILE)
  if word is None:
    return imagenet.pipeline(FILE, smoke)
  ffhq = {"source": "folder", "folder": os.environ.get("VQJAX_FFHQ_DIR", "data/ffhq"),
          "image_size": 256, "val_fraction": 0.05}
  c = imagenet.stage_config(word, ffhq, smoke, num_classes=0)
  if word != "tokenizer":
    imagenet.on_tokenizer(c, f"{FILE}:tokenizer{',smoke' if smoke else ''}", "runs/movq_ffhq")
  c.lock()
  return c
