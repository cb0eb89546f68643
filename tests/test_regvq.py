"""Reg-VQ end to end: configs/regvq_ade20k.py:smoke runs every stage once (shared by the tests
of this module, which xdist keeps on one worker); a GPT conditioned on semantic maps learns to
use its condition; the recipes' variants and the bad inputs."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import in_repository, load_config
from tests.test_bad_inputs import run_table

# The tests that share the smoke run stay on one xdist worker.
SHARED = pytest.mark.xdist_group("regvq_smoke")
STAGES = ["tokenizer", "tokens_train", "tokens_val", "ar", "ar_samples", "ar_eval",
          "reconstruction"]




@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """DIR of a finished `configs/regvq_ade20k.py:smoke` pipeline (fixed per test session: a
  re-created fixture finds every stage finished and skips it)."""
  from vqjax.train.pipeline import run_pipeline

  workdir = str(tmp_path_factory.getbasetemp() / "regvq_smoke_run")
  in_repository(run_pipeline, load_config("configs/regvq_ade20k.py:smoke"), workdir)
  return workdir


def _json(pattern):
  (path,) = glob.glob(pattern)
  with open(path) as f:
    return json.load(f)


def _centre_pixels(label_map, grid):
  """The id at each grid cell's centre pixel, by loops (independent of downsample_nearest)."""
  h, w = label_map.shape
  out = np.zeros(grid, np.int32)
  for i in range(grid[0]):
    for j in range(grid[1]):
      out[i, j] = label_map[int((i + 0.5) * h / grid[0]), int((j + 0.5) * w / grid[1])]
  return out


@SHARED
def test_smoke_pipeline_stores_conditions_and_reports_table_1(smoke_run):
  from vqjax.data.pipeline import eval_batches
  from vqjax.data.tokens import TokenStore

  for name in STAGES:
    assert os.path.exists(os.path.join(smoke_run, name, "stage_finished.json")), name
  tok_config = load_config("configs/regvq_ade20k.py:tokenizer,smoke")
  assert tok_config.model.quantizer.name == "regvq" and tok_config.loss.terms.pcl.weight > 0
  # The validation store holds, beside each image's tokens, its label map's ids at the
  # centre of each token cell (16x16 tokens at 32px: the paper's 256 condition tokens).
  store = TokenStore(os.path.join(smoke_run, "tokenizer", "tokens_validation"))
  assert store.token_shape == (16, 16) and store.condition_shape == (16, 16)
  (batch,) = list(in_repository(lambda: list(eval_batches(tok_config, max_examples=0))))
  n = int(batch["mask"].sum())
  assert len(store) == n
  for i in range(n):
    np.testing.assert_array_equal(store[i]["condition"],
                                  _centre_pixels(np.asarray(batch["label_map"][i]), (16, 16)))
  # The GPT reads 256 condition ids then 256 image tokens: 512 positions.
  from vqjax.train import transformer

  config = load_config("configs/regvq_ade20k.py:ar,smoke")
  config.tokens.dir = os.path.join(smoke_run, "tokenizer", "tokens_train")
  config.tokens.val_dir = ""
  model = transformer.setup(config).objective.model
  assert (model.cond_len, model.seq_len) == (256, 256)
  # Samples: one per validation map in order (cycled), a [map | real | sample] row each.
  (npz,) = glob.glob(os.path.join(smoke_run, "ar", "samples", "samples_*.npz"))
  samples = np.load(npz)
  k = samples["images"].shape[0]
  expected = np.stack([store[i % n]["condition"].reshape(-1) for i in range(k)])
  np.testing.assert_array_equal(samples["conditions"], expected)
  grid = np.asarray(Image.open(npz.replace(".npz", ".png")))
  assert grid.shape == (k * 32, 3 * 32, 3)
  np.testing.assert_array_equal(grid[:32, 64:], samples["images"][0])
  # Table 1: FID[G] of the samples, FID[R] and PSNR[R] of the reconstructions, and the
  # codebook plots of Fig. 1 / 7.
  gen = _json(os.path.join(smoke_run, "ar", "eval_*.json"))
  assert np.isfinite(gen["fid"]) and gen["num_samples"] == 8
  rec = _json(os.path.join(smoke_run, "tokenizer", "eval_*.json"))
  assert np.isfinite(rec["rfid"]) and np.isfinite(rec["psnr"])
  for path in rec["codebook_plots"].values():
    assert Image.open(path).size[0] > 100


