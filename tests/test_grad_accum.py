"""Gradient accumulation (`config.train.grad_accum`, vqjax/train/accumulate.py): one step with
grad_accum = k on a batch equals one step with grad_accum = 1 on the same batch (the k-times
micro-batch) for the tokenizer, transformer and GAN trainers, with both micro-batch loops
(the Python-unrolled one that CPU runs and the lax.scan that accelerators run); codebook and
FQ statistics summed over micro-batches; and the configs that cannot be split."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import load_config
from vqjax import registry
from vqjax.errors import ConfigError
from vqjax.train import accumulate


def with_fields(config, **fields):
  """A copy of `config` with dotted fields ('train.grad_accum') set."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in fields.items():
      section, field = key.split(".")
      c[section][field] = value
  return c


def assert_trees_close(expected, actual, rtol, atol, scaled=0.0, skip=None, what=""):
  """Same structure; floating leaves within |actual - expected| <= atol + rtol |expected| +
  scaled max |expected leaf| (float sums in another order err relative to the size of what
  they add up, not of each result), the others equal; leaves whose path matches the regular
  expression `skip` are left out."""
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(jax.device_get(expected))
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(jax.device_get(actual))
  assert tree_e == tree_a, what
  for (path, e), (_, a) in zip(flat_e, flat_a, strict=True):
    name = what + jax.tree_util.keystr(path)
    if skip is not None and re.search(skip, name):
      continue
    e, a = np.asarray(e), np.asarray(a)
    if e.dtype.kind == "f":
      bound = atol + scaled * (float(np.max(np.abs(e))) if e.size else 0.0)
      np.testing.assert_allclose(a, e, rtol=rtol, atol=bound, err_msg=name)
    else:
      np.testing.assert_array_equal(a, e, err_msg=name)


def test_split_and_both_loops_add_up_micro_batches_in_order():
  x = jnp.arange(24.0).reshape(12, 2)
  xs = accumulate.split(x, 3)
  assert xs.shape == (3, 4, 2)
  for j in range(3):  # micro-batch j holds rows j, j + 3, ...: every device's share
    np.testing.assert_array_equal(xs[j], x[j::3])

  def fn(j, xj, carry):
    return {"sum": jnp.sum(xj, 0), "j": jnp.asarray(j, jnp.float32)}, carry + jnp.sum(xj)

  for loop in ("unroll", "scan"):
    total, carry = accumulate.accumulate(fn, xs, jnp.zeros(()), loop)
    np.testing.assert_allclose(total["sum"], jnp.sum(x, 0))
    assert float(total["j"]) == 3.0 and float(carry) == float(jnp.sum(x))
  with pytest.raises(ValueError, match="does not split into 5"):
    accumulate.split(x, 5)


@pytest.mark.parametrize("name", ["vq_ema_restart", "multichannel_ema", "fq"])
def test_quantizer_statistics_summed_over_micro_batches_give_the_big_batch_update(name):
  """Each micro-batch starts from the state before the step and adds its statistics to
  `stat_sums`: the last one's state is the big batch's one EMA update (codebook, counts,
  sums, dead-code counters)."""
  from vqjax.nn.quantizers import STAT_SUMS

  q = {"vq_ema_restart": registry.QUANTIZERS.build(registry.QUANTIZERS.config(
           "vq", codebook_size=16, embed_dim=8, learning="ema", restart_after=4)),
       "multichannel_ema": registry.QUANTIZERS.build(registry.QUANTIZERS.config(
           "multichannel", codebook_size=16, embed_dim=8, channels=2, learning="ema")),
       "fq": registry.QUANTIZERS.build(registry.QUANTIZERS.config(
           "fq", codebook_size=16, embed_dim=8, decay=0.8))}[name]
  z = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 8))
  variables = q.init(jax.random.PRNGKey(0), z)
  rngs = {"quantizer": jax.random.PRNGKey(2)}
  big, mutated = q.apply(variables, z, train=True, mutable=["vq_stats"], rngs=rngs)
  sums, indices = {}, []
  for zj in accumulate.split(z, 3):
    out, micro = q.apply({**variables, **({STAT_SUMS: sums} if sums else {})}, zj, train=True,
                         mutable=["vq_stats", STAT_SUMS], rngs=rngs)
    sums = micro[STAT_SUMS]
    indices.append(out.indices)
  # the micro-batches looked codes up in the step's codebook, as the big batch did
  np.testing.assert_array_equal(jnp.stack(indices), accumulate.split(big.indices, 3))
  np.testing.assert_allclose(sums["counts"], jnp.sum(jax.nn.one_hot(
      big.indices.reshape(-1), 16), 0))
  assert_trees_close(mutated["vq_stats"], micro["vq_stats"], rtol=1e-5, atol=1e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b),
                                       variables["vq_stats"], mutated["vq_stats"]))
  assert any(moved)  # the update did something


