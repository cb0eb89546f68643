"""SeQ-GAN entropy regulariser and Reg-VQ prior KL against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats

from vqjax.nn.quantizers import VectorQuantizer
from vqjax.ops import regularizers


def test_entropy_penalty_is_zero_for_uniform_and_log_k_for_collapsed_usage():
  k = 8
  uniform = jnp.eye(k)  # each position on its own code: average usage uniform
  collapsed = jnp.zeros((k, k)).at[:, 3].set(1.0)  # every position on code 3
  np.testing.assert_allclose(regularizers.codebook_entropy_penalty(uniform), 0.0, atol=1e-6)
  np.testing.assert_allclose(regularizers.codebook_entropy_penalty(collapsed), np.log(k),
                             rtol=1e-6)


def test_soft_assignment_and_penalty_match_scipy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(20, 3)).astype(np.float32)
  codebook = rng.normal(size=(6, 3)).astype(np.float32)
  d = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)
  p = scipy.special.softmax(-d, axis=1)
  probs = regularizers.soft_code_assignment(jnp.asarray(z), jnp.asarray(codebook))
  np.testing.assert_allclose(probs, p, rtol=1e-4, atol=1e-6)
  expected = np.log(6) - scipy.stats.entropy(p.mean(0))
  np.testing.assert_allclose(regularizers.codebook_entropy_penalty(probs), expected, rtol=1e-4)


def test_a_gradient_step_on_the_penalty_raises_the_average_entropy():
  rng = np.random.default_rng(1)
  codebook = jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32))
  z = codebook[0] + 0.3 * jnp.asarray(rng.normal(size=(32, 4)).astype(np.float32))  # near code 0

  def avg_entropy(zz):
    return scipy.stats.entropy(np.asarray(
        regularizers.soft_code_assignment(zz, codebook)).mean(0))

  loss = lambda zz: regularizers.codebook_entropy_penalty(
      regularizers.soft_code_assignment(zz, codebook))
  before = avg_entropy(z)
  z_new = z - 0.5 * jax.grad(loss)(z)
  assert avg_entropy(z_new) > before + 1e-3
  assert float(loss(z_new)) < float(loss(z))


def test_quantizer_adds_gamma_times_the_penalty():
  rng = np.random.default_rng(2)
  codebook = rng.normal(size=(5, 2)).astype(np.float32)
  z = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
  module = VectorQuantizer(codebook_size=5, embed_dim=2, entropy_weight=0.01)
  out = module.apply({"params": {"codebook": jnp.asarray(codebook)}}, jnp.asarray(z))
  d = ((z.reshape(-1, 1, 2) - codebook[None]) ** 2).sum(-1)
  p_bar = scipy.special.softmax(-d, axis=1).mean(0)
  np.testing.assert_allclose(out.losses["entropy"],
                             0.01 * (np.log(5) - scipy.stats.entropy(p_bar)), rtol=1e-4)


def test_prior_kl_matches_scipy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(50, 7)) * 2
  probs = scipy.special.softmax(logits, axis=1)
  expected = scipy.stats.entropy(probs.mean(0), np.full(7, 1 / 7))  # KL(P_post || U)
  np.testing.assert_allclose(regularizers.kl_to_uniform(jnp.asarray(probs, jnp.float32)),
                             expected, rtol=1e-5)
  one_code = np.zeros((4, 7))
  one_code[:, 2] = 1
  np.testing.assert_allclose(regularizers.kl_to_uniform(jnp.asarray(one_code)), np.log(7),
                             rtol=1e-6)
