"""MoVQ's decoder ('movq'): SpatialNorm is Eq. 4 and its 1x1 convs commute with the
upsampling, the blocks and their SpatialNorms are counted as documented, the VQGAN paths
are kept, z_q conditions the output, and the config checks (command line included)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.nn import movq_decoder as md
from vqjax.nn.layers import upsample_nearest

KEY = jax.random.PRNGKey(0)
# Blocks: mid_res0, mid_attn, mid_res1, up1_res0, up1_res1, up0_res0, up0_res1, norm_out.
# Level 1 (4x4) has attention after each ResBlock; level 0 (8x8) has none.
SMALL = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=4)
H = jax.random.normal(KEY, (2, 4, 4, 6))
Z_Q = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
# SpatialNorm modules after k conditioned blocks: the middle 2 + 1 + 2, up1_res{i} 2 + 1
# each (ResBlock and its attention), up0_res{i} 2 each, norm_out 1.
SPATIAL_NORMS = {0: 0, 3: 5, 4: 8, 5: 11, 7: 15, "all": 16}


def _decoder(**fields):
  """Built directly, so that the pairs check_config rejects (f0 'sinusoid' or 'constant'
  with no SpatialNorm) run too; the registry's build is in the contract test of test_parts."""
  return md.MoVQDecoder(**SMALL, **fields, out_channels=3)


def _paths(params) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  return {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}


def _spatial_norm_paths(params) -> list[str]:
  """The subtrees holding phi_gamma and phi_beta, i.e. the SpatialNorm modules."""
  found = []

  def walk(tree, prefix):
    if "phi_gamma" in tree and "phi_beta" in tree:
      found.append(prefix)
    for key, sub in tree.items():
      if isinstance(sub, dict):
        walk(sub, f"{prefix}/{key}" if prefix else key)

  walk(nn.unbox(params), "")
  return found


def _group_norm_by_hand(f: np.ndarray, groups: int, eps: float) -> np.ndarray:
  b, hgt, wdt, c = f.shape
  g = f.reshape(b, hgt, wdt, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(f.shape)


def test_spatial_norm_equals_eq4_on_a_hand_example():
  # F: 2x4 map, 2 channels; z_q: 1x2 grid of 1-d codes (+1, -1), upsampled x2.
  f = np.array([[[1, 0], [2, 1], [3, -1], [4, 2]],
                [[0, 3], [-1, 1], [2, 0], [1, 5]]], np.float32)[None]
  z_q = np.array([[[1.0], [-1.0]]], np.float32)[None]  # [1, 1, 2, 1]
  params = {"phi_gamma": {"kernel": np.array([[[[2.0, -1.0]]]], np.float32),
                          "bias": np.array([1.0, 0.5], np.float32)},
            "phi_beta": {"kernel": np.array([[[[0.5, 1.0]]]], np.float32),
                         "bias": np.array([0.0, -1.0], np.float32)}}
  layer = md.SpatialNorm(num_groups=2)
  out = layer.apply({"params": params}, f, z_q)
  # gamma = 2 z + 1, -z + 0.5 -> (3, -0.5) left half, (-1, 1.5) right half;
  # beta = 0.5 z, z - 1 -> (0.5, 0) left, (-0.5, -2) right.
  gamma = np.array([[3, -0.5]] * 2 + [[-1, 1.5]] * 2, np.float32)[None, None]  # [1,1,4,2]
  beta = np.array([[0.5, 0]] * 2 + [[-0.5, -2]] * 2, np.float32)[None, None]
  expected = gamma * _group_norm_by_hand(f, 2, 1e-6) + beta
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # One group: mean and variance over all 16 values.
  one = md.SpatialNorm(num_groups=1).apply({"params": params}, f, z_q)
  np.testing.assert_allclose(one, gamma * _group_norm_by_hand(f, 1, 1e-6) + beta,
                             rtol=1e-5, atol=1e-5)
  # No GroupNorm affine of its own: only the two convs are parameters.
  assert set(layer.init(KEY, f, z_q)["params"]) == {"phi_gamma", "phi_beta"}


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_conv_then_upsample_equals_upsample_then_conv(factor):
  z_q = jax.random.normal(KEY, (2, 3, 3, 5))
  f = jax.random.normal(jax.random.PRNGKey(2), (2, 3 * factor, 3 * factor, 8))
  layer = md.SpatialNorm(num_groups=4)
  params = nn.unbox(layer.init(KEY, f, z_q)["params"])
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(KEY, p.shape), params)
  out = layer.apply({"params": params}, f, z_q)
  big = upsample_nearest(z_q, factor)
  conv = nn.Conv(8, (1, 1))
  gamma = conv.apply({"params": params["phi_gamma"]}, big)
  beta = conv.apply({"params": params["phi_beta"]}, big)
  expected = gamma * _group_norm_by_hand(np.asarray(f), 4, 1e-6) + beta
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_spatial_norm_rejects_a_non_integer_factor():
  with pytest.raises(ValueError, match="one integer factor"):
    md.SpatialNorm(num_groups=1).init(KEY, jnp.ones((1, 6, 6, 2)), jnp.ones((1, 4, 4, 1)))


