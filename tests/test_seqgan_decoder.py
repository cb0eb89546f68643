"""SeQ-GAN's enhanced decoder ('seqgan'): the partitions, regional and dilated attention
equal masked dense attention, the VQGAN parameter paths are kept, and the config checks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.nn import seqgan_decoder as sd

KEY = jax.random.PRNGKey(0)
SMALL = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=4)


def _numbered(height=4, width=4):
  """[1, height, width, 1] holding each position's row-major number."""
  return jnp.arange(height * width, dtype=jnp.float32).reshape(1, height, width, 1)


def test_window_partition_groups_each_window_in_row_major_order():
  parts = sd.window_partition(_numbered(), 2)
  assert parts.shape == (4, 4, 1)
  np.testing.assert_array_equal(
      parts[..., 0], [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
  np.testing.assert_array_equal(sd.window_partition(_numbered(), 4)[..., 0],
                                [np.arange(16)])
  np.testing.assert_array_equal(sd.window_unpartition(parts, 2, 4, 4), _numbered())


def test_grid_partition_groups_positions_strided_by_map_over_grid():
  parts = sd.grid_partition(_numbered(), 2)  # H/g = 2: group (a, b) = {(2i + a, 2j + b)}
  assert parts.shape == (4, 4, 1)
  np.testing.assert_array_equal(
      parts[..., 0], [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]])
  np.testing.assert_array_equal(sd.grid_partition(_numbered(), 4)[..., 0], [np.arange(16)])
  np.testing.assert_array_equal(sd.grid_partition(_numbered(), 1)[..., 0],
                                np.arange(16)[:, None])
  np.testing.assert_array_equal(sd.grid_unpartition(parts, 2, 4, 4), _numbered())


@pytest.mark.parametrize("kind", ["window", "grid"])
@pytest.mark.parametrize("shape,size", [((2, 8, 8, 3), 2), ((2, 8, 8, 3), 4), ((3, 4, 8, 2), 2)])
def test_partitions_are_inverses(kind, shape, size):
  split, merge = sd.PARTITIONS[kind]
  x = jax.random.normal(KEY, shape)
  parts = split(x, size)
  groups = (shape[1] // size) * (shape[2] // size)
  assert parts.shape == (shape[0] * groups, size * size, shape[3])
  np.testing.assert_array_equal(merge(parts, size, shape[1], shape[2]), x)
  # Each group of a batch element holds only positions of that element.
  batch = jnp.broadcast_to(jnp.arange(shape[0])[:, None, None, None], shape[:3] + (1,))
  np.testing.assert_array_equal(split(batch, size)[:, :, 0].max(1),
                                split(batch, size)[:, :, 0].min(1))


def _same_group_mask(kind: str, height: int, width: int, size: int) -> np.ndarray:
  """[H W, H W] boolean: the two positions are in the same window / grid group."""
  rows, cols = np.divmod(np.arange(height * width), width)
  if kind == "window":
    key = (rows // size) * width + cols // size
  else:
    key = (rows % (height // size)) * width + cols % (width // size)
  return key[:, None] == key[None, :]


@pytest.mark.parametrize("kind,size", [("window", 2), ("window", 4), ("grid", 2), ("grid", 4)])
def test_partitioned_attention_equals_masked_dense_attention(kind, size):
  b, height, width, c, heads = 2, 8, 8, 8, 2
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, height, width, c)) for i in range(3))
  split, merge = sd.PARTITIONS[kind]
  out = merge(sd.multihead_attention(split(q, size), split(k, size), split(v, size), heads),
              size, height, width)
  flat = lambda t: t.reshape(b, height * width, c)
  mask = jnp.asarray(_same_group_mask(kind, height, width, size))
  dense = sd.multihead_attention(flat(q), flat(k), flat(v), heads, mask=mask)
  np.testing.assert_allclose(out, dense.reshape(out.shape), rtol=1e-5, atol=1e-5)


def test_multihead_attention_splits_channels_into_heads():
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 6)) for i in range(3))
  out = sd.multihead_attention(q, k, v, heads=2)
  for h in range(2):
    part = slice(3 * h, 3 * h + 3)
    weights = jax.nn.softmax(q[..., part] @ jnp.swapaxes(k[..., part], -1, -2) / np.sqrt(3))
    np.testing.assert_allclose(out[..., part], weights @ v[..., part], rtol=1e-5, atol=1e-6)


