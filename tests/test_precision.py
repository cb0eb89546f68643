"""Mixed precision (`config.precision='bfloat16'`) and rematerialisation
(`config.model.remat='block'`) in the three trainers.

bfloat16 keeps parameters, optimiser states, statistics, the quantiser and every loss in
float32 and computes the convs and matmuls in bfloat16; 'block' recomputes every residual
and attention block in the backward pass with the same parameters and the same numbers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_config
from vqjax import config_lib, registry
from vqjax.errors import ConfigError

# bfloat16 rounds to 8 significant bits (relative error up to 2^-9 ~ 0.2% per rounding).
# The smoke models chain a handful of layers, each rounding its inputs and output, so
# their outputs move by about 1% of their scale (BigGAN's D: 0.6% of logits ~ 14); the
# quantiser and the losses are float32 and add nothing. Each loss therefore agrees to 5%
# relative (measured: 0.05% for L1 up to 2.2% for BigGAN's hinge G loss) or 0.02 absolute
# near zero; `loss/total`, a sum of terms of both signs, to 5% of the sum of their sizes.
BF16_RTOL, BF16_ATOL = 5e-2, 2e-2
# remat recomputes the same float32 operations, but XLA fuses (and so orders reductions)
# differently: values agree to float32 round-off of the sums that make them, a few 1e-7
# of those sums' terms. So an array agrees to 1e-4 relative, or to 1e-5 of its largest
# entry plus 2e-5 (measured: 2e-7 of the largest entry in BigGAN's gradients, 5e-6 on the
# analytically zero gradients of the conv biases before a BatchNorm).
REMAT_RTOL, REMAT_ATOL, REMAT_OF_MAX = 1e-4, 2e-5, 1e-5

COMPUTE = ("conv_general_dilated", "dot_general")
REMAT_PRIMITIVES = ("checkpoint", "remat", "remat2")
K_TOKENIZER = 37  # a codebook size no layer width shares, so its matmuls can be found


# --------------------------------------------------------------------------------------
# Helpers.


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside its equations (scan, cond, remat...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
        if hasattr(inner, "eqns"):
          yield from equations(inner)


def input_dtypes(eqn):
  return {str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")}


def compute_ops(jaxpr):
  """{'bfloat16': n, 'float32': m}: convolutions and matmuls by their operands' dtype."""
  counts = {}
  for eqn in equations(jaxpr):
    if eqn.primitive.name in COMPUTE:
      key = "/".join(sorted(input_dtypes(eqn)))
      counts[key] = counts.get(key, 0) + 1
  return counts


def matmuls_with_axis(jaxpr, size: int):
  """The dot_generals with an operand axis of `size` (e.g. a codebook's K)."""
  return [e for e in equations(jaxpr) if e.primitive.name == "dot_general"
          and any(size in v.aval.shape for v in e.invars)]


def remat_count(jaxpr) -> int:
  """How many rematerialised (checkpointed) calls `jaxpr` makes, at any depth."""
  return sum(e.primitive.name in REMAT_PRIMITIVES for e in equations(jaxpr))


def traced_run(step, *args):
  """(the jaxpr of jit(step), its outputs for args): traced once, then compiled and run."""
  traced = jax.jit(step).trace(*args)
  return traced.jaxpr.jaxpr, traced.lower().compile()(*args)


def float_dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def assert_same_tree(a, b):
  """Same paths, shapes, dtypes and, where both are arrays (not `jax.eval_shape`'s
  abstract ones), values: remat and precision must not touch the parameters."""
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(nn.unbox(t))[0] for t in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
    assert x.shape == y.shape and x.dtype == y.dtype, path
    if isinstance(x, jax.Array) and isinstance(y, jax.Array):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def assert_remat_close(actual, desired, what=""):
  """Equal to float32 round-off (see REMAT_RTOL)."""
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=REMAT_RTOL,
                             atol=REMAT_ATOL + REMAT_OF_MAX * scale, err_msg=what)


def assert_losses_close(f32: dict, bf16: dict):
  """Every `loss/*` metric within BF16 tolerance (see BF16_RTOL); a total with terms
  beside it within BF16_RTOL of the sum of its terms' sizes."""
  terms = sorted(k for k in f32 if k.startswith("loss/") and k != "loss/total")
  for key in terms or ["loss/total"]:
    np.testing.assert_allclose(np.asarray(bf16[key]), np.asarray(f32[key]), rtol=BF16_RTOL,
                               atol=BF16_ATOL, err_msg=key)
  if terms and "loss/total" in f32:
    size = sum(abs(float(np.mean(f32[key]))) for key in terms)
    np.testing.assert_allclose(np.asarray(bf16["loss/total"]), np.asarray(f32["loss/total"]),
                               atol=BF16_RTOL * size + BF16_ATOL, err_msg="loss/total")


