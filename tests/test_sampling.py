"""MaskGIT schedules and decoding, AR sampling filters, the KV cache and the causal mask."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.nn.transformers import GPT, MaskGITTransformer
from vqjax.sampling import autoregressive as ar
from vqjax.sampling import maskgit


def test_num_masked_after_step_matches_formula():
  n, t_total = 256, 12
  for t in range(t_total):
    want = 0 if t == t_total - 1 else max(1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / 12)))
    assert int(maskgit.num_masked_after_step(t, t_total, n)) == want
  # Hand values: cos(pi/24) = 0.99144, cos(pi/4) = 0.70711, cos(11 pi/24) = 0.13053.
  assert [int(maskgit.num_masked_after_step(t, 12, 256)) for t in (0, 5, 10, 11)] == \
      [253, 181, 33, 0]
  assert int(maskgit.num_masked_after_step(2, 4, 1)) == 1  # at least one until the end


def test_training_mask_ratio_follows_the_cosine_schedule():
  mask = np.asarray(maskgit.training_mask(jax.random.PRNGKey(0), (4000, 64)))
  counts = mask.sum(1)
  assert counts.min() >= 1 and counts.max() <= 64
  # E[cos(pi/2 u)] = 2/pi for u ~ U(0,1); ceil adds at most one token per row.
  assert abs(mask.mean() - 2 / np.pi) < 0.02


def test_multichannel_mask_treats_position_channel_pairs_independently():
  mask = np.asarray(maskgit.training_mask(jax.random.PRNGKey(1), (2000, 16, 4)))
  per_pair = mask.mean(0)  # [16, 4]: every (position, channel) pair masked equally often
  assert np.abs(per_pair - mask.mean()).max() < 0.05
  # Channels of one position are not masked together: partial masks are common.
  partial = (mask.any(-1) & ~mask.all(-1)).mean()
  assert partial > 0.3
  # Given the row's ratio, two channels of one position correlate no more than two positions.
  same_pos = np.mean(mask[:, :, 0] == mask[:, :, 1])
  other_pos = np.mean(mask[:, 0, :] == mask[:, 1, :])
  assert abs(same_pos - other_pos) < 0.02


@pytest.mark.parametrize("shape", [(3, 16), (2, 8, 3)])
def test_decode_keeps_fixed_tokens_and_ends_unmasked(shape):
  k, mask_id, steps = 10, 10, 6
  rng = np.random.default_rng(0)
  logits_table = jnp.asarray(rng.normal(size=shape + (k,)).astype(np.float32))
  start = np.full(shape, mask_id)
  start.reshape(shape[0], -1)[:, :3] = 7  # three given entries per example
  final, history = maskgit.decode(lambda t: logits_table, jnp.asarray(start), mask_id,
                                  jax.random.PRNGKey(0), num_steps=steps)
  history = np.concatenate([start[None], np.asarray(history)])
  n = int(np.prod(shape[1:])) - 3  # the schedule counts the initially masked entries
  for t in range(steps):
    before, after = history[t], history[t + 1]
    fixed = before != mask_id
    assert np.array_equal(after[fixed], before[fixed])  # never re-masked, never changed
    masked_after = (after == mask_id).reshape(shape[0], -1).sum(1)
    want = 0 if t == steps - 1 else max(1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps)))
    assert np.all(masked_after == np.minimum(want, (before == mask_id).reshape(shape[0], -1)
                                            .sum(1) - 1).clip(0))
  assert not np.any(np.asarray(final) == mask_id)
  assert np.all(np.asarray(final).reshape(shape[0], -1)[:, :3] == 7)


@pytest.mark.parametrize("shape", [(2, 12), (2, 6, 4)])
def test_maskgit_returns_the_tokens_a_certain_model_predicts(shape):
  k = 9
  target = np.random.default_rng(1).integers(0, k, shape)
  logits = jnp.asarray(np.where(np.eye(k)[target] > 0, 0.0, -1e4).astype(np.float32))
  final, _ = maskgit.decode(lambda t: logits, jnp.full(shape, k), k, jax.random.PRNGKey(3),
                            num_steps=5)
  np.testing.assert_array_equal(final, target)


def test_ar_returns_the_tokens_a_certain_model_predicts():
  b, p, n, k = 2, 3, 7, 11
  target = jnp.asarray(np.random.default_rng(2).integers(0, k, (b, n)))

  def decode_fn(ids, cache, index):
    # Position index + j predicts code (index + j - p + 1) of `target`.
    pos = index + jnp.arange(ids.shape[1]) - p + 1
    nxt = jnp.take_along_axis(target, jnp.clip(pos, 0, n - 1)[None].repeat(b, 0), axis=1)
    seen.append(cache.shape[1])  # at trace time: the cache length this call attends over
    return jnp.where(jax.nn.one_hot(nxt, k) > 0, 0.0, -1e4), cache

  seen = []
  out = jax.jit(lambda r: ar.sample(decode_fn, jnp.zeros((b, p + n)),
                                    jnp.zeros((b, p), jnp.int32), n, r, top_k=3, top_p=0.9,
                                    cache_blocks=3))(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, target)
  # n - 1 = 6 steps in 3 blocks of 2: step i writes position p + i, so the blocks see
  # caches ending at p + 2, p + 4, p + 6; the prefill sees the prefix only.
  assert seen == [p, p + 2, p + 4, p + 6]
  assert ar.attended_lengths(p, n, 3) == [p] * p + [p + 2] * 2 + [p + 4] * 2 + [p + 6] * 2
  assert ar.block_bounds(6, 4) == [(0, 2), (2, 3), (3, 4), (4, 6)]
  assert ar.block_bounds(2, 5) == [(0, 1), (1, 2)]


def test_top_k_and_top_p_never_sample_outside_the_kept_set():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  draw = jax.jit(jax.vmap(lambda key, k, p: ar.sample_logits(key, jnp.asarray(logits), 1.0, k, p),
                          in_axes=(0, None, None)), static_argnums=(1, 2))
  topk = np.asarray(draw(keys, 5, 1.0))  # [2000, 4]
  for row in range(4):
    kept = set(np.argsort(-logits[row])[:5])
    assert set(topk[:, row]) <= kept and len(set(topk[:, row])) == 5
  nucleus = np.asarray(draw(keys, 0, 0.6))
  for row in range(4):
    order = np.argsort(-logits[row])
    probs = np.exp(logits[row] - logits[row].max())
    probs /= probs.sum()
    cum = np.cumsum(probs[order])
    kept = set(order[: int(np.searchsorted(cum, 0.6) + 1)])  # smallest prefix reaching 0.6
    assert set(nucleus[:, row]) <= kept


def _small_gpt(**kw):
  return GPT(codebook_size=13, seq_len=10, num_conditions=5, cond_len=2, width=32, depth=2,
             heads=4, mlp_dim=64, dropout=0.0, **kw)


def test_kv_cache_logits_equal_full_recompute_at_every_position():
  model = _small_gpt()
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, 13, (2, 10)))
  cond = jnp.asarray(rng.integers(0, 5, (2, 2)))
  params = model.init(jax.random.PRNGKey(0), tokens, cond)["params"]
  full = model.apply({"params": params}, tokens, cond)  # [2, 10, 13]
  ids = jnp.concatenate([model.bind({"params": params}).prefix_ids(cond), tokens], axis=1)
  cache = model.init_cache(2)
  logits, cache = model.apply({"params": params}, ids[:, :2], cache, 0, method=GPT.decode)
  stepwise = [logits[:, -1]]
  for i in range(2, 11):
    logits, cache = model.apply({"params": params}, ids[:, i:i + 1], cache, i,
                                method=GPT.decode)
    stepwise.append(logits[:, 0])
  np.testing.assert_allclose(np.stack(stepwise, 1), full, rtol=1e-4, atol=1e-5)


def test_causal_mask_hides_later_tokens():
  model = _small_gpt()
  rng = np.random.default_rng(5)
  ids = jnp.asarray(rng.integers(0, 13, (1, 12)))
  params = model.init(jax.random.PRNGKey(1), ids[:, :10], ids[:, :2])["params"]
  run = lambda x: model.apply({"params": params}, x, method=GPT.decode)[0]
  base = run(ids)
  for j in (0, 5, 11):
    changed = run(ids.at[0, j].set((ids[0, j] + 1) % 13))
    np.testing.assert_allclose(changed[:, :j], base[:, :j], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, j], base[:, j])


@pytest.mark.parametrize("cache_blocks", [1, 4, 20])
def test_cached_sampling_equals_recompute_sampling(cache_blocks):
  model = _small_gpt()
  rng = np.random.default_rng(6)
  cond = jnp.asarray(rng.integers(0, 5, (3, 2)))
  params = model.init(jax.random.PRNGKey(2), jnp.zeros((3, 10), jnp.int32), cond)["params"]
  bound = model.bind({"params": params})
  prefix = bound.prefix_ids(cond)

  def decode_fn(ids, cache, index):
    return model.apply({"params": params}, ids, cache, index, method=GPT.decode)

  with_cache = ar.sample(decode_fn, model.init_cache(3), prefix, 10, jax.random.PRNGKey(7),
                         temperature=1.0, top_k=6, cache_blocks=cache_blocks)
  no_cache = ar.sample_without_cache(lambda ids: decode_fn(ids, None, 0)[0], prefix, 10,
                                     jax.random.PRNGKey(7), temperature=1.0, top_k=6)
  np.testing.assert_array_equal(with_cache, no_cache)


@pytest.mark.parametrize("channels", [1, 3])
def test_maskgit_transformer_shapes_condition_and_logical_axes(channels):
  model = MaskGITTransformer(codebook_size=16, seq_len=9, channels=channels, num_conditions=4,
                             width=32, depth=2, heads=4, mlp_dim=64, dropout=0.0)
  shape = (2, 9) if channels == 1 else (2, 9, channels)
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 17, shape))
  variables = model.init(jax.random.PRNGKey(0), tokens, jnp.array([0, 1]))
  logits = model.apply(variables, tokens, jnp.array([0, 1]))
  assert logits.shape == shape + (16,)
  other = model.apply(variables, tokens, jnp.array([2, 3]))
  assert not np.allclose(logits, other)  # the class token matters
  names = {"embed", "mlp", "heads", "kv", "vocab", None}
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.Partitioned) and set(b.names) <= names for b in boxed)


@pytest.mark.parametrize("objective,classes,guidance", [
    ("maskgit", 0, 0.0), ("maskgit", 4, 2.0), ("gpt", 4, 1.5), ("gpt", 0, 0.0)])
def test_sample_tokens_for_each_objective(objective, classes, guidance):
  from vqjax import config_lib
  from vqjax.train.transformer import build_objective

  c = config_lib.transformer_smoke_overrides(config_lib.transformer_config(objective))
  c.model.num_classes = classes
  c.model.dropout = 0.0
  c.sample.steps = 3
  c.sample.top_k = 5
  c.sample.guidance_scale = guidance
  obj = build_objective(c, (3, 3), 11)
  params = nn.unbox(obj.init_params(jax.random.PRNGKey(0)))
  cond = obj.conditions.from_labels(jnp.array([0, 3]))
  tokens = obj.sample(params, cond, jax.random.PRNGKey(1), c.sample)
  assert tokens.shape == (2, 9) and int(tokens.min()) >= 0 and int(tokens.max()) < 11
