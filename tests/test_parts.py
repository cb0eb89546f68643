"""The registered parts keep their contracts; freezing, init-from, R1 and LeCam."""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT
from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.losses import gan as gan_lib

KEY = jax.random.PRNGKey(0)
X = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
SMALL_ARCH = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=4)


def _roundtrip(reg, name, **overrides):
  """config -> check -> build: the config holds exactly the part's fields."""
  cfg = reg.config(name, **overrides)
  reg.check(cfg)
  assert set(cfg) == {"name"} | set(reg.fields(name))
  return cfg


@pytest.mark.parametrize("name", registry.QUANTIZERS.names())
def test_quantizer_contract(name):
  cfg = _roundtrip(registry.QUANTIZERS, name, codebook_size=16, embed_dim=8)
  module = registry.QUANTIZERS.build(cfg)
  z = jax.random.normal(KEY, (2, 4, 4, 8))
  rngs = {"params": KEY, "quantizer": jax.random.PRNGKey(2)}
  variables = module.init(rngs, z, train=False)
  out = module.apply(variables, z, train=True, rngs={"quantizer": KEY})  # stats immutable
  assert out.quantized.shape == z.shape and out.indices.shape[:3] == (2, 4, 4)
  decoded = module.apply(variables, out.indices, method=module.decode_indices)
  assert decoded.shape == z.shape
  if "vq_stats" in variables:
    _, mutated = module.apply(variables, z + 1.0, train=True, mutable=["vq_stats"],
                              rngs={"quantizer": KEY})
    before, after = jax.tree.leaves(variables["vq_stats"]), jax.tree.leaves(mutated["vq_stats"])
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("name", registry.ENCODERS.names())
def test_encoder_contract(name):
  cfg = _roundtrip(registry.ENCODERS, name, **SMALL_ARCH)
  encoder = registry.ENCODERS.build(cfg, z_channels=6)
  z, _ = encoder.init_with_output(KEY, X)
  f = registry.ENCODERS.get(name).downsampling(cfg)
  assert z.shape == (2, 16 // f, 16 // f, 6)


@pytest.mark.parametrize("name", registry.DECODERS.names())
def test_decoder_contract_and_declared_last_layer(name):
  cfg = _roundtrip(registry.DECODERS, name, **SMALL_ARCH)
  decoder = registry.DECODERS.build(cfg, out_channels=3)
  h = jax.random.normal(KEY, (2, 8, 8, 6))
  z_q = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 4))
  params = decoder.init(KEY, h, z_q)["params"]
  out, mutated = decoder.apply({"params": params}, h, z_q, mutable=["intermediates"])
  assert out.shape == (2, 16, 16, 3)
  last = type(decoder).LAST_LAYER
  assert last in params
  features = mutated["intermediates"]["last_features"][0]
  again = decoder.last_layer().apply({"params": params[last]}, features)
  np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", registry.DISCRIMINATORS.names())
def test_discriminator_contract(name):
  cfg = _roundtrip(registry.DISCRIMINATORS, name)
  disc = registry.DISCRIMINATORS.build(cfg)
  variables = disc.init(KEY, X, train=False)
  logits, extra = disc.apply(variables, X, train=True)  # statistics immutable: no error
  # a patch map [B, h, w, 1] (PatchGAN) or one logit per image [B] (BigGAN)
  assert logits.shape[0] == 2 and logits.ndim in (1, 4) and isinstance(extra, dict)
  assert all(np.shape(v) == () for v in extra.values())
  if "disc_stats" in variables:
    _, mutated = disc.apply(variables, X, train=True, mutable=["disc_stats"])
    assert jax.tree.structure(mutated["disc_stats"]) == jax.tree.structure(
        variables["disc_stats"])


# Fields that let a term run without a file the user must download (`logit` needs one).
WITHOUT_USER_FILES = {"semantic_perceptual": {"sem_layers": ("relu5_3",)}}


# What the Reg-VQ quantiser gives the terms that read q.aux (the contrastive losses): a 2x2
# token grid, every token sampled, unit sample distances. The other terms ignore q.
REGVQ_OUTPUT = types.SimpleNamespace(aux={"stochastic_mask": jnp.ones((2, 2, 2)),
                                          "sample_distance": jnp.ones((2, 2, 2))})


