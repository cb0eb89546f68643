"""Transformer sharding: a tiny MaskGIT train step on 1 device equals the step on 8 fake CPU
devices under each mesh.param_sharding mode ('replicate', 'channels', 'fsdp')."""

import os
import subprocess
import sys
import time

from tests.conftest import ROOT

SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.getcwd())
import flax.linen as nn, jax, numpy as np
from tests.conftest import load_config
from vqjax.data.tokens import TokenStoreWriter
from vqjax.core import partitioning
from vqjax.train import transformer

assert jax.device_count() == 8, jax.devices()
tokens_dir = sys.argv[1]
rng = np.random.default_rng(0)
writer = TokenStoreWriter(tokens_dir, (4, 4), 16, shard_size=16)
writer.add(rng.integers(0, 16, (16, 4, 4)), rng.integers(0, 8, 16))
writer.finish()
config = load_config("configs/maskgit_imagenet.py:smoke")
with config.unlocked():
  config.tokens.dir = tokens_dir
  config.train.batch_size = 8
  config.model.dropout = 0.0
  config.eval.grid_images = 0


from tests.sharding_checks import check_opt_state_follows_params, mesh_axes

runs = {}
for name, devices, data, model, mode in [("1", jax.devices()[:1], 1, 1, "replicate"),
                                         ("8x1 replicate", jax.devices(), 8, 1, "replicate"),
                                         ("4x2 channels", jax.devices(), 4, 2, "channels"),
                                         ("8x1 fsdp", jax.devices(), 8, 1, "fsdp")]:
  with config.unlocked():
    config.mesh.data, config.mesh.model, config.mesh.param_sharding = data, model, mode
  s = transformer.setup(config, devices)
  batches = iter(transformer.token_dataset(config, s.store))
  state, losses = s.state, []
  for _ in range(2):
    state, m = s.train_step(state, partitioning.shard_batch(next(batches), s.mesh))
    losses.append(float(m["loss/total"]))
  params = nn.unbox(state.params)
  axes = [mesh_axes(x) for x in jax.tree.leaves(params)]
  if mode == "replicate":
    assert all(not a for a in axes)
  if mode == "channels":
    assert any("model" in a for a in axes), "no parameter was sharded over model"
    assert not any("data" in a for a in axes)
  if mode == "fsdp":
    assert any("data" in a for a in axes), "no parameter was sharded over data"
  check_opt_state_follows_params(params, nn.unbox(state.opt_state))
  runs[name] = (losses, jax.device_get(params))
  print(name, "ok", losses, flush=True)
ref_losses, ref = runs["1"]
for name in list(runs)[1:]:
  losses, params = runs[name]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
print("SHARDED-OK", ref_losses)
"""


def test_sharded_transformer_step_matches_single_device(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tokens")], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "SHARDED-OK" in proc.stdout
  print(proc.stdout, f"{time.time() - start:.0f}s")
