"""Codebook pictures (`vqjax.eval.codebook_plots`): the PCA, the PNG writers, and
`--mode=eval --config.eval.codebook_plots=True` on a tiny trained tokenizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from vqjax.eval.codebook_plots import (
  pca_2d,
  usage_shares,
  usage_title,
  write_codebook_pca,
  write_usage_histogram,
)


def _dominant_cloud(k: int = 200, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(vectors [k, d] spread mostly along a unit direction, that direction)."""
  rng = np.random.default_rng(seed)
  direction = rng.normal(size=d)
  direction /= np.linalg.norm(direction)
  vectors = 10.0 * rng.normal(size=(k, 1)) * direction + 0.5 * rng.normal(size=(k, d)) + 3.0
  return vectors, direction


def test_pca_2d_matches_numpy_svd_up_to_sign():
  vectors, direction = _dominant_cloud()
  xy = pca_2d(vectors)
  assert xy.shape == (200, 2)
  np.testing.assert_allclose(xy.mean(axis=0), 0.0, atol=1e-9)  # centred
  variances = xy.var(axis=0)
  assert variances[0] > 20 * variances[1] > 0  # the dominant direction comes first
  centred = vectors - vectors.mean(axis=0)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  for i in range(2):
    reference = centred @ vt[i]
    sign = np.sign(reference @ xy[:, i])
    np.testing.assert_allclose(xy[:, i], sign * reference, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(xy[:, i]), s[i], rtol=1e-9)
  assert abs(abs(vt[0] @ direction) - 1.0) < 1e-2  # SVD's first axis is the planted one


def test_pca_2d_sign_is_fixed_and_small_inputs_are_padded():
  vectors, _ = _dominant_cloud(seed=1)
  xy = pca_2d(vectors)
  np.testing.assert_allclose(pca_2d(-vectors), -xy, atol=1e-9)  # same axes, mirrored data
  centred = vectors - vectors.mean(axis=0)
  loadings = np.linalg.lstsq(centred, xy, rcond=None)[0]  # [d, 2]: the axes used
  assert all(loadings[np.argmax(np.abs(loadings[:, i])), i] > 0 for i in range(2))
  line = pca_2d(np.arange(5.0)[:, None])  # d = 1: one component, the second column 0
  np.testing.assert_allclose(line[:, 1], 0.0)
  np.testing.assert_allclose(np.abs(line[:, 0]), np.abs(np.arange(5.0) - 2.0))
  assert pca_2d(np.ones((1, 4))).shape == (1, 2)


def test_usage_shares_and_title():
  counts = np.array([0.0, 3.0, 1.0, 0.0])
  np.testing.assert_allclose(usage_shares(counts), [0.75, 0.25, 0.0, 0.0])
  np.testing.assert_allclose(usage_shares(np.zeros(3)), 0.0)
  title = usage_title(counts)
  perplexity = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
  assert "2/4 (50.0%)" in title and f"perplexity {perplexity:.1f}" in title


@pytest.mark.parametrize("k", [16, 4096])
def test_pngs_are_written_and_decode(tmp_path, k):
  rng = np.random.default_rng(k)
  codebook = rng.normal(size=(k, 8))
  counts = np.where(rng.random(k) < 0.3, 0.0, rng.integers(1, 500, k)).astype(np.float32)
  usage = write_usage_histogram(str(tmp_path / "plots" / "usage.png"), counts)
  pca = write_codebook_pca(str(tmp_path / "plots" / "pca.png"), codebook, counts)
  for path in (usage, pca):
    assert os.path.getsize(path) > 10_000
    with Image.open(path) as image:
      image.load()
      assert image.format == "PNG" and min(image.size) >= 300
      pixels = np.asarray(image.convert("RGB"))
      assert pixels.std() > 10  # not a blank canvas
  assert sorted(os.listdir(tmp_path / "plots")) == ["pca.png", "usage.png"]  # no temporaries


def test_pca_plot_takes_an_unused_codebook_and_rejects_mismatched_counts(tmp_path):
  path = write_codebook_pca(str(tmp_path / "pca.png"), np.eye(4), np.zeros(4))
  assert os.path.getsize(path) > 0
  with pytest.raises(ValueError, match="4 codes but counts has 3"):
    write_codebook_pca(str(tmp_path / "bad.png"), np.eye(4), np.zeros(3))


def test_mode_eval_writes_the_codebook_plots(tmp_path):
  """A two-step smoke run (EMA codebook, in vq_stats), then `python -m vqjax.main
  --mode=eval --config.eval.codebook_plots=True` on it."""
  from tests.conftest import load_config
  from vqjax.train.run import setup, train_and_evaluate

  config = load_config("configs/demo.py:smoke")
  assert config.model.quantizer.learning == "ema" and not config.eval.codebook_plots
  with config.unlocked():
    config.train.steps = 2
    config.eval.every_steps = 100  # the one eval at the last step
  workdir = tmp_path / "run"
  state = train_and_evaluate(config, str(workdir))
  # The plotted codebook is the EMA one in vq_stats, as trained (not the initial one).
  s = setup(config)
  trained = np.asarray(state.vq_stats["quantizer"]["codebook"])
  np.testing.assert_array_equal(s.codebook(state), trained)
  assert not np.allclose(s.codebook(s.state), trained)
  assert "codebook_plots" not in json.load(open(workdir / "eval_2.json"))
  assert not list(workdir.glob("codebook_*.png"))  # training's evals never draw them

  proc = subprocess.run(
      [sys.executable, "-m", "vqjax.main", "--config=configs/demo.py:smoke",
       f"--workdir={workdir}", "--mode=eval", "--config.eval.codebook_plots=True"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = json.load(open(workdir / "eval_2.json"))
  paths = report["codebook_plots"]
  assert paths == {"usage": str(workdir / "codebook_usage_2.png"),
                   "pca": str(workdir / "codebook_pca_2.png")}
  for path in paths.values():
    with Image.open(path) as image:
      image.load()
      assert image.format == "PNG" and os.path.getsize(path) > 10_000
  assert 0.0 < report["codebook_usage"] <= 1.0
