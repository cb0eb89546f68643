"""Spectral norm, BigGAN at 32x32 (G and projection D) and FQ-GAN's feature quantisation in
the discriminators (vqjax.nn.spectral_norm, vqjax.nn.biggan, vqjax.nn.discriminators)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.nn import spectral_norm as sn
from vqjax.nn.biggan import BigGAN32Discriminator, BigGAN32Generator
from vqjax.nn.discriminators import PatchDiscriminator, fq_dictionary_usage

KEY = jax.random.PRNGKey(0)
SMALL = dict(ch=4, num_classes=3)  # width 4 * ch = 16
Z = jax.random.normal(jax.random.PRNGKey(1), (4, 128))
Y = jnp.array([0, 1, 2, 0], jnp.int32)
X = jax.random.uniform(jax.random.PRNGKey(2), (4, 32, 32, 3), minval=-1, maxval=1)


def unboxed(tree):
  return jax.tree.map(np.asarray, nn.unbox(tree))


def np_sigma(w_mat, u):
  """sigma = u^T W v with v = normalize(W^T u): the estimate from a stored u, in NumPy."""
  v = w_mat.T @ u
  v = v / np.linalg.norm(v)
  return u @ w_mat @ v


def top_singular_value(w_mat):
  return np.linalg.svd(np.asarray(w_mat, np.float64), compute_uv=False)[0]


# --- spectral norm ---------------------------------------------------------------------------

def test_power_iteration_reaches_the_svd_top_singular_value():
  w = jax.random.normal(KEY, (3, 3, 4, 8))  # a conv kernel: W [8, 36]
  w_mat = sn.weight_matrix(w, -1)
  u = sn.init_u(jax.random.PRNGKey(3), 8, 1e-8)
  np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-6)
  for _ in range(50):
    sigma, u = sn.sigma_estimate(w_mat, u, 1e-8, iterate=True)
  np.testing.assert_allclose(sigma, top_singular_value(w_mat), rtol=1e-3)
  np.testing.assert_allclose(top_singular_value(w_mat / sigma), 1.0, rtol=1e-3)


def test_sigma_gradient_holds_u_and_v_constant():
  w_mat = jax.random.normal(KEY, (5, 7))
  u = sn.init_u(jax.random.PRNGKey(3), 5, 1e-8)
  grad = jax.grad(lambda w: sn.sigma_estimate(w, u, 1e-8, iterate=True)[0])(w_mat)
  v = np.asarray(w_mat).T @ np.asarray(u)
  v /= np.linalg.norm(v)
  u_new = np.asarray(w_mat) @ v
  u_new /= np.linalg.norm(u_new)
  np.testing.assert_allclose(grad, np.outer(u_new, v), rtol=1e-5, atol=1e-6)  # d(u^T W v)/dW


def test_sn_dense_normalises_its_kernel_after_updates():
  layer = sn.SNDense(6, use_bias=False, collection="gen_stats")
  eye = jnp.eye(10)
  variables = layer.init(KEY, eye)
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (10, 6)))
  params = {"kernel": w}
  stats = variables["gen_stats"]
  step = jax.jit(lambda s: layer.apply({"params": params, "gen_stats": s}, eye, update=True,
                                       mutable=["gen_stats"])[1]["gen_stats"])
  for _ in range(50):
    stats = step(stats)
  normed = layer.apply({"params": params, "gen_stats": stats}, eye)  # = W / sigma
  np.testing.assert_allclose(w[0, 0] / normed[0, 0], top_singular_value(w.T), rtol=1e-3)
  np.testing.assert_allclose(top_singular_value(normed), 1.0, rtol=1e-3)
  # no iteration without update=True or without a mutable collection
  _, same = layer.apply({"params": params, "gen_stats": stats}, eye, mutable=["gen_stats"])
  np.testing.assert_array_equal(unboxed(same)["gen_stats"]["u"], unboxed(stats)["u"])
  layer.apply({"params": params, "gen_stats": stats}, eye, update=True)


def test_sn_conv_divides_by_the_stored_estimate():
  layer = sn.SNConv(8, (3, 3))
  x = jax.random.normal(KEY, (2, 5, 5, 4))
  variables = unboxed(layer.init(KEY, x))
  y = layer.apply(variables, x)
  w, u = variables["params"]["kernel"], variables["disc_stats"]["u"]
  sigma = np_sigma(np.asarray(sn.weight_matrix(w, -1)), u)
  want = jax.lax.conv_general_dilated(x, w / sigma, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


# --- generator -------------------------------------------------------------------------------

def _g_init(**fields):
  g = BigGAN32Generator(**{**SMALL, **fields})
  return g, g.init(KEY, Z, Y)


def test_generator_shape_range_and_class_conditioning():
  g, variables = _g_init()
  out = g.apply(variables, Z, Y)
  assert out.shape == (4, 32, 32, 3) and out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out))) <= 1.0
  other = g.apply(variables, Z, (Y + 1) % 3)
  assert float(jnp.max(jnp.abs(out - other))) > 1e-3  # same z, another class
  with pytest.raises(ValueError, match="num_classes=0"):
    g.apply(variables, Z, None)
  unconditional, uvars = _g_init(num_classes=0)
  assert unconditional.apply(uvars, Z, None).shape == (4, 32, 32, 3)
  assert "gain" in uvars["params"]["block0"]["bn1"]  # plain per-channel gain


def test_generator_running_statistics_as_torch():
  g, variables = _g_init()
  (out, mutated) = g.apply(variables, Z, Y, train=True, mutable=["gen_stats", "intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "linear")
  h = np.asarray(mutated["intermediates"]["linear"]["__call__"][0])  # [B, 16 * 16]
  h = h.reshape(4, 16, 4, 4).transpose(0, 2, 3, 1).reshape(-1, 16)  # torch's view(B, C, 4, 4)
  bn1 = unboxed(mutated["gen_stats"])["block0"]["bn1"]
  np.testing.assert_allclose(bn1["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn1["var"], 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-5)
  # eval: the running statistics, so one sample's image does not depend on the batch
  trained = {"params": variables["params"], "gen_stats": mutated["gen_stats"]}
  a = g.apply(trained, Z[:2], Y[:2])
  b = g.apply(trained, Z[jnp.array([0, 2])], Y[jnp.array([0, 2])])
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(a - g.apply(variables, Z[:2], Y[:2])))) > 1e-4
  ta = g.apply(trained, Z[:2], Y[:2], train=True)  # batch statistics (stats immutable: no error)
  tb = g.apply(trained, Z[jnp.array([0, 2])], Y[jnp.array([0, 2])], train=True)
  assert float(jnp.max(jnp.abs(ta[0] - tb[0]))) > 1e-4
  assert out.shape == (4, 32, 32, 3)


def test_orthogonal_init_on_the_out_by_rest_view():
  _, variables = _g_init()
  params = unboxed(variables["params"])
  conv = sn.weight_matrix(params["block0"]["conv1"]["kernel"], -1)  # [16, 3 * 3 * 16]
  np.testing.assert_allclose(conv @ conv.T, np.eye(16), atol=1e-5)
  linear = sn.weight_matrix(params["linear"]["kernel"], -1)  # [256, 128]: out > in
  np.testing.assert_allclose(linear.T @ linear, np.eye(128), atol=1e-5)
  gain = params["block0"]["bn1"]["gain"]["embedding"]  # [3, 16]
  np.testing.assert_allclose(gain @ gain.T, np.eye(3), atol=1e-5)
  assert all(not np.any(params[k]["bias"]) for k in ("linear", "out_conv"))
  d_params = unboxed(BigGAN32Discriminator(**SMALL).init(KEY, X, labels=Y)["params"])
  first = sn.weight_matrix(d_params["block0"]["conv1"]["kernel"], -1)  # [16, 27]
  np.testing.assert_allclose(first @ first.T, np.eye(16), atol=1e-5)


def _g_count(num_classes, ch=64, dim_z=128):
  """Parameters of arch[32] G, from the layer list in the BigGAN32Generator docstring."""
  w = 4 * ch
  linear = dim_z * 16 * w + 16 * w
  block = 2 * (9 * w * w + w) + (w * w + w) + 2 * 2 * num_classes * w  # convs, 1x1, 2 cBNs
  return linear + 3 * block + 2 * w + (9 * w * 3 + 3)  # output BN and conv


def _d_count(num_classes, ch=64):
  w = 4 * ch
  conv3 = 9 * w * w + w
  block0 = (9 * 3 * w + w) + conv3 + (3 * w + w)
  block1 = 2 * conv3 + (w * w + w)
  return block0 + block1 + 2 * (2 * conv3) + (w + 1) + num_classes * w


def _count(module, *args, **kwargs):
  shapes = jax.eval_shape(lambda: module.init(KEY, *args, **kwargs))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


@pytest.mark.parametrize("num_classes,g_params,d_params", [
    (10, 4_304_387, 4_207_361), (100, 4_580_867, 4_230_401)])
def test_parameter_counts_at_ch64(num_classes, g_params, d_params):
  assert (_g_count(num_classes), _d_count(num_classes)) == (g_params, d_params)
  labels = jnp.zeros((1,), jnp.int32)
  assert _count(BigGAN32Generator(num_classes=num_classes), Z[:1], labels) == g_params
  assert _count(BigGAN32Discriminator(num_classes=num_classes), X[:1], labels=labels) == d_params


# --- discriminator ---------------------------------------------------------------------------

def test_discriminator_projection_term():
  d = BigGAN32Discriminator(**SMALL)
  variables = d.init(KEY, X, labels=Y)
  (logits, extra), inter = d.apply(variables, X, labels=Y, mutable=["intermediates"],
                                   capture_intermediates=lambda mdl, _: mdl.name == "block3")
  assert logits.shape == (4,) and extra == {}
  h = np.maximum(np.asarray(inter["intermediates"]["block3"]["__call__"][0]), 0).sum((1, 2))
  p, s = unboxed(variables["params"]), unboxed(variables["disc_stats"])
  k = p["linear"]["kernel"]
  linear = h @ (k / np_sigma(k.T, s["linear"]["u"]))[:, 0] + p["linear"]["bias"][0]
  e = p["embed"]["embedding"]
  e = e / np_sigma(e, s["embed"]["u"])
  np.testing.assert_allclose(logits, linear + np.sum(e[np.asarray(Y)] * h, -1), rtol=1e-4)
  other = d.apply(variables, X, labels=(Y + 1) % 3)[0]
  np.testing.assert_allclose(other - logits, np.sum((e[np.asarray((Y + 1) % 3)] -
                                                     e[np.asarray(Y)]) * h, -1),
                             rtol=1e-3, atol=1e-3 * np.abs(logits).max())
  with pytest.raises(ValueError, match="pass labels"):
    d.apply(variables, X)


def test_discriminator_statistics_change_only_in_mutable_training():
  d = BigGAN32Discriminator(ch=4)  # unconditional
  variables = unboxed(d.init(KEY, X))
  assert "embed" not in variables["params"]
  # an orthogonal W has W W^T = I, which leaves u where it is: move off the initial weights
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(KEY, len(leaves))
  noisy = [w + 0.3 * np.asarray(jax.random.normal(k, w.shape))
           for w, k in zip(leaves, keys, strict=True)]
  variables["params"] = jax.tree.unflatten(tree, noisy)
  _, frozen = d.apply(variables, X, train=False, mutable=["disc_stats"])
  _, moved = d.apply(variables, X, train=True, mutable=["disc_stats"])
  before = unboxed(variables["disc_stats"])
  assert jax.tree.all(jax.tree.map(np.array_equal, before, unboxed(frozen["disc_stats"])))
  u0, u1 = before["block1"]["conv1"]["u"], unboxed(moved["disc_stats"])["block1"]["conv1"]["u"]
  assert not np.allclose(u0, u1) and np.isclose(np.linalg.norm(u1), 1.0)


# --- FQ-GAN in the discriminators --------------------------------------------------------------

def _np_fq_step(h, dictionary, decay):
  """Eq. 5 and Eq. 8 from zero counts, in NumPy: (indices, cluster sizes, new dictionary)."""
  dist = ((h[:, None, :] - dictionary[None]) ** 2).sum(-1)
  idx = dist.argmin(1)
  onehot = np.eye(dictionary.shape[0])[idx]
  sizes = (1 - decay) * onehot.sum(0)
  sums = (1 - decay) * onehot.T @ h
  safe = np.where(sizes > 0, sizes, 1.0)[:, None]
  return idx, sizes, np.where(sizes[:, None] > 0, sums / safe, dictionary)


def test_fq_dictionary_follows_eq_8_and_the_loss_is_weighted():
  d = BigGAN32Discriminator(**SMALL, fq_layers=(1,), fq_log2_size=3, fq_alpha=2.0)
  variables = d.init(KEY, X, labels=Y)
  (_, extra), mutated = d.apply(
      variables, X, train=True, labels=Y, mutable=["disc_stats", "intermediates"],
      capture_intermediates=lambda mdl, _: mdl.name == "block1")
  h = np.asarray(mutated["intermediates"]["block1"]["__call__"][0]).reshape(-1, 16)
  before = unboxed(variables["disc_stats"])["fq_1"]
  after = unboxed(mutated["disc_stats"])["fq_1"]
  idx, sizes, dictionary = _np_fq_step(h, before["dictionary"], 0.9)
  assert not np.allclose(after["dictionary"], before["dictionary"])
  np.testing.assert_allclose(after["cluster_size"], sizes, rtol=1e-6)
  np.testing.assert_allclose(after["dictionary"], dictionary, rtol=1e-4, atol=1e-5)
  commitment = 0.25 * np.mean((h - before["dictionary"][idx]) ** 2)
  assert set(extra) == {"fq/1"}
  np.testing.assert_allclose(extra["fq/1"], 2.0 * commitment, rtol=1e-4)
  usage = fq_dictionary_usage(mutated["disc_stats"])
  assert set(usage) == {1}
  np.testing.assert_allclose(usage[1]["usage"], np.mean(sizes > 1e-3))
  p = sizes / sizes.sum()
  np.testing.assert_allclose(usage[1]["perplexity"],
                             np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))), rtol=1e-5)
  assert fq_dictionary_usage({}) == {}
  # eval, or training with immutable statistics, leaves the dictionary as it is
  _, same = d.apply(variables, X, train=False, labels=Y, mutable=["disc_stats"])
  np.testing.assert_array_equal(unboxed(same["disc_stats"])["fq_1"]["dictionary"],
                                before["dictionary"])
  d.apply(variables, X, train=True, labels=Y)


def test_fq_without_propagation_keeps_the_logits():
  fq = dict(**SMALL, fq_layers=(0, 2), fq_log2_size=2)
  variables = BigGAN32Discriminator(**fq, fq_propagate=False).init(KEY, X, labels=Y)
  plain_vars = {"params": variables["params"],
                "disc_stats": {k: v for k, v in variables["disc_stats"].items()
                               if not k.startswith("fq_")}}
  plain = BigGAN32Discriminator(**SMALL).apply(plain_vars, X, labels=Y)[0]
  loss_only, extra = BigGAN32Discriminator(**fq, fq_propagate=False).apply(variables, X,
                                                                           labels=Y)
  np.testing.assert_allclose(loss_only, plain, rtol=1e-6)
  assert set(extra) == {"fq/0", "fq/2"}
  propagated = BigGAN32Discriminator(**fq).apply(variables, X, labels=Y)[0]
  assert float(jnp.max(jnp.abs(propagated - plain))) > 1e-3
  fresh = BigGAN32Discriminator(**SMALL).init(KEY, X, labels=Y)["params"]
  assert jax.tree.all(jax.tree.map(np.array_equal, unboxed(fresh),
                                   unboxed(variables["params"])))


# The PatchGAN's parameter tree (ndf=8, num_layers=3) before FQ existed, as checkpoints hold it.
OLD_PATCHGAN = {
    "Conv_0": {"kernel": (4, 4, 3, 8), "bias": (8,)},
    "Conv_1": {"kernel": (4, 4, 8, 16)}, "BatchStatNorm_0": {"scale": (16,), "bias": (16,)},
    "Conv_2": {"kernel": (4, 4, 16, 32)}, "BatchStatNorm_1": {"scale": (32,), "bias": (32,)},
    "Conv_3": {"kernel": (4, 4, 32, 64)}, "BatchStatNorm_2": {"scale": (64,), "bias": (64,)},
    "Conv_4": {"kernel": (4, 4, 64, 1), "bias": (1,)},
}


def test_patchgan_with_and_without_fq():
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), unboxed(tree))
  plain = PatchDiscriminator(ndf=8).init(KEY, X)
  assert set(plain) == {"params"} and shapes(plain["params"]) == OLD_PATCHGAN
  d = PatchDiscriminator(ndf=8, fq_layers=(1,), fq_log2_size=3)
  variables = d.init(KEY, X)
  assert jax.tree.all(jax.tree.map(np.array_equal, unboxed(variables["params"]),
                                   unboxed(plain["params"])))
  assert shapes(variables["disc_stats"])["fq_1"]["dictionary"] == (8, 16)
  (logits, extra), mutated = d.apply(variables, X, train=True, mutable=["disc_stats"])
  assert logits.shape == (4, 2, 2, 1) and set(extra) == {"fq/1"} and extra["fq/1"] > 0
  assert not np.allclose(unboxed(mutated["disc_stats"])["fq_1"]["dictionary"],
                         unboxed(variables["disc_stats"])["fq_1"]["dictionary"])
  assert set(fq_dictionary_usage(mutated["disc_stats"])) == {1}


@pytest.mark.parametrize("name,fields,match", [
    ("biggan32", dict(fq_layers=(4,)), r"disc.fq_layers=\(4,\).*\(0, 1, 2, 3\)"),
    ("biggan32", dict(fq_layers=(-1,)), r"\(0, 1, 2, 3\)"),
    ("patchgan", dict(fq_layers=(1, 4)), r"disc.fq_layers=\(1, 4\).*\(0, 1, 2, 3\)"),
    ("biggan32", dict(fq_log2_size=0), r"disc.fq_log2_size=0 must be in \[1, 16\]"),
    ("patchgan", dict(fq_log2_size=17), r"disc.fq_log2_size=17"),
    ("biggan32", dict(fq_log2_size=2.5), r"fq_log2_size=2.5 must be an integer"),
    ("biggan32", dict(fq_alpha=-1.0), r"disc.fq_alpha=-1.0 must be >= 0"),
    ("patchgan", dict(fq_beta=-0.1), r"disc.fq_beta=-0.1 must be >= 0"),
    ("biggan32", dict(fq_decay=1.0), r"disc.fq_decay=1.0 must be in \[0, 1\)"),
    ("biggan32", dict(num_classes=-1), r"disc.num_classes=-1"),
])
def test_fq_config_errors_are_one_line(name, fields, match):
  cfg = registry.DISCRIMINATORS.config(name, **fields)
  with pytest.raises(ConfigError, match=match) as info:
    registry.DISCRIMINATORS.check(cfg)
  assert "\n" not in str(info.value)


def test_registries():
  cfg = registry.GENERATORS.config("biggan32", num_classes=10)
  registry.GENERATORS.check(cfg)
  g = registry.GENERATORS.build(cfg)
  assert isinstance(g, BigGAN32Generator) and g.dim_z == 128 and g.resolution == 32
  assert "resolution" not in cfg
  registry.DISCRIMINATORS.check(registry.DISCRIMINATORS.config("patchgan", num_layers=4,
                                                               fq_layers=(4,)))
  disc = registry.DISCRIMINATORS.build(registry.DISCRIMINATORS.config(
      "biggan32", num_classes=10, fq_layers=[0, 1, 2, 3]))
  assert disc.fq_layers == (0, 1, 2, 3)
  assert "collection" not in registry.QUANTIZERS.fields("fq")
