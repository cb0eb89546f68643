"""Reg-VQ, MoVQ multichannel, FQ-GAN and the vq options against independent computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from vqjax.nn.quantizers import (
  FeatureQuantizer,
  MultichannelQuantizer,
  RegVQQuantizer,
  VectorQuantizer,
)
from vqjax.ops import quantize as vq

RNGS = {"quantizer": jax.random.PRNGKey(7)}


def _nearest_numpy(v, codebook):
  return ((v[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)


# ---- Reg-VQ -------------------------------------------------------------------------

def test_regvq_with_mask_ratio_zero_equals_deterministic_quantisation_exactly():
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))
  module = RegVQQuantizer(codebook_size=16, embed_dim=6, mask_ratio=0.0)
  variables = nn.unbox(module.init(jax.random.PRNGKey(1), z))
  train = module.apply(variables, z, train=True, rngs=RNGS)
  evaluation = module.apply(variables, z, train=False)
  np.testing.assert_array_equal(train.quantized, evaluation.quantized)
  np.testing.assert_array_equal(train.indices, evaluation.indices)
  np.testing.assert_array_equal(train.aux["sample_distance"], 0.0)
  # and the deterministic token is argmax of the head's logits
  logits = np.asarray(z) @ np.asarray(variables["params"]["logits_head"]["kernel"]) + \
      np.asarray(variables["params"]["logits_head"]["bias"])
  np.testing.assert_array_equal(evaluation.indices, logits.argmax(-1))
  np.testing.assert_allclose(evaluation.quantized,
                             np.asarray(variables["params"]["codebook"])[logits.argmax(-1)],
                             atol=1e-6)


def test_regvq_mask_ratio_is_the_fraction_of_stochastic_positions():
  z = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 4))
  module = RegVQQuantizer(codebook_size=8, embed_dim=4, mask_ratio=0.4)
  variables = nn.unbox(module.init(jax.random.PRNGKey(1), z))
  out = module.apply(variables, z, train=True, rngs=RNGS)
  frac = float(out.aux["stochastic_mask"].mean())
  assert abs(frac - 0.4) < 0.03  # 2048 Bernoulli(0.4) draws: sd 0.011
  # positions outside the mask keep the best token and a zero sample distance
  det = np.asarray(out.aux["stochastic_mask"]) == 0
  best = module.apply(variables, z, train=False).indices
  np.testing.assert_array_equal(np.asarray(out.indices)[det], np.asarray(best)[det])
  np.testing.assert_array_equal(np.asarray(out.aux["sample_distance"])[det], 0.0)


def test_gumbel_region_samples_softmax_of_logits_not_of_tempered_logits():
  logits = jnp.array([1.0, 0.0, -0.5, 2.0, 0.3])
  n = 40_000
  tiled = jnp.broadcast_to(logits, (n, 5))
  codebook = jnp.eye(5)
  gumbel = jax.random.gumbel(jax.random.PRNGKey(3), (n, 5))
  out = vq.stochastic_mask_quantize(tiled, codebook, jnp.ones((n,)), gumbel, 0.9)
  observed = np.bincount(np.asarray(out["indices"]), minlength=5)
  # Algorithm 1: argmax(P + g) draws from softmax(P); tau = 0.9 only shapes the backward pass
  expected = scipy.special.softmax(np.asarray(logits, np.float64)) * n
  _, p_value = scipy.stats.chisquare(observed, expected)
  assert p_value > 1e-3, (observed, expected)
  # and it is not softmax(P / tau): that alternative is rejected
  tempered = scipy.special.softmax(np.asarray(logits, np.float64) / 0.9) * n
  _, p_wrong = scipy.stats.chisquare(observed, tempered)
  assert p_wrong < 1e-6
  # the sample distance is ||Z[sampled] - Z[argmax]||^2: 2 off the argmax, 0 on it
  np.testing.assert_allclose(out["sample_distance"],
                             np.where(np.asarray(out["indices"]) == 3, 0.0, 2.0))


@pytest.mark.parametrize("stochastic", [0.0, 1.0])
def test_algorithm_1_gradient_is_the_softmax_matmul_gradient(stochastic):
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32))
  codebook = jnp.asarray(rng.normal(size=(5, 3)).astype(np.float32))
  gumbel = jnp.asarray(rng.gumbel(size=(6, 5)).astype(np.float32))
  mask = jnp.full((6,), stochastic)
  cotangent = jnp.asarray(rng.normal(size=(6, 3)).astype(np.float32))

  def quantize(lg, cb):
    return vq.stochastic_mask_quantize(lg, cb, mask, gumbel, 0.9)["quantized"]

  def relaxed(lg, cb):  # Algorithm 1's backward pass, written directly
    scores = (lg + gumbel) / 0.9 if stochastic else lg
    return jax.nn.softmax(scores, axis=-1) @ cb

  value, vjp = jax.vjp(quantize, logits, codebook)
  _, vjp_ref = jax.vjp(relaxed, logits, codebook)
  for got, want in zip(vjp(cotangent), vjp_ref(cotangent), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  scores = np.asarray(logits + gumbel if stochastic else logits)  # forward: argmax(P + g)
  np.testing.assert_allclose(value, np.asarray(codebook)[scores.argmax(-1)], atol=1e-6)


def test_regvq_prior_kl_loss_value():
  z = jax.random.normal(jax.random.PRNGKey(5), (1, 3, 3, 4))
  module = RegVQQuantizer(codebook_size=6, embed_dim=4, prior_weight=0.5)
  variables = nn.unbox(module.init(jax.random.PRNGKey(1), z))
  out = module.apply(variables, z, train=True, rngs=RNGS)
  head = variables["params"]["logits_head"]
  logits = np.asarray(z).reshape(-1, 4) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  p_post = scipy.special.softmax(logits, axis=1).mean(0)
  np.testing.assert_allclose(out.losses["prior_kl"],
                             0.5 * scipy.stats.entropy(p_post, np.full(6, 1 / 6)), rtol=1e-4)


# ---- MoVQ multichannel -------------------------------------------------------------

def test_multichannel_tokens_are_per_chunk_nearest_codes_and_round_trip():
  rng = np.random.default_rng(6)
  codebook = rng.normal(size=(10, 3)).astype(np.float32)
  z = rng.normal(size=(2, 4, 5, 12)).astype(np.float32)  # 4 chunks of 3
  module = MultichannelQuantizer(codebook_size=10, embed_dim=12, channels=4)
  variables = {"params": {"codebook": jnp.asarray(codebook)}}
  out = module.apply(variables, jnp.asarray(z))
  assert out.indices.shape == (2, 4, 5, 4)
  expected = _nearest_numpy(z.reshape(2, 4, 5, 4, 3), codebook)
  np.testing.assert_array_equal(out.indices, expected)
  decoded = module.apply(variables, out.indices, method=MultichannelQuantizer.decode_indices)
  assert decoded.shape == z.shape
  np.testing.assert_allclose(decoded, out.quantized, atol=1e-6)
  np.testing.assert_allclose(np.asarray(decoded)[0, 1, 2, 6:9], codebook[expected[0, 1, 2, 2]])


# ---- FQ-GAN -------------------------------------------------------------------------

def test_fq_dictionary_update_matches_eq_8_in_numpy():
  rng = np.random.default_rng(8)
  k, c = 6, 4
  module = FeatureQuantizer(codebook_size=k, embed_dim=c, decay=0.9)
  h = jnp.asarray(rng.normal(size=(2, 3, 3, c)).astype(np.float32))
  stats = {"dictionary": rng.normal(size=(k, c)).astype(np.float32),
           "embed_sum": rng.normal(size=(k, c)).astype(np.float32),
           "cluster_size": np.array([0.5, 1.0, 0.0, 2.0, 0.3, 0.0], np.float32)}
  out, mutated = module.apply({"vq_stats": stats}, h, train=True, mutable=["vq_stats"])
  flat = np.asarray(h).reshape(-1, c)
  idx = _nearest_numpy(flat, stats["dictionary"])
  np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx)
  n_new, m_new, e_new = stats["cluster_size"].copy(), stats["embed_sum"].copy(), \
      stats["dictionary"].copy()
  for j in range(k):  # Eq. 8 code by code
    members = flat[idx == j]
    n_new[j] = 0.9 * n_new[j] + 0.1 * len(members)
    m_new[j] = 0.9 * m_new[j] + 0.1 * members.sum(0)
    if n_new[j] > 0:
      e_new[j] = m_new[j] / n_new[j]
  got = mutated["vq_stats"]
  np.testing.assert_allclose(got["cluster_size"], n_new, rtol=1e-6)
  np.testing.assert_allclose(got["embed_sum"], m_new, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["dictionary"], e_new, rtol=1e-5, atol=1e-6)
  chosen = stats["dictionary"][idx]
  np.testing.assert_allclose(out.losses["commitment"], 0.25 * ((flat - chosen) ** 2).mean(),
                             rtol=1e-5)


def test_fq_propagate_flag():
  h = jax.random.normal(jax.random.PRNGKey(9), (2, 4, 4, 3))
  for propagate in (True, False):
    module = FeatureQuantizer(codebook_size=5, embed_dim=3, propagate=propagate)
    variables = nn.unbox(module.init(jax.random.PRNGKey(0), h))
    out = module.apply(variables, h)
    if propagate:
      np.testing.assert_allclose(out.quantized, module.apply(
          variables, out.indices, method=FeatureQuantizer.decode_indices), atol=1e-6)
    else:
      np.testing.assert_array_equal(out.quantized, h)
      g = jax.grad(lambda x, m=module, v=variables: jnp.sum(m.apply(v, x).quantized ** 2))(h)
      np.testing.assert_allclose(g, 2 * h, rtol=1e-6)


# ---- vq options -----------------------------------------------------------------------

def _lloyd_numpy(points, centroids, iters):
  c = centroids.copy()
  for _ in range(iters):
    a = _nearest_numpy(points, c)
    for j in range(len(c)):
      if np.any(a == j):
        c[j] = points[a == j].mean(0)
  return c


def test_kmeans_matches_numpy_lloyd_and_finds_separated_blobs():
  rng = np.random.default_rng(10)
  centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
  points = np.concatenate([c + rng.normal(size=(30, 2)) for c in centres]).astype(np.float32)
  init = points[[0, 1, 2]]  # all three seeds in the first blob
  got = np.asarray(vq.kmeans(jnp.asarray(points), jnp.asarray(init), 10))
  np.testing.assert_allclose(got, _lloyd_numpy(points, init, 10), rtol=1e-5, atol=1e-5)
  init2 = points[[0, 30, 60]]
  got2 = np.asarray(vq.kmeans(jnp.asarray(points), jnp.asarray(init2), 5))
  blob_means = points.reshape(3, 30, 2).mean(1)
  np.testing.assert_allclose(got2, blob_means, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learning", ["loss", "ema"])
def test_kmeans_init_runs_on_the_first_training_batch_only(learning):
  z1 = jax.random.normal(jax.random.PRNGKey(11), (4, 4, 4, 3))
  z2 = 5.0 + jax.random.normal(jax.random.PRNGKey(12), (4, 4, 4, 3))
  module = VectorQuantizer(codebook_size=8, embed_dim=3, learning=learning, kmeans_init=True,
                           kmeans_iters=100, ema_decay=0.9)
  variables = nn.unbox(module.init(jax.random.PRNGKey(0), z1))
  flat = np.asarray(z1).reshape(-1, 3)
  out, mutated = module.apply(variables, z1, train=True, mutable=["vq_stats"], rngs=RNGS)
  stats = mutated["vq_stats"]
  assert int(stats["initialized"]) == 1
  if learning == "loss":
    codebook = np.asarray(variables["params"]["codebook"]) + np.asarray(stats["codebook_shift"])
  else:  # undo this step's EMA move: the k-means codes are embed_sum / counts before it
    codebook = None
  if codebook is not None:
    # converged Lloyd: every used code is the mean of the batch vectors nearest to it
    cells = _nearest_numpy(flat, codebook)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), cells)
    for j in np.unique(cells):
      np.testing.assert_allclose(codebook[j], flat[cells == j].mean(0), atol=1e-5)
  else:
    counts = np.bincount(np.asarray(out.indices).reshape(-1), minlength=8).astype(np.float32)
    # N <- 0.9 N0 + 0.1 n with N0 = max(n, 1) from k-means on the same batch
    np.testing.assert_allclose(stats["cluster_size"], 0.9 * np.maximum(counts, 1) + 0.1 * counts,
                               rtol=1e-5)
  # the k-means codebook quantises z1 far better than the random initial one
  assert float(out.metrics["quant_error"]) < 0.5 * float(np.var(flat, 0).sum())
  # a second, distant batch does not re-run k-means: only the usual update happens
  state2 = {**variables, **mutated}
  out2, mutated2 = module.apply(state2, z2, train=True, mutable=["vq_stats"], rngs=RNGS)
  if learning == "loss":
    np.testing.assert_array_equal(mutated2["vq_stats"]["codebook_shift"],
                                  stats["codebook_shift"])
  else:
    onehot = jax.nn.one_hot(np.asarray(out2.indices).reshape(-1), 8)
    expected = vq.ema_update(stats["cluster_size"], stats["embed_sum"],
                             jnp.asarray(z2).reshape(-1, 3), onehot, 0.9, 1e-5)
    np.testing.assert_allclose(mutated2["vq_stats"]["codebook"], expected[2], rtol=1e-5)


def test_dead_codes_restart_from_batch_vectors_after_n_unused_steps():
  codebook = np.array([[0, 0], [1, 0], [50, 50], [60, 60]], np.float32)  # 2, 3 never nearest
  z = jnp.asarray(np.random.default_rng(13).uniform(0, 1, (1, 4, 4, 2)).astype(np.float32))
  module = VectorQuantizer(codebook_size=4, embed_dim=2, restart_after=2)
  variables = {"params": {"codebook": jnp.asarray(codebook)},
               "vq_stats": {"codebook_shift": jnp.zeros((4, 2)),
                            "unused_steps": jnp.zeros((4,), jnp.int32)}}
  out, m1 = module.apply(variables, z, train=True, mutable=["vq_stats"], rngs=RNGS)
  used = np.unique(np.asarray(out.indices))
  assert set(used) <= {0, 1}
  unused = np.asarray(m1["vq_stats"]["unused_steps"])
  np.testing.assert_array_equal(unused[[2, 3]], [1, 1])
  np.testing.assert_array_equal(m1["vq_stats"]["codebook_shift"], 0.0)  # not yet dead
  out2, m2 = module.apply({**variables, **m1}, z, train=True, mutable=["vq_stats"], rngs=RNGS)
  assert float(out2.metrics["restarted_codes"]) == 2
  new = codebook + np.asarray(m2["vq_stats"]["codebook_shift"])
  np.testing.assert_array_equal(new[:2], codebook[:2])  # live codes untouched
  flat = np.asarray(z).reshape(-1, 2)
  for j in (2, 3):  # each restarted code is one of the batch's vectors
    assert np.min(np.abs(flat - new[j]).sum(1)) < 1e-5  # param + (new - param) rounding
  np.testing.assert_array_equal(np.asarray(m2["vq_stats"]["unused_steps"])[[2, 3]], [0, 0])
  # the gradient still reaches the codebook parameter one-to-one
  g = jax.grad(lambda p: module.apply({"params": {"codebook": p}, "vq_stats": m2["vq_stats"]},
                                      z).losses["codebook"])(jnp.asarray(codebook))
  assert np.abs(np.asarray(g)).sum() > 0


def test_l2_normalised_codes_pick_the_highest_cosine():
  rng = np.random.default_rng(14)
  codebook = rng.normal(size=(6, 3)).astype(np.float32) * rng.uniform(0.1, 5, (6, 1))
  z = rng.normal(size=(1, 5, 5, 3)).astype(np.float32) * 7
  module = VectorQuantizer(codebook_size=6, embed_dim=3, l2_normalize=True)
  out = module.apply({"params": {"codebook": jnp.asarray(codebook)}}, jnp.asarray(z))
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  cosine = unit(z) @ unit(codebook).T
  np.testing.assert_array_equal(out.indices, cosine.argmax(-1))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.quantized), axis=-1), 1.0, rtol=1e-5)
