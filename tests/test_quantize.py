"""Quantiser maths against hand-worked numbers and a NumPy transcription of the formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqjax.nn.quantizers import VectorQuantizer
from vqjax.ops import quantize as vq

CODEBOOK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
Z = np.array([[0.9, 0.1], [0.1, 1.5], [-0.2, 0.0]], np.float32)


def test_distances_and_nearest_code_hand_example():
  d = np.asarray(vq.squared_distances(jnp.asarray(Z), jnp.asarray(CODEBOOK)))
  # Row 0: |(.9,.1)|^2 = .82, |(-.1,.1)|^2 = .02, |(.9,-1.9)|^2 = 4.42
  np.testing.assert_allclose(d[0], [0.82, 0.02, 4.42], atol=1e-6)
  np.testing.assert_allclose(d[1], [2.26, 3.06, 0.26], atol=1e-6)
  assert vq.nearest_code(jnp.asarray(Z), jnp.asarray(CODEBOOK)).tolist() == [1, 2, 0]


def test_vq_loss_values_and_beta_on_commitment():
  z_q = CODEBOOK[[1, 2, 0]]
  terms = vq.vq_loss_terms(jnp.asarray(Z), jnp.asarray(z_q), beta=0.25)
  mse = (0.02 + 0.26 + 0.04) / 6.0  # sum of squared errors over 6 elements
  np.testing.assert_allclose(terms["codebook"], mse, rtol=1e-6)
  np.testing.assert_allclose(terms["commitment"], 0.25 * mse, rtol=1e-6)


def test_loss_gradients_flow_to_the_right_side():
  z, cb = jnp.asarray(Z), jnp.asarray(CODEBOOK)
  idx = jnp.array([1, 2, 0])
  g_cb = jax.grad(lambda c: vq.vq_loss_terms(z, c[idx], 0.25)["codebook"])(cb)
  g_z = jax.grad(lambda zz: vq.vq_loss_terms(zz, cb[idx], 0.25)["codebook"])(z)
  np.testing.assert_allclose(g_z, 0.0)  # codebook term moves only the codes
  # d/de_k mean((z - e)^2) = -2 (z - e) / 6 for the row that picked e_k
  np.testing.assert_allclose(g_cb[1], -2 * (Z[0] - CODEBOOK[1]) / 6, rtol=1e-5)
  g_commit_z = jax.grad(lambda zz: vq.vq_loss_terms(zz, cb[idx], 0.25)["commitment"])(z)
  np.testing.assert_allclose(g_commit_z[0], 0.25 * 2 * (Z[0] - CODEBOOK[1]) / 6, rtol=1e-5)


def test_straight_through_forward_value_and_identity_gradient():
  z = jnp.asarray(Z)
  z_q = jnp.asarray(CODEBOOK[[1, 2, 0]])
  out = vq.straight_through(z, z_q)
  np.testing.assert_allclose(out, z_q, atol=1e-7)
  weights = jnp.arange(6.0).reshape(3, 2)
  g = jax.grad(lambda zz: jnp.sum(vq.straight_through(zz, z_q) * weights))(z)
  np.testing.assert_allclose(g, weights)


def test_module_with_loss_codebook_matches_hand_example():
  module = VectorQuantizer(codebook_size=3, embed_dim=2, beta=0.25, learning="loss")
  params = {"params": {"codebook": jnp.asarray(CODEBOOK)}}
  out = module.apply(params, jnp.asarray(Z).reshape(1, 3, 1, 2))
  assert out.indices.reshape(-1).tolist() == [1, 2, 0]
  mse = (0.02 + 0.26 + 0.04) / 6.0
  np.testing.assert_allclose(out.losses["codebook"], mse, rtol=1e-6)
  np.testing.assert_allclose(out.metrics["usage_in_batch"], 1.0)
  np.testing.assert_allclose(out.metrics["perplexity"], 3.0, rtol=1e-6)
  np.testing.assert_allclose(out.metrics["quant_error"], (0.02 + 0.26 + 0.04) / 3, rtol=1e-6)
  np.testing.assert_allclose(module.apply(params, jnp.array([2, 0]),
                                          method=VectorQuantizer.decode_indices),
                             CODEBOOK[[2, 0]])


def _ema_numpy(cluster, embed_sum, z, idx, decay, eps):
  k = cluster.shape[0]
  cluster, embed_sum = cluster.copy(), embed_sum.copy()
  for j in range(k):
    members = z[idx == j]
    cluster[j] = decay * cluster[j] + (1 - decay) * len(members)
    embed_sum[j] = decay * embed_sum[j] + (1 - decay) * members.sum(axis=0)
  n = cluster.sum()
  smoothed = np.array([(cluster[j] + eps) / (n + k * eps) * n for j in range(k)])
  return cluster, embed_sum, embed_sum / smoothed[:, None]


def test_ema_update_matches_numpy_formula():
  rng = np.random.default_rng(0)
  k, d = 5, 3
  cluster = rng.uniform(0.5, 2.0, k).astype(np.float32)
  embed_sum = rng.normal(size=(k, d)).astype(np.float32)
  z = rng.normal(size=(11, d)).astype(np.float32)
  idx = rng.integers(0, k - 1, 11)  # the last code is never used
  expected = _ema_numpy(cluster, embed_sum, z, idx, 0.9, 1e-5)
  got = vq.ema_update(jnp.asarray(cluster), jnp.asarray(embed_sum), jnp.asarray(z),
                      jax.nn.one_hot(idx, k), 0.9, 1e-5)
  for g, e in zip(got, expected, strict=True):
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-6)


def test_ema_module_updates_only_when_collection_is_mutable():
  module = VectorQuantizer(codebook_size=4, embed_dim=2, learning="ema", ema_decay=0.5)
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 2))
  variables = nn.unbox(module.init(jax.random.PRNGKey(0), z))
  assert "params" not in variables  # the EMA codebook is state, not a parameter
  stats = variables["vq_stats"]
  out_frozen = module.apply(variables, z, train=True)  # not mutable: no update possible
  out, mutated = module.apply(variables, z, train=True, mutable=["vq_stats"])
  assert set(out.losses) == {"commitment"}
  np.testing.assert_array_equal(out.indices, out_frozen.indices)
  expected = _ema_numpy(np.asarray(stats["cluster_size"]), np.asarray(stats["embed_sum"]),
                        np.asarray(z).reshape(-1, 2), np.asarray(out.indices).reshape(-1),
                        0.5, 1e-5)
  np.testing.assert_allclose(mutated["vq_stats"]["codebook"], expected[2], rtol=1e-5)
  _, unchanged = module.apply(variables, z, train=False, mutable=["vq_stats"])
  np.testing.assert_array_equal(unchanged["vq_stats"]["codebook"], stats["codebook"])


def test_perplexity_and_usage():
  np.testing.assert_allclose(vq.perplexity(jnp.array([5.0, 5.0, 0.0, 0.0])), 2.0, rtol=1e-6)
  np.testing.assert_allclose(vq.usage_fraction(jnp.array([5.0, 5.0, 0.0, 0.0])), 0.5)
