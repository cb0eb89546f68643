"""Every quantiser option trains end to end in the tokenizer trainer (configs/vq_variants.py)."""

import json

import jax
import numpy as np
import pytest

from tests.conftest import load_config
from vqjax.config_lib import quantizer_config
from vqjax.errors import ConfigError
from vqjax.train.run import train_and_evaluate
from vqjax.train.tokenizer import validate_tokenizer_config

VARIANTS = ["entropy", "multichannel", "regvq", "kmeans", "restart", "l2", "fq"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_smoke_run(variant, tmp_path):
  config = load_config(f"configs/vq_variants.py:{variant},smoke")
  state = train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == config.train.steps
  report = json.load(open(tmp_path / f"eval_{config.train.steps}.json"))
  assert 0.0 < report["codebook_usage"] <= 1.0 and np.isfinite(report["psnr"])
  stats = jax.device_get(state.vq_stats)
  q = config.model.quantizer
  if variant == "kmeans":
    assert int(stats["quantizer"]["initialized"]) == 1
    assert np.abs(stats["quantizer"]["codebook_shift"]).max() > 0
  if variant == "restart":
    assert stats["quantizer"]["unused_steps"].max() < q.restart_after + 1
  if variant in ("multichannel", "l2", "regvq"):
    from vqjax.train.tokenizer import build_models

    vqgan = build_models(config).vqgan
    x = np.zeros((2, config.data.image_size, config.data.image_size, 3), np.float32)
    variables = {"params": state.params, **({"vq_stats": state.vq_stats} if stats else {})}
    _, out = vqgan.apply(variables, x)
    h = config.data.image_size // 2 ** (len(config.model.encoder.ch_mult) - 1)
    expected = (2, h, h, q.channels) if variant == "multichannel" else (2, h, h)
    assert out.indices.shape == expected
    decoded = vqgan.apply(variables, out.indices, method=vqgan.decode_indices)
    assert decoded.shape == x.shape


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="entropy,smoke"):
    load_config("configs/vq_variants.py:entropyy")


def test_quantizer_fields_are_checked_with_a_suggestion():
  config = load_config("configs/vq_variants.py:regvq,smoke")
  with config.unlocked():
    config.model.quantizer = quantizer_config("regvq", codebook_size=32, embed_dim=8)
    config.model.quantizer.mask_ratio = 1.5
  with pytest.raises(ConfigError, match="mask_ratio=1.5 must be in"):
    validate_tokenizer_config(config, 1)
  with pytest.raises(ConfigError, match="restart_after is not a field of quantizer 'regvq'"):
    quantizer_config("regvq", restart_after=10)
  with config.unlocked():
    config.model.quantizer = quantizer_config("multichannel", codebook_size=32, embed_dim=8)
    config.model.quantizer.channels = 3
  with pytest.raises(ConfigError, match="channels=3 must be a divisor of embed_dim=8"):
    validate_tokenizer_config(config, 1)
  with config.unlocked():
    config.model.quantizer = quantizer_config("vq", codebook_size=32, embed_dim=8)
    config.model.quantizer.name = "regvq"  # fields of vq, name of another quantiser
  with pytest.raises(ConfigError, match="not a field of quantizer 'regvq'"):
    validate_tokenizer_config(config, 1)
