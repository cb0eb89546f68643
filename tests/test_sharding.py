"""Tokenizer sharding: every parameter carries logical axis names, and the same train step on
1 device equals the step on 8 fake CPU devices under each mesh.param_sharding mode."""

import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import ROOT, load_config
from vqjax.core import partitioning
from vqjax.core.partitioning import DEFAULT_LOGICAL_RULES
from vqjax.train.tokenizer import build_models, init_boxed_state

SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.getcwd())
import jax, numpy as np
from tests.conftest import load_config
from vqjax.core import partitioning
from vqjax.train.run import setup

assert jax.device_count() == 8, jax.devices()
config = load_config("configs/demo.py:smoke")
with config.unlocked():
  config.loss.disc_start = 1  # step 0 without, step 1 with the discriminator
  config.model.quantizer.learning = "ema"
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
         "label": np.zeros(8, np.int32)}


from tests.sharding_checks import check_opt_state_follows_params, mesh_axes

runs = {}
for name, devices, data, model, mode in [("1", jax.devices()[:1], 1, 1, "replicate"),
                                         ("8x1 replicate", jax.devices(), 8, 1, "replicate"),
                                         ("4x2 channels", jax.devices(), 4, 2, "channels"),
                                         ("8x1 fsdp", jax.devices(), 8, 1, "fsdp")]:
  with config.unlocked():
    config.mesh.data, config.mesh.model, config.mesh.param_sharding = data, model, mode
  s = setup(config, devices)
  state, losses = s.state, []
  for _ in range(2):
    state, m = s.train_step(state, partitioning.shard_batch(batch, s.mesh), s.term_params)
    losses.append(float(m["loss/total"]))
  axes = [mesh_axes(x) for x in jax.tree.leaves((state.params, state.disc_params))]
  if mode == "replicate":
    assert all(not a for a in axes)
  if mode == "channels":
    assert any("model" in a for a in axes), "no parameter was sharded over model"
    assert not any("data" in a for a in axes)
  if mode == "fsdp":
    assert any("data" in a for a in axes), "no parameter was sharded over data"
    assert any("data" in mesh_axes(x) for x in jax.tree.leaves(state.vq_stats))
  check_opt_state_follows_params(state.params, state.opt_state)
  check_opt_state_follows_params(state.disc_params, state.disc_opt_state)
  for leaf in jax.tree.leaves(state.vq_stats):
    by_slice = {}
    for sh in leaf.addressable_shards:  # replicas of the same slice must agree exactly
      by_slice.setdefault(str(sh.index), []).append(np.asarray(sh.data))
    for copies in by_slice.values():
      assert all(np.array_equal(copies[0], x) for x in copies), "vq_stats differ across devices"
  variables = {"params": state.params, "vq_stats": state.vq_stats}
  x_hat = s.models.vqgan.apply(variables, partitioning.shard_batch(batch, s.mesh)["image"])[0]
  runs[name] = (losses, jax.device_get(state), np.asarray(x_hat))
  print(name, "ok", losses, flush=True)