@pytest.mark.parametrize("name", registry.LOSS_TERMS.names())
def test_loss_term_contract(name):
  cfg = _roundtrip(registry.LOSS_TERMS, name, weight=0.5, **WITHOUT_USER_FILES.get(name, {}))
  term = registry.LOSS_TERMS.build(cfg)
  y = jnp.clip(X + 0.1 * jax.random.normal(KEY, X.shape), -1, 1)
  value, metrics = term(term.load_params(), X, y, REGVQ_OUTPUT, KEY)
  assert np.shape(value) == () and np.isfinite(value) and value > 0
  assert all(np.shape(v) == () for v in metrics.values())
  expected = {"l1": np.mean(np.abs(np.asarray(X) - np.asarray(y))),
              "l2": np.mean((np.asarray(X) - np.asarray(y)) ** 2)}
  if name in expected:
    np.testing.assert_allclose(value, expected[name], rtol=1e-6)


def test_gan_losses_hand_values():
  real, fake = jnp.array([2.0, -1.0]), jnp.array([0.0, 1.0])
  hinge = registry.GAN_LOSSES.build(_roundtrip(registry.GAN_LOSSES, "hinge"))
  np.testing.assert_allclose(hinge.d_loss(real, fake), 0.5 * ((0 + 2) / 2 + (1 + 2) / 2))
  np.testing.assert_allclose(hinge.g_loss(fake), -0.5)
  ns = registry.GAN_LOSSES.build(_roundtrip(registry.GAN_LOSSES, "non_saturating"))
  sp = lambda v: np.log1p(np.exp(v))
  np.testing.assert_allclose(ns.d_loss(real, fake),
                             (sp(-2) + sp(1)) / 2 + (sp(0) + sp(1)) / 2, rtol=1e-6)
  np.testing.assert_allclose(ns.g_loss(fake), (sp(0) + sp(-1)) / 2, rtol=1e-6)


def test_r1_of_a_linear_and_a_quadratic_discriminator():
  w = jax.random.normal(KEY, (4, 4, 3))
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 4, 4, 3))
  linear = lambda v: jnp.sum(v * w, axis=(1, 2, 3))  # grad = w for every image
  np.testing.assert_allclose(gan_lib.r1_penalty(linear, x), np.sum(np.asarray(w) ** 2),
                             rtol=1e-5)
  quadratic = lambda v: jnp.sum(v**2, axis=(1, 2, 3))  # grad = 2x
  want = np.mean(np.sum((2 * np.asarray(x)) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(gan_lib.r1_penalty(quadratic, x), want, rtol=1e-5)


def test_lecam_formula_and_anchors():
  real, fake = jnp.array([1.0, 3.0]), jnp.array([-1.0, 0.0])
  # E (D(x) - a_F)^2 + E (D(G) - a_R)^2 with a_R = 0.5, a_F = -0.5
  want = ((1.5**2 + 3.5**2) / 2) + ((1.5**2 + 0.5**2) / 2)
  np.testing.assert_allclose(gan_lib.lecam_penalty(real, fake, 0.5, -0.5), want)
  ema = gan_lib.lecam_ema({"real": 0.5, "fake": -0.5}, real, fake, 0.9)
  np.testing.assert_allclose(ema["real"], 0.9 * 0.5 + 0.1 * 2.0)
  np.testing.assert_allclose(ema["fake"], 0.9 * -0.5 + 0.1 * -0.5)


def test_unknown_names_and_fields_name_the_nearest():
  with pytest.raises(ConfigError, match="Did you mean 'vqgan'"):
    registry.DECODERS.get("vqgna")
  with pytest.raises(ConfigError, match="Did you mean 'lpips'"):
    registry.LOSS_TERMS.config("lpisp")
  with pytest.raises(ConfigError, match="Did you mean 'num_layers'"):
    registry.DISCRIMINATORS.config("patchgan", num_layer=2)


@pytest.mark.parametrize("override,nearest", [
    ("--config.model.decoder.name=vqgna", "'vqgan'"),
    ("--config.loss.terms.lpips.name=lpisp", "'lpips'"),
])
def test_cli_stops_on_a_misspelt_part_before_building(tmp_path, override, nearest):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "vqjax.main", "--config=configs/demo.py:smoke",
       f"--workdir={workdir}", override],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert f"Did you mean {nearest}" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(workdir)