def test_block_names_and_count():
  assert md.block_names((1, 2), 1) == ["mid_res0", "mid_attn", "mid_res1", "up1_res0",
                                       "up1_res1", "up0_res0", "up0_res1", "norm_out"]
  assert len(md.block_names((1, 1, 2, 2, 4), 2)) == 3 + 5 * 3 + 1 == 19
  assert md.conditioned_count("all", (1, 2), 1) == 8


@pytest.mark.parametrize("f0", md.F0_CHOICES)
@pytest.mark.parametrize("blocks", [0, 3, "all"])
def test_decoder_runs_with_the_documented_spatial_norms(f0, blocks):
  decoder = _decoder(f0=f0, spatial_norm_blocks=blocks)
  out, variables = decoder.init_with_output(KEY, H, Z_Q)
  assert out.shape == (2, 8, 8, 3) and np.all(np.isfinite(out))
  params = variables["params"]
  assert len(_spatial_norm_paths(params)) == SPATIAL_NORMS[blocks]
  extra = {"fourier": "f0_fourier", "constant": "f0_constant"}.get(f0)
  assert (extra in params) if extra else not any(k.startswith("f0_") for k in params)


@pytest.mark.parametrize("blocks", [4, 5, 7])
def test_spatial_norm_count_for_partial_blocks(blocks):
  params = _decoder(f0="conv", spatial_norm_blocks=blocks).init(KEY, H, Z_Q)["params"]
  assert len(_spatial_norm_paths(params)) == SPATIAL_NORMS[blocks]


def test_default_conditions_the_three_middle_blocks():
  params = _decoder().init(KEY, H, Z_Q)["params"]
  assert sorted(_spatial_norm_paths(params)) == [
      "mid_attn/norm", "mid_res0/norm1", "mid_res0/norm2", "mid_res1/norm1", "mid_res1/norm2"]
  assert nn.unbox(params)["conv_in"]["kernel"].shape == (3, 3, 2 * 128, 16)  # [sin, cos] of 128


def test_vqgan_paths_are_kept():
  vqgan = registry.DECODERS.build(registry.DECODERS.config("vqgan", **SMALL), out_channels=3)
  base = _paths(vqgan.init(KEY, H, Z_Q)["params"])
  plain = _paths(_decoder(f0="conv", spatial_norm_blocks=0).init(KEY, H, Z_Q)["params"])
  assert plain == base
  # Conditioned: every VQGAN path is kept but a conditioned norm's scale and bias.
  movq = _paths(_decoder(f0="conv", spatial_norm_blocks="all").init(KEY, H, Z_Q)["params"])
  changed = {p for p in base if p not in movq}
  assert changed and all(p.rsplit("/", 2)[-2].startswith("norm") for p in changed)
  assert all(movq[p] == shape for p, shape in base.items() if p in movq)
  assert all(p in base or "/phi_" in p for p in movq)


