"""Research check of FQ-GAN (Zhao et al. 2020, Table 1) on the embedded set, on a CPU.

Part 1: BigGAN against FQ-BigGAN (the same model with feature quantisation after every
discriminator block, K = 2^10, as configs/fqgan_cifar10.py), class-conditional on the
embedded set at 32px (the classes are the source images), equal steps, `--seeds` seeds each.
FID and KID of `--num_samples` EMA-G samples against the training crops. One JSON line per
run, then one summary line per model (mean and std over seeds, population std).

Part 2 (`--tokenizer_steps` > 0): the demo tokenizer (configs/demo.py) with its PatchGAN on
from step 0, without and with FQ in the PatchGAN (`disc.fq_layers`), equal steps: rFID, PSNR,
LPIPS on the validation crops. One JSON line each.

The paper: FQ lowers FID (CIFAR-10 6.30 -> 5.59). Widths, batch and steps are flags, far
below the paper's (a CPU); runs resume from their checkpoints.

  python benchmarks/fqgan_embedded.py --workdir=runs/fqgan_embedded
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/fqgan_embedded", "one sub-directory per run")
_STEPS = flags.DEFINE_integer("steps", 150, "generator steps per GAN run")
_SEEDS = flags.DEFINE_integer("seeds", 3, "seeds per model")
_CH = flags.DEFINE_integer("ch", 8, "BigGAN channel multiplier (BigGAN-PyTorch CIFAR: 64)")
_BATCH = flags.DEFINE_integer("batch_size", 16, "GAN batch (the paper: 64)")
_N_CRITIC = flags.DEFINE_integer("n_critic", 4, "D steps per G step")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2000, "EMA-G samples scored")
_CROPS = flags.DEFINE_integer("crops_per_image", 32, "training crops per embedded image")
_TOKENIZER_STEPS = flags.DEFINE_integer("tokenizer_steps", 200, "0 = skip part 2")

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))


def gan_config(fq: bool, seed: int):
  from vqjax.core.config_files import load_config_file

  spec = "fqgan_cifar10.py:smoke" if fq else "biggan_cifar10.py:smoke"
  c = load_config_file(os.path.join(ROOT, "configs", spec))
  with c.unlocked():
    c.seed = seed
    c.model.generator.ch = c.disc.ch = _CH.value
    c.data.crops_per_image = _CROPS.value
    c.train.steps = _STEPS.value
    c.train.batch_size = _BATCH.value
    c.train.n_critic = _N_CRITIC.value
    c.train.log_every = 50
    c.train.image_every = _STEPS.value
    c.train.checkpoint_every = max(_STEPS.value // 2, 1)
    c.ema.start = _STEPS.value // 4
    c.ema.decay = 0.999
    c.eval.every_steps = 0  # at the last step only
    c.eval.num_samples = _NUM_SAMPLES.value
    c.eval.batch_size = 200
    c.eval.stats_cache_dir = os.path.join(_WORKDIR.value, "stats_cache")
  return c


def tokenizer_config(fq: bool):
  from vqjax.core.config_files import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  with c.unlocked():
    c.loss.disc_start = 0
    if fq:
      c.disc.fq_layers = (1, 2)
      c.disc.fq_log2_size = 10
    c.train.steps = _TOKENIZER_STEPS.value
    c.train.checkpoint_every = max(_TOKENIZER_STEPS.value // 2, 1)
    c.eval.max_examples = 0
    c.eval.stats_cache_dir = os.path.join(_WORKDIR.value, "stats_cache")
  return c


def main(argv):
  del argv
  import jax
  import numpy as np

  from vqjax.train.modes import run_mode

  platform = jax.devices()[0].platform
  results = {False: [], True: []}
  for fq in (False, True):
    for seed in range(_SEEDS.value):
      name = f"{'fqgan' if fq else 'biggan'}_seed{seed}_{_STEPS.value}"
      workdir = os.path.join(_WORKDIR.value, name)
      config = gan_config(fq, seed)
      start = time.time()
      run_mode(config, workdir, "train")
      if not os.path.exists(os.path.join(workdir, f"eval_{_STEPS.value}.json")):
        run_mode(config, workdir, "eval")  # a run that finished training but not its eval
      seconds = time.time() - start
      with open(os.path.join(workdir, f"eval_{_STEPS.value}.json")) as f:
        report = json.load(f)
      results[fq].append(report["fid"])
      print(json.dumps({
          "benchmark": "fqgan_embedded", "model": "fq_biggan" if fq else "biggan",
          "seed": seed, "steps": _STEPS.value, "ch": _CH.value, "batch_size": _BATCH.value,
          "n_critic": _N_CRITIC.value, "fq_layers": list(config.disc.fq_layers),
          "fid": round(report["fid"], 2), "kid": round(report["kid"], 4),
          "num_samples": report["num_samples"], "cpu_seconds": round(seconds, 1),
          "platform": platform}), flush=True)
  print(json.dumps({
      "benchmark": "fqgan_embedded", "summary": {
          ("fq_biggan" if fq else "biggan"): {"fid_mean": round(float(np.mean(v)), 2),
                                              "fid_std": round(float(np.std(v)), 2),
                                              "runs": len(v)}
          for fq, v in results.items()}}), flush=True)
  if not _TOKENIZER_STEPS.value:
    return
  for fq in (False, True):
    workdir = os.path.join(_WORKDIR.value, f"tokenizer_{'fq' if fq else 'plain'}_"
                                           f"{_TOKENIZER_STEPS.value}")
    config = tokenizer_config(fq)
    start = time.time()
    run_mode(config, workdir, "train")
    if not os.path.exists(os.path.join(workdir, f"eval_{_TOKENIZER_STEPS.value}.json")):
      run_mode(config, workdir, "eval")
    seconds = time.time() - start
    with open(os.path.join(workdir, f"eval_{_TOKENIZER_STEPS.value}.json")) as f:
      recon = json.load(f)
    print(json.dumps({
        "benchmark": "fqgan_embedded_tokenizer", "disc_fq_layers": list(config.disc.fq_layers),
        "steps": _TOKENIZER_STEPS.value, "rfid": round(recon["rfid"], 2),
        "psnr": round(recon["psnr"], 3), "lpips": round(recon["lpips"], 4),
        "codebook_usage": round(recon["codebook_usage"], 4), "cpu_seconds": round(seconds, 1),
        "platform": platform}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  app.run(main)
