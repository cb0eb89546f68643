"""Codebook usage and reconstruction quality per quantiser, equal steps (issue 3).

Trains each variant of `configs/vq_variants.py` (demo sizes, embedded data)
for the same number of steps and evaluates it on the validation split; prints
one JSON line per variant. Runs resume from their checkpoints, so a killed
comparison continues where it stopped when started again with the same
--workdir.

  python benchmarks/codebook_usage.py --steps=2000 \
      --variants=plain,entropy,regvq,multichannel,restart --workdir=runs/codebook_usage

--losses=full trains with the recipe's losses (L1 + LPIPS + GAN from step
200); --losses=l1 drops LPIPS and the discriminator from training (about 4x
faster on a CPU; evaluation still reports LPIPS). --precision=bfloat16 computes the
convolutions, attention and MLPs in bfloat16 (`config.precision`; the quantiser stays float32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 2000, "training steps per variant")
_VARIANTS = flags.DEFINE_list("variants", ["plain", "entropy", "regvq", "multichannel",
                                           "restart"], "variants of configs/vq_variants.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/codebook_usage", "one sub-directory per variant")
_LOSSES = flags.DEFINE_enum("losses", "full", ["full", "l1"], "training losses (see docstring)")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 128, "validation crops evaluated")
_PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                               "config.precision: the compute dtype of the tokenizer")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_variant(variant: str):
  spec = importlib.util.spec_from_file_location("vq_variants",
                                                os.path.join(ROOT, "configs", "vq_variants.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def main(argv):
  del argv
  import jax

  from vqjax.train.run import train_and_evaluate

  for variant in _VARIANTS.value:
    config = load_variant(variant)
    with config.unlocked():
      config.train.steps = _STEPS.value
      config.train.checkpoint_every = max(_STEPS.value // 10, 1)
      config.train.image_every = _STEPS.value
      config.eval.every_steps = _STEPS.value
      config.eval.max_examples = _EVAL_EXAMPLES.value
      config.precision = _PRECISION.value
      if _LOSSES.value == "l1":
        config.loss.terms.lpips.weight = 0.0
        config.loss.disc_start = _STEPS.value + 1
    workdir = os.path.join(_WORKDIR.value,
                           f"{variant}_{_LOSSES.value}_{_STEPS.value}_{_PRECISION.value}")
    start = time.time()
    train_and_evaluate(config, workdir)
    seconds = time.time() - start
    report = json.load(open(os.path.join(workdir, f"eval_{_STEPS.value}.json")))
    print(json.dumps({
        "benchmark": "codebook_usage", "variant": variant, "quantizer": config.model.quantizer.name,
        "steps": _STEPS.value, "losses": _LOSSES.value, "precision": _PRECISION.value,
        "codebook_size": config.model.quantizer.codebook_size,
        "val_codebook_usage": round(report["codebook_usage"], 4),
        "val_perplexity": round(report["perplexity"], 2), "val_psnr": round(report["psnr"], 3),
        "val_ssim": round(report["ssim"], 4), "val_lpips": round(report["lpips"], 4),
        "val_examples": report["num_examples"], "train_seconds": round(seconds, 1),
        "platform": jax.devices()[0].platform,
    }), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  app.run(main)