def block_count(params, words=("_res", "_attn", "_conv", "_regional", "_dilated")) -> int:
  """How many top-level subtrees of `params` are residual or attention blocks, by name."""
  return sum(any(w in name for w in words) for name in params)


# --------------------------------------------------------------------------------------
# Tokenizer.


def tokenizer_config(precision="float32", remat="none", **quantizer):
  """The demo smoke tokenizer at 16px (8x8 tokens), L1 + GAN (LPIPS off: it compiles slowly
  and stays float32 whatever the precision, since the trainer gives it no dtype)."""
  c = load_config("configs/demo.py:smoke")
  with c.unlocked():
    c.precision, c.model.remat = precision, remat
    c.data.image_size = 16
    c.loss.terms.lpips.weight = 0.0
    c.loss.disc_weight = 0.8
    for key, value in quantizer.items():
      c.model.quantizer[key] = value
  return c


def images(n=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, (n, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("gan", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["before_disc_start", "with_disc"])
def test_tokenizer_bf16_step_keeps_state_and_quantiser_float32(gan):
  """The step before disc_start (encoder, EMA quantiser, decoder, L1) and, slow, the one
  with the PatchGAN and the adaptive weight."""
  from vqjax.train.tokenizer import build_models, init_state, make_train_step

  ema = {"codebook_size": K_TOKENIZER, "learning": "ema"}
  config_32, config_16 = tokenizer_config(**ema), tokenizer_config("bfloat16", **ema)
  models_32, models_16 = build_models(config_32), build_models(config_16)
  state = init_state(models_16, config_16, jax.random.PRNGKey(0))
  assert_same_tree(state.params, jax.eval_shape(
      lambda r: init_state(models_32, config_32, r), jax.random.PRNGKey(0)).params)
  batch = {"image": images(), "label": jnp.zeros((4,), jnp.int32)}
  jaxpr, (new_16, metrics_16) = traced_run(make_train_step(models_16, config_16, gan=gan),
                                           state, batch, {})
  jaxpr_32, (_, metrics_32) = traced_run(make_train_step(models_32, config_32, gan=gan),
                                         state, batch, {})
  ops = compute_ops(jaxpr)
  assert ops.get("bfloat16", 0) >= 10, ops  # encoder and decoder convs (and PatchGAN's)
  assert compute_ops(jaxpr_32).keys() == {"float32"}
  # distances [N, d] x [d, K] and the EMA sums [K, N] x [N, d]: float32 in and out
  codebook_ops = matmuls_with_axis(jaxpr, K_TOKENIZER)
  assert len(codebook_ops) >= 2
  for eqn in codebook_ops:
    assert input_dtypes(eqn) == {"float32"}, eqn
    assert {str(v.aval.dtype) for v in eqn.outvars} == {"float32"}, eqn
  assert_losses_close(metrics_32, metrics_16)
  assert float(metrics_16["nonfinite"]) == 0.0
  for part in ("params", "opt_state", "disc_params", "disc_opt_state", "vq_stats"):
    assert float_dtypes(getattr(new_16, part)) == {"float32"}, part
  # the EMA codebook moved (it was updated, in float32)
  assert not np.array_equal(np.asarray(new_16.vq_stats["quantizer"]["codebook"]),
                            np.asarray(state.vq_stats["quantizer"]["codebook"]))


def test_bf16_tokenizer_picks_codes_closer_than_bf16_resolution():
  """The quantiser sees float32 features: with the quant conv's kernel zero, its input is
  its bias b, whose nearest code is found to float32 precision. b = 1 + 2e and the codes
  1 and 1 + 3e (first coordinate, e = 2^-10) all round to 1.0 in bfloat16, where the
  first code would win the tie; in float32 the second is nearer (e^2 < 4 e^2)."""
  from vqjax.nn.vqgan import VQGAN

  config = tokenizer_config("bfloat16", codebook_size=4, learning="loss", restart_after=0)
  model = VQGAN(config.model, dtype=jnp.bfloat16)
  x = images(2)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), x)["params"])
  e, d = 2.0**-10, config.model.quantizer.embed_dim
  assert jnp.asarray(1 + 2 * e, jnp.bfloat16) == jnp.asarray(1 + 3 * e, jnp.bfloat16) == 1.0
  codebook = np.zeros((4, d), np.float32)
  codebook[:, 0] = [1.0, 1.0 + 3 * e, 5.0, -5.0]
  bias = np.zeros((d,), np.float32)
  bias[0] = 1.0 + 2 * e
  params["quantizer"]["codebook"] = jnp.asarray(codebook)
  params["quant_conv"] = {"kernel": jnp.zeros_like(params["quant_conv"]["kernel"]),
                          "bias": jnp.asarray(bias)}
  q = model.apply({"params": params}, x, method=VQGAN.encode)
  np.testing.assert_array_equal(np.asarray(q.indices), 1)
  assert q.quantized.dtype == jnp.float32


