"""Registered transformer objectives: config look-up, losses against NumPy, condition prefixes
of length L with the reserved "no condition" id (dropout, classifier-free guidance)."""

import ast
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import ROOT, load_config
from vqjax import config_lib, registry
from vqjax.errors import ConfigError
from vqjax.objectives.base import Conditions
from vqjax.sampling import autoregressive as ar
from vqjax.sampling.maskgit import training_mask
from vqjax.train.transformer import validate_transformer_config

K, VOCAB, WIDTH = 11, 5, 32  # codebook size, condition vocabulary, model width
PREFIX_OF_3 = Conditions(VOCAB, 3)


def make_objective(name, token_shape=(3, 3), conditions=PREFIX_OF_3, **fields):
  c = config_lib.transformer_smoke_overrides(config_lib.transformer_config(name, **fields))
  c.model.dropout = 0.0
  c.model.cond_dropout = 0.0
  return registry.OBJECTIVES.build(c.model.objective, model_config=c.model,
                                   token_shape=token_shape, codebook_size=K,
                                   conditions=conditions)


def init(objective, seed=0):
  return nn.unbox(objective.init_params(jax.random.PRNGKey(seed)))


def random_tokens(objective, b=4, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, K, (b,) + objective.sequence_shape), jnp.int32)
  cond = jnp.asarray(rng.integers(0, VOCAB, (b, objective.conditions.length)), jnp.int32)
  return tokens, cond


def cond_row(name):
  """Row of the token embedding that condition id v = 0 uses (see the objectives' docstrings)."""
  return {"maskgit": K + 1, "gpt": K}[name]


def test_registry_lists_both_objectives_with_their_capabilities():
  assert {"maskgit", "gpt"} <= set(registry.OBJECTIVES.names())
  assert registry.OBJECTIVES.get("gpt").teacher_forcing
  assert not registry.OBJECTIVES.get("maskgit").teacher_forcing
  assert registry.OBJECTIVES.get("maskgit").multichannel
  assert registry.OBJECTIVES.get("gpt").multichannel


def test_misspelt_objective_is_refused_with_the_nearest_name():
  with pytest.raises(ConfigError, match="model.objective.*Did you mean 'maskgit'"):
    config_lib.transformer_config("maskgti")
  config = load_config("configs/maskgit_imagenet.py:smoke")
  with config.unlocked():
    config.model.objective.name = "maskgti"
  with pytest.raises(ConfigError, match="Did you mean 'maskgit'"):
    validate_transformer_config(config, 1)
  with pytest.raises(ConfigError, match="Did you mean 'label_smoothing'"):
    config_lib.transformer_config("maskgit", label_smothing=0.2)


def test_multichannel_tokens_and_an_objective_that_cannot_model_them():
  """MaskGIT keeps the channels per position, the GPT one sequence of h*w*c indices; an
  objective without the capability is refused, naming those that have it."""
  assert make_objective("maskgit", token_shape=(3, 3, 2)).sequence_shape == (9, 2)
  assert make_objective("gpt", token_shape=(3, 3, 2)).sequence_shape == (18,)
  gpt = registry.OBJECTIVES.get("gpt")
  single = dataclasses.make_dataclass("SingleChannel", [], bases=(gpt,), frozen=True,
                                      kw_only=True, eq=False,
                                      namespace={"multichannel": False})
  with pytest.raises(ConfigError, match=r"\(3, 3, 2\).*multichannel.*\['gpt', 'maskgit'\]"):
    single(model_config=None, token_shape=(3, 3, 2), codebook_size=8,
           conditions=Conditions(0, 1))


def test_visualize_asks_for_the_teacher_forcing_capability(tmp_path):
  from vqjax.train.visualize import visualize

  config = load_config("configs/maskgit_imagenet.py:smoke")
  with pytest.raises(ConfigError, match="teacher forcing.*'maskgit'.*gpt"):
    visualize(config, str(tmp_path))


def _numpy_loss(logits, targets, weights, smoothing):
  """Weighted mean of (1 - s) CE(one_hot) + s CE(uniform), and top-1 accuracy, in float64."""
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  per_entry = (1 - smoothing) * nll - smoothing * logp.mean(-1)
  w = np.asarray(weights, np.float64)
  correct = logits.argmax(-1) == np.asarray(targets)
  return (per_entry * w).sum() / w.sum(), (correct * w).sum() / w.sum(), (nll * w).sum(), w.sum()