# --- the tokenizer ---------------------------------------------------------------------


def tokenizer_config():
  """The smoke tokenizer (EMA codebook) with every part of the GAN step that is the same on
  micro-batches: the adversarial term from step 0 (adaptive weight), BigGAN's D without
  BatchNorm, with FQ dictionaries after two blocks and spectral norm, R1 and LeCam. L1 only:
  LPIPS would only add compile time."""
  c = load_config("configs/demo.py:smoke")
  with c.unlocked():
    c.disc = registry.DISCRIMINATORS.config("biggan32", ch=4, fq_layers=(0, 1), fq_log2_size=4)
    c.loss.disc_start = 0
    c.loss.lecam_weight = 0.1
    c.loss.r1_weight = 0.5
    c.loss.terms.lpips.weight = 0.0
  assert c.model.quantizer.learning == "ema" and c.train.batch_size == 8
  return c


@pytest.fixture(scope="module")
def tokenizer_run():
  """(setup, batch, the grad_accum = 1 step's (state, metrics))."""
  from vqjax.train import run, tokenizer

  s = run.setup(tokenizer_config())
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 3)), jnp.float32),
           "label": jnp.zeros(8, jnp.int32)}
  step = jax.jit(tokenizer.make_train_step(s.models, s.config, gan=True))
  return s, batch, jax.device_get(step(s.state, batch, s.term_params))


# Tolerances. Gradients are compared through Adam's moments (mu = (1 - b1) g, nu = (1 - b2)
# g^2 after one step). Adam's first step moves every element by about lr g / (|g| + eps), so
# where g is near float noise the update is not a continuous function of g: parameters are
# compared to 10% of the learning rate. The attention key biases get no gradient at all
# (softmax is invariant to them): their first step is lr * sign(noise), and they are compared
# through the optimiser state only.
GRADIENTS = {"rtol": 1e-4, "atol": 1e-8, "scaled": 1e-4}
_NO_GRADIENT = r"attn.*\['(k|key)'\]\['bias'\]"
# Usage and perplexity are not means over the batch: the step logs their micro-batch means.
_NOT_MEANS = r"vq/(usage_in_batch|perplexity)"


def assert_tokenizer_states_close(expected, state, config):
  for part in ("opt_state", "disc_opt_state"):
    assert_trees_close(getattr(expected, part), getattr(state, part), **GRADIENTS, what=part)
  for part in ("vq_stats", "disc_stats", "loss_stats"):
    assert_trees_close(getattr(expected, part), getattr(state, part), rtol=1e-5, atol=1e-6,
                       scaled=1e-5, what=part)
  assert_trees_close(expected.params, state.params, rtol=1e-5, atol=0.1 * config.optim.lr,
                     skip=_NO_GRADIENT)
  assert_trees_close(expected.disc_params, state.disc_params, rtol=1e-5,
                     atol=0.1 * config.optim.disc_lr)
  assert int(state.step) == int(expected.step) == 1