def test_tokenizer_remat_same_parameters_losses_and_gradients():
  from vqjax.nn.vqgan import VQGAN

  models = {r: VQGAN(tokenizer_config(remat=r, learning="loss", restart_after=0).model)
            for r in ("none", "block")}
  x = images()
  params = {r: m.init(jax.random.PRNGKey(0), x)["params"] for r, m in models.items()}
  assert_same_tree(params["none"], params["block"])
  p = nn.unbox(params["none"])

  def loss(model, p):
    x_hat, q = model.apply({"params": p}, x, train=True)
    return jnp.mean(jnp.abs(x - x_hat)) + sum(q.losses.values())

  values = {r: jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(p)
            for r, m in models.items()}
  assert_remat_close(values["block"][0], values["none"][0], "loss")
  for a, b in zip(jax.tree.leaves(values["block"][1]), jax.tree.leaves(values["none"][1]),
                  strict=True):
    assert_remat_close(a, b, "gradient")

  # one checkpoint per ResBlock / AttnBlock of encoder and decoder, none without remat
  blocks = block_count(p["encoder"]) + block_count(p["decoder"])
  assert blocks == 12  # encoder 2 + 3 middle, decoder 3 middle + 2 x 2 up
  remats = lambda model: remat_count(
      jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(p).jaxpr)
  assert (remats(models["none"]), remats(models["block"])) == (0, blocks)


@pytest.mark.parametrize("name,fields", [
    ("movq", {"spatial_norm_blocks": "all", "f0": "fourier", "fourier_features": 4}),
    ("seqgan", {"enhance": "attention", "window_size": 2, "grid_size": 2, "head_dim": 8}),
    ("seqgan", {"enhance": "conv"}),
], ids=["movq", "seqgan_attention", "seqgan_conv"])
def test_decoder_remat_and_bf16(name, fields):
  """Every residual / attention block of the MoVQ and SeQ-GAN decoders is rematerialised
  (same parameters, same output); bfloat16 gives the output within BF16 tolerance."""
  cfg = registry.DECODERS.config(name, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=(), norm_groups=4, **fields)
  z_q = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
  build = lambda **kw: registry.DECODERS.build(cfg, out_channels=3, **kw)
  plain, remat, half = build(), build(remat="block"), build(dtype=jnp.bfloat16)
  init = lambda m: m.init(jax.random.PRNGKey(0), z_q, z_q)["params"]
  params = jax.jit(lambda: init(plain))()
  assert_same_tree(params, jax.eval_shape(lambda: init(remat)))
  assert_same_tree(params, jax.eval_shape(lambda: init(half)))
  p = nn.unbox(params)
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, z_q, z_q))(p)
  out = run(plain)
  assert_remat_close(run(remat), out)
  jaxpr = jax.make_jaxpr(lambda p: remat.apply({"params": p}, z_q, z_q))(p).jaxpr
  assert remat_count(jaxpr) == block_count(p) >= 7  # 3 middle + 2 x 2 up (+ 2 x 2 enhance)
  out_16 = run(half)
  assert out_16.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(out)))
  np.testing.assert_allclose(np.asarray(out_16, np.float32), out, atol=BF16_RTOL * scale)


# --------------------------------------------------------------------------------------
# Token transformers.


def transformer_setup(objective="maskgit", precision="float32", remat="none"):
  from vqjax.train.transformer_step import build_objective, make_optimizer

  c = config_lib.transformer_smoke_overrides(config_lib.transformer_config(objective))
  c.precision, c.model.remat = precision, remat
  c.model.dropout = 0.0
  c.model.num_classes = 5
  return c, build_objective(c, (4, 4), 16), make_optimizer(c)


