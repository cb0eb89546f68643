"""Reg-VQ on CelebA-HQ (Zhang et al. 2023): semantic image synthesis from face-parsing maps.

  VQJAX_CELEBAHQ_DIR=/data/celebamask_hq python -m vqjax.main \
      --config=configs/regvq_celebahq.py --workdir=DIR

CelebA-HQ with its label maps (CelebAMask-HQ) has no TFDS builder: it is read from paired
folders under VQJAX_CELEBAHQ_DIR (default data/celebamask_hq):
  train/images/<stem>.jpg   train/labels/<stem>.png
  val/images/<stem>.jpg     val/labels/<stem>.png
a label file being one single-channel PNG of ids 0..18 per image (background and the 18
face-part classes, e.g. the maps CelebAMask-HQ's own script combines from its per-part
masks), of the image's size. An image without a map is skipped and counted.

The stages, variants (`tokenizer`, `ar`, Table 2's rows, `smoke`) and settings are those of
configs/regvq_ade20k.py, with 19 semantic ids, 60 tokenizer epochs and 50 GPT epochs
(supplement).
"""

import os

from vqjax import config_lib

FILE = "configs/regvq_celebahq.py"
ade20k = config_lib.recipe_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "regvq_ade20k.py"))


def celebahq() -> dict:
  root = os.environ.get("VQJAX_CELEBAHQ_DIR", "data/celebamask_hq")
  return {"source": "folder", "folder": f"{root}/train/images",
          "val_folder": f"{root}/val/images", "label_maps": "paired",
          "label_folder": f"{root}/train/labels", "val_label_folder": f"{root}/val/labels",
          "semantic_classes": 19, "image_size": 256, "resize_shorter": 256}


def get_config(arg=None):
  return ade20k.recipe(arg, FILE, {"": celebahq()}, tokenizer_epochs=60.0, ar_epochs=50.0,
                       run="runs/regvq_celebahq")