def _reference_block(params, x, kind, size, heads):
  """The attention block as dense attention over all H W positions with the group mask."""
  b, height, width, c = x.shape
  p = params

  def norm(name, t):
    return nn.LayerNorm().apply({"params": p[name]}, t)

  def lin(name, t):
    return t @ p[name]["kernel"] + p[name]["bias"]

  y = norm("norm1", x).reshape(b, height * width, c)
  mask = jnp.asarray(_same_group_mask(kind, height, width, size))
  y = sd.multihead_attention(lin("q", y), lin("k", y), lin("v", y), heads, mask=mask)
  x = x + lin("proj", y).reshape(x.shape)
  if "fc1" in p:
    x = x + lin("fc2", nn.gelu(lin("fc1", norm("norm2", x))))
  return x


@pytest.mark.parametrize("kind,size,mlp_ratio", [("window", 4, 2), ("grid", 4, 2),
                                                 ("grid", 2, 0)])
def test_attention_block_equals_masked_dense_block(kind, size, mlp_ratio):
  x = jax.random.normal(KEY, (2, 8, 8, 16))
  block = sd.PartitionedAttentionBlock(kind, size, head_dim=8, mlp_ratio=mlp_ratio)
  boxed = block.init(KEY, x)["params"]
  # Every parameter carries one logical axis name per dimension.
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda t: isinstance(t, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
  params = nn.meta.unbox(boxed)
  # Random biases and norm parameters, so that every parameter takes part.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  params = jax.tree.unflatten(
      tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])
  assert ("fc1" in params) == (mlp_ratio > 0)
  if mlp_ratio:
    assert params["fc1"]["kernel"].shape == (16, 16 * mlp_ratio)
  out = block.apply({"params": params}, x)
  np.testing.assert_allclose(out, _reference_block(params, x, kind, size, heads=2),
                             rtol=1e-4, atol=1e-4)


def _flat_shapes(params) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))}


def _decoders(enhance, **fields):
  vqgan = registry.DECODERS.build(registry.DECODERS.config("vqgan", **SMALL), out_channels=3)
  cfg = registry.DECODERS.config("seqgan", enhance=enhance, window_size=4, grid_size=4,
                                 head_dim=8, **SMALL, **fields)
  return vqgan, registry.DECODERS.build(cfg, out_channels=3)


H = jax.random.normal(KEY, (2, 8, 8, 6))


def test_enhance_none_is_the_vqgan_decoder():
  vqgan, seqgan = _decoders("none")
  params = vqgan.init(KEY, H)["params"]
  own = seqgan.init(KEY, H)["params"]
  assert jax.tree.structure(own) == jax.tree.structure(params)
  assert _flat_shapes(own) == _flat_shapes(params)
  np.testing.assert_array_equal(seqgan.apply({"params": params}, H),
                                vqgan.apply({"params": params}, H))


@pytest.mark.parametrize("enhance,blocks", [("attention", ("regional", "dilated")),
                                            ("conv", ("conv0", "conv1"))])