@pytest.mark.parametrize("loop", ["unroll", pytest.param("scan", marks=pytest.mark.slow)])
def test_tokenizer_step_equals_the_big_batch_step(tokenizer_run, loop):
  from vqjax.train import tokenizer

  s, batch, (expected, expected_metrics) = tokenizer_run
  config = with_fields(s.config, **{"train.grad_accum": 2})
  step = jax.jit(tokenizer.make_train_step(s.models, config, gan=True, loop=loop))
  state, metrics = jax.device_get(step(s.state, batch, s.term_params))
  assert float(expected_metrics["adaptive_weight"]) > 0 and float(expected_metrics["loss/d"])
  assert_trees_close(expected_metrics, metrics, rtol=2e-5, atol=1e-6, skip=_NOT_MEANS)
  assert_tokenizer_states_close(expected, state, s.config)
  # the EMA codebook and the FQ dictionaries moved: the comparison covers their update
  fresh = jax.device_get(s.state)
  for stats, name in ((state.vq_stats["quantizer"], "codebook"),
                      (state.disc_stats["fq_1"], "dictionary")):
    assert not np.allclose(stats[name], (fresh.vq_stats["quantizer"] if name == "codebook"
                                         else fresh.disc_stats["fq_1"])[name])


@pytest.mark.slow
def test_tokenizer_step_before_disc_start_accumulates(tokenizer_run):
  """The plain step (no discriminator): the same equality, the discriminator unchanged."""
  from vqjax.train import tokenizer

  s, batch, _ = tokenizer_run
  expected, expected_metrics = jax.device_get(jax.jit(tokenizer.make_train_step(
      s.models, s.config, gan=False))(s.state, batch, s.term_params))
  config = with_fields(s.config, **{"train.grad_accum": 4})
  state, metrics = jax.device_get(jax.jit(tokenizer.make_train_step(
      s.models, config, gan=False))(s.state, batch, s.term_params))
  assert sorted(metrics) == sorted(expected_metrics)
  assert_trees_close(expected_metrics, metrics, rtol=2e-5, atol=1e-6, skip=_NOT_MEANS)
  assert_tokenizer_states_close(expected, state, s.config)
  assert_trees_close(jax.device_get(s.state.disc_params), state.disc_params, 0, 0)


# --- the transformer -------------------------------------------------------------------


@pytest.mark.parametrize("spec,k,loop", [
    ("configs/maskgit_imagenet.py:smoke", 2, "unroll"),
    ("configs/maskgit_imagenet.py:smoke", 4, "scan"),
    ("configs/ar_imagenet.py:smoke", 2, "unroll"),
])
def test_transformer_step_equals_the_big_batch_step(spec, k, loop, tmp_path):
  """MaskGIT's loss is a mean over the masked tokens of the whole batch: the masks and the
  condition dropout are drawn for the batch and split, the sums divided by the batch's
  count. No dropout inside the model (its draws are per micro-batch)."""
  from tests.test_transformer_training import write_store
  from vqjax.train import transformer
  from vqjax.train.transformer_step import make_train_step

  config = load_config(spec)
  with config.unlocked():
    config.tokens.dir = write_store(tmp_path / "tokens", (4, 4))
    config.model.dropout = 0.0
    config.model.cond_dropout = 0.5
    config.train.batch_size = 8
  s = transformer.setup(config)
  batch = jax.tree.map(jnp.asarray, next(iter(transformer.token_dataset(config, s.store))))
  # The recipe's optimiser, at a constant rate: its warmup makes the first step's rate 0.
  tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                   optax.adamw(1e-3, b1=config.optim.b1, b2=config.optim.b2,
                               weight_decay=config.optim.weight_decay))
  state = s.state.replace(opt_state=tx.init(s.state.params))
  expected = jax.device_get(jax.jit(make_train_step(s.objective, tx))(state, batch))
  actual = jax.device_get(jax.jit(make_train_step(s.objective, tx, k, loop))(state, batch))
  assert_trees_close(expected[1], actual[1], rtol=1e-5, atol=1e-7)
  assert_trees_close(nn.unbox(expected[0].opt_state), nn.unbox(actual[0].opt_state),
                     **GRADIENTS)
  assert_trees_close(nn.unbox(expected[0].params), nn.unbox(actual[0].params), rtol=1e-5,
                     atol=0.1 * 1e-3, skip=_NO_GRADIENT)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), nn.unbox(expected[0].params),
                       nn.unbox(jax.device_get(state.params)))
  assert all(jax.tree.leaves(moved))


