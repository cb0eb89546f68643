"""Transformer training on a token store: every transformer config's smoke run, exact resume,
and an 8-device sharded step equal to the 1-device step."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, load_config
from vqjax.data.tokens import TokenStoreWriter
from vqjax.train import transformer
from vqjax.train.loop import StopRequest

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if load_config(os.path.relpath(p, ROOT)).trainer == "transformer")


def write_store(folder, shape, k=16, n=40, classes=8, seed=0):
  rng = np.random.default_rng(seed)
  w = TokenStoreWriter(str(folder), shape, k, shard_size=16)
  w.add(rng.integers(0, k, (n,) + tuple(shape)), rng.integers(0, classes, n))
  w.finish()
  return str(folder)


def smoke(path, tmp_path):
  config = load_config(f"{path}:smoke")
  shape = (4, 4, 2) if "movq" in path else (4, 4)
  with config.unlocked():
    config.tokens.dir = write_store(tmp_path / "tokens", shape)
    config.eval.grid_images = 0  # no tokenizer here; tests/test_generation.py decodes grids
  return config


def test_every_transformer_config_has_a_smoke_variant():
  assert {os.path.basename(p) for p in CONFIGS} >= {
      "maskgit_imagenet.py", "ar_imagenet.py"}


@pytest.mark.parametrize("path", CONFIGS)
def test_smoke_variant_trains(path, tmp_path):
  config = smoke(path, tmp_path)
  state = transformer.train(config, str(tmp_path / "run"))
  assert int(state.step) == config.train.steps
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / str(config.train.steps))
  assert glob.glob(str(tmp_path / "run" / "events.out.tfevents.*"))


def test_killed_run_resumes_exactly(tmp_path):
  config = smoke("configs/maskgit_imagenet.py", tmp_path)
  straight = transformer.train(config, str(tmp_path / "straight"))
  stop = StopRequest()
  transformer.train(config, str(tmp_path / "resumed"), stop=stop,
                    after_step=lambda step: stop.event.set() if step == 3 else None)
  resumed = transformer.train(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == int(straight.step) == config.train.steps
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_token_store_says_to_tokenize(tmp_path):
  from vqjax.data.tokens import TokenStoreError

  config = load_config("configs/maskgit_imagenet.py:smoke")
  with config.unlocked():
    config.tokens.dir = str(tmp_path / "nowhere")
  with pytest.raises(TokenStoreError, match="--mode=tokenize"):
    transformer.train(config, str(tmp_path / "run"))


def test_val_store_from_another_tokenizer_is_refused_before_training(tmp_path):
  from vqjax.data.tokens import TokenStoreError

  config = smoke("configs/maskgit_imagenet.py", tmp_path)
  with config.unlocked():
    config.tokens.val_dir = write_store(tmp_path / "val", (8, 8))
  with pytest.raises(TokenStoreError, match=r"\(8, 8\) tokens.*same tokenizer"):
    transformer.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_missing_tokenizer_run_is_named_before_training(tmp_path):
  config = smoke("configs/maskgit_imagenet.py", tmp_path)
  with config.unlocked():
    config.eval.grid_images = 4  # grids need the tokenizer
    config.tokenizer.config = os.path.join(ROOT, "configs/demo.py:smoke")
    config.tokenizer.workdir = str(tmp_path / "no_tokenizer")
  with pytest.raises(FileNotFoundError, match="no tokenizer checkpoint in .*no_tokenizer"):
    transformer.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  assert not os.path.exists(tmp_path / "no_tokenizer")


_SHARDED = r"""
import sys, numpy as np, jax, flax.linen as nn
sys.path.insert(0, {root!r})
from tests.conftest import load_config
from vqjax.core import partitioning
from vqjax.train import transformer
config = load_config({spec!r})
with config.unlocked():
  config.tokens.dir = {tokens!r}
  config.train.batch_size = 8
  config.model.dropout = 0.0
def one_step(devices, model_axis):
  with config.unlocked():
    config.mesh.model = model_axis
  s = transformer.setup(config, devices)
  batch = next(iter(transformer.token_dataset(config, s.store)))
  state, metrics = s.train_step(s.state, partitioning.shard_batch(batch, s.mesh))
  return jax.device_get(nn.unbox(state.params)), jax.device_get(metrics), state
p1, m1, _ = one_step(jax.devices()[:1], 1)
p8, m8, s8 = one_step(jax.devices(), 2)
sharded = [x for x in jax.tree.leaves(nn.unbox(s8.params)) if len(x.sharding.device_set) == 8
           and not x.sharding.is_fully_replicated]
err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
print(len(jax.devices()), len(sharded), abs(float(m1["loss/total"]) - float(m8["loss/total"])), err)
"""


@pytest.mark.parametrize("spec", ["configs/maskgit_imagenet.py:smoke",
                                  "configs/ar_imagenet.py:smoke"])
def test_sharded_8_device_step_equals_1_device(spec, tmp_path):
  tokens = write_store(tmp_path / "tokens", (4, 4))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  code = _SHARDED.format(root=ROOT, spec=spec, tokens=tokens)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  n, n_sharded, loss_diff, param_err = out.stdout.split()[-4:]
  assert int(n) == 8 and int(n_sharded) > 0  # heads/mlp/vocab split over `model`
  assert float(loss_diff) < 1e-5 and float(param_err) < 1e-5