def token_batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": jnp.asarray(rng.integers(0, 16, (b, 4, 4)), jnp.int32),
          "label": jnp.asarray(rng.integers(0, 5, (b,)), jnp.int32)}


def test_transformer_bf16_step():
  from vqjax.train.transformer_step import init_state, make_train_step

  _, obj_32, tx = transformer_setup("maskgit")
  _, obj_16, _ = transformer_setup("maskgit", "bfloat16")
  state = init_state(obj_16, tx, jax.random.PRNGKey(0))
  assert_same_tree(state.params, init_state(obj_32, tx, jax.random.PRNGKey(0)).params)
  state = nn.unbox(state)
  batch = token_batch()
  jaxpr, (new_16, metrics_16) = traced_run(make_train_step(obj_16, tx), state, batch)
  ops = compute_ops(jaxpr)
  assert ops.get("bfloat16", 0) >= 8, ops  # q, k, v, out, fc1, fc2 per block, the head
  _, metrics_32 = jax.jit(make_train_step(obj_32, tx))(state, batch)
  assert_losses_close(metrics_32, metrics_16)
  assert float_dtypes(new_16.params) == float_dtypes(new_16.opt_state) == {"float32"}
  logits = obj_16.logits(new_16.params, obj_16.flatten(batch["tokens"]),
                         obj_16.conditions.from_labels(batch["label"]))
  assert logits.dtype == jnp.float32


def test_transformer_remat_same_parameters_loss_and_gradients():
  _, plain, _ = transformer_setup("gpt")
  _, remat, _ = transformer_setup("gpt", remat="block")
  params = plain.init_params(jax.random.PRNGKey(0))
  assert_same_tree(params, remat.init_params(jax.random.PRNGKey(0)))
  params = nn.unbox(params)
  batch = token_batch()
  tokens, cond = batch["tokens"].reshape(4, 16), batch["label"][:, None]
  grad = lambda obj: jax.jit(jax.value_and_grad(
      lambda p: obj.loss(p, tokens, cond, jax.random.PRNGKey(3), True)[0]))(params)
  (loss_a, grads_a), (loss_b, grads_b) = grad(plain), grad(remat)
  assert_remat_close(loss_b, loss_a, "loss")
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    assert_remat_close(b, a, "gradient")
  jaxpr = jax.make_jaxpr(lambda p: remat.logits(p, tokens, cond))(params).jaxpr
  depth = sum(name.startswith("block_") for name in params["trunk"])
  assert depth == 2
  assert remat_count(jaxpr) == depth


@pytest.mark.parametrize("objective", ["maskgit", "gpt"])
def test_bf16_sampling_traces(objective):
  """Sampling (MaskGIT's rounds, the GPT's KV-cache steps) with a bfloat16 model: traced
  to the end (dtypes checked), float32 logits, the GPT's cache in bfloat16."""
  c, obj, _ = transformer_setup(objective, "bfloat16")
  params = jax.eval_shape(lambda: nn.unbox(obj.init_params(jax.random.PRNGKey(0))))
  cond = jnp.array([[1], [2]], jnp.int32)
  tokens = jax.eval_shape(lambda p: obj.sample(p, cond, jax.random.PRNGKey(0), c.sample),
                          params)
  assert tokens.shape == (2, 16) and tokens.dtype == jnp.int32
  logits = jax.eval_shape(lambda p: obj.logits(p, jnp.zeros((2, 16), jnp.int32), cond), params)
  assert logits.dtype == jnp.float32
  if objective == "gpt":
    assert obj.model.init_cache(2)[0][0].dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------
# GAN trainer (BigGAN with FQ layers).

FQ_K = 64  # 2^fq_log2_size: no layer of the smoke G or D is 64 wide


def gan_setup(precision="float32", remat="none", propagate=True, abstract=False):
  """The FQ-BigGAN smoke recipe with one critic step. `propagate=False` (FQ-GAN's released
  code) passes D's features on unquantised: with True, a feature whose two nearest
  dictionary entries are closer than bfloat16's rounding may switch entry and move D's
  logit by O(1), a discrete change that no tolerance on the losses covers."""
  from vqjax.train import gan

  c = load_config("configs/fqgan_cifar10.py:smoke")
  with c.unlocked():
    c.precision, c.model.remat = precision, remat
    c.disc.fq_log2_size = 6
    c.disc.fq_layers = (1, 3)  # two of the four (each compiles its own look-up and update)
    c.disc.fq_propagate = propagate
    c.train.batch_size, c.train.n_critic = 4, 1
  models = gan.build_models(c)
  init = lambda r: nn.unbox(gan.init_boxed_state(models, c, r))
  state = (jax.eval_shape if abstract else lambda f, r: f(r))(init, jax.random.PRNGKey(0))
  return c, models, state


