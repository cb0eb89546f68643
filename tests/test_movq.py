"""MoVQ end to end: configs/movq_imagenet.py:smoke runs every stage once (shared by the tests
of this module, which xdist keeps on one worker), the "auto" GPT over its multichannel tokens,
the colab, and the bad inputs."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import in_repository, load_config, run_notebook
from tests.test_bad_inputs import run_table

pytestmark = pytest.mark.xdist_group("movq_smoke")
STAGES = ["tokenizer", "tokens_train", "tokens_val", "mask", "mask_samples", "mask_eval",
          "reconstruction"]




@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """DIR of a finished `configs/movq_imagenet.py:smoke` pipeline (run in this process).

  The directory is fixed per test session (and xdist worker): should pytest set this
  module fixture up again, the pipeline's markers make the rerun skip every stage.
  """
  from vqjax.train.pipeline import run_pipeline

  workdir = str(tmp_path_factory.getbasetemp() / "movq_smoke_run")
  in_repository(run_pipeline, load_config("configs/movq_imagenet.py:smoke"), workdir)
  return workdir


@pytest.fixture(scope="module")
def auto_run(smoke_run):
  """DIR of the "auto" GPT trained, sampled and evaluated on the smoke run's tokens (once
  per session: a marker file records that the three modes finished)."""
  from vqjax.train.modes import run_mode

  workdir = os.path.join(smoke_run, "auto")
  done = os.path.join(workdir, "modes_finished")
  if not os.path.exists(done):
    for mode in ("train", "sample", "eval"):
      in_repository(run_mode, auto_config(smoke_run), workdir, mode)
    open(done, "w").close()
  return workdir


def auto_config(smoke_run):
  config = load_config("configs/movq_imagenet.py:auto,smoke")
  tokenizer = os.path.join(smoke_run, "tokenizer")
  config.tokens.dir = os.path.join(tokenizer, "tokens_train")
  config.tokens.val_dir = os.path.join(tokenizer, "tokens_validation")
  config.tokenizer.workdir = tokenizer
  return config


def _json(pattern):
  (path,) = glob.glob(pattern)
  with open(path) as f:
    return json.load(f)


def test_smoke_pipeline_leaves_every_stages_output(smoke_run):
  for name in STAGES:
    assert os.path.exists(os.path.join(smoke_run, name, "stage_finished.json")), name
  with open(os.path.join(smoke_run, "tokenizer", "tokens_train", "meta.json")) as f:
    assert json.load(f)["token_shape"] == [16, 16, 4]  # 32px, f2, c = 4
  (samples,) = glob.glob(os.path.join(smoke_run, "mask", "samples", "samples_*.npz"))
  assert np.load(samples)["tokens"].shape[1:] == (16, 16, 4)
  metrics = _json(os.path.join(smoke_run, "mask", "eval_*.json"))
  assert np.isfinite(metrics["fid"]) and metrics["num_samples"] == 8
  table = _json(os.path.join(smoke_run, "tokenizer", "eval_*.json"))
  assert all(np.isfinite(table[k]) for k in ("psnr", "ssim", "lpips", "rfid")), table


def test_auto_scenario_trains_samples_and_evaluates_on_multichannel_tokens(auto_run):
  """A GPT over the h*w*c indices (position-major) of the smoke tokenizer: train, sample
  [h, w, 4] maps that decode to images, and FID of the samples."""
  workdir = auto_run
  (samples,) = glob.glob(os.path.join(workdir, "samples", "samples_*.npz"))
  saved = np.load(samples)
  assert saved["tokens"].shape[1:] == (16, 16, 4) and saved["images"].shape[1:] == (32, 32, 3)
  metrics = _json(os.path.join(workdir, "eval_*.json"))
  assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["val/loss"])


@pytest.mark.parametrize("order", ["position_major", "channel_major"])
def test_gpt_sequence_order_of_multichannel_tokens(order):
  """The order of the h*w*c indices, against a loop over (position, channel), and back."""
  from vqjax import registry
  from vqjax.objectives.base import Conditions

  h, w, c = 2, 3, 4
  objective = registry.OBJECTIVES.build(
      registry.OBJECTIVES.config("gpt", order=order), model_config=None, token_shape=(h, w, c),
      codebook_size=64, conditions=Conditions(0, 1))
  tokens = np.arange(h * w * c).reshape(1, h, w, c)
  if order == "position_major":
    want = [tokens[0, i, j, k] for i in range(h) for j in range(w) for k in range(c)]
  else:
    want = [tokens[0, i, j, k] for k in range(c) for i in range(h) for j in range(w)]
  flat = objective.flatten(jnp.asarray(tokens))
  assert objective.seq_len == h * w * c and flat.tolist() == [want]
  np.testing.assert_array_equal(objective.unflatten(flat), tokens)


def test_tokens_colab_runs_on_the_smoke_run(smoke_run, monkeypatch):
  text = run_notebook("movq_tokens.ipynb", monkeypatch, smoke_run)
  assert "tokens (2, 16, 16, 4)" in text and "changes the decoding by" in text


def test_bad_movq_inputs_stop_before_compiling(smoke_run, auto_run, tmp_path):
  """channels that do not divide the embedding, more conditioned blocks than the decoder
  has, an unknown F^0, and a GPT asked for another token order than it was trained on."""
  tokenizer = "configs/movq_imagenet.py:tokenizer,smoke"
  run_table([
      ([f"--config={tokenizer}", "--config.model.quantizer.channels=3"], "channels=3"),
      ([f"--config={tokenizer}", "--config.model.decoder.spatial_norm_blocks=99"],
       "spatial_norm_blocks=99"),
      ([f"--config={tokenizer}", "--config.model.decoder.f0=bogus"], "f0='bogus'"),
      (["--config=configs/movq_imagenet.py:auto,smoke", "--mode=sample",
        "--config.model.objective.order=channel_major",
        f"--config.tokens.dir={smoke_run}/tokenizer/tokens_train",
        f"--config.tokenizer.workdir={smoke_run}/tokenizer"],
       "order='channel_major' (trained: 'position_major')", auto_run),
  ], tmp_path)


@pytest.mark.parametrize("spec", ["configs/movq_ffhq.py:smoke", "configs/movq_ffhq.py",
                                  "configs/movq_imagenet.py"])
def test_pipelines_plan(spec, tmp_path):
  """Every stage's recipe loads and validates; the paper's sizes; FFHQ is unconditional."""
  from vqjax.train.pipeline import plan

  stages = {s.name: s for s in plan(load_config(spec), str(tmp_path / "run"))}
  assert list(stages) == STAGES
  tok, mask = stages["tokenizer"].config, stages["mask"].config
  assert mask.model.num_classes == (1000 if "imagenet" in spec else 0)
  if "smoke" not in spec:
    q = tok.model.quantizer
    assert (q.name, q.codebook_size, q.embed_dim, q.channels) == ("multichannel", 1024, 256, 4)
    assert tok.model.decoder.name == "movq" and tok.train.batch_size == 48
    assert (tok.train.epochs, mask.train.epochs, mask.train.batch_size) == (40.0, 200.0, 64)
    assert (mask.model.depth, mask.model.heads, mask.model.width, mask.model.mlp_dim) == (
        24, 16, 1024, 4096)
