"""Token transformer training: one generic step around a registered objective.

The objective (`config.model.objective`, `vqjax.objectives`) builds the
model and says how a batch becomes a loss, validation sums and samples:
MaskGIT's masked tokens (Chang et al. 2022) or the GPT's next token (Esser
et al. 2021). Conditions are a prefix of condition ids (a class label, or a
semantic map's ids on a grid with model.condition = 'semantic_map';
`vqjax.objectives.base.Conditions`).

Tokens come from a `vqjax.data.tokens` store through Grain; parameters are
sharded by their logical axes (`config.mesh.param_sharding`, `.rules`); the step is jitted with
donated state and skips (and counts) updates whose loss or gradients are
not finite. Checkpoints hold the state and the data iterator, so a resumed
run continues exactly.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

from vqjax import registry
from vqjax.checks import check_table
from vqjax.console import console
from vqjax.core import partitioning
from vqjax.core.partitioning import check_batch_split, check_grad_accum, validate_mesh
from vqjax.core.writers import make_writer, write_images
from vqjax.data.pipeline import pad_batch
from vqjax.data.rows import process_rows
from vqjax.data.tokens import TokenStore, TokenStoreError
from vqjax.errors import ConfigError
from vqjax.eval.settings import validate_fid_settings
from vqjax.nn.layers import PRECISIONS, REMAT_CHOICES
from vqjax.objectives.base import Objective
from vqjax.ops.images import square_grid, to_uint8
from vqjax.train import generate
from vqjax.train.loop import StopRequest, TrainRun, every, validate_guards
from vqjax.train.transformer_step import (  # noqa: F401  (re-exported)
  TransformerState,
  build_objective,
  conditions_of,
  make_optimizer,
  make_train_step,
  sharded_init,
)


def make_eval_step(objective: Objective):
  """Sums of token NLL (no smoothing), correct top-1 and counted tokens over a padded batch."""
  def eval_step(params, batch, rng):
    return objective.eval_sums(params, objective.flatten(batch["tokens"]),
                               objective.conditions.from_batch(batch), batch["mask"],
                               rng)

  return eval_step


def token_dataset(config, store: TokenStore, process_index: int = 0, process_count: int = 1):
  """Infinite, shuffled training batches: this process's rows of every global batch
  (vqjax.data.rows), so P processes together read the 1-process batches."""
  batch = config.train.batch_size
  ds = grain.MapDataset.source(store).shuffle(seed=config.seed).repeat(None)
  ds = process_rows(ds, batch, process_index, process_count)
  return ds.to_iter_dataset().batch(batch // process_count, drop_remainder=True)


def val_batches(config, store: TokenStore, process_index: int = 0, process_count: int = 1):
  """One ordered pass over (the first eval.max_examples of) a store, in padded batches."""
  per_process = config.eval.batch_size // process_count
  ds = grain.MapDataset.source(store)[process_index::process_count]
  if config.eval.max_examples:
    ds = ds[: config.eval.max_examples // process_count]
  for batch in ds.to_iter_dataset().batch(per_process, drop_remainder=False):
    yield pad_batch(batch, per_process)


@dataclass
class Setup:
  """A transformer run's model, mesh, initial state and jitted steps, built from the config."""
  config: Any
  objective: Objective
  mesh: Any
  state: TransformerState
  shardings: Any
  train_step: Callable
  eval_step: Callable
  store: TokenStore
  val_store: TokenStore | None

  @property
  def model(self) -> nn.Module:
    return self.objective.model

  def validate(self, params) -> dict[str, float]:
    """Loss and top-1 accuracy on `tokens.val_dir` ({} when it is not set)."""
    if self.val_store is None:
      return {}
    totals = None
    for i, batch in enumerate(val_batches(self.config, self.val_store, jax.process_index(),
                                          jax.process_count())):
      sums = self.eval_step(params, partitioning.shard_batch(batch, self.mesh),
                            jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), i))
      sums = jax.device_get(sums)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    count = max(float(totals["count"]), 1.0)
    return {"val/loss": float(totals["nll"]) / count,
            "val/accuracy": float(totals["correct"]) / count}


def setup(config, devices=None) -> Setup:
  """Model, mesh, initial state (sharded by logical axes) and jitted train/eval steps."""
  devices = list(devices if devices is not None else jax.devices())
  validate_transformer_config(config, len(devices), jax.process_count())
  store = TokenStore(config.tokens.dir)
  check_store_conditions(config, store)
  val_store = TokenStore(config.tokens.val_dir) if config.tokens.val_dir else None
  if val_store is not None and (val_store.token_shape, val_store.codebook_size) != (
      store.token_shape, store.codebook_size):
    raise TokenStoreError(
        f"tokens.val_dir holds {val_store.token_shape} tokens over {val_store.codebook_size} "
        f"codes, tokens.dir {store.token_shape} over {store.codebook_size}: extract both with "
        "the same tokenizer")
  objective = build_objective(config, store.token_shape, store.codebook_size,
                              store.condition_shape)
  tx = make_optimizer(config)
  mesh = partitioning.make_mesh(config, devices)

  state, shardings = sharded_init(objective, tx, config, mesh,
                                 jax.random.PRNGKey(config.seed))
  rep = partitioning.replicated(mesh)
  batch_sh = partitioning.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(objective, tx, config.train.get("grad_accum", 1)),
                       in_shardings=(shardings, batch_sh),
                       out_shardings=(shardings, rep), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(objective),
                      in_shardings=(shardings.params, batch_sh, rep), out_shardings=rep)
  return Setup(config, objective, mesh, state, shardings, train_step, eval_step, store,
               val_store)


