"""End-to-end training on the embedded set: smoke runs, exact resume, NaN handling."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, load_config
from vqjax.core import checkpoint, partitioning
from vqjax.train.loop import NonFiniteGuard, NonFiniteLossError, StopRequest
from vqjax.train.run import evaluate, setup, train_and_evaluate

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if load_config(os.path.relpath(p, ROOT)).trainer == "tokenizer")


@pytest.mark.parametrize("path", CONFIGS)
def test_smoke_variant_trains_and_evaluates(path, tmp_path):
  config = load_config(f"{path}:smoke")
  with_fid = path == os.path.join("configs", "demo.py")  # rFID costs ~15 s: check it once
  if with_fid:
    with config.unlocked():
      config.eval.fid = True
      config.eval.fid_method = "eigh"  # sqrtm has its own tests; this keeps the run short
      config.eval.stats_cache_dir = str(tmp_path / "cache")
      config.eval.kid_subsets = 5
  workdir = tmp_path / "run"
  state = train_and_evaluate(config, str(workdir))
  assert int(state.step) == config.train.steps
  report = json.load(open(workdir / f"eval_{config.train.steps}.json"))
  assert 0.0 < report["codebook_usage"] <= 1.0 and np.isfinite(report["psnr"])
  assert glob.glob(str(workdir / "images" / "reconstructions_*.png"))
  assert glob.glob(str(workdir / "events.out.tfevents.*"))
  assert "decoder/conv_out/kernel" in (workdir / "parameters.txt").read_text()
  again = evaluate(config, str(workdir))  # --mode=eval on the saved checkpoint
  np.testing.assert_allclose(again["psnr"], report["psnr"], rtol=1e-5)
  if with_fid:
    _check_rfid(config, workdir, report, again)
  else:
    assert "rfid" not in report


def _check_rfid(config, workdir, report, again):
  """rFID/KID reported at every eval; the val statistics cached once and reused."""
  from jax.sharding import Mesh

  from vqjax.data.pipeline import eval_batches
  from vqjax.eval.evaluator import IS_UNAVAILABLE
  from vqjax.eval.inception_features import InceptionExtractor, load_stats

  for r in (json.load(open(workdir / "eval_0.json")), report):
    assert np.isfinite(r["rfid"]) and r["rfid"] > 0 and np.isfinite(r["rkid"])
    assert IS_UNAVAILABLE in r["notes"]
  files = glob.glob(os.path.join(config.eval.stats_cache_dir, "*.npz"))
  assert len(files) == 1  # built at step 0, loaded at the later evals and by --mode=eval
  # The cache holds the real val images' statistics, recomputed here independently.
  extractor = InceptionExtractor(Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                                      ("data", "model")))
  direct = extractor.stats_of_batches(eval_batches(config))
  cached = load_stats(files[0])
  assert cached["num_images"] == direct.n == report["num_examples"] > 1
  np.testing.assert_allclose(cached["mu"], direct.mean_cov()[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(again["rfid"], report["rfid"], rtol=1e-6)


@pytest.mark.parametrize("fq_layers", [(), (0, 2)], ids=["patchgan", "patchgan_fq"])
def test_killed_run_resumes_exactly(tmp_path, smoke_config, fq_layers):
  """Also with FQ-GAN's dictionaries in the PatchGAN (disc.fq_layers): they are trained by
  the discriminator steps and restored bitwise."""
  c = smoke_config
  with c.unlocked():
    c.disc.fq_layers = fq_layers
    c.train.steps = 6
    c.train.checkpoint_every = 100  # only the save on stop
    c.train.image_every = 100
    c.eval.every_steps = 100
  straight = train_and_evaluate(c, str(tmp_path / "straight"))

  stop = StopRequest()
  def kill_after_3(step):
    if step == 3:
      stop.event.set()  # what SIGTERM does
  partial = train_and_evaluate(c, str(tmp_path / "resumed"), stop=stop, after_step=kill_after_3)
  assert int(partial.step) == 3
  resumed = train_and_evaluate(c, str(tmp_path / "resumed"))
  assert int(resumed.step) == 6
  leaves = [jax.tree.leaves(jax.device_get(s)) for s in (straight, resumed)]
  for a, b in zip(*leaves, strict=True):
    np.testing.assert_array_equal(a, b)
  fresh = setup(c).state.disc_stats
  assert sorted(k for k in resumed.disc_stats if k.startswith("fq_")) == [
      f"fq_{i}" for i in fq_layers]
  for name in (f"fq_{i}" for i in fq_layers):  # the EMA dictionaries moved during training
    assert not np.allclose(resumed.disc_stats[name]["dictionary"], fresh[name]["dictionary"])


def test_nonfinite_batch_skips_the_update(smoke_config):
  s = setup(smoke_config)
  bad = np.zeros((8, 32, 32, 3), np.float32)
  bad[0, 0, 0, 0] = np.nan
  batch = partitioning.shard_batch({"image": bad, "label": np.zeros(8, np.int32)}, s.mesh)
  before = jax.device_get(s.state)
  state, metrics = s.train_step(s.state, batch, s.term_params)
  after = jax.device_get(state)
  assert float(metrics["nonfinite"]) == 1.0 and int(after.step) == 1
  for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_host_picks_the_plain_step_before_disc_start_and_the_gan_step_from_it(smoke_config):
  with smoke_config.unlocked():
    smoke_config.loss.disc_start = 1
  s = setup(smoke_config)
  rng = np.random.default_rng(0)
  batch = partitioning.shard_batch(
      {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
       "label": np.zeros(8, np.int32)}, s.mesh)
  before = jax.device_get(s.state)
  state, m0 = s.train_step(s.state, batch, s.term_params)  # step 0 < disc_start
  after0 = jax.device_get(state)
  assert float(m0["loss/d"]) == 0.0 and float(m0["loss/g"]) == 0.0
  for part in ("disc_params", "disc_opt_state", "disc_stats"):
    for a, b in zip(jax.tree.leaves(getattr(before, part)), jax.tree.leaves(getattr(after0, part)),
                    strict=True):
      np.testing.assert_array_equal(a, b)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, before.params, after0.params)))
  state, m1 = s.train_step(state, batch, s.term_params)  # step 1 = disc_start: GAN on
  after1 = jax.device_get(state)
  assert float(m1["loss/d"]) > 0.0 and float(m1["adaptive_weight"]) > 0.0
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, after0.disc_params,
                                              after1.disc_params)))
  # The two programs log the same metrics, so the loop can average across disc_start.
  assert sorted(m0) == sorted(m1)


def test_guard_stops_after_consecutive_nonfinite_steps():
  guard = NonFiniteGuard(limit=2)
  guard.update(1, {"loss/total": 0.5, "nonfinite": 0.0})
  guard.update(2, {"loss/total": np.nan, "nonfinite": 1.0})
  guard.update(3, {"loss/total": 0.4, "nonfinite": 0.0})  # a finite step resets the count
  guard.update(4, {"loss/total": np.nan, "nonfinite": 1.0})
  with pytest.raises(NonFiniteLossError, match=r"ending at step 5.*step 3.*'loss/total': 0.4"):
    guard.update(5, {"loss/total": np.inf, "nonfinite": 1.0})


def test_diverging_run_stops_and_never_saves_nan(tmp_path, smoke_config):
  c = smoke_config
  with c.unlocked():
    c.optim.lr = 1e30
    c.train.steps = 20
    c.train.max_consecutive_nonfinite = 3
    c.train.checkpoint_every = 1
    c.eval.every_steps = 100
  with pytest.raises(NonFiniteLossError, match="No checkpoint from before step 1 is kept"):
    train_and_evaluate(c, str(tmp_path))
  # Step 1's update blew the state up (every later loss is NaN): its checkpoint is set aside
  # and none is kept (tests/test_checkpoint_healing.py resumes such a run from a good one).
  assert not [name for name in os.listdir(tmp_path / "checkpoints") if name.isdigit()]
  assert [name.split("-")[0] for name in os.listdir(tmp_path / checkpoint.DIVERGED)] == ["1"]
