"""MaskGIT decoding with given tokens (inpainting, editing) follows the reference schedule.

MaskGIT (Chang et al. 2022) spreads only the initially unknown tokens over the T
decoding steps: the reference decoder (google-research/maskgit,
`libml/parallel_decode.py`) keeps floor(n0 cos(pi/2 (t+1)/T)) tokens masked
after step t, n0 = the example's masked count before the first step, clamped to
[1, masked before the step - 1]. `maskgit.decode` is checked against a plain
Python rewrite of that rule, with given entries per example in [B, N] and
[B, N, c] maps (where (position, channel) pairs count one by one).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.sampling import maskgit

K = 16
MASK_ID = K


def reference_masked_counts(initially_masked: int, num_steps: int) -> list[int]:
  """Masked entries after each step of the reference MaskGIT decoder, for one example.

  Step t: mask_len = floor(n0 cos(pi/2 (t+1)/T)), then max(1, min(unknown - 1,
  mask_len)); the reference returns the last step's samples, so nothing is
  masked after it. One documented difference: when a single masked entry is
  left before the last step, vqjax reveals it, where the reference's max(1, .)
  keeps it masked (every other entry is fixed then, so it is sampled from the
  same logits either way); an example with nothing masked stays as it is.
  """
  unknown, counts = initially_masked, []
  for step in range(num_steps):
    mask_ratio = math.cos(math.pi / 2 * (step + 1) / num_steps)
    mask_len = math.floor(initially_masked * mask_ratio)
    mask_len = max(1, min(unknown - 1, mask_len))
    if step == num_steps - 1 or unknown <= 1:
      mask_len = 0
    counts.append(mask_len)
    unknown = mask_len
  return counts


def _start_and_target(shape, given_per_row, seed=0):
  """Start map with `given_per_row[b]` given entries at random (position, channel) pairs."""
  rng = np.random.default_rng(seed)
  target = rng.integers(0, K, shape)
  start = np.full(shape, MASK_ID)
  flat_start, flat_target = start.reshape(shape[0], -1), target.reshape(shape[0], -1)
  for b, given in enumerate(given_per_row):
    idx = rng.permutation(flat_start.shape[1])[:given]
    flat_start[b, idx] = (flat_target[b, idx] + 1) % K  # differs from what the model predicts
  return start, target


def _decode(start, target, steps, jit=False):
  # The model is certain of `target` everywhere, so samples and confidences are deterministic;
  # given entries hold other tokens and show whether decoding ever overwrites them.
  logits = jnp.asarray(np.where(np.eye(K)[target] > 0, 0.0, -1e4).astype(np.float32))
  run = lambda tok, key: maskgit.decode(lambda t: logits, tok, MASK_ID, key, num_steps=steps)
  if jit:
    run = jax.jit(run)
  final, history = run(jnp.asarray(start), jax.random.PRNGKey(0))
  return np.asarray(final), np.concatenate([start[None], np.asarray(history)])


def _check(start, target, steps, jit=False):
  """Runs `decode`; returns the per-step masked counts [T, B] after checking every invariant."""
  final, history = _decode(start, target, steps, jit)
  b = start.shape[0]
  given = start != MASK_ID
  initially = (~given).reshape(b, -1).sum(1)
  counts = (history[1:] == MASK_ID).reshape(steps, b, -1).sum(-1)
  want = np.array([reference_masked_counts(int(n), steps) for n in initially]).T
  np.testing.assert_array_equal(counts, want)
  for t in range(steps):
    before, after = history[t], history[t + 1]
    fixed = before != MASK_ID
    np.testing.assert_array_equal(after[fixed], before[fixed])  # never re-masked or changed
    np.testing.assert_array_equal(after[given], start[given])
  assert not np.any(final == MASK_ID)
  np.testing.assert_array_equal(final, np.where(given, start, target))
  return counts


def test_reference_helper_hand_values():
  # 156 unknown, T = 12: cos(pi/24) = 0.991445, cos(pi/4) = 0.707107, cos(11 pi/24) = 0.130526.
  counts = reference_masked_counts(156, 12)
  assert (counts[0], counts[5], counts[10], counts[11]) == (154, 110, 20, 0)
  assert reference_masked_counts(256, 3) == [221, 128, 0]  # 256 cos(pi/6) = 221.7
  assert reference_masked_counts(6, 12) == [5, 4, 3, 2, 1] + [0] * 7
  assert reference_masked_counts(2, 4) == [1, 0, 0, 0]
  assert reference_masked_counts(0, 4) == [0, 0, 0, 0]


@pytest.mark.parametrize("steps", [12, 8])
def test_100_of_256_given_follow_the_reference_schedule(steps):
  start, target = _start_and_target((2, 256), [100, 100])
  counts = _check(start, target, steps)
  if steps == 12:
    # Not one token a step (the schedule scaled by all 256 tokens gave 155, 154, ...).
    np.testing.assert_array_equal(counts[[0, 5, 10, 11]].T, [[154, 110, 20, 0]] * 2)


def test_rows_with_different_numbers_given_follow_their_own_schedule():
  given = [0, 1, 100, 200, 250, 254, 255, 256]
  start, target = _start_and_target((len(given), 256), given, seed=1)
  counts = _check(start, target, 12, jit=True)
  # The row with nothing given keeps the all-masked schedule over all 256 tokens.
  np.testing.assert_array_equal(
      counts[:, 0], [int(maskgit.num_masked_after_step(t, 12, 256)) for t in range(12)])
  assert counts[0, 2] == math.floor(156 * math.cos(math.pi / 24))


@pytest.mark.parametrize("jit", [False, True])
def test_multichannel_maps_count_position_channel_entries(jit):
  shape = (4, 64, 4)
  given = [0, 30, 128, 200]
  start, target = _start_and_target(shape, given, seed=2)
  partial = (start != MASK_ID).any(-1) & ~(start != MASK_ID).all(-1)
  assert partial[1:].any(-1).all()  # some positions have only some channels given
  counts = _check(start, target, 10, jit)
  assert counts[0, 3] == math.floor(56 * math.cos(math.pi / 20))


@pytest.mark.parametrize("steps", [3, 6, 12])
def test_half_point_of_the_schedule_does_not_lose_a_token(steps):
  # cos(pi/2 * 2/3) = 1/2 exactly: n/2 stay masked after step 2T/3 - 1 (not n/2 - 1).
  half = 2 * steps // 3 - 1
  start, target = _start_and_target((3, 256), [0, 100, 57], seed=3)
  counts = _check(start, target, steps)
  np.testing.assert_array_equal(counts[half], [128, 78, 99])


def test_num_masked_after_step_per_row_counts():
  n = np.arange(0, 1025)
  for steps in range(1, 17):
    table = np.stack([np.asarray(maskgit.num_masked_after_step(t, steps, n)) for t in
                      range(steps)])
    for t in range(steps - 1):
      want = [max(1, math.floor(int(x) * math.cos(math.pi / 2 * (t + 1) / steps))) for x in n]
      np.testing.assert_array_equal(table[t], want)
    np.testing.assert_array_equal(table[-1], 0)
    if steps % 3 == 0:
      np.testing.assert_array_equal(table[2 * steps // 3 - 1], np.maximum(n // 2, 1))
  # Traced counts need a static bound; scalar counts keep the all-masked behaviour.
  traced = jax.jit(lambda c: maskgit.num_masked_after_step(1, 3, c, 300))(jnp.array([256, 57, 0]))
  np.testing.assert_array_equal(traced, [128, 28, 1])
  assert int(maskgit.num_masked_after_step(1, 3, 256)) == 128
  with pytest.raises(ValueError, match="max_tokens"):
    jax.jit(lambda c: maskgit.num_masked_after_step(1, 3, c))(jnp.array([4]))
