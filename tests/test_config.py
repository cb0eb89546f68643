"""Start-up validation: one clear error before anything is built."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, load_config
from vqjax.errors import ConfigError
from vqjax.train.tokenizer import validate_tokenizer_config
from vqjax.train.transformer import validate_transformer_config


def test_image_size_the_encoder_cannot_divide(smoke_config):
  with smoke_config.unlocked():
    smoke_config.model.encoder.ch_mult = (1, 2, 2)
    smoke_config.data.image_size = 30
  with pytest.raises(ConfigError, match="not divisible .* factor 4"):
    validate_tokenizer_config(smoke_config, num_devices=1)


def test_batch_the_mesh_cannot_split(smoke_config):
  with smoke_config.unlocked():
    smoke_config.train.batch_size = 6
  with pytest.raises(ConfigError, match="train.batch_size=6 .* multiple of 4"):
    validate_tokenizer_config(smoke_config, num_devices=4)
  with smoke_config.unlocked():
    smoke_config.train.batch_size = 8
    smoke_config.mesh.model = 3
  with pytest.raises(ConfigError, match="mesh.model=3"):
    validate_tokenizer_config(smoke_config, num_devices=4)


@pytest.mark.parametrize("spec", ["configs/demo.py:smoke", "configs/maskgit_imagenet.py:smoke"])
def test_unknown_fid_method_is_refused(spec):
  config = load_config(spec)
  validate = (validate_tokenizer_config if config.trainer == "tokenizer"
              else validate_transformer_config)
  validate(config, num_devices=1)
  with config.unlocked():
    config.eval.fid_method = "svd"
  with pytest.raises(ConfigError,
                     match=r"eval.fid_method='svd' must be one of \('sqrtm', 'eigh'\)"):
    validate(config, num_devices=1)


def test_transformer_sample_batch_the_mesh_cannot_split():
  config = load_config("configs/maskgit_imagenet.py:smoke")
  with config.unlocked():
    config.sample.batch_size = 6
  with pytest.raises(ConfigError, match="sample.batch_size=6"):
    validate_transformer_config(config, num_devices=4)


def test_norm_groups_must_divide_widths(smoke_config):
  with smoke_config.unlocked():
    smoke_config.model.decoder.norm_groups = 5
  with pytest.raises(ConfigError, match="norm_groups=5"):
    validate_tokenizer_config(smoke_config, num_devices=1)


def test_valid_smoke_config_passes(smoke_config):
  validate_tokenizer_config(smoke_config, num_devices=1)


def test_codebook_dim_mismatch_is_named():
  import jax
  import jax.numpy as jnp

  from vqjax.nn.quantizers import VectorQuantizer

  with pytest.raises(ValueError, match="embed_dim is 4"):
    VectorQuantizer(codebook_size=8, embed_dim=4).init(
        {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 2, 2, 3)))


def test_cli_rejects_a_misspelt_key_before_running(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "vqjax.main", "--config=configs/demo.py:smoke",
       f"--workdir={workdir}", "--config.train.stepz=5"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'Did you mean "steps"' in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(workdir)


def test_epochs_become_steps_from_the_data_size():
  from vqjax.data.sources import build_source
  from vqjax.train.modes import epochs_to_steps, resolve_epochs

  assert epochs_to_steps(300, 1_281_167, 256) == 1_501_368  # ceil(300 x 1,281,167 / 256)
  assert epochs_to_steps(1, 10, 4) == 3 and epochs_to_steps(0.5, 10, 5) == 1
  config = load_config("configs/demo.py:smoke")
  steps = config.train.steps
  resolve_epochs(config)  # epochs 0: train.steps stays
  assert config.train.steps == steps
  config.train.epochs = 2.0
  resolve_epochs(config)
  examples = len(build_source(config.data, config.data.train_split))
  assert config.train.steps == -(-2 * examples // config.train.batch_size)
