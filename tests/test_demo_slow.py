"""`make demo` end to end (slow: a few minutes on 2 cores; run with `make test-slow`)."""

import json
import os
import subprocess

import numpy as np
import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_make_demo_reaches_its_stated_quality(tmp_path):
  workdir = tmp_path / "demo"
  proc = subprocess.run(["make", "demo", f"WORKDIR={workdir}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # The README's promise for the tokenizer on the 32 embedded validation crops.
  end = json.load(open(workdir / "tokenizer" / "eval_600.json"))
  assert end["psnr"] >= 20.0, end
  assert end["lpips"] <= 0.35, end
  assert os.path.exists(workdir / "tokenizer" / "images" / "reconstructions_0000600.png")
  # Then tokens of the train split, a small MaskGIT on them, and a grid of its samples.
  meta = json.load(open(workdir / "tokenizer" / "tokens_train" / "meta.json"))
  assert meta["complete"] and meta["token_shape"] == [16, 16]
  samples = np.load(workdir / "maskgit" / "samples" / "samples_450.npz")
  assert samples["images"].shape == (16, 64, 64, 3)
  assert os.path.exists(workdir / "maskgit" / "samples" / "samples_450.png")
  assert os.path.exists(workdir / "maskgit" / "images" / "samples_0000225.png")
  # --mode=eval: FID/KID of those 16 samples and the validation loss of the trained model,
  # below the chance level log(K) of the demo's K = 256 codes.
  report = json.load(open(workdir / "maskgit" / "eval_450.json"))
  assert report["num_samples"] == 16 and np.isfinite(report["fid"]) and report["fid"] > 0
  assert report["val/loss"] < np.log(256)
