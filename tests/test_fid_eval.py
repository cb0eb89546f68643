"""The reference-statistics cache key, the FID command line, the sharded extractor.

rFID inside the tokenizer evaluator is checked by the demo smoke run in test_training.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from vqjax.eval import feature_stats as fs
from vqjax.eval import fid as fid_cli
from vqjax.eval import inception_features as incf
from vqjax.weights.fid_inception import fid_inception_path


def test_reference_key_changes_with_resolution_split_and_data(smoke_config):
  weights = fid_inception_path()
  base = incf.data_description(smoke_config, "validation")
  key = incf.reference_key(base, weights)
  assert incf.reference_key(dict(base), weights) == key  # deterministic
  with smoke_config.unlocked():
    smoke_config.data.image_size = 64
  assert incf.reference_key(incf.data_description(smoke_config, "validation"), weights) != key
  assert incf.reference_key(incf.data_description(smoke_config, "train"), weights) != \
      incf.reference_key(incf.data_description(smoke_config, "validation"), weights)
  with smoke_config.unlocked():
    smoke_config.data.image_size = 32
    smoke_config.eval.max_examples = 16
  assert incf.reference_key(incf.data_description(smoke_config, "validation"), weights) != key
  path = incf.reference_path("/cache", base, weights)
  assert path.startswith("/cache/embedded_validation_32px_") and path.endswith(key + ".npz")


def _write_images(folder, seed, n, size=(40, 56), corrupt=False):
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
        os.path.join(folder, f"{i}.png"))
  if corrupt:
    with open(os.path.join(folder, "broken.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\nnot really")


def test_fid_folders_and_stat_files(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _write_images(a, 0, 5)
  _write_images(b, 1, 4, size=(64, 64))
  result = fid_cli.compare(str(a), str(b), batch_size=4, fid_method="eigh", kid_subsets=3,
                           save_a=str(tmp_path / "a.npz"))
  assert result["num_a"] == 5 and result["num_b"] == 4 and result["fid"] > 0
  assert np.isfinite(result["kid"])
  # The saved statistics of `a` against `a` itself: identical features, FID ~ 0.
  again = fid_cli.compare(str(tmp_path / "a.npz"), str(a), batch_size=4, fid_method="eigh",
                          kid_subsets=3)
  assert abs(again["fid"]) < 1e-3
  saved = incf.load_stats(str(tmp_path / "a.npz"))
  assert saved["features"].shape == (5, 2048)
  # The same images as a `--mode=sample`-style .npz of uint8 arrays: the same features.
  pixels = np.stack([np.asarray(Image.open(a / f"{i}.png")) for i in range(5)])
  np.savez(tmp_path / "samples.npz", images=pixels, labels=np.zeros(5))
  as_arrays = fid_cli.compare(str(tmp_path / "samples.npz"), str(tmp_path / "a.npz"),
                              batch_size=4, fid_method="eigh", kid_subsets=3)
  assert abs(as_arrays["fid"]) < 1e-3 and as_arrays["num_a"] == 5
  # The command line, on two stat files (no Inception needed): one JSON line.
  np.savez(tmp_path / "b.npz", mu=saved["mu"] + 1.0, sigma=saved["sigma"])
  out = subprocess.run([sys.executable, "-m", "vqjax.eval.fid", f"--a={tmp_path / 'a.npz'}",
                        f"--b={tmp_path / 'b.npz'}", "--fid_method=eigh"], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  line = json.loads(out.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(line["fid"], 2048.0, rtol=1e-6)  # |mu shift|^2, same sigma
  assert "kid" not in line  # b.npz has no raw features
  out = subprocess.run([sys.executable, "-m", "vqjax.eval.fid", f"--a={tmp_path / 'nope'}",
                        f"--b={tmp_path / 'b.npz'}"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and "neither an image folder" in out.stderr


def test_fid_folder_with_a_corrupt_image_names_it(tmp_path):
  _write_images(tmp_path / "c", 2, 3, corrupt=True)
  with pytest.raises(fs.FIDError, match="broken.png.*remove or replace"):
    fid_cli.compare(str(tmp_path / "c"), str(tmp_path / "c"), fid_method="eigh")


_SHARDED = r"""
import numpy as np, jax
from jax.sharding import Mesh
from vqjax.eval.inception_features import InceptionExtractor
x = np.random.default_rng(0).uniform(-1, 1, (8, 48, 48, 3)).astype(np.float32)
def feats(devices):
  ex = InceptionExtractor(Mesh(np.array(devices).reshape(-1, 1), ("data", "model")))
  return ex.gather(ex(x), np.ones(8))
a, b = feats(jax.devices()), feats(jax.devices()[:1])
print(len(jax.devices()), float(np.abs(a - b).max() / np.abs(b).max()))
"""


@pytest.mark.slow
def test_extractor_sharded_over_8_devices_equals_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, capture_output=True,
                       text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  n, rel = out.stdout.split()
  assert int(n) == 8 and float(rel) < 1e-5


def test_damaged_reference_cache_is_rebuilt_not_fatal(tmp_path, smoke_config):
  from types import SimpleNamespace

  from vqjax.eval.evaluator import ReferenceStats

  with smoke_config.unlocked():
    smoke_config.eval.stats_cache_dir = str(tmp_path)
  extractor = SimpleNamespace(weights_path=fid_inception_path())
  ref = ReferenceStats(smoke_config, extractor, "validation")
  assert ref.cached is None and ref.building is not None  # nothing cached yet
  stats = fs.RunningStats(2048)
  stats.update(np.random.default_rng(0).normal(size=(4, 2048)))
  incf.save_stats(ref.path, stats)
  assert ReferenceStats(smoke_config, extractor, "validation").cached["num_images"] == 4
  with open(ref.path, "wb") as f:
    f.write(b"half a file")
  again = ReferenceStats(smoke_config, extractor, "validation")
  assert again.cached is None and again.building is not None
