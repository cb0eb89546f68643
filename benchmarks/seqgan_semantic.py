"""Research check of SeQ-GAN's Observation 2 (Sec. 3.3.2, Table 6) at the demo scale.

Trains two tokenizers that differ only in the semantic ratio alpha of Eq. 3
(alpha = 0: L_low over relu1_2 .. relu5_3; alpha = 1: L_sem over relu5_3 and
`logit` when --vgg16_classifier gives torchvision's vgg16-397923af.pth,
relu5_3 alone otherwise), the same number of steps each, then the same small
GPT on each one's tokens. One JSON line per tokenizer: rFID, PSNR, LPIPS and
codebook usage on the validation crops, and the GPT's validation loss and
teacher-forced top-1 accuracy (Sec. 3.2) on the validation tokens.

The paper's claim: alpha = 1 gives the transformer an easier token
distribution (better generation), possibly at some cost in reconstruction.

  python benchmarks/seqgan_semantic.py --workdir=runs/seqgan_semantic

The tokenizer is configs/demo.py (64px crops of the embedded set, 16x16 tokens,
EMA codebook of 256, 600 steps of batch 8) with its LPIPS term replaced by
Eq. 3 at the SeQ-GAN recipe's weight; the GPT is 4 x 128 wide, 450 steps of
batch 16. Runs resume from their checkpoints when started again.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/seqgan_semantic", "one sub-directory per alpha")
_ALPHAS = flags.DEFINE_list("alphas", ["0", "1"], "semantic ratios to compare")
_STEPS = flags.DEFINE_integer("steps", 600, "tokenizer steps (each alpha)")
_GPT_STEPS = flags.DEFINE_integer("gpt_steps", 450, "GPT steps (each tokenizer)")
_WEIGHT = flags.DEFINE_float("perceptual_weight", 0.01, "weight of the Eq. 3 term")
_CLASSIFIER = flags.DEFINE_string("vgg16_classifier", "",
                                  "torchvision's vgg16-397923af.pth ('' = relu5_3 alone)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenizer_config(alpha: float):
  from vqjax.core.config_files import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  sem_layers = ("relu5_3", "logit") if _CLASSIFIER.value else ("relu5_3",)
  with c.unlocked():
    del c.loss.terms["lpips"]
    c.loss.terms.perceptual = dict(
        name="semantic_perceptual", weight=_WEIGHT.value, alpha=alpha,
        low_layers=("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
        sem_layers=sem_layers, classifier_path=_CLASSIFIER.value)
    c.train.steps = _STEPS.value
    c.train.checkpoint_every = max(_STEPS.value // 2, 1)
    c.train.image_every = _STEPS.value
    c.eval.max_examples = 0  # every validation crop
  return c


def gpt_config(tokenizer_dir: str):
  from vqjax.core.config_files import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs", "ar_imagenet.py:smoke"))
  with c.unlocked():
    c.tokens.dir = os.path.join(tokenizer_dir, "tokens_train")
    c.tokens.val_dir = os.path.join(tokenizer_dir, "tokens_validation")
    c.tokenizer.config = ""
    c.tokenizer.workdir = ""
    c.model.width, c.model.depth, c.model.heads, c.model.mlp_dim = 128, 4, 4, 512
    c.model.dropout = 0.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = _GPT_STEPS.value
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.checkpoint_every = _GPT_STEPS.value
    c.eval.every_steps = 0  # at the last step: loss and accuracy over all validation tokens
    c.eval.max_examples = 0
    c.eval.grid_images = 0
  return c


def validation_metrics(config, workdir: str) -> dict:
  """val/loss and val/accuracy (teacher-forced top-1) of the latest GPT in `workdir`."""
  from vqjax.train import generate, transformer

  s = transformer.setup(config)
  state, _ = generate.restore_latest(workdir, s.state, "transformer")
  return s.validate(state.params)


def main(argv):
  del argv
  import jax

  from vqjax.train.modes import run_mode

  for alpha in (float(a) for a in _ALPHAS.value):
    workdir = os.path.join(_WORKDIR.value, f"alpha{alpha:g}_{_STEPS.value}")
    config = tokenizer_config(alpha)
    start = time.time()
    run_mode(config, workdir, "train")
    tokenizer_seconds = time.time() - start
    with open(os.path.join(workdir, f"eval_{_STEPS.value}.json")) as f:
      recon = json.load(f)
    for split in ("train", "validation"):
      tokenize = config.copy_and_resolve_references()
      with tokenize.unlocked():
        tokenize.tokenize.split = split
      run_mode(tokenize, workdir, "tokenize")
    gpt_dir = os.path.join(workdir, f"gpt_{_GPT_STEPS.value}")
    start = time.time()
    run_mode(gpt_config(workdir), gpt_dir, "train")
    gpt_seconds = time.time() - start
    last = validation_metrics(gpt_config(workdir), gpt_dir)
    print(json.dumps({
        "benchmark": "seqgan_semantic", "alpha": alpha,
        "sem_layers": list(config.loss.terms.perceptual.sem_layers),
        "perceptual_weight": _WEIGHT.value, "tokenizer_steps": _STEPS.value,
        "rfid": round(recon["rfid"], 2), "psnr": round(recon["psnr"], 3),
        "lpips": round(recon["lpips"], 4), "codebook_usage": round(recon["codebook_usage"], 4),
        "recon_examples": recon["num_examples"], "gpt_steps": _GPT_STEPS.value,
        "ar_val_loss": round(last["val/loss"], 4),
        "ar_top1_accuracy": round(last["val/accuracy"], 4),
        "tokenizer_seconds": round(tokenizer_seconds, 1), "gpt_seconds": round(gpt_seconds, 1),
        "platform": jax.devices()[0].platform,
    }), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  app.run(main)
