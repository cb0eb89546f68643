"""SeQ-GAN on LSUN church / cat / bedroom 256px (Gu et al. 2023, Table 3): unconditional.

  python -m vqjax.main --config=configs/seqgan_lsun.py:church --workdir=DIR

As the paper (Sec. 4.1, following RQ-VAE), phase 1 does not train from scratch: it
starts from the ImageNet phase-1 tokenizer (`init_from`, the run directory in
VQJAX_SEQGAN_IMAGENET_PHASE1, default runs/seqgan_imagenet/phase1: run
configs/seqgan_imagenet.py:phase1 first) and fine-tunes one epoch on the category
(converted to steps from the TFDS split's size); phase 2 then runs 200k steps, and
the unconditional NAR and AR transformers 500k steps each (Sec. 4.2).

Variants: a category (`church`, the default, `cat`, `bedroom`) and optionally the words of
configs/seqgan_imagenet.py (`phase1`, `phase2`, `nar`, `ar`, `nar_L`, `ar_L`,
`smoke`), e.g. `configs/seqgan_lsun.py:cat,phase2`. TFDS data sets `lsun/church_outdoor`,
`lsun/cat` (train only: its first 300 images are held out for validation), `lsun/bedroom`.
`smoke` runs on the embedded set and starts phase 1 from
scratch (there is no ImageNet run to start from).
"""

import os

from vqjax import config_lib

FILE = "configs/seqgan_lsun.py"
CATEGORIES = {"church": "lsun/church_outdoor", "cat": "lsun/cat", "bedroom": "lsun/bedroom"}
imagenet = config_lib.recipe_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "seqgan_imagenet.py"))


def get_config(arg=None):
  words = [w for w in (arg or "").split(",") if w]
  categories = [w for w in words if w in CATEGORIES] or ["church"]
  if len(categories) != 1:
    raise ValueError(f"configs/seqgan_lsun.py takes one category of {sorted(CATEGORIES)}, e.g. "
                     f"'church' or 'cat,phase2'; got {arg!r}")
  category = categories[0]
  rest = ",".join(w for w in words if w != category)
  word, smoke, row = imagenet.parse_variant(rest, f"{FILE}:{category}")
  if word is None:
    return imagenet.pipeline(FILE, smoke, prefix=f"{category},")
  lsun = {"source": "tfds", "name": CATEGORIES[category], "image_size": 256}
  if category == "cat" and not smoke:  # TFDS's object categories have no validation split
    lsun.update(train_split="train[300:]", val_split="train[:300]")  # hold out 300
  run = f"runs/seqgan_lsun_{category}"
  c = imagenet.stage_config(word, lsun, smoke, f"{run}/phase1", num_classes=0)
  if row:
    imagenet.apply_table6(c, row)
  if word == "phase1" and not smoke:
    c.init_from.workdir = os.environ.get("VQJAX_SEQGAN_IMAGENET_PHASE1",
                                         "runs/seqgan_imagenet/phase1")
    c.train.epochs = 1.0
  if word not in ("phase1", "phase2"):
    c.train.epochs = 0.0
    c.train.steps = 4 if smoke else 500_000
    imagenet.on_phase2(c, f"{FILE}:{category},phase2{',smoke' if smoke else ''}", run)
  c.lock()
  return c