_SHARDED = r"""
import re, sys, numpy as np, jax, jax.numpy as jnp, flax.linen as nn
sys.path.insert(0, {root!r})
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tests.conftest import load_config
from vqjax.core import partitioning
from vqjax.train import accumulate, transformer
config = load_config("configs/maskgit_imagenet.py:smoke")
with config.unlocked():
  config.tokens.dir = {tokens!r}
  config.train.batch_size = 8
  config.model.dropout = 0.0
def one_step(devices, model_axis, k):
  with config.unlocked():
    config.mesh.model, config.train.grad_accum = model_axis, k
  s = transformer.setup(config, devices)
  batch = partitioning.shard_batch(next(iter(transformer.token_dataset(config, s.store))), s.mesh)
  state, metrics = s.train_step(s.state, batch)
  return jax.device_get(nn.unbox(state.opt_state)), float(metrics["loss/total"])
o1, l1 = one_step(jax.devices()[:1], 1, 1)
o8, l8 = one_step(jax.devices(), 2, 2)  # mesh (data 4, model 2): micro-batches of 4 rows
err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o8)))
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
x = jax.device_put(jnp.ones((16, 3)), NamedSharding(mesh, P("data")))
split = jax.jit(lambda x: accumulate.split(x, 2))
hlo = split.lower(x).compile().as_text()
moved = len(re.findall("all-to-all|collective-permute|all-gather|all-reduce", hlo))
print(abs(l1 - l8), err, moved, tuple(split(x).sharding.spec))
"""