def test_enhanced_decoder_keeps_the_vqgan_paths(enhance, blocks):
  vqgan, seqgan = _decoders(enhance)
  old = vqgan.init(KEY, H)["params"]
  new = seqgan.init(KEY, H)["params"]
  old_shapes, new_shapes = _flat_shapes(old), _flat_shapes(new)
  assert {p: new_shapes[p] for p in old_shapes} == old_shapes
  added = set(new) - set(old)
  assert added == {f"up{level}_{block}" for level in range(len(SMALL["ch_mult"]))
                   for block in blocks}
  # The phase-1 decoder copied in by path; the new blocks keep their fresh values.
  merged = {**nn.meta.unbox(new), **nn.meta.unbox(old)}
  out, state = seqgan.apply({"params": merged}, H, mutable=["intermediates"],
                            capture_intermediates=lambda m, _: m.name in added)
  assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()
  # Each level's blocks act before its Upsample: on level l's map at level l's width.
  for level, (size, mult) in enumerate([(16, 1), (8, 2)]):
    for block in blocks:
      (y,) = state["intermediates"][f"up{level}_{block}"]["__call__"]
      assert y.shape == (2, size, size, 8 * mult)
  # With the new blocks' last layers zero, the enhanced decoder is the phase-1 decoder.
  last = ("proj", "fc2") if enhance == "attention" else ("conv2",)
  zero_last = lambda tree: {sub: jax.tree.map(jnp.zeros_like, t) if sub in last else t
                           for sub, t in tree.items()}
  zeroed = {name: zero_last(tree) if name in added else tree for name, tree in merged.items()}
  np.testing.assert_allclose(seqgan.apply({"params": zeroed}, H),
                             vqgan.apply({"params": nn.meta.unbox(old)}, H),
                             rtol=1e-5, atol=1e-5)


def test_default_fields_and_last_layer_contract():
  cfg = registry.DECODERS.config("seqgan", **SMALL)
  assert (cfg.enhance, cfg.window_size, cfg.grid_size, cfg.head_dim, cfg.mlp_ratio) == (
      "attention", 8, 8, 64, 2)
  registry.DECODERS.check(cfg)
  decoder = registry.DECODERS.build(cfg, out_channels=3)
  assert type(decoder).LAST_LAYER == "conv_out"
  params = decoder.init(KEY, H)["params"]
  out, state = decoder.apply({"params": params}, H, mutable=["intermediates"])
  features = state["intermediates"]["last_features"][0]
  np.testing.assert_allclose(decoder.last_layer().apply({"params": params["conv_out"]},
                                                        features), out, rtol=1e-5, atol=1e-6)


def test_check_geometry():
  check = registry.DECODERS.get("seqgan").check_geometry
  cfg = registry.DECODERS.config("seqgan", ch_mult=(1, 1, 2, 2, 4))  # maps 16 .. 256
  check(cfg, 16)
  with pytest.raises(ConfigError, match=r"window_size=8 does not divide the 4x4 .*\[1, 2, 4\]"):
    check(cfg, 4)
  cfg.window_size, cfg.grid_size = 4, 3
  with pytest.raises(ConfigError, match=r"grid_size=3 does not divide the 4x4"):
    check(cfg, 4)
  check(registry.DECODERS.config("seqgan", window_size=3, grid_size=6, ch_mult=(1, 2)), 6)
  cfg.enhance = "conv"
  check(cfg, 4)  # no windows: any size


@pytest.mark.parametrize("fields,match", [
    (dict(enhance="atention"), r"enhance='atention' must be one of .*'attention'"),
    (dict(window_size=0), r"window_size=0 must be >= 1"),
    (dict(grid_size=0), r"grid_size=0 must be >= 1"),
    (dict(head_dim=0), r"head_dim=0 must be >= 1"),
    (dict(mlp_ratio=-1), r"mlp_ratio=-1 must be >= 0"),
    (dict(ch=5, ch_mult=(1, 5), norm_groups=5, head_dim=8), r"3 heads for channel width 25"),
    (dict(norm_groups=3), r"norm_groups=3 does not divide"),
])
def test_check_config_errors(fields, match):
  cfg = registry.DECODERS.config("seqgan", **{**SMALL, **fields})
  with pytest.raises(ConfigError, match=match):
    registry.DECODERS.check(cfg)


def test_check_config_passes_valid_configs():
  registry.DECODERS.check(registry.DECODERS.config("seqgan"))
  # Widths 5 and 25 with head_dim 8: one head and three would not divide 25; as conv, fine.
  registry.DECODERS.check(registry.DECODERS.config(
      "seqgan", ch=5, ch_mult=(1, 5), norm_groups=5, head_dim=8, enhance="conv"))
  registry.DECODERS.check(registry.DECODERS.config(
      "seqgan", ch=5, ch_mult=(1, 5), norm_groups=5, head_dim=5))
