"""Research check of Reg-VQ's Table 2 (the reconstruction half) at the demo scale.

Trains one tokenizer per row of Table 2, the same number of steps each, and
prints one JSON line per row: codebook usage and perplexity, PSNR, LPIPS and
rFID on the validation crops.

  baseline   VQGAN's quantiser (nearest code, loss-learned codebook)
  prior      + PriorReg: Reg-VQ's quantiser (logits head, KL to uniform), no stochastic mask
  mask       + MaskReg: Bernoulli(0.4) stochastic mask, Gumbel sampling (Algorithm 1)
  cl         + CL: vanilla contrastive loss over VGG19 features (Eq. 2)
  pcl        + PCL: probabilistic contrastive loss (Eq. 3): Reg-VQ

The paper (ADE20K, Table 2): every row lowers FID[R]; MaskReg lowers PSNR[R];
PCL recovers part of it, more than CL does.

  python benchmarks/regvq_ablation.py --workdir=runs/regvq_ablation

The tokenizer is configs/demo.py's (64px crops of the embedded set, 16x16
tokens, K = 256, d = 32, Adam 1e-3 with warmup and cosine decay, batch 8, no
GAN term) with the rows applied as configs/regvq_ade20k.py applies them: L1 +
LPIPS + the row's contrastive term (weight 0.2 summed over the five VGG19
layers). The baseline's codebook is learned by its loss as VQGAN's is (not the
demo's EMA with restarts). Runs resume from their checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/regvq_ablation", "one sub-directory per row")
_ROWS = flags.DEFINE_list("rows", ["baseline", "prior", "mask", "cl", "pcl"], "Table 2 rows")
_STEPS = flags.DEFINE_integer("steps", 2000, "tokenizer steps (each row)")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "crop size (64: the demo's)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row_config(row: str):
  """configs/demo.py with the Reg-VQ quantiser and losses of Table 2's `row`."""
  from vqjax import config_lib
  from vqjax.core.config_files import load_config_file
  from vqjax.losses.terms import terms_config

  recipe = config_lib.recipe_module(os.path.join(ROOT, "configs", "regvq_ade20k.py"))
  c = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  with c.unlocked():
    q = c.model.quantizer
    c.model.quantizer = config_lib.quantizer_config(
        "regvq", codebook_size=q.codebook_size, embed_dim=q.embed_dim, mask_ratio=0.4,
        temperature=0.9, prior_weight=1.0)
    c.loss.terms = terms_config(l1={"weight": 1.0}, lpips={"weight": 1.0}, cl={"weight": 0.0},
                                pcl={"weight": recipe.CONTRASTIVE_WEIGHT})
    recipe.apply_row(c, row)
    c.data.image_size = _IMAGE_SIZE.value
    c.train.steps = _STEPS.value
    c.train.checkpoint_every = max(_STEPS.value // 4, 1)
    c.train.image_every = _STEPS.value
    c.eval.max_examples = 0  # every validation crop
  return c


def main(argv):
  del argv
  import jax

  from vqjax.train.modes import run_mode

  for row in _ROWS.value:
    workdir = os.path.join(_WORKDIR.value, f"{row}_{_IMAGE_SIZE.value}px_{_STEPS.value}")
    config = row_config(row)
    start = time.time()
    run_mode(config, workdir, "train")
    seconds = time.time() - start
    with open(os.path.join(workdir, f"eval_{_STEPS.value}.json")) as f:
      recon = json.load(f)
    print(json.dumps({
        "benchmark": "regvq_ablation", "row": row, "steps": _STEPS.value,
        "image_size": _IMAGE_SIZE.value, "quantizer": config.model.quantizer.name,
        "mask_ratio": float(config.model.quantizer.get("mask_ratio", 0.0)),
        "contrastive": [k for k in ("cl", "pcl") if config.loss.terms[k].weight > 0],
        "codebook_usage": round(recon["codebook_usage"], 4),
        "perplexity": round(recon["perplexity"], 2), "psnr": round(recon["psnr"], 3),
        "lpips": round(recon["lpips"], 4), "rfid": round(recon["rfid"], 2),
        "eval_examples": recon["num_examples"], "train_seconds": round(seconds, 1),
        "platform": jax.devices()[0].platform,
    }), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  app.run(main)