@pytest.mark.slow  # make test-slow: its run costs minutes on 2 CPU cores
def test_gpt_learns_to_copy_its_semantic_map(tmp_path):
  """Tokens equal to their condition map (mod K): a GPT that reads its prefix predicts them
  far above chance (1/K); one whose prefix were ignored could not."""
  from vqjax.data.tokens import TokenStoreWriter
  from vqjax.train import transformer

  rng = np.random.default_rng(0)
  k, classes, grid = 8, 8, (3, 3)
  for split, n in (("train", 256), ("val", 32)):
    maps = rng.integers(0, classes, (n,) + grid)
    writer = TokenStoreWriter(str(tmp_path / split), grid, k, condition_shape=grid)
    writer.add(maps % k, np.zeros(n, np.int32), maps)
    writer.finish()
  config = load_config("configs/regvq_ade20k.py:ar,smoke")
  config.tokens.dir, config.tokens.val_dir = str(tmp_path / "train"), str(tmp_path / "val")
  config.tokenizer.config = config.tokenizer.workdir = ""
  config.model.width, config.model.mlp_dim = 64, 128
  config.optim.lr, config.optim.warmup_steps = 3e-3, 10
  config.train.steps, config.train.batch_size, config.train.checkpoint_every = 300, 32, 300
  config.eval.every_steps, config.eval.grid_images, config.eval.max_examples = 0, 0, 0
  transformer.train(config, str(tmp_path / "run"))
  s = transformer.setup(config)
  from vqjax.train import generate

  state, _ = generate.restore_latest(str(tmp_path / "run"), s.state, "transformer")
  metrics = s.validate(state.params)
  assert metrics["val/accuracy"] > 0.9, metrics  # chance: 1/8


def test_recipes_and_rows():
  for spec in ("configs/regvq_ade20k.py", "configs/regvq_celebahq.py"):
    pipeline = load_config(spec)
    assert [s.name for s in pipeline.stages] == STAGES
    ar = load_config(f"{spec}:ar")
    assert (ar.model.depth, ar.model.heads, ar.model.width) == (24, 16, 1024)
    assert ar.model.condition == "semantic_map" and ar.train.epochs == 50
    tok = load_config(f"{spec}:tokenizer")
    assert (tok.optim.name, tok.optim.b1, tok.optim.b2, tok.optim.lr) == (
        "adamw", 0.9, 0.95, 1.5e-4)
    assert tok.train.batch_size == 40 and tok.model.quantizer.codebook_size == 1024
  assert load_config("configs/regvq_ade20k.py:tokenizer").train.epochs == 100
  assert load_config("configs/regvq_celebahq.py:tokenizer").train.epochs == 60
  assert load_config("configs/regvq_celebahq.py:ar").model.num_classes == 19
  assert load_config("configs/regvq_ade20k.py:ar").model.num_classes == 151
  assert load_config("configs/regvq_ade20k.py:ar,tfds").model.num_classes == 101
  rows = {row: load_config(f"configs/regvq_ade20k.py:tokenizer,{row}")
          for row in ("baseline", "prior", "mask", "cl", "pcl")}
  assert rows["baseline"].model.quantizer.name == "vq"
  assert rows["prior"].model.quantizer.mask_ratio == 0.0
  assert rows["mask"].model.quantizer.mask_ratio == 0.4
  on = {row: tuple(t for t in ("cl", "pcl") if c.loss.terms[t].weight > 0)
        for row, c in rows.items()}
  assert on == {"baseline": (), "prior": (), "mask": (), "cl": ("cl",), "pcl": ("pcl",)}


@SHARED
def test_bad_inputs(smoke_run, tmp_path):
  tokens = os.path.join(smoke_run, "tokenizer", "tokens_train")
  plain = str(tmp_path / "plain")
  from vqjax.data.tokens import TokenStoreWriter

  writer = TokenStoreWriter(plain, (16, 16), 32)
  writer.add(np.zeros((2, 16, 16), np.int32), np.zeros(2, np.int32))
  writer.finish()
  ar = "--config=configs/regvq_ade20k.py:ar,smoke"
  run_table([
      ([ar, f"--config.tokens.dir={plain}"], "has no condition maps"),
      ([ar, f"--config.tokens.dir={tokens}", "--config.model.num_classes=3"],
       "model.num_classes=3"),
      (["--config=configs/regvq_ade20k.py:tokenizer,baseline,smoke",
        "--config.loss.terms.pcl.weight=0.2"], "reads what the quantisers ('regvq',)"),
      (["--config=configs/regvq_ade20k.py:tokenizer,smoke",
        "--config.loss.terms.pcl.weights_path=/nonexistent/vgg19.h5"], "vgg19.h5"),
  ], tmp_path)
