"""The speed rewrites equal the plain formulations they replace, in values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vqjax.nn.layers import upsample_nearest
from vqjax.nn.vgg import max_pool_2x2
from vqjax.ops import conv as fast_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _plain(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                  precision="highest")


def _fast(x, w, strides, padding):
  return fast_conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                        precision="highest")


# (input size, channels in, out, kernel, strides, padding): VGG conv5 on 2x2 and 3x3 maps,
# a PatchGAN 4x4/2 and 4x4/1 layer on tiny maps, a 1x1, an asymmetric pad, string paddings.
CASES = [
    (2, 16, 8, 3, (1, 1), ((1, 1), (1, 1))),
    (3, 8, 8, 3, (1, 1), ((1, 1), (1, 1))),
    (8, 4, 6, 4, (2, 2), ((1, 1), (1, 1))),
    (4, 6, 1, 4, (1, 1), ((1, 1), (1, 1))),
    (4, 5, 7, 1, (1, 1), ((0, 0), (0, 0))),
    (5, 3, 4, 3, (2, 2), ((0, 1), (0, 1))),
    (4, 3, 4, 3, (1, 1), "SAME"),
    (5, 3, 4, 2, (2, 2), "VALID"),
]


@pytest.mark.parametrize("size,cin,cout,k,strides,padding", CASES)
def test_patch_conv_equals_lax_conv_values_and_gradients(size, cin, cout, k, strides, padding):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(size * 100 + cin), 3)
  x = jax.random.normal(kx, (2, size, size, cin))
  w = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
  y_plain = _plain(x, w, strides, padding)
  y_fast = _fast(x, w, strides, padding)
  assert y_fast.shape == y_plain.shape
  np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-5)
  # The patch product, called directly, is the formulation under test (tiny outputs).
  assert "dot_general" in str(jax.make_jaxpr(lambda x, w: _fast(x, w, strides, padding))(x, w))
  g = jax.random.normal(kg, y_plain.shape)
  grads = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w, strides, padding) * g),
                             argnums=(0, 1))(x, w)
  for got, want in zip(grads(_fast), grads(_plain), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_large_maps_and_other_layouts_keep_the_lax_convolution():
  x = jnp.ones((1, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 2))
  large = str(jax.make_jaxpr(  # 64 output positions
      lambda x, w: _fast(x, w, (1, 1), ((1, 1), (1, 1))))(x, w))
  assert "conv_general_dilated" in large and "dot_general" not in large
  dilated = str(jax.make_jaxpr(lambda x, w: fast_conv.conv_general_dilated(
      x[:, :3, :3], w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
      dimension_numbers=NHWC))(x, w))
  assert "conv_general_dilated" in dilated
  nchw = jnp.ones((1, 4, 2, 2))
  np.testing.assert_allclose(
      fast_conv.conv_general_dilated(nchw, jnp.ones((2, 4, 3, 3)), (1, 1), ((1, 1), (1, 1))),
      lax.conv_general_dilated(nchw, jnp.ones((2, 4, 3, 3)), (1, 1), ((1, 1), (1, 1))))


def test_patches_hand_example():
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)  # [[0, 1], [2, 3]]
  p = fast_conv.patches(x, (2, 2), (1, 1), ((0, 1), (0, 1)))  # windows in (u, v) order
  np.testing.assert_array_equal(p[0, :, :, :], [[[0, 1, 2, 3], [1, 0, 3, 0]],
                                                [[2, 3, 0, 0], [3, 0, 0, 0]]])


def test_flax_conv_through_the_fast_path_matches_plain_flax_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 5))
  plain = nn.Conv(7, (3, 3), strides=(2, 2), padding=1)
  fast = nn.Conv(7, (3, 3), strides=(2, 2), padding=1,
                 conv_general_dilated=fast_conv.conv_general_dilated)
  params = plain.init(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 4, 1)])
def test_upsample_nearest_equals_image_resize(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  b, h, w, c = shape
  ref = lambda x: jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
  # jax.image.resize goes through a float product (about 1e-7 off an exact copy).
  np.testing.assert_allclose(upsample_nearest(x, 2), ref(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(upsample_nearest(x, 2)[:, 1::2, ::2], x)
  g = jax.random.normal(jax.random.PRNGKey(1), (b, 2 * h, 2 * w, c))
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(upsample_nearest(x, 2) * g))(x),
                             jax.grad(lambda x: jnp.sum(ref(x) * g))(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 5, 7, 2)])
def test_max_pool_equals_flax_max_pool(shape):
  # Continuous random values: no tied maxima, so the gradients agree everywhere.
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
  g = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * g))(x),
                                jax.grad(lambda x: jnp.sum(ref(x) * g))(x))


def test_keep_mask_frequency_and_independent_halves():
  from vqjax.ops import random as random_ops

  n = 1 << 20
  mask = np.asarray(random_ops.keep_mask(jax.random.PRNGKey(0), (n,), 0.9))
  p = random_ops.quantized_keep(0.9)
  assert p == 58982 / 65536
  # Binomial: the kept fraction within 5 standard deviations of p.
  assert abs(mask.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  # Entries drawn from the low and high halves of the same words are independent:
  # P(both kept) = p^2 within 5 standard deviations.
  lo, hi = mask[: n // 2], mask[n // 2:]  # the low and high halves of the same words
  both = np.mean(lo & hi)
  assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / (n // 2))


def test_dropout_scales_kept_entries_by_the_rounded_probability():
  from vqjax.ops import random as random_ops

  x = jax.random.normal(jax.random.PRNGKey(1), (7, 33))  # odd size: the last word half-used
  key = jax.random.PRNGKey(2)
  y = random_ops.dropout(key, x, 0.1)
  mask = random_ops.keep_mask(key, x.shape, 0.9)
  np.testing.assert_allclose(y, np.where(mask, x / (58982 / 65536), 0.0), rtol=1e-6)
  np.testing.assert_array_equal(random_ops.dropout(key, x, 0.0), x)
  np.testing.assert_array_equal(random_ops.dropout(key, x, 1.0), np.zeros_like(x))


def _conds_with_convs(jaxpr) -> int:
  """Number of `cond` equations (at any depth) with a convolution inside a branch."""
  import jax.extend as jex

  def has_conv(j):
    return any(e.primitive.name == "conv_general_dilated" or
               any(has_conv(sub) for sub in _subjaxprs(e)) for e in j.eqns)

  def _subjaxprs(eqn):
    for v in eqn.params.values():
      for item in (v if isinstance(v, (list, tuple)) else [v]):
        if isinstance(item, jex.core.ClosedJaxpr):
          yield item.jaxpr
        elif isinstance(item, jex.core.Jaxpr):
          yield item

  count = 0
  for e in jaxpr.eqns:
    if e.primitive.name == "cond" and any(has_conv(b.jaxpr) for b in e.params["branches"]):
      count += 1
    count += sum(_conds_with_convs(sub) for sub in _subjaxprs(e))
  return count


@pytest.mark.parametrize("gan", [False, True])
def test_tokenizer_steps_keep_convolutions_out_of_cond_branches(gan):
  # XLA on CPU compiles convolutions inside a cond branch as slow loops; the host picks
  # between two programs instead (vqjax.train.tokenizer.PhasedStep).
  from tests.conftest import load_config
  from vqjax.train.tokenizer import build_models, init_state, make_train_step

  # The counter finds a convolution inside a branch (the old formulation's D update).
  w = jnp.ones((3, 3, 2, 2))
  conv_in_cond = lambda p, x: jax.lax.cond(p, lambda: _plain(x, w, (1, 1), "SAME"),
                                           lambda: x)
  assert _conds_with_convs(jax.make_jaxpr(conv_in_cond)(True, jnp.ones((1, 4, 4, 2))).jaxpr) == 1

  config = load_config("configs/demo.py:smoke")
  models = build_models(config)
  state = jax.eval_shape(lambda r: init_state(models, config, r), jax.random.PRNGKey(0))
  batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
  term_params = {label: jax.eval_shape(lambda t=t: t.init_params(jax.random.PRNGKey(0)))
                 for label, t in models.terms.items()}
  closed = jax.make_jaxpr(make_train_step(models, config, gan=gan))(state, batch, term_params)
  assert "conv_general_dilated" in str(closed)
  assert _conds_with_convs(closed.jaxpr) == 0