ref_losses, ref, ref_out = runs["1"]
for name in list(runs)[1:]:
  losses, st, out = runs[name]
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-4)
  # The trained model computes the same function (to within the learning rate: Adam's
  # first step moves every parameter by about +-lr whatever its gradient's size, so a
  # parameter whose gradient is at summation-noise level can move either way)...
  np.testing.assert_allclose(out, ref_out, atol=config.optim.lr)
  for a, b in zip(jax.tree.leaves(st.vq_stats), jax.tree.leaves(ref.vq_stats), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # ...and every parameter agrees to within the Adam step size per step: conv
  # biases feeding a GroupNorm have a true gradient of exactly 0, so what they
  # get is summation-order noise, which Adam scales up to +-lr a step.
  for part in ("params", "disc_params"):
    for a, b in zip(jax.tree.leaves(getattr(st, part)), jax.tree.leaves(getattr(ref, part)),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=5 * config.optim.lr)
print("SHARDED-OK", ref_losses)
"""


def test_sharded_step_matches_single_device():
  env = dict(os.environ, PYTHONPATH=ROOT)
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "SHARDED-OK" in proc.stdout
  print(proc.stdout, f"{time.time() - start:.0f}s")


QUANTIZERS = {
    "vq-loss": dict(name="vq", learning="loss", kmeans_init=True, restart_after=2),
    "vq-ema": dict(name="vq", learning="ema", kmeans_init=True, restart_after=2),
    "multichannel": dict(name="multichannel", learning="ema", channels=2, restart_after=2),
    "regvq": dict(name="regvq"),
    "fq": dict(name="fq"),
}


def abstract_boxed_state(quantizer: dict, frozen: tuple[str, ...] = ()):
  """The smoke tokenizer's boxed abstract state with `quantizer`'s fields and frozen paths."""
  import ml_collections

  config = load_config("configs/demo.py:smoke")
  with config.unlocked():
    config.model.quantizer = ml_collections.ConfigDict(
        {"codebook_size": config.model.quantizer.codebook_size,
         "embed_dim": config.model.quantizer.embed_dim, **quantizer})
    config.optim.frozen = frozen
  models = build_models(config)
  return jax.eval_shape(lambda r: init_boxed_state(models, config, r), jax.random.PRNGKey(0))


def _unnamed(tree) -> list[str]:
  """Paths of the leaves of `tree` without a full set of logical axis names."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return [jax.tree_util.keystr(p) for p, x in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
          if not is_box(x) or len(x.names) != len(x.value.shape)]


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_every_tokenizer_parameter_has_logical_axis_names(quantizer):
  abstract = abstract_boxed_state(QUANTIZERS[quantizer], frozen=("encoder/.*",))
  for part in ("params", "vq_stats", "disc_params", "disc_stats"):
    assert not _unnamed(getattr(abstract, part)), (part, _unnamed(getattr(abstract, part)))
  assert jax.tree.leaves(abstract.vq_stats) or quantizer == "regvq"
  # Optimiser states mirror the named parameters; only their step counts are unnamed.
  is_box = lambda x: isinstance(x, nn.Partitioned)
  for part in ("opt_state", "disc_opt_state"):
    plain = [x for x in jax.tree.leaves(getattr(abstract, part), is_leaf=is_box)
             if not is_box(x)]
    assert all(x.shape == () for x in plain), part
  names = {n for x in jax.tree.leaves(abstract, is_leaf=is_box) if is_box(x) for n in x.names}
  assert names <= {name for name, _ in DEFAULT_LOGICAL_RULES}


def test_param_shardings_modes_on_one_device():
  abstract = abstract_boxed_state(QUANTIZERS["vq-ema"])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  for mode in ("replicate", "channels", "fsdp"):
    shardings = partitioning.param_shardings(mesh, abstract, mode, DEFAULT_LOGICAL_RULES)
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(abstract))
  kernel = partitioning.param_shardings(mesh, abstract, "channels", DEFAULT_LOGICAL_RULES)
  assert kernel.params["decoder"]["conv_out"]["kernel"].spec == P(None, None, None, "model")
  assert kernel.params["decoder"]["norm_out"]["scale"].spec == P("model")
  assert kernel.vq_stats["quantizer"]["embed_sum"].is_fully_replicated
  assert kernel.step.spec == P()
  with pytest.raises(ValueError, match="param sharding mode"):
    partitioning.param_shardings(mesh, abstract, "tensor", DEFAULT_LOGICAL_RULES)
  rules = [r for r in DEFAULT_LOGICAL_RULES if r[0] != "conv_in"]
  with pytest.raises(ValueError, match="logical axis 'conv_in' .* has no rule"):
    partitioning.param_shardings(mesh, abstract, "fsdp", rules)


@pytest.mark.parametrize("spec", ["configs/demo.py:smoke", "configs/maskgit_imagenet.py:smoke"])
def test_mesh_param_sharding_and_rules_are_validated(spec):
  from vqjax.errors import ConfigError
  from vqjax.train.tokenizer import validate_tokenizer_config
  from vqjax.train.transformer import validate_transformer_config

  validate = (validate_tokenizer_config if "demo" in spec else validate_transformer_config)
  config = load_config(spec)
  for mode in ("replicate", "channels", "fsdp"):
    with config.unlocked():
      config.mesh.param_sharding = mode
    validate(config, 1)
  with config.unlocked():
    config.mesh.param_sharding = "tensor"
  with pytest.raises(ConfigError, match="mesh.param_sharding must be one of"):
    validate(config, 1)
  with config.unlocked():
    config.mesh.param_sharding = "fsdp"
    config.mesh.rules = (("conv_out", "pipeline"),)
  with pytest.raises(ConfigError, match="mesh.rules entry"):
    validate(config, 1)