def check_store_conditions(config, store: TokenStore) -> None:
  """ConfigError unless the store holds what model.condition and model.num_classes need."""
  n, kind = config.model.num_classes, config.model.condition
  if kind == "semantic_map":
    if store.condition_shape is None:
      raise ConfigError(
          f"model.condition='semantic_map', but the token store {config.tokens.dir} has no "
          "condition maps: extract it with a tokenizer recipe whose data has label maps "
          "(data.label_maps, data.semantic_classes), or use model.condition='class'")
    if not n:
      raise ConfigError("model.condition='semantic_map' needs model.num_classes = the number "
                        "of semantic ids (data.semantic_classes of the tokenizer)")
    if store.max_condition() >= n:
      raise ConfigError(f"the token store's condition maps have ids up to "
                        f"{store.max_condition()}, but model.num_classes={n}: set it to the "
                        "tokenizer's data.semantic_classes")
  elif n and store.max_label() >= n:
    raise ConfigError(f"the token store has labels up to {store.max_label()}, but "
                      f"model.num_classes={n}: raise it, or set 0 for an unconditional model")


@dataclass
class Restored:
  """A trained transformer (latest checkpoint) with the tokenizer that decodes its tokens."""
  setup: Setup
  state: TransformerState  # boxed params, placed by the setup's shardings
  step: int
  tok: Any  # the tokenizer's run.Setup
  tok_config: Any
  variables: dict  # the tokenizer's restored variables

  @property
  def params(self):
    return nn.unbox(self.state.params)