def _independent_logits(name, objective, params, tokens, cond, mask_rng):
  """(logits, loss weights) from the Flax model called directly, inputs built here by hand."""
  model = objective.model
  if name == "maskgit":
    mask = training_mask(mask_rng, tokens.shape)
    return model.apply({"params": params}, jnp.where(mask, K, tokens), cond), mask
  # GPT: ids = [K + condition ids, codes 0..N-2]; logits at L-1 .. L+N-2 predict codes 0..N-1.
  ids = jnp.concatenate([K + cond, tokens[:, :-1]], axis=1)
  logits, _ = model.apply({"params": params}, ids, method="decode")
  length = cond.shape[1]
  return logits[:, length - 1:], np.ones(tokens.shape)


@pytest.mark.parametrize("name", registry.OBJECTIVES.names())
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_and_eval_sums_equal_numpy_cross_entropy(name, smoothing):
  assert name in ("maskgit", "gpt"), f"add the hand computation of objective {name!r}"
  objective = make_objective(name, label_smoothing=smoothing)
  params = init(objective)
  tokens, cond = random_tokens(objective)
  rng = jax.random.PRNGKey(3)
  mask_rng = jax.random.split(rng, 3)[0]  # `loss` splits rng into (mask, dropout, cond drop)
  logits, weights = _independent_logits(name, objective, params, tokens, cond, mask_rng)
  want_loss, want_acc, _, _ = _numpy_loss(logits, tokens, weights, smoothing)
  loss, acc = objective.loss(params, tokens, cond, rng, train=False)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(acc), want_acc, rtol=1e-6)
  # Validation: unsmoothed sums over the valid rows, the masks drawn from rng itself.
  valid = np.array([1.0, 1.0, 0.0, 1.0])
  logits, weights = _independent_logits(name, objective, params, tokens, cond, rng)
  _, _, nll_sum, count = _numpy_loss(logits, tokens, np.asarray(weights) * valid[:, None], 0.0)
  sums = objective.eval_sums(params, tokens, cond, jnp.asarray(valid), rng)
  np.testing.assert_allclose(float(sums["nll"]), nll_sum, rtol=1e-5)
  assert float(sums["count"]) == count


def test_condition_dropout_replaces_whole_prefixes_by_the_reserved_id():
  conditions = Conditions(VOCAB, 3)
  cond = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2000, 3)))
  dropped = np.asarray(conditions.drop(jax.random.PRNGKey(0), cond, 0.25))
  null = (dropped == VOCAB).all(1)
  assert np.array_equal(dropped[~null], np.asarray(cond)[~null])  # untouched rows
  assert not ((dropped == VOCAB).any(1) & ~null).any()  # never a partial prefix
  assert abs(null.mean() - 0.25) < 0.03
  np.testing.assert_array_equal(Conditions(VOCAB, 1).from_labels(jnp.array([4, 1])), [[4], [1]])
  unconditional = Conditions(0, 0)
  assert unconditional.from_labels(jnp.array([4, 1])).shape == (2, 0)


