"""The GAN trainer (FQ-GAN's BigGAN experiments): the smoke run of configs/fqgan_cifar10.py
(trained, sampled and evaluated once, shared by this module's tests on one xdist worker), the
step's semantics (EMA, n_critic batches, non-finite guard), exact resume, FQ dictionaries over
8 fake devices, the eval-history summary, the colab and the bad inputs."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, in_repository, load_config, run_notebook
from tests.test_bad_inputs import run_table

# The tests that share the smoke run stay on one xdist worker.
SHARED = pytest.mark.xdist_group("gan_smoke")
SMOKE = "configs/fqgan_cifar10.py:smoke"




@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
  """A run directory of `configs/fqgan_cifar10.py:smoke` after --mode=train (with its FID at
  the last step), sample and eval (a marker file records that the three finished)."""
  from vqjax.train.modes import run_mode

  workdir = str(tmp_path_factory.getbasetemp() / "fqgan_smoke_run")
  done = os.path.join(workdir, "modes_finished")
  if not os.path.exists(done):
    for mode in ("train", "sample", "eval"):
      in_repository(run_mode, load_config(SMOKE), workdir, mode)
    open(done, "w").close()
  return workdir


@SHARED
def test_smoke_run_scores_samples_and_writes_a_class_grid(gan_run):
  config = load_config(SMOKE)
  with open(os.path.join(gan_run, "eval_4.json")) as f:
    report = json.load(f)
  assert np.isfinite(report["fid"]) and report["num_samples"] == 200
  assert any("inception_score" in note for note in report["notes"])  # why there is no IS
  (npz,) = glob.glob(os.path.join(gan_run, "samples", "samples_4.npz"))
  samples = np.load(npz)
  assert samples["images"].shape == (24, 32, 32, 3) and samples["images"].dtype == np.uint8
  np.testing.assert_array_equal(samples["labels"], np.arange(24) % 12)  # classes cycle
  grid = np.asarray(Image.open(npz.replace(".npz", ".png")))
  rows, cols = config.sample.grid_classes, config.sample.grid_per_class
  assert grid.shape == (rows * 32, cols * 32, 3)
  # every FQ layer keeps its dictionary in D's statistics
  from vqjax.train import gan

  s, state, step = gan.restore(config, gan_run)
  assert step == 4
  assert sorted(k for k in state.d_stats if k.startswith("fq_")) == ["fq_0", "fq_1", "fq_2",
                                                                    "fq_3"]
  assert state.d_stats["fq_0"]["dictionary"].shape == (2 ** config.disc.fq_log2_size,
                                                       config.disc.ch * 4)


def _step_setup(**overrides):
  from vqjax.train import gan

  config = load_config("configs/biggan_cifar10.py:smoke")
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config, gan.setup(config)


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n = config.train.batch_size * config.train.n_critic
  return {"image": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
          "label": rng.integers(0, config.model.num_classes, n).astype(np.int32)}


def test_ema_copies_g_before_start_then_mixes():
  """ema.start = 1: after G step 1 the EMA equals G; after step 2 it is
  decay * ema_1 + (1 - decay) * G_2 (BigGAN-PyTorch's ema)."""
  config, s = _step_setup(**{"ema.start": 1, "ema.decay": 0.9})
  state, _ = s.train_step(s.state, _batch(config, 0))
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  for e, g in zip(leaves(state.ema_params), leaves(state.g_params), strict=True):
    np.testing.assert_array_equal(e, g)
  ema_1 = leaves(state.ema_params)
  stats_1 = leaves(state.ema_stats)
  state, metrics = s.train_step(state, _batch(config, 1))
  assert float(metrics["ema_decay"]) == pytest.approx(0.9)
  for e, e1, g in zip(leaves(state.ema_params), ema_1, leaves(state.g_params), strict=True):
    np.testing.assert_allclose(e, 0.9 * e1 + 0.1 * g, rtol=1e-5, atol=1e-7)
  for e, e1, g in zip(leaves(state.ema_stats), stats_1, leaves(state.g_stats), strict=True):
    np.testing.assert_allclose(e, 0.9 * e1 + 0.1 * g, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # make test-slow: its run costs minutes on 2 CPU cores
def test_each_critic_step_reads_its_own_real_batch():
  """With n_critic = 2 the step's batch holds two real batches: changing the second one
  changes D's update, changing nothing gives the same step (the step is deterministic)."""
  config, s = _step_setup()
  batch = _batch(config)
  first, _ = s.train_step(jax.tree.map(jnp.copy, s.state), batch)
  again, _ = s.train_step(jax.tree.map(jnp.copy, s.state), batch)
  other = {k: v.copy() for k, v in batch.items()}
  other["image"][config.train.batch_size:] *= -1.0  # the second critic step's real images
  changed, _ = s.train_step(jax.tree.map(jnp.copy, s.state), other)
  leaf = lambda st: np.asarray(jax.tree.leaves(st.d_params)[0])
  np.testing.assert_array_equal(leaf(first), leaf(again))
  assert not np.array_equal(leaf(first), leaf(changed))


def test_non_finite_step_changes_nothing_but_the_step():
  config, s = _step_setup()
  batch = _batch(config)
  batch["image"][0, 0, 0, 0] = np.nan
  before = jax.tree.map(np.asarray, s.state)
  state, metrics = s.train_step(jax.tree.map(jnp.copy, s.state), batch)
  assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(before.replace(step=0)),
                  jax.tree.leaves(jax.tree.map(np.asarray, state).replace(step=0)), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # make test-slow: its run costs minutes on 2 CPU cores
def test_killed_run_resumes_exactly(tmp_path):
  """2 steps, stop, resume to 4 == 4 steps straight: every state leaf bitwise (FQ dictionaries,
  SN vectors, BN moments, EMA, optimisers)."""
  from vqjax.train import gan
  from vqjax.train.loop import StopRequest

  config = load_config(SMOKE)
  config.eval.fid = False
  straight = gan.train(config, str(tmp_path / "straight"))
  stop = StopRequest()
  gan.train(config, str(tmp_path / "resumed"), stop=stop,
            after_step=lambda step: stop.event.set() if step == 2 else None)
  resumed = gan.train(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


EIGHT_DEVICES = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.getcwd())
import jax, numpy as np
from tests.conftest import load_config
from vqjax.train import gan

config = load_config("configs/fqgan_cifar10.py:smoke")
rng = np.random.default_rng(0)
n = config.train.batch_size * config.train.n_critic
batch = {"image": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
         "label": rng.integers(0, 12, n).astype(np.int32)}
out = {}
for devices in (jax.devices()[:1], jax.devices()):
  s = gan.setup(config, devices)
  state, _ = s.train_step(s.state, batch)
  state, _ = s.train_step(state, batch)
  dicts = {k: v["dictionary"] for k, v in state.d_stats.items() if k.startswith("fq_")}
  for name, d in dicts.items():  # every device holds the same dictionary
    shards = [np.asarray(x.data) for x in d.addressable_shards]
    assert len(shards) == len(devices) and all(np.array_equal(x, shards[0]) for x in shards), name
  out[len(devices)] = {k: np.asarray(v) for k, v in dicts.items()}
for name in out[1]:
  np.testing.assert_allclose(out[8][name], out[1][name], rtol=2e-4, atol=2e-5)
print("dictionaries equal", sorted(out[1]))
"""


@pytest.mark.slow  # make test-slow: its run costs minutes on 2 CPU cores
def test_fq_dictionaries_agree_across_eight_devices():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dictionaries equal ['fq_0', 'fq_1', 'fq_2', 'fq_3']" in proc.stdout


def test_history_summary_by_hand(tmp_path):
  from vqjax.eval import gan_history

  runs = []
  for seed, fids in enumerate(([30.0, 20.0, 25.0], [28.0, 22.0, 24.0])):
    run = tmp_path / f"seed{seed}"
    run.mkdir()
    for i, fid in enumerate(fids):
      (run / f"eval_{(i + 1) * 1000}.json").write_text(json.dumps(
          {"step": (i + 1) * 1000, "fid": fid, "inception_score": 8.0 + i + seed}))
    runs.append(gan_history.summarize_run(gan_history.read_history(str(run)), last=2))
  assert runs[0] == {"fid_best": 20.0, "fid_last": 22.5, "is_best": 10.0, "is_last": 9.5,
                     "evaluations": 3}
  summary = gan_history.summarize_runs(runs)
  assert summary["fid_best"] == {"mean": 21.0, "std": 1.0}
  assert summary["is_last"] == {"mean": 10.0, "std": 0.5}
  proc = subprocess.run([sys.executable, "-m", "vqjax.eval.gan_history",
                         str(tmp_path / "seed0"), str(tmp_path / "seed1")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  assert proc.returncode == 0 and len(lines) == 3 and lines[2]["summary"]["runs"] == 2


@SHARED
def test_dictionary_colab_runs_on_the_smoke_run(gan_run, monkeypatch):
  text = run_notebook("fqgan_dictionary.ipynb", monkeypatch, gan_run)
  assert "class grid (128, 192, 3)" in text
  assert "fq/3/usage:" in text and "of the dictionary used at step 4" in text


def test_recipes():
  base = load_config("configs/biggan_cifar10.py")
  assert (base.optim.b1, base.optim.b2, base.optim.g_lr, base.optim.d_lr) == (
      0.0, 0.999, 2e-4, 2e-4)
  assert (base.train.n_critic, base.train.batch_size, base.train.epochs) == (4, 64, 500)
  assert (base.ema.decay, base.ema.start) == (0.9999, 1000) and base.disc.fq_layers == ()
  ten, hundred = load_config("configs/fqgan_cifar10.py"), load_config("configs/fqgan_cifar100.py")
  assert (ten.disc.fq_log2_size, hundred.disc.fq_log2_size) == (10, 6)
  assert (ten.data.name, hundred.data.name, hundred.model.num_classes) == (
      "cifar10", "cifar100", 100)
  assert ten.disc.fq_propagate and ten.disc.fq_decay == 0.9 and ten.disc.fq_alpha == 1.0
  # 500 epochs of CIFAR's 50,000 images, 4 x 64 per G step (BigGAN-PyTorch's epoch)
  from vqjax.train.modes import epochs_to_steps

  assert epochs_to_steps(500, 50_000, 64 * 4) == 97_657


def test_bad_gan_inputs_stop_before_compiling(tmp_path):
  smoke = f"--config={SMOKE}"
  run_table([
      ([smoke, "--config.disc.fq_layers=(7,)"], "disc.fq_layers=(7,) names block 7"),
      ([smoke, "--config.disc.fq_log2_size=0"], "fq_log2_size"),
      ([smoke, "--config.train.n_critic=0"], "train.n_critic=0"),
      ([smoke, "--config.model.num_classes=10", "--config.model.generator.num_classes=10",
        "--config.disc.num_classes=10"], "labels up to 11"),
      ([smoke, "--config.disc.num_classes=3"], "disc.num_classes=3"),
      ([smoke, "--config.data.image_size=64"], "makes 32x32 images"),
  ], tmp_path)
