"""Tokenizer -> token store -> transformer -> samples, on one small trained demo tokenizer.

The tokenizer is trained and its tokens extracted once per session (`pipeline` group, so
pytest-xdist keeps these tests on one worker); each test checks one stage against values
computed here independently.
"""

import json
import os

import flax.linen as nn
import numpy as np
import pytest

from tests.conftest import ROOT, load_config

pytestmark = pytest.mark.xdist_group("pipeline")

TOKENIZER = "configs/demo.py:smoke"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  """(config, workdir, run.Setup, restored state, train store, val store) of a 4-step tokenizer."""
  from vqjax.train.run import restore_for_eval, setup, train_and_evaluate
  from vqjax.train.tokenize import tokenize

  root = tmp_path_factory.mktemp("pipeline")
  config = load_config(TOKENIZER)
  workdir = root / "tokenizer"
  train_and_evaluate(config, str(workdir))
  train_store = tokenize(config, str(workdir))
  val_config = config.copy_and_resolve_references()
  with val_config.unlocked():
    val_config.tokenize.split = config.data.val_split
    val_config.tokenize.max_examples = 0  # all 4 (2 images x 2 crops): less than a batch
  val_store = tokenize(val_config, str(workdir))
  s = setup(config)
  state, _ = restore_for_eval(config, str(workdir), s)
  return config, workdir, s, state, train_store, val_store


def transformer_config(spec, tokenizer, **overrides):
  config, workdir, _, _, train_store, val_store = tokenizer
  c = load_config(spec)
  with c.unlocked():
    c.tokens.dir = train_store
    c.tokens.val_dir = val_store
    c.tokenizer.config = os.path.join(ROOT, TOKENIZER)
    c.tokenizer.workdir = str(workdir)
    c.train.steps = 2
    for key, value in overrides.items():
      section, name = key.split("__")
      c[section][name] = value
  return c


def variables(state):
  return {"params": state.params, "vq_stats": state.vq_stats}


def test_token_store_holds_the_encoder_indices_and_resumes(tokenizer, tmp_path):
  from vqjax.data.pipeline import eval_batches
  from vqjax.data.tokens import TokenStore
  from vqjax.nn.vqgan import VQGAN
  from vqjax.train.tokenize import tokenize

  config, workdir, s, state, train_store, _ = tokenizer
  store = TokenStore(train_store)
  t = config.tokenize
  assert len(store) == t.max_examples and store.token_shape == (16, 16)  # 32 px, f = 2
  saved = np.stack([store[i]["tokens"] for i in range(len(store))])
  # The same images through the restored tokenizer, encoded here directly.
  images = np.concatenate([b["image"][b["mask"] > 0] for b in eval_batches(
      config, split=t.split, batch_size=t.batch_size, max_examples=t.max_examples)])
  direct = s.models.vqgan.apply(variables(state), images, method=VQGAN.encode).indices
  np.testing.assert_array_equal(saved, np.asarray(direct))
  # A copy killed after its first shard: the rerun completes it identically.
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.tokenize.output_dir = str(tmp_path / "tokens")
  folder = tokenize(c, str(workdir))
  meta_path = os.path.join(folder, "meta.json")
  meta = json.load(open(meta_path))
  meta["shards"], meta["complete"] = meta["shards"][:1], False
  json.dump(meta, open(meta_path, "w"))
  tokenize(c, str(workdir))
  resumed = TokenStore(folder)
  np.testing.assert_array_equal(
      np.stack([resumed[i]["tokens"] for i in range(len(resumed))]), saved)


@pytest.fixture(scope="session")
def maskgit_run(tokenizer):
  """A 2-step MaskGIT with validation and sample grids at every step."""
  from vqjax.train import transformer

  c = transformer_config("configs/maskgit_imagenet.py:smoke", tokenizer, eval__every_steps=1,
                         eval__grid_images=4, sample__num_images=3, sample__batch_size=2,
                         sample__steps=4, eval__num_samples=3, eval__fid_method="eigh",
                         eval__kid_subsets=3, eval__kid_subset_size=2)
  with c.unlocked():
    c.eval.stats_cache_dir = str(tokenizer[1].parent / "fid_cache")
  run_dir = tokenizer[1].parent / "maskgit"
  transformer.train(c, str(run_dir))
  return c, run_dir


def test_training_writes_sample_grids_and_validation_scalars(maskgit_run):
  import tensorflow as tf
  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator

  c, run_dir = maskgit_run
  for step in (1, 2):  # eval.every_steps = 1
    grid = np.asarray(Image.open(run_dir / "images" / f"samples_{step:07d}.png"))
    assert grid.shape == (2 * 32, 2 * 32, 3)  # 4 samples in a 2 x 2 grid
  events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
  events.Reload()
  loss = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("val/loss")]
  assert len(loss) == 2 and all(np.isfinite(loss))
  assert np.log(32) * 0.5 < loss[-1] < np.log(32) * 2  # near chance for 2 steps, K = 32


