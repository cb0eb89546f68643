"""The same train step on 1 device, a 4x2 mesh and an 8x1 mesh of fake CPU devices."""

import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.getcwd())
import jax, numpy as np
from tests.conftest import load_config
from vqjax.train import partitioning
from vqjax.train.run import setup

assert jax.device_count() == 8, jax.devices()
config = load_config("configs/demo.py:smoke")
with config.unlocked():
  config.loss.disc_start = 1  # step 0 without, step 1 with the discriminator
  config.model.quantizer.learning = "ema"
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
         "label": np.zeros(8, np.int32)}
runs = {}
for name, devices, data, model, mode in [("1", jax.devices()[:1], 1, 1, "replicate"),
                                         ("4x2", jax.devices(), 4, 2, "channels"),
                                         ("8x1", jax.devices(), 8, 1, "replicate")]:
  with config.unlocked():
    config.mesh.data, config.mesh.model, config.mesh.param_sharding = data, model, mode
  s = setup(config, devices)
  state, losses = s.state, []
  for _ in range(2):
    state, m = s.train_step(state, partitioning.shard_batch(batch, s.mesh), s.lpips_params)
    losses.append(float(m["loss/total"]))
  if name == "4x2":
    specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
    assert any("model" in tuple(sp) for sp in specs), "no parameter was sharded over model"
  for leaf in jax.tree.leaves(state.vq_stats):
    shards = [np.asarray(sh.data) for sh in leaf.addressable_shards]
    assert all(np.array_equal(shards[0], x) for x in shards), "vq_stats differ across devices"
  runs[name] = (losses, jax.device_get(state))
ref_losses, ref = runs["1"]
for name in ("4x2", "8x1"):
  losses, st = runs[name]
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-4)
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
print("SHARDED-OK", ref_losses)
"""


def test_sharded_step_matches_single_device():
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "SHARDED-OK" in proc.stdout
