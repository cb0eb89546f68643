"""Training phases as config: frozen parameter paths and init-from another run."""

import jax
import numpy as np
import pytest

from tests.conftest import load_config
from vqjax.core import checkpoint, partitioning, trees
from vqjax.errors import ConfigError
from vqjax.train.run import init_from, setup


def _batch(s, seed):
  images = np.random.default_rng(seed).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  return partitioning.shard_batch({"image": images, "label": np.zeros(8, np.int32)}, s.mesh)


def test_frozen_paths_stay_bitwise_while_the_rest_trains():
  config = load_config("configs/demo.py:smoke")
  with config.unlocked():
    config.model.quantizer.learning = "ema"  # the codebook is statistics: frozen too
    config.optim.frozen = ("encoder/.*", "quant_conv/.*", "quantizer/.*")
    config.loss.disc_start = 1  # the GAN branch runs in step 2
  s = setup(config)
  before = jax.device_get(s.state)
  state = s.state
  for i in range(2):
    state, _ = s.train_step(state, _batch(s, i), s.term_params)
  after = jax.device_get(state)
  for tree in ("params", "vq_stats"):
    frozen = trees.match_mask(getattr(before, tree), config.optim.frozen)
    pairs = zip(jax.tree.leaves(frozen), jax.tree.leaves(getattr(before, tree)),
                jax.tree.leaves(getattr(after, tree)), strict=True)
    for is_frozen, a, b in pairs:
      if is_frozen:
        np.testing.assert_array_equal(a, b)
  assert jax.tree.leaves(before.vq_stats)  # the EMA statistics were covered
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(before.params["decoder"]), jax.tree.leaves(after.params["decoder"]),
      strict=True)]
  assert all(changed)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(before.disc_params), jax.tree.leaves(after.disc_params), strict=True))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """A saved smoke state whose decoder differs from a fresh init (so copies are visible)."""
  config = load_config("configs/demo.py:smoke")
  s = setup(config)
  state = s.state.replace(params={**s.state.params, "decoder": jax.tree.map(
      lambda x: x + 1.0, s.state.params["decoder"])})
  workdir = str(tmp_path_factory.mktemp("source"))
  manager = checkpoint.make_manager(workdir, 1, async_save=False)
  checkpoint.save(manager, 7, state, None)
  manager.wait_until_finished()
  manager.close()
  return workdir, jax.device_get(state), s


def test_init_from_copies_the_matching_paths(source_run):
  workdir, source, s = source_run
  cfg = load_config("configs/demo.py:smoke").init_from
  with cfg.unlocked():
    cfg.workdir, cfg.patterns = workdir, ("params/decoder/.*",)
  fresh = s.state
  state = jax.device_get(init_from(cfg, fresh, s.state_shardings))
  for a, b in zip(jax.tree.leaves(state.params["decoder"]),
                  jax.tree.leaves(source.params["decoder"]), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(state.params["encoder"]),
                  jax.tree.leaves(jax.device_get(fresh.params["encoder"])), strict=True):
    np.testing.assert_array_equal(a, b)


def test_init_from_errors_list_the_paths(source_run):
  workdir, _, _ = source_run
  config = load_config("configs/demo.py:smoke")
  with config.unlocked():
    config.model.decoder.ch = 8  # other shapes than the source's decoder
    config.model.decoder.norm_groups = 4
    config.init_from.workdir = workdir
    config.init_from.patterns = ("params/decoder/.*",)
  other = setup(config)
  with pytest.raises(ConfigError, match="shapes differ .*params/decoder/"):
    init_from(config.init_from, other.state, other.state_shardings)
  with config.unlocked():
    config.init_from.patterns = ("params/decodr/.*",)
  with pytest.raises(ConfigError, match=r"\['params/decodr/\.\*'\] match no path"):
    init_from(config.init_from, other.state, other.state_shardings)
  with config.unlocked():
    config.init_from.step = 3
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    init_from(config.init_from, other.state, other.state_shardings)