def _outputs(decoder, z_q_other):
  params = decoder.init(KEY, H, Z_Q)["params"]
  return decoder.apply({"params": params}, H, Z_Q), decoder.apply({"params": params}, H,
                                                                   z_q_other)


def test_z_q_conditions_the_output_only_through_spatial_norm_or_f0():
  other = Z_Q[::-1]
  a, b = _outputs(_decoder(f0="conv", spatial_norm_blocks=0), other)
  np.testing.assert_array_equal(a, b)
  for fields in (dict(f0="conv", spatial_norm_blocks=3), dict(f0="conv", spatial_norm_blocks=8),
                 dict(f0="fourier", spatial_norm_blocks=0)):
    a, b = _outputs(_decoder(**fields), other)
    assert np.max(np.abs(a - b)) > 1e-4, fields


def test_last_layer_contract():
  decoder = _decoder()
  params = decoder.init(KEY, H, Z_Q)["params"]
  out, mutated = decoder.apply({"params": params}, H, Z_Q, mutable=["intermediates"])
  features = mutated["intermediates"]["last_features"][0]
  again = decoder.last_layer().apply({"params": params[decoder.LAST_LAYER]}, features)
  np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6)


def test_sinusoidal_grid():
  grid = md.sinusoidal_grid(3, 5, 7)
  assert grid.shape == (3, 5, 7)
  np.testing.assert_allclose(grid[:, 0, 0], np.sin(np.arange(3)), rtol=1e-6)  # rows, freq 1
  np.testing.assert_allclose(grid[0, :, 3], np.sin(np.arange(5)), rtol=1e-6)  # columns
  assert np.all(grid[:, :, :3] == grid[:, :1, :3])  # the row part is constant along a row


@pytest.mark.parametrize("fields,message", [
    (dict(f0="fourir"), r"one of \('fourier', 'conv', 'sinusoid', 'constant'\).*'fourier'"),
    (dict(spatial_norm_blocks=9), r"=9 must be an int in \[0, 8\] or 'all': .* 8 blocks"),
    (dict(spatial_norm_blocks=-1), r"=-1 must be an int in \[0, 8\]"),
    (dict(spatial_norm_blocks="most"), r"='most' must be an int in \[0, 8\] or 'all'"),
    (dict(spatial_norm_blocks=2.5), r"=2.5 must be"),
    (dict(spatial_norm_blocks=True), r"=True must be"),
    (dict(f0="constant", spatial_norm_blocks=0), "never reads the codes"),
    (dict(f0="sinusoid", spatial_norm_blocks=0), "never reads the codes"),
    (dict(fourier_features=0), "fourier_features=0"),
])
def test_check_config_errors(fields, message):
  cfg = registry.DECODERS.config("movq", **SMALL)
  for key, value in fields.items():
    cfg[key] = value
  with pytest.raises(ConfigError, match=message) as info:
    registry.DECODERS.check(cfg)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, 3, 8, "all"])
def test_check_config_accepts(value):
  cfg = registry.DECODERS.config("movq", **SMALL)
  cfg.spatial_norm_blocks = value  # the field takes an int or 'all' after creation too
  registry.DECODERS.check(cfg)
  assert registry.DECODERS.kwargs(cfg)["spatial_norm_blocks"] == value


@pytest.mark.parametrize("arg,value", [("all", "all"), ("5", 5), ("0", 0)])
def test_command_line_sets_an_int_or_all(tmp_path, arg, value):
  path = tmp_path / "recipe.py"
  path.write_text("import ml_collections\nfrom vqjax import registry\n\n\ndef get_config():\n"
                  "  c = ml_collections.ConfigDict()\n"
                  "  c.decoder = registry.DECODERS.config('movq')\n  c.lock()\n  return c\n")
  argv = ["prog", f"--config={path}", f"--config.decoder.spatial_norm_blocks={arg}"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv,
                                  lock_config=True)
  flag_values(argv)
  cfg = flag_values.config.decoder
  assert cfg.spatial_norm_blocks == value
  registry.DECODERS.check(cfg)
  assert md.MoVQDecoder().spatial_norm_blocks == 3  # a direct build holds the plain default