def test_sample_writes_the_tokenizer_decoding(tokenizer, maskgit_run):
  from vqjax.nn.vqgan import VQGAN
  from vqjax.train.sample import sample

  _, _, s, state, _, _ = tokenizer
  c, run_dir = maskgit_run
  out = np.load(sample(c, str(run_dir)))
  assert out["images"].shape == (3, 32, 32, 3) and out["images"].dtype == np.uint8
  assert out["tokens"].shape == (3, 16, 16) and out["tokens"].max() < 32
  np.testing.assert_array_equal(out["labels"], [0, 1, 2])  # labels cycle through the classes
  x = s.models.vqgan.apply(variables(state), out["tokens"], method=VQGAN.decode_indices)
  expect = np.clip((np.clip(np.asarray(x), -1, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  assert np.abs(expect.astype(int) - out["images"].astype(int)).max() <= 1
  assert (run_dir / "samples" / "samples_2.png").exists()


def test_eval_scores_the_sampled_images_against_the_val_statistics(maskgit_run):
  """--mode=eval's FID equals the FID tool's on --mode=sample's file and the cached val stats."""
  import glob

  from vqjax.eval.evaluator import IS_UNAVAILABLE
  from vqjax.eval.fid import compare
  from vqjax.train import transformer
  from vqjax.train.sample import sample

  c, run_dir = maskgit_run
  metrics = transformer.evaluate(c, str(run_dir))
  assert metrics["num_samples"] == 3 and np.isfinite(metrics["kid"])
  report = json.load(open(run_dir / "eval_2.json"))
  assert report["fid"] == pytest.approx(metrics["fid"])
  assert report["notes"] == [IS_UNAVAILABLE] and "inception_score" not in report
  assert "val/loss" in metrics and 0 <= metrics["val/accuracy"] <= 1
  (reference,) = glob.glob(os.path.join(c.eval.stats_cache_dir, "*.npz"))
  tool = compare(sample(c, str(run_dir)), reference, batch_size=4, fid_method="eigh",
                 kid_subsets=3, kid_subset_size=2)
  assert tool["num_a"] == 3 and tool["num_b"] == 4  # the smoke val split: 2 images x 2 crops
  np.testing.assert_allclose(metrics["fid"], tool["fid"], rtol=2e-3)


def test_gpt_validation_loss_and_visualize(tokenizer):
  """Validation NLL/accuracy of a GPT equal a NumPy recomputation over the (padded) val store;
  --mode=visualize's grid and teacher-forced accuracy equal a direct forward pass."""
  from PIL import Image

  from vqjax.data.pipeline import eval_batches
  from vqjax.data.tokens import TokenStore
  from vqjax.nn.vqgan import VQGAN
  from vqjax.train import transformer
  from vqjax.train.visualize import visualize

  config, workdir, s, state, _, val_store = tokenizer
  c = transformer_config("configs/ar_imagenet.py:smoke", tokenizer, eval__grid_images=0)
  run_dir = workdir.parent / "gpt"
  trained = transformer.train(c, str(run_dir))
  params = nn.unbox(trained.params)
  model = transformer.build_objective(c, (16, 16), 32).model

  store = TokenStore(val_store)
  tokens = np.stack([store[i]["tokens"].reshape(-1) for i in range(len(store))])
  labels = np.array([store[i]["label"] for i in range(len(store))])
  logits = np.asarray(model.apply({"params": params}, tokens, labels), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, tokens[..., None], -1).mean()
  acc = (logits.argmax(-1) == tokens).mean()
  got = transformer.setup(c).validate(trained.params)
  assert len(store) == 4 and c.eval.batch_size == 8  # one batch, half of it padding
  np.testing.assert_allclose(got["val/loss"], nll, rtol=1e-5)
  np.testing.assert_allclose(got["val/accuracy"], acc, rtol=1e-6)

  out = visualize(c, str(run_dir), num_images=3)
  grid = np.asarray(Image.open(run_dir / "visualize" / "visualize_2.png"))
  assert grid.shape == (3 * 32, 3 * 32, 3) and out["num_images"] == 3
  batch = next(eval_batches(config, batch_size=3, max_examples=3))
  enc = np.asarray(s.models.vqgan.apply(variables(state), batch["image"],
                                        method=VQGAN.encode).indices).reshape(3, -1)
  logits = model.apply({"params": params}, enc, np.asarray(batch["label"]))
  np.testing.assert_allclose(out["top1_accuracy"], (np.asarray(logits).argmax(-1) == enc).mean(),
                             rtol=1e-6)
  first_input = np.clip((batch["image"][0] + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(grid[:32, :32], first_input)  # column 1: the input