@pytest.mark.parametrize("name", ["maskgit", "gpt"])
def test_prefix_of_three_condition_ids_trains_a_step(name):
  objective = make_objective(name)
  params = init(objective)
  n = 9
  assert params["pos_embedding"].shape == (3 + n, WIDTH)  # L = 3 prefix positions
  tokens, cond = random_tokens(objective)
  tx = optax.adam(1e-2)
  (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(
      params, tokens, cond, jax.random.PRNGKey(1), True)
  new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
  assert np.isfinite(float(loss))
  used = np.unique(np.asarray(cond)) + cond_row(name)  # embedding rows of the used ids
  row_grads = np.abs(np.asarray(grads["token_embedding"])).sum(1)
  assert np.all(row_grads[used] > 0)
  assert row_grads[cond_row(name) + VOCAB] == 0  # "no condition" unused (cond_dropout = 0)
  assert not np.allclose(new["token_embedding"], params["token_embedding"])
  other = (cond + 1) % VOCAB
  assert not np.allclose(objective.logits(params, tokens, cond),
                         objective.logits(params, tokens, other))  # every prefix counts


@pytest.mark.parametrize("name", ["maskgit", "gpt"])
def test_training_with_full_condition_dropout_sees_the_reserved_id(name):
  c = config_lib.transformer_smoke_overrides(config_lib.transformer_config(name))
  c.model.dropout = 0.0
  c.model.cond_dropout = 1.0
  objective = registry.OBJECTIVES.build(c.model.objective, model_config=c.model,
                                        token_shape=(3, 3), codebook_size=K,
                                        conditions=Conditions(VOCAB, 3))
  params = init(objective)
  tokens, cond = random_tokens(objective)
  rng = jax.random.PRNGKey(2)
  dropped = objective.loss(params, tokens, cond, rng, train=True)[0]
  null = objective.loss(params, tokens, jnp.full_like(cond, VOCAB), rng, train=False)[0]
  np.testing.assert_allclose(float(dropped), float(null), rtol=1e-6)


@pytest.mark.parametrize("name", ["maskgit", "gpt"])
def test_guidance_uses_the_reserved_id_for_the_unconditional_branch(name):
  objective = make_objective(name)
  params = init(objective)
  tokens, cond = random_tokens(objective)
  conditional = objective.logits(params, tokens, cond)
  np.testing.assert_array_equal(objective.guided_logits(params, tokens, cond, 0.0), conditional)
  scale = 2.0
  guided = objective.guided_logits(params, tokens, cond, scale)
  unconditional = conditional - (guided - conditional) / scale  # l_u from l_c + s (l_c - l_u)
  null = objective.logits(params, tokens, jnp.full_like(cond, VOCAB))
  np.testing.assert_allclose(unconditional, null, rtol=1e-4, atol=1e-4)
  # The reserved id is embedding row (offset + V): changing it moves only the null branch.
  perturbed = {**params, "token_embedding": params["token_embedding"].at[
      cond_row(name) + VOCAB].add(1.0)}
  np.testing.assert_allclose(objective.logits(perturbed, tokens, cond), conditional, atol=1e-6)
  assert not np.allclose(objective.logits(perturbed, tokens, jnp.full_like(cond, VOCAB)), null)


@pytest.mark.parametrize("name", ["maskgit", "gpt"])
def test_guided_sampling_with_a_prefix_of_three(name):
  c = config_lib.transformer_smoke_overrides(config_lib.transformer_config(name)).sample
  c.steps, c.top_k, c.guidance_scale = 3, 5, 1.5
  objective = make_objective(name)
  params = init(objective)
  _, cond = random_tokens(objective, b=2)
  tokens = jax.jit(lambda p, r: objective.sample(p, cond, r, c))(params, jax.random.PRNGKey(4))
  assert tokens.shape == (2, 9) and int(tokens.min()) >= 0 and int(tokens.max()) < K


def test_gpt_guided_kv_cache_sampling_equals_guided_teacher_forcing():
  """The cached sampler's unconditional half sees the reserved id: its samples equal those of a
  loop that recomputes `guided_logits` over the whole sequence at every step."""
  c = config_lib.transformer_smoke_overrides(config_lib.transformer_config("gpt")).sample
  c.top_k, c.guidance_scale, c.temperature = 4, 3.0, 0.7
  objective = make_objective("gpt")
  params = init(objective)
  _, cond = random_tokens(objective, b=3)
  rng = jax.random.PRNGKey(5)
  cached = np.asarray(objective.sample(params, cond, rng, c))
  tokens = jnp.zeros((3, 9), jnp.int32)
  for i in range(9):
    rng, key = jax.random.split(rng)
    logits = objective.guided_logits(params, tokens, cond, c.guidance_scale)[:, i]
    tokens = tokens.at[:, i].set(ar.sample_logits(key, logits, c.temperature, c.top_k, c.top_p))
  np.testing.assert_array_equal(cached, np.asarray(tokens))


@pytest.mark.parametrize("name", ["maskgit", "gpt"])
def test_class_conditions_keep_the_parameter_shapes(name):
  """L = 1 (a class id) and the unconditional model: the embedding tables of before."""
  objective = make_objective(name, conditions=Conditions(VOCAB, 1))
  params = init(objective)
  extra = 1 if name == "maskgit" else 0  # MaskGIT's mask token
  assert params["token_embedding"].shape == (K + extra + VOCAB + 1, WIDTH)
  assert params["pos_embedding"].shape == (1 + 9, WIDTH)
  params = init(make_objective(name, conditions=Conditions(0, 0)))
  assert params["token_embedding"].shape == (K + 1, WIDTH)  # mask id / GPT's start id
  assert params["pos_embedding"].shape == ((0 if name == "maskgit" else 1) + 9, WIDTH)


def _imports(path):
  tree = ast.parse(open(os.path.join(ROOT, path)).read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
  return found


def test_trainer_never_imports_the_sample_or_visualize_drivers():
  for path in ("vqjax/train/transformer.py", "vqjax/train/generate.py"):
    assert not _imports(path) & {"vqjax.train.sample", "vqjax.train.visualize"}, path


def test_to_uint8_rounds_and_clips():
  from vqjax.core.writers import image_grid
  from vqjax.ops.images import to_uint8

  x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 191, 255, 255])  # 0.5 -> 191.25
  images = np.linspace(-1, 1, 2 * 2 * 2 * 3).reshape(2, 2, 2, 3)
  np.testing.assert_array_equal(image_grid([images], max_rows=2), to_uint8(
      np.concatenate(list(images), axis=0)))