def gan_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  n = c.train.batch_size * c.train.n_critic
  return {"image": jnp.asarray(rng.uniform(-1, 1, (n, 32, 32, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, c.model.num_classes, n), jnp.int32)}


def test_bf16_generator_and_discriminators_trace():
  """BigGAN's G and D (with FQ layers) and the tokenizer's PatchGAN in bfloat16, traced:
  bfloat16 convolutions, float32 images, logits, statistics and FQ look-ups."""
  from vqjax.train import gan
  from vqjax.train.tokenizer import build_models

  c, models, state = gan_setup("bfloat16", abstract=True)
  z, y = jnp.zeros((4, models.dim_z)), jnp.arange(4, dtype=jnp.int32)
  x = jnp.zeros((4, 32, 32, 3))
  generate = lambda s: gan.generate(models, s.g_params, s.g_stats, z, y, train=True)
  discriminate = lambda s: gan.discriminate(models, s.d_params, s.d_stats, x, y, update=True)
  for fn, convs in ((generate, 7), (discriminate, 9)):  # G: 3 blocks x 3 + out; D: 4 x 2 + 2
    jaxpr = jax.make_jaxpr(fn)(state).jaxpr
    assert compute_ops(jaxpr).get("bfloat16", 0) >= convs
    out = jax.eval_shape(fn, state)
    assert float_dtypes(out) == {"float32"}  # images or logits, FQ losses, statistics
  fq_ops = matmuls_with_axis(jax.make_jaxpr(discriminate)(state).jaxpr, FQ_K)
  assert fq_ops and all(input_dtypes(e) == {"float32"} for e in fq_ops)

  config = tokenizer_config("bfloat16")
  disc = build_models(config).disc
  images_16 = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(lambda: disc.init(jax.random.PRNGKey(0), images_16))
  apply = lambda v: disc.apply(v, images_16, train=True)
  assert compute_ops(jax.make_jaxpr(apply)(variables).jaxpr).get("bfloat16", 0) == 4
  logits, _ = jax.eval_shape(apply, variables)
  assert logits.dtype == jnp.float32


@pytest.mark.slow
def test_gan_bf16_step():
  from vqjax.train import gan

  c32, models_32, state = gan_setup(propagate=False)
  c16, models_16, state_16 = gan_setup("bfloat16", propagate=False)
  assert_same_tree(state.g_params, state_16.g_params)
  assert_same_tree(state.d_params, state_16.d_params)
  batch = gan_batch(c32)
  jaxpr, (new_16, metrics_16) = traced_run(gan.make_train_step(models_16, c16), state, batch)
  _, metrics_32 = jax.jit(gan.make_train_step(models_32, c32))(state, batch)
  ops = compute_ops(jaxpr)
  assert ops.get("bfloat16", 0) >= 20, ops
  fq_ops = matmuls_with_axis(jaxpr, FQ_K)  # FQ distances and dictionary sums
  assert fq_ops and all(input_dtypes(e) == {"float32"} for e in fq_ops)
  assert_losses_close(metrics_32, metrics_16)
  assert float(metrics_16["nonfinite"]) == 0.0
  for part in ("g_params", "d_params", "g_stats", "d_stats", "ema_params", "g_opt_state",
               "d_opt_state"):
    assert float_dtypes(getattr(new_16, part)) == {"float32"}, part
  # samples (eval and --mode=sample) come out float32
  z = jnp.zeros((2, models_16.dim_z))
  fake, _ = gan.generate(models_16, new_16.ema_params, new_16.ema_stats, z,
                         jnp.zeros((2,), jnp.int32), train=False)
  assert fake.dtype == jnp.float32 and bool(jnp.isfinite(fake).all())


def test_gan_remat_same_parameters_losses_gradients_and_statistics():
  """G's and D's blocks under nn.remat: the same parameters; a G pass then a D pass in
  training mode give the same loss, gradients and statistics (BatchNorm moments,
  spectral-norm vectors and FQ dictionaries, all advanced inside rematerialised blocks)."""
  from vqjax.train import gan

  _, models, state = gan_setup()
  _, models_r, state_r = gan_setup(remat="block")
  assert_same_tree(state, state_r)
  z = jax.random.normal(jax.random.PRNGKey(1), (4, models.dim_z))
  y = jnp.arange(4, dtype=jnp.int32)

  def loss(m, g_params, d_params):
    fake, g_stats = gan.generate(m, g_params, state.g_stats, z, y, train=True)
    logits, extra, d_stats = gan.discriminate(m, d_params, state.d_stats, fake, y, update=True)
    return jnp.mean(jnp.square(logits)) + sum(extra.values()), (g_stats, d_stats)

  (value, stats), grads = jax.jit(jax.value_and_grad(
      lambda g, d: loss(models, g, d), argnums=(0, 1), has_aux=True))(state.g_params,
                                                                      state.d_params)
  (value_r, stats_r), grads_r = jax.jit(jax.value_and_grad(
      lambda g, d: loss(models_r, g, d), argnums=(0, 1), has_aux=True))(state.g_params,
                                                                        state.d_params)
  assert_remat_close(value_r, value, "loss")
  for a, b in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((grads_r, stats_r)),
                  strict=True):
    assert_remat_close(b, a)
  assert not np.allclose(stats[1]["fq_1"]["dictionary"], state.d_stats["fq_1"]["dictionary"])

  g_jaxpr = jax.make_jaxpr(lambda g, d: loss(models_r, g, d))(state.g_params,
                                                               state.d_params).jaxpr
  blocks = lambda params: sum(name.startswith("block") for name in params)
  assert (blocks(state.g_params), blocks(state.d_params)) == (3, 4)
  assert remat_count(g_jaxpr) == 3 + 4