def check_trained_objective(config, workdir: str) -> None:
  """ConfigError when the run in `workdir` (its config.json) trained its objective with
  other fields than `config.model.objective` (e.g. a GPT on multichannel tokens in another
  order): its checkpoints would be read as a different model."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    trained = json.load(f).get("model", {}).get("objective", {})
  asked = json.loads(json.dumps(config.model.objective.to_dict()))  # tuples as lists
  differ = sorted(k for k in set(trained) | set(asked) if trained.get(k) != asked.get(k))
  if differ:
    shown = ", ".join(f"{k}={asked.get(k)!r} (trained: {trained.get(k)!r})" for k in differ)
    raise ConfigError(f"model.objective: {shown}; the transformer in {workdir} was trained "
                      f"with {trained}: use those fields (e.g. --config.model.objective."
                      f"{differ[0]}={trained.get(differ[0])}) or another --workdir.")


def restore_models(config, workdir: str) -> Restored:
  """The latest transformer in `workdir` and the tokenizer named in `config.tokenizer`."""
  check_trained_objective(config, workdir)
  tok, tok_config, variables = generate.restore_tokenizer(config)
  s = setup(config)
  state, step = generate.restore_latest(workdir, s.state, "transformer")
  return Restored(s, state, step, tok, tok_config, variables)


def _sample_grid(s: Setup) -> Callable | None:
  """params -> uint8 grid of eval.grid_images samples, when a tokenizer to decode them is set."""
  config = s.config
  if not config.eval.grid_images:
    return None
  if not (config.tokenizer.config and config.tokenizer.workdir):
    console("sample grids off: config.tokenizer.config/workdir are not set")
    return None
  tok, tok_config, variables = generate.restore_tokenizer(config)
  sampler = generate.ImageSampler(s.objective, config.sample, tok, variables)
  n = config.eval.grid_images

  def draw(params):
    conditions = generate.sample_conditions(s.objective, s.store, tok_config, n)
    (images, _, _, _), = sampler.batches(nn.unbox(params), n, n, config.seed, conditions)
    return square_grid(to_uint8(images))

  return draw


def train(config, workdir: str, stop: StopRequest | None = None,
          after_step=None) -> TransformerState:
  """Train (resuming from the latest checkpoint in `workdir`); returns the final state.

  Every `eval.every_steps` and at the last step: validation loss/accuracy (with
  `tokens.val_dir`) and a sample grid (with `config.tokenizer`).
  """
  check_trained_objective(config, workdir)
  s = setup(config)
  grid = _sample_grid(s)  # restores the tokenizer: a missing one stops here, before the run
  r = TrainRun(config, workdir)
  data_iter = iter(token_dataset(config, s.store, jax.process_index(), jax.process_count()))
  state = r.resume(s.state, data_iter)
  n_params = sum(x.size for x in jax.tree.leaves(nn.unbox(state.params)))
  console(f"{type(s.model).__name__} {n_params:,} parameters over {len(s.store):,} token maps of "
        f"shape {s.store.token_shape}; mesh {dict(s.mesh.shape)}")
  total = config.train.steps

  def evaluation(step, state, batch, device_batch):
    metrics = s.validate(state.params)
    if metrics:
      r.writer.write_scalars(step, metrics)
      console(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if grid is not None:
      write_images(r.writer, workdir, step, "samples", grid(state.params))

  return r.run(state, data_iter, s.train_step, s.mesh,
               hooks=[every(config.eval.every_steps, total, evaluation)], stop=stop,
               after_step=after_step)


def evaluate(config, workdir: str) -> dict:
  """--mode=eval: FID/KID of eval.num_samples samples (and their Inception Score with
  eval.inception_logits_path), and validation loss with tokens.val_dir.

  The samples are those --mode=sample draws (same seed and batches), quantised to uint8 as
  their files are. The reference is the val split of the tokenizer's data set (its Inception
  statistics are cached, and shared with the tokenizer's rFID when the settings agree).
  """
  from vqjax.eval.evaluator import is_notes, reference_stats, sample_metrics, write_eval
  from vqjax.eval.inception_features import InceptionExtractor, to_model_range

  m = restore_models(config, workdir)
  ref_config = m.tok_config.copy_and_resolve_references()
  with ref_config.unlocked():
    ref_config.eval.max_examples = config.eval.reference_examples
    ref_config.eval.max_features = config.eval.max_features
    ref_config.eval.stats_cache_dir = config.eval.stats_cache_dir
  inception = InceptionExtractor(m.setup.mesh)
  reference = reference_stats(ref_config, inception, ref_config.data.val_split)
  sampler = generate.ImageSampler(m.setup.objective, config.sample, m.tok, m.variables)
  n, bs = config.eval.num_samples, config.sample.batch_size
  conditions = generate.sample_conditions(m.setup.objective, m.setup.store, m.tok_config, bs)
  # The images --mode=sample writes (same seed and batches), scored as the uint8 files are.
  # Under semantic maps these are FID[G] of Reg-VQ's Table 1: samples for the validation
  # maps against the validation images.
  batches = ({"image": to_model_range(to_uint8(images)),
              "mask": (np.arange(bs) < valid).astype(np.float32)}
             for images, _, _, valid in sampler.batches(m.params, n, bs, config.seed,
                                                        conditions))
  start = time.time()
  metrics = sample_metrics(batches, reference, config, inception, total=n)
  metrics.update(m.setup.validate(m.state.params))
  metrics["seconds"] = round(time.time() - start, 2)
  writer = make_writer(workdir, jax.process_index() == 0)
  write_eval(writer, workdir, m.step, metrics, None, notes=is_notes(config))
  writer.flush()
  return metrics


# Ranges and choices of the transformer's fields (vqjax.checks); the FID fields are checked
# in vqjax/eval/settings.py.
TRANSFORMER_RULES = {
    "": {"precision": tuple(PRECISIONS)},
    "train": {"steps": ">=1", "epochs": ">=0", "batch_size": ">=1", "log_every": ">=1",
              "checkpoint_every": ">=1", "keep_checkpoints": ">=1",
              "max_consecutive_nonfinite": ">=1"},
    "eval": {"every_steps": ">=0",  # 0 = only at the last step
             "batch_size": ">=1", "max_examples": ">=0", "grid_images": ">=0",
             "num_samples": ">=2", "reference_examples": ">=0"},
    "sample": {"num_images": ">=1", "batch_size": ">=1", "steps": ">=1",
               "choice_temperature": ">=0", "temperature": ">0", "top_k": ">=0",
               "top_p": "(0,1]", "guidance_scale": ">=0"},
    "model": {"width": ">=1", "depth": ">=1", "heads": ">=1", "mlp_dim": ">=1",
              "dropout": "[0,1)", "num_classes": ">=0", "cond_dropout": "[0,1]",
              "condition": ("class", "semantic_map"), "remat": REMAT_CHOICES},
    "model.objective": {"label_smoothing": "[0,1)"},
    "optim": {"lr": ">0", "warmup_steps": ">=0", "weight_decay": ">=0", "b1": "[0,1)",
              "b2": "[0,1)", "grad_clip": ">0"},
}


def validate_transformer_config(c: ml_collections.ConfigDict, num_devices: int,
                                process_count: int = 1) -> None:
  """Check, before anything is built: the ranges and choices of every field
  (`TRANSFORMER_RULES`, the FID fields), the objective by its registry, the sizes that must
  divide each other, the token store's folder being set, and the mesh."""
  check_table(c, TRANSFORMER_RULES)
  validate_fid_settings(c.eval)
  m = c.model
  registry.OBJECTIVES.check(m.objective)
  if m.width % m.heads:
    raise ConfigError(f"model.heads={m.heads} does not divide model.width={m.width}.")
  if not c.tokens.dir:
    raise ConfigError("tokens.dir is empty: extract tokens with a tokenizer config and "
                      "--mode=tokenize, then pass --config.tokens.dir=<that folder>.")
  validate_mesh(c)
  check_batch_split(c, num_devices, process_count,
                    ("train.batch_size", "eval.batch_size", "sample.batch_size"))
  check_grad_accum(c, num_devices, process_count)
  validate_guards(c.train)