@pytest.mark.slow
def test_sharded_accumulated_step_equals_the_1_device_big_batch_step(tmp_path):
  """On 8 devices (data 4 x model 2) the micro-batches stay split over `data` (the split
  moves no data) and the accumulated step equals the 1-device step on the whole batch."""
  import subprocess
  import sys

  from tests.conftest import ROOT
  from tests.test_transformer_training import write_store

  code = _SHARDED.format(root=ROOT, tokens=write_store(tmp_path / "tokens", (4, 4)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  loss_diff, err, moved, spec = out.stdout.split("\n")[-2].split(" ", 3)
  assert float(loss_diff) < 1e-5 and float(err) < 1e-6
  assert int(moved) == 0 and spec == "(None, 'data')"


def test_maskgit_loss_sums_over_micro_batches_give_its_loss():
  """`Objective.training_draws` + `loss_sums` over any split = `Objective.loss` (the same
  rng gives the same masks and condition dropout)."""
  from vqjax.objectives.base import Conditions

  config = load_config("configs/maskgit_imagenet.py:smoke")
  with config.unlocked():
    config.model.dropout = 0.0
    config.model.cond_dropout = 0.5
  objective = registry.OBJECTIVES.build(config.model.objective, model_config=config.model,
                                        token_shape=(4, 4), codebook_size=16,
                                        conditions=Conditions(vocab=8, length=1))
  params = objective.init_params(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (6, 16), 0, 16)
  cond = jnp.arange(6)[:, None] % 8
  rng = jax.random.PRNGKey(3)
  loss, acc = objective.loss(params, tokens, cond, rng)
  dropped, weights, dropout_rng = objective.training_draws(tokens, cond, rng)
  assert 0 < int(jnp.sum(weights)) < weights.size and int(jnp.sum(dropped == 8)) > 0
  parts = [objective.loss_sums(params, *inputs, dropout_rng)
           for inputs in zip(*accumulate.split((tokens, dropped, weights), 3), strict=True)]
  count = float(jnp.sum(weights))
  np.testing.assert_allclose(sum(p[0] for p in parts) / count, loss, rtol=1e-5)
  np.testing.assert_allclose(sum(p[1] for p in parts) / count, acc, rtol=1e-5)


# --- the GAN ---------------------------------------------------------------------------


@pytest.fixture
def batch_independent_bn(monkeypatch):
  """BigGAN's G normalises each micro-batch with its own BatchNorm moments, so its fakes on
  micro-batches are not the big batch's. Fixed moments (and a fixed count in the running
  variance's n / (n - 1)) make G independent of the batch, so the whole GAN step (noise
  split, n_critic D updates with FQ dictionaries and spectral norm, G update, EMA) can be
  compared with the big batch's exactly."""
  from vqjax.nn import biggan

  running = biggan.running_moments
  monkeypatch.setattr(biggan, "batch_moments",
                      lambda x: (jnp.zeros(x.shape[-1]), jnp.ones(x.shape[-1])))
  monkeypatch.setattr(biggan, "running_moments",
                      lambda mean, var, bm, bv, count, momentum: running(mean, var, bm, bv, 2,
                                                                          momentum))


@pytest.mark.parametrize("k,loop", [(2, "unroll"), (4, "scan")])
def test_gan_step_equals_the_big_batch_step(batch_independent_bn, k, loop):
  from vqjax.train import gan

  config = load_config("configs/fqgan_cifar10.py:smoke")  # FQ after every D block
  models = gan.build_models(config)
  state = jax.jit(lambda r: nn.unbox(gan.init_boxed_state(models, config, r)))(
      jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  n = config.train.batch_size * config.train.n_critic
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (n, 32, 32, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, config.model.num_classes, n), jnp.int32)}
  expected = jax.device_get(jax.jit(gan.make_train_step(models, config))(state, batch))
  step = gan.make_train_step(models, with_fields(config, **{"train.grad_accum": k}), loop=loop)
  actual = jax.device_get(jax.jit(step)(state, batch))
  assert_trees_close(expected[1], actual[1], rtol=1e-5, atol=1e-6)
  e, a = expected[0], actual[0]
  for part in ("g_opt_state", "d_opt_state"):
    assert_trees_close(getattr(e, part), getattr(a, part), **GRADIENTS, what=part)
  for part in ("g_stats", "d_stats", "ema_stats"):  # BN moments, SN vectors, FQ dictionaries
    assert_trees_close(getattr(e, part), getattr(a, part), rtol=1e-5, atol=1e-6, scaled=1e-5,
                       what=part)
  for part, lr in (("g_params", config.optim.g_lr), ("d_params", config.optim.d_lr),
                   ("ema_params", config.optim.g_lr)):
    assert_trees_close(getattr(e, part), getattr(a, part), rtol=1e-5, atol=0.1 * lr, what=part)
  assert int(a.step) == 1
  before = jax.device_get(state)
  for part in ("g_params", "d_params"):
    assert not np.allclose(jax.tree.leaves(getattr(before, part))[0],
                           jax.tree.leaves(getattr(actual[0], part))[0])
  assert not np.allclose(before.d_stats["fq_2"]["dictionary"],
                         actual[0].d_stats["fq_2"]["dictionary"])


# --- bad configs -----------------------------------------------------------------------


def _validators():
  from vqjax.train.gan import validate_gan_config
  from vqjax.train.tokenizer import validate_tokenizer_config
  from vqjax.train.transformer import validate_transformer_config

  transformer = load_config("configs/maskgit_imagenet.py:smoke")
  with transformer.unlocked():
    transformer.tokens.dir = os.devnull
  return [(load_config("configs/demo.py:smoke"), validate_tokenizer_config),
          (transformer, validate_transformer_config),
          (load_config("configs/biggan_cifar10.py:smoke"), validate_gan_config)]


@pytest.mark.parametrize("fields,devices,processes,message", [
    ({"train.grad_accum": 0}, 1, 1, r"train.grad_accum=0 must be an integer >= 1"),
    ({"train.grad_accum": 3, "train.batch_size": 16}, 2, 2,
     r"^train.grad_accum=3 does not divide the per-process batch of 8 \(train.batch_size=16 "
     r"over 2 process\(es\)\): use one of \[1, 2, 4, 8\]\.$"),
    ({"train.grad_accum": 4, "train.batch_size": 8}, 4, 1,
     r"^train.grad_accum=4 makes micro-batches of 2 per process \(train.batch_size=8 over 1 "
     r"process\(es\)\), which the mesh's data axis of size 4 cannot split evenly: use one of "
     r"\[1, 2\]\.$"),
])
def test_grad_accum_that_cannot_split_the_batch_is_a_config_error(fields, devices, processes,
                                                                 message):
  for config, validate in _validators():
    config = with_fields(config, **{"eval.batch_size": 16, **fields})
    for section in ("sample", "tokenize"):
      if section in config:
        config = with_fields(config, **{f"{section}.batch_size": 16})
    with pytest.raises(ConfigError, match=message):
      validate(config, devices, processes)
    validate(with_fields(config, **{"train.grad_accum": 2}), devices, processes)  # this fits