# --------------------------------------------------------------------------------------
# Inference in bfloat16 and the validators.


def test_bf16_tokenizer_eval_step_gives_float32_images_and_metrics():
  """Traced (eval, and the tokenize and decode paths): x_hat, PSNR, SSIM, LPIPS and the
  code counts float32; the LPIPS network keeps float32 convolutions."""
  from vqjax.nn.vqgan import VQGAN
  from vqjax.train.tokenizer import build_models, init_state, make_eval_step
  from vqjax.weights.lpips_vgg16 import load_lpips_params

  config = tokenizer_config("bfloat16")
  models = build_models(config)
  state = jax.eval_shape(lambda r: init_state(models, config, r), jax.random.PRNGKey(0))
  lpips_params = jax.eval_shape(load_lpips_params)
  batch = {"image": images(2), "mask": jnp.ones((2,), jnp.float32)}
  eval_step = make_eval_step(models, config)
  sums, x_hat = jax.eval_shape(eval_step, state.params, state.vq_stats, batch, lpips_params)
  assert x_hat.dtype == jnp.float32
  assert float_dtypes(sums) == {"float32"}
  variables = {"params": state.params, "vq_stats": state.vq_stats}
  q = jax.eval_shape(lambda v: models.vqgan.apply(v, batch["image"], method=VQGAN.encode),
                     variables)
  decoded = jax.eval_shape(lambda v: models.vqgan.apply(v, q.indices, method=VQGAN.decode_indices),
                           variables)
  assert decoded.dtype == q.quantized.dtype == jnp.float32
  lpips_ops = compute_ops(jax.make_jaxpr(
      lambda p: models.lpips.apply({"params": p}, batch["image"], batch["image"]))(
          lpips_params).jaxpr)
  assert lpips_ops.keys() == {"float32"}


@pytest.mark.parametrize("field,value", [("precision", "float16"), ("model.remat", "layer")])
def test_unknown_precision_or_remat_is_a_config_error(field, value):
  from vqjax.train.gan import validate_gan_config
  from vqjax.train.tokenizer import validate_tokenizer_config
  from vqjax.train.transformer import validate_transformer_config

  allowed = {"precision": r"\('float32', 'bfloat16'\)", "model.remat": r"\('none', 'block'\)"}
  for spec, validate in (("configs/demo.py:smoke", validate_tokenizer_config),
                         ("configs/maskgit_imagenet.py:smoke", validate_transformer_config),
                         ("configs/biggan_cifar10.py:smoke", validate_gan_config)):
    config = load_config(spec)
    with config.unlocked():
      if field == "precision":
        config.precision = value
      else:
        config.model.remat = value
    with pytest.raises(ConfigError, match=f"^{field}='{value}' must be one of {allowed[field]}"):
      validate(config, 1)
