"""Token losses against hand computations, and the teacher-forced visualisation core."""

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.nn.transformers import GPT
from vqjax.ops.losses import masked_token_loss, next_token_loss, smoothed_cross_entropy
from vqjax.sampling.visualize import teacher_forced_top1


def test_smoothed_cross_entropy_by_hand():
  logits = np.array([[2.0, 0.0, -1.0]])
  p = np.exp(logits) / np.exp(logits).sum()
  s = 0.1
  target = np.array([0.9 + s / 3, s / 3, s / 3])  # (1 - s) one_hot(0) + s / K
  want = -np.sum(target * np.log(p))
  np.testing.assert_allclose(smoothed_cross_entropy(jnp.asarray(logits), jnp.array([0]), s),
                             [want], rtol=1e-6)


def test_masked_token_loss_counts_only_masked_entries():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5, 3))
  mask = rng.random((2, 5, 3)) < 0.5
  loss, acc = masked_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                label_smoothing=0.0)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(acc, (logits.argmax(-1) == targets)[mask].mean())
  # Changing an unmasked entry's logits leaves the loss unchanged.
  logits2 = logits.copy()
  logits2[~mask] += rng.normal(size=logits2[~mask].shape).astype(np.float32) * 5
  np.testing.assert_allclose(masked_token_loss(jnp.asarray(logits2), jnp.asarray(targets),
                                               jnp.asarray(mask), 0.0)[0], loss, rtol=1e-6)


def test_next_token_loss_is_mean_nll():
  logits = jnp.zeros((2, 4, 8))
  loss, _ = next_token_loss(logits, jnp.zeros((2, 4), jnp.int32))
  np.testing.assert_allclose(loss, np.log(8), rtol=1e-6)


def test_teacher_forced_accuracy_of_a_copying_model_is_one():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 12, (3, 9)))

  def copy_model(tokens, cond):  # predicts at position i exactly the true token i
    return jnp.where(jax.nn.one_hot(tokens, 12) > 0, 5.0, -5.0)

  pred, acc = teacher_forced_top1(copy_model, tokens, None)
  np.testing.assert_array_equal(pred, tokens)
  np.testing.assert_allclose(acc, 1.0)
  # A model that always predicts code 0 scores the fraction of zeros.
  pred, acc = teacher_forced_top1(lambda t, c: jnp.zeros((3, 9, 12)).at[..., 0].set(1), tokens,
                                  None)
  np.testing.assert_allclose(acc, (np.asarray(tokens) == 0).mean(1))


def test_teacher_forcing_through_gpt_uses_only_earlier_tokens():
  model = GPT(codebook_size=10, seq_len=6, num_conditions=3, cond_len=1, width=16, depth=1,
              heads=2, mlp_dim=32, dropout=0.0)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 10, (2, 6)))
  cond = jnp.array([0, 2])
  params = model.init(jax.random.PRNGKey(0), tokens, cond)["params"]
  fn = lambda t, c: model.apply({"params": params}, t, c)
  pred, _ = teacher_forced_top1(fn, tokens, cond)
  # Prediction i cannot depend on token i itself: changing the last token changes nothing.
  pred2, _ = teacher_forced_top1(fn, tokens.at[:, -1].set((tokens[:, -1] + 1) % 10), cond)
  np.testing.assert_array_equal(pred, pred2)
