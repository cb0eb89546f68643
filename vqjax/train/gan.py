"""GAN training without an encoder (FQ-GAN's BigGAN experiments): `config.trainer = 'gan'`.

One jitted step (`make_train_step`) makes `train.n_critic` discriminator
updates, each on its own real batch and a fresh generated batch (one D pass
over [fake; real] as BigGAN-PyTorch does), then one generator update on a
fresh batch of noise and uniformly drawn classes, then the EMA copy of G:

    ema <- d ema + (1 - d) G,  d = ema.decay from G step ema.start on, 0 before

over G's parameters and its statistics (BatchNorm running moments, spectral
norm vectors), as BigGAN-PyTorch's `ema` does over G's state dict. Losses:
`config.loss.gan` (hinge) plus the discriminator's own extra losses (FQ-GAN's
alpha L_Q of its feature-quantisation layers). Statistics are updated by the
passes that train them: G's by its training-mode passes, D's (spectral norm
vectors, FQ dictionaries) by the D updates only. A step whose losses or
gradients are not finite changes nothing and is counted, as in the other
trainers; checkpoints hold the state and the data iterator (exact resume).

Evaluation (`--mode=eval` and every `eval.every_steps`): FID/KID of
`eval.num_samples` EMA-G samples, classes cycling, against the statistics of
`eval.reference_split` (the training split, as FQ-GAN reports), and the
Inception Score with the logits file. `--mode=sample` writes a class-by-sample
grid and an .npz of `sample.num_images` images.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from vqjax import registry
from vqjax.checks import check_table
from vqjax.console import console
from vqjax.core import checkpoint, partitioning, trees
from vqjax.core.partitioning import (
  check_batch_split,
  check_grad_accum,
  param_shardings,
  validate_mesh,
)
from vqjax.core.writers import make_writer, write_images
from vqjax.data.pipeline import train_dataset
from vqjax.data.sources import validate_data_config
from vqjax.errors import ConfigError
from vqjax.eval.settings import validate_fid_settings
from vqjax.nn.layers import PRECISIONS, REMAT_CHOICES, compute_dtype
from vqjax.nn.quantizers import STAT_SUMS
from vqjax.ops.images import to_uint8
from vqjax.train import accumulate
from vqjax.train.loop import StopRequest, TrainRun, every, validate_guards

sg = jax.lax.stop_gradient


@flax.struct.dataclass
class GANState:
  step: jax.Array  # int32: generator updates taken
  g_params: Any
  d_params: Any
  g_stats: Any  # G's mutable statistics ('gen_stats': BatchNorm moments, SN vectors)
  d_stats: Any  # D's ('disc_stats': SN vectors, FQ dictionaries)
  ema_params: Any  # the EMA copy of G
  ema_stats: Any
  g_opt_state: Any
  d_opt_state: Any
  rng: jax.Array  # base key; step k draws from fold_in(rng, k)


@dataclass
class GANModels:
  generator: nn.Module
  disc: nn.Module
  gan: Any  # GAN loss with d_loss / g_loss
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation
  num_classes: int
  dim_z: int


def build_models(config) -> GANModels:
  """G and D compute in `config.precision`'s dtype and rematerialise their residual blocks
  with `model.remat` (where they take these fields); parameters and optimisers stay float32."""
  o = config.optim
  fields = {"dtype": compute_dtype(config.precision), "remat": config.model.remat}
  g_cfg, d_cfg = config.model.generator, config.disc
  generator = registry.GENERATORS.build(
      g_cfg, **registry.GENERATORS.trainer_fields(g_cfg.name, **fields))
  return GANModels(
      generator=generator,
      disc=registry.DISCRIMINATORS.build(
          d_cfg, **registry.DISCRIMINATORS.trainer_fields(d_cfg.name, **fields)),
      gan=registry.GAN_LOSSES.build(config.loss.gan),
      g_tx=optax.adam(o.g_lr, b1=o.b1, b2=o.b2, eps=o.eps),
      d_tx=optax.adam(o.d_lr, b1=o.b1, b2=o.b2, eps=o.eps),
      num_classes=config.model.num_classes, dim_z=generator.dim_z)


def _vars(params, stats: dict, collection: str) -> dict:
  return {"params": params, **({collection: stats} if stats else {})}


def _labels(models: GANModels, y):
  """The class labels a model takes (None for an unconditional GAN)."""
  return y if models.num_classes else None


def generate(models: GANModels, params, stats, z, y, train: bool):
  """(images [B, H, W, 3] in [-1, 1], G's statistics after the pass). `train=True` uses the
  batch's BatchNorm statistics and advances G's statistics."""
  if not train:
    return models.generator.apply(_vars(params, stats, "gen_stats"), z, _labels(models, y),
                                  train=False), stats
  images, mutated = models.generator.apply(_vars(params, stats, "gen_stats"), z,
                                           _labels(models, y), train=True,
                                           mutable=["gen_stats"])
  return images, mutated.get("gen_stats", stats)


def discriminate(models: GANModels, params, stats, x, y, update: bool):
  """(logits [B], extra losses, D's statistics after the pass); `update` advances them."""
  variables = _vars(params, stats, "disc_stats")
  if not update:
    logits, extra = models.disc.apply(variables, x, train=True, labels=_labels(models, y))
    return logits, extra, stats
  (logits, extra), mutated = models.disc.apply(variables, x, train=True,
                                               labels=_labels(models, y),
                                               mutable=["disc_stats"])
  return logits, extra, mutated.get("disc_stats", stats)


def discriminate_summed(models: GANModels, params, stats, sums, x, y):
  """`discriminate` with update=True under gradient accumulation: (logits, extra losses, D's
  statistics, summed statistics); `sums` are those of the micro-batches before this one
  ({} on the first), which D's FQ dictionaries add theirs to (`vqjax.nn.quantizers`)."""
  variables = {**_vars(params, stats, "disc_stats"), **({STAT_SUMS: sums} if sums else {})}
  (logits, extra), mutated = models.disc.apply(variables, x, train=True,
                                               labels=_labels(models, y),
                                               mutable=["disc_stats", STAT_SUMS])
  return logits, extra, mutated.get("disc_stats", stats), mutated.get(STAT_SUMS, {})


def init_boxed_state(models: GANModels, config, rng: jax.Array) -> GANState:
  s = config.data.image_size
  k_g, k_d, k_train = jax.random.split(rng, 3)
  z, y = jnp.zeros((1, models.dim_z)), jnp.zeros((1,), jnp.int32)
  g_vars = models.generator.init(k_g, z, _labels(models, y), train=False)
  d_vars = models.disc.init(k_d, jnp.zeros((1, s, s, 3)), train=False, labels=_labels(models, y))
  g_params, d_params = g_vars["params"], d_vars["params"]
  g_stats = g_vars.get("gen_stats", {})
  return GANState(
      step=jnp.zeros((), jnp.int32), g_params=g_params, d_params=d_params, g_stats=g_stats,
      d_stats=d_vars.get("disc_stats", {}), ema_params=g_params, ema_stats=g_stats,
      g_opt_state=models.g_tx.init(g_params), d_opt_state=models.d_tx.init(d_params),
      rng=k_train)


def sharded_init(models: GANModels, config, mesh, rng: jax.Array):
  """(fresh state placed on `mesh`, its shardings from the logical axis names)."""
  abstract = jax.eval_shape(lambda r: init_boxed_state(models, config, r), rng)
  shardings = param_shardings(mesh, abstract, config.mesh.param_sharding, config.mesh.rules)
  state = jax.jit(lambda r: nn.unbox(init_boxed_state(models, config, r)),
                  out_shardings=shardings)(rng)
  return state, shardings


def ema_update(ema, new, decay):
  """decay * ema + (1 - decay) * new over the floating leaves (integer leaves take `new`)."""
  def mix(e, n):
    if not jnp.issubdtype(n.dtype, jnp.floating):
      return n
    return (decay * e + (1.0 - decay) * n).astype(n.dtype)
  return jax.tree.map(mix, ema, new)


def make_train_step(models: GANModels, config, loop: str = "auto"):
  """(state, batch) -> (state, metrics); `batch` holds n_critic x batch_size real images.

  `config.train.grad_accum` = a > 1: each D update and the G update accumulate a
  micro-batches of batch_size / a (`vqjax.train.accumulate`, whose `loop` runs them). The
  noise and classes of an update are drawn for the whole batch and split, so micro-batches
  see the big batch's draws; gradients, losses and metrics are their means, D's FQ
  dictionaries one update from the statistics of all of them and its spectral-norm vectors
  advance once per D update (every micro-batch starts from the update's statistics; the
  last one's are kept). G's BatchNorm normalises each micro-batch with its own moments, as
  accumulation in other frameworks does, so the fakes (and the step) are not the big
  batch's; G's statistics after an update are the mean over its micro-batches (running
  moments: the mean of the micro-batches' updates; spectral-norm vectors: advanced once).
  The EMA of G follows once per G step.
  """
  b, k = config.train.batch_size, config.train.n_critic
  acc = config.train.get("grad_accum", 1)
  classes = max(models.num_classes, 1)
  ema_decay, ema_start = config.ema.decay, config.ema.start

  def noise(key):
    kz, ky = jax.random.split(key)
    return (jax.random.normal(kz, (b, models.dim_z)),
            jax.random.randint(ky, (b,), 0, classes, jnp.int32))

  def train_step(state: GANState, batch: dict):
    key = jax.random.fold_in(state.rng, state.step)
    x = batch["image"].reshape((k, b) + batch["image"].shape[1:])
    y = batch["label"].astype(jnp.int32).reshape(k, b)

    def d_update(carry, inputs):
      d_params, d_opt_state, d_stats, g_stats, finite = carry
      x_real, y_real, d_key = inputs
      z, y_fake = noise(d_key)
      fake, g_stats = generate(models, state.g_params, g_stats, z, y_fake, train=True)

      def d_loss_fn(params):
        logits, extra, stats = discriminate(
            models, params, d_stats, jnp.concatenate([sg(fake), x_real]),
            jnp.concatenate([y_fake, y_real]), update=True)
        d_loss = models.gan.d_loss(logits[b:], logits[:b])
        total = d_loss + sum(extra.values(), jnp.zeros((), jnp.float32))
        return total, (stats, d_loss, extra, logits)

      (total, (stats, d_loss, extra, logits)), grads = jax.value_and_grad(
          d_loss_fn, has_aux=True)(d_params)
      updates, opt_state = models.d_tx.update(grads, d_opt_state, d_params)
      finite = finite & trees.all_finite(total, grads)
      metrics = {"loss/d": d_loss, "logits/real": jnp.mean(logits[b:]),
                 "logits/fake": jnp.mean(logits[:b]),
                 **{f"loss/{name}": v for name, v in extra.items()}}
      return (optax.apply_updates(d_params, updates), opt_state, stats, g_stats,
              finite), metrics

    def d_update_accumulated(carry, inputs):
      """`d_update` over `acc` micro-batches of the real batch and of the noise."""
      d_params, d_opt_state, d_stats, g_stats, finite = carry
      x_real, y_real, d_key = inputs
      z, y_fake = noise(d_key)  # the whole batch's draws
      xs = accumulate.split((x_real, y_real, z, y_fake), acc)
      m = b // acc

      def micro(j, inputs, carry):
        x_j, y_j, z_j, y_fake_j = inputs
        fake, g_stats_j = generate(models, state.g_params, g_stats, z_j, y_fake_j, train=True)

        def d_loss_fn(params):
          logits, extra, stats, sums = discriminate_summed(
              models, params, d_stats, carry[0], jnp.concatenate([sg(fake), x_j]),
              jnp.concatenate([y_fake_j, y_j]))
          d_loss = models.gan.d_loss(logits[m:], logits[:m])
          total = d_loss + sum(extra.values(), jnp.zeros((), jnp.float32))
          return total, (stats, sums, d_loss, extra, logits)

        (total, (stats, sums, d_loss, extra, logits)), grads = jax.value_and_grad(
            d_loss_fn, has_aux=True)(d_params)
        metrics = {"loss/d": d_loss, "logits/real": jnp.mean(logits[m:]),
                   "logits/fake": jnp.mean(logits[:m]),
                   **{f"loss/{name}": v for name, v in extra.items()}}
        return ({"total": total, "grads": grads, "g_stats": g_stats_j, "metrics": metrics},
                (sums, stats))

      x0 = jax.tree.map(lambda v: v[0], xs)
      sums = accumulate.zeros_like(jax.eval_shape(lambda: discriminate_summed(
          models, d_params, d_stats, {}, jnp.concatenate([x0[0], x0[0]]),
          jnp.concatenate([x0[1], x0[1]]))[3]))
      total, (_, d_stats) = accumulate.accumulate(micro, xs, (sums, d_stats), loop)
      mean = accumulate.mean(total, acc)
      updates, opt_state = models.d_tx.update(mean["grads"], d_opt_state, d_params)
      finite = finite & trees.all_finite(mean["total"], mean["grads"])
      return (optax.apply_updates(d_params, updates), opt_state, d_stats, mean["g_stats"],
              finite), mean["metrics"]

    # A Python loop rather than lax.scan: XLA's cost analysis (benchmarks/mfu.py) counts a
    # scan's body once, and n_critic is small.
    d_keys = jax.random.split(jax.random.fold_in(key, 0), k)
    carry = (state.d_params, state.d_opt_state, state.d_stats, state.g_stats,
             jnp.asarray(True))
    per_step = []
    for i in range(k):
      carry, metrics_i = (d_update if acc == 1 else d_update_accumulated)(
          carry, (x[i], y[i], d_keys[i]))
      per_step.append(metrics_i)
    d_params, d_opt_state, d_stats, g_stats, finite = carry
    d_metrics = jax.tree.map(lambda *v: jnp.stack(v), *per_step)

    z, y_fake = noise(jax.random.fold_in(key, 1))

    def g_loss_fn(params, z=z, y_fake=y_fake):
      fake, stats = generate(models, params, g_stats, z, y_fake, train=True)
      logits, _, _ = discriminate(models, d_params, d_stats, fake, y_fake, update=False)
      return models.gan.g_loss(logits), stats

    if acc == 1:
      (g_loss, g_stats), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params)
    else:  # the G update over `acc` micro-batches of the noise
      def g_micro(j, inputs, carry):
        (loss, stats), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params,
                                                                           *inputs)
        return {"g_loss": loss, "grads": grads, "g_stats": stats}, carry

      total, _ = accumulate.accumulate(g_micro, accumulate.split((z, y_fake), acc), (), loop)
      mean = accumulate.mean(total, acc)
      g_loss, g_stats, g_grads = mean["g_loss"], mean["g_stats"], mean["grads"]
    updates, g_opt_state = models.g_tx.update(g_grads, state.g_opt_state, state.g_params)
    g_params = optax.apply_updates(state.g_params, updates)
    finite = finite & trees.all_finite(g_loss, g_grads)
    decay = jnp.where(state.step >= ema_start, ema_decay, 0.0)
    new = state.replace(
        step=state.step + 1, g_params=g_params, d_params=d_params, g_stats=g_stats,
        d_stats=d_stats, g_opt_state=g_opt_state, d_opt_state=d_opt_state,
        ema_params=ema_update(state.ema_params, g_params, decay),
        ema_stats=ema_update(state.ema_stats, g_stats, decay))
    new_state = trees.select(finite, new, state.replace(step=state.step + 1))
    d_mean = {name: jnp.mean(v) for name, v in d_metrics.items()}
    metrics = {**d_mean, "loss/g": g_loss, "loss/total": d_mean["loss/d"] + g_loss,
               "ema_decay": decay, "nonfinite": 1.0 - finite.astype(jnp.float32),
               **dictionary_metrics(d_stats)}
    return new_state, metrics

  return train_step


def dictionary_metrics(d_stats) -> dict:
  """fq/<layer>/usage and /perplexity of each FQ dictionary in D's statistics (from the EMA
  cluster sizes; `vqjax.nn.discriminators.fq_dictionary_usage`)."""
  from vqjax.nn.discriminators import fq_dictionary_usage

  return {f"fq/{name}/{k}": v for name, stats in fq_dictionary_usage(d_stats).items()
          for k, v in stats.items()}


@dataclass
class Setup:
  config: Any
  models: GANModels
  mesh: Any
  state: GANState
  shardings: Any
  train_step: Callable


def setup(config, devices=None) -> Setup:
  devices = list(devices if devices is not None else jax.devices())
  validate_gan_config(config, len(devices), jax.process_count())
  mesh = partitioning.make_mesh(config, devices)
  models = build_models(config)
  state, shardings = sharded_init(models, config, mesh, jax.random.PRNGKey(config.seed))
  batch_sh = partitioning.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(models, config), in_shardings=(shardings, batch_sh),
                       out_shardings=(shardings, partitioning.replicated(mesh)),
                       donate_argnums=0)
  return Setup(config, models, mesh, state, shardings, train_step)


def real_batches_config(config):
  """The config whose training batches hold the n_critic real batches of one step."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.train.batch_size = config.train.batch_size * config.train.n_critic
  return c


class Sampler:
  """EMA-G samples in batches, classes cycling (BatchNorm per `sample.bn_stats`)."""

  def __init__(self, models: GANModels, bn_stats: str):
    train = bn_stats == "batch"
    self.models = models
    self._draw = jax.jit(lambda p, s, z, y: generate(models, p, s, z, y, train=train)[0])

  def labels(self, start: int, size: int) -> np.ndarray:
    return (np.arange(start, start + size) % max(self.models.num_classes, 1)).astype(np.int32)

  def images(self, params, stats, labels, seed: int, index: int) -> np.ndarray:
    z = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), index),
                          (len(labels), self.models.dim_z))
    return partitioning.fetch(self._draw(params, stats, z, jnp.asarray(labels)))

  def batches(self, params, stats, num: int, batch_size: int, seed: int):
    """Yields (images [B, H, W, 3] in [-1, 1], labels [B], valid) until `num` images."""
    for i, start in enumerate(range(0, num, batch_size)):
      labels = self.labels(start, batch_size)
      yield self.images(params, stats, labels, seed, i), labels, min(batch_size, num - start)


def evaluate_samples(config, state: GANState, models: GANModels, mesh) -> dict:
  """FID/KID (IS with the logits file) of eval.num_samples EMA-G samples against
  eval.reference_split's statistics (cached)."""
  from vqjax.eval.evaluator import reference_stats, sample_metrics
  from vqjax.eval.inception_features import to_model_range

  inception = _inception(mesh)
  ref_config = config.copy_and_resolve_references()
  with ref_config.unlocked():
    ref_config.eval.max_examples = config.eval.reference_examples
  reference = reference_stats(ref_config, inception, config.eval.reference_split)
  sampler = Sampler(models, config.sample.bn_stats)
  n, bs = config.eval.num_samples, config.eval.batch_size
  batches = ({"image": to_model_range(to_uint8(images)),
              "mask": (np.arange(bs) < valid).astype(np.float32)}
             for images, _, valid in sampler.batches(state.ema_params, state.ema_stats, n, bs,
                                                     config.seed))
  return sample_metrics(batches, reference, config, inception, total=n)


@functools.lru_cache(maxsize=4)
def _inception(mesh):
  from vqjax.eval.inception_features import InceptionExtractor

  return InceptionExtractor(mesh)


def class_grid(sampler: Sampler, state: GANState, config) -> np.ndarray:
  """uint8 grid: one row per class (the first sample.grid_classes), sample.grid_per_class
  EMA-G samples each (the same noise in every row)."""
  rows = min(config.sample.grid_classes, max(sampler.models.num_classes, 1))
  cols = config.sample.grid_per_class
  labels = np.repeat(np.arange(rows, dtype=np.int32), cols)
  z_rows = np.tile(np.arange(cols), rows)
  z = jax.random.normal(jax.random.PRNGKey(config.seed + 7), (cols, sampler.models.dim_z))
  images = partitioning.fetch(sampler._draw(state.ema_params, state.ema_stats, z[z_rows],
                                            jnp.asarray(labels)))
  s = images.shape[1]
  grid = to_uint8(images).reshape(rows, cols, s, s, 3).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * s, cols * s, 3)


def _write_eval(writer, workdir, step, config, state, s: Setup):
  from vqjax.eval.evaluator import is_notes, write_eval

  metrics = evaluate_samples(config, state, s.models, s.mesh)
  return write_eval(writer, workdir, step, metrics, None, notes=is_notes(config))


def train(config, workdir: str, stop: StopRequest | None = None, after_step=None) -> GANState:
  """Train (resuming from the latest checkpoint in `workdir`); returns the final state."""
  s = setup(config)
  r = TrainRun(config, workdir)
  dataset, preprocess = train_dataset(real_batches_config(config), jax.process_index(),
                                      jax.process_count())
  data_iter = iter(dataset)
  state = r.resume(s.state, data_iter)
  n_g = sum(x.size for x in jax.tree.leaves(state.g_params))
  n_d = sum(x.size for x in jax.tree.leaves(state.d_params))
  console(f"G {n_g:,} parameters, D {n_d:,}; {config.train.n_critic} D steps per G step; mesh "
          f"{dict(s.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  total = config.train.steps
  sampler = Sampler(s.models, config.sample.bn_stats)
  if int(state.step) == 0 and config.eval.at_start and config.eval.fid:
    _write_eval(r.writer, workdir, 0, config, state, s)

  def images(step, state, batch, device_batch):
    write_images(r.writer, workdir, step, "samples", class_grid(sampler, state, config))

  def evaluation(step, state, batch, device_batch):
    if config.eval.fid:
      _write_eval(r.writer, workdir, step, config, state, s)

  return r.run(state, data_iter, s.train_step, s.mesh,
               hooks=[every(config.train.image_every, total, images),
                      every(config.eval.every_steps, total, evaluation)],
               scalars=lambda: {"data/corrupt_images": preprocess.num_corrupt},
               stop=stop, after_step=after_step)


def restore(config, workdir: str):
  """(setup, the state of eval.checkpoint_step (-1: the newest that restores), its step)."""
  from vqjax.train.generate import require_checkpoints

  s = setup(config)
  require_checkpoints(workdir, "GAN")
  state, _, step = checkpoint.restore_newest_good(workdir, s.state, with_data=False,
                                                  step=config.eval.checkpoint_step)
  return s, state, step


def evaluate(config, workdir: str) -> dict:
  """--mode=eval: FID/KID (and IS) of EMA-G samples; writes eval_<step>.json."""
  s, state, step = restore(config, workdir)
  writer = make_writer(workdir, jax.process_index() == 0)
  from vqjax.eval.evaluator import is_notes, write_eval

  metrics = evaluate_samples(config, state, s.models, s.mesh)
  write_eval(writer, workdir, step, metrics, None, notes=is_notes(config))
  writer.flush()
  return metrics


def sample(config, workdir: str) -> str:
  """--mode=sample: `samples/samples_<step>.png` (class-by-sample grid of EMA-G) and
  `.npz` (sample.num_images uint8 images and their labels); returns the .npz path."""
  s, state, step = restore(config, workdir)
  sampler = Sampler(s.models, config.sample.bn_stats)
  parts = [(images[:valid], labels[:valid]) for images, labels, valid in sampler.batches(
      state.ema_params, state.ema_stats, config.sample.num_images, config.sample.batch_size,
      config.seed)]
  folder = os.path.join(workdir, "samples")
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(class_grid(sampler, state, config)).save(
      os.path.join(folder, f"samples_{step}.png"))
  path = os.path.join(folder, f"samples_{step}.npz")
  if jax.process_index() == 0:
    np.savez(path, images=to_uint8(np.concatenate([p[0] for p in parts])),
             labels=np.concatenate([p[1] for p in parts]))
  console(f"wrote {config.sample.num_images} samples to {path} and samples_{step}.png")
  return path


GAN_RULES = {
    "": {"precision": tuple(PRECISIONS)},
    "train": {"steps": ">=1", "epochs": ">=0", "batch_size": ">=1", "n_critic": ">=1",
              "log_every": ">=1", "image_every": ">=0", "checkpoint_every": ">=1",
              "keep_checkpoints": ">=1", "max_consecutive_nonfinite": ">=1"},
    "optim": {"g_lr": ">0", "d_lr": ">0", "b1": "[0,1)", "b2": "[0,1)", "eps": ">0"},
    "ema": {"decay": "[0,1]", "start": ">=0"},
    "eval": {"every_steps": ">=0", "batch_size": ">=1", "num_samples": ">=2",
             "reference_examples": ">=0", "checkpoint_step": ">=-1"},
    "sample": {"num_images": ">=1", "batch_size": ">=1", "grid_classes": ">=1",
               "grid_per_class": ">=1", "bn_stats": ("batch", "running")},
    "model": {"num_classes": ">=0", "remat": REMAT_CHOICES},
}


def validate_gan_config(c: ml_collections.ConfigDict, num_devices: int,
                        process_count: int = 1) -> None:
  """ConfigError before anything is built: ranges and choices, the parts by their
  registries, class counts that agree, the image size G makes, and batches the mesh splits."""
  check_table(c, GAN_RULES)
  validate_fid_settings(c.eval)
  validate_data_config(c.data)
  validate_guards(c.train)
  registry.GENERATORS.check(c.model.generator)
  registry.DISCRIMINATORS.check(c.disc)
  registry.GAN_LOSSES.check(c.loss.gan)
  n = c.model.num_classes
  for name, part in (("model.generator", c.model.generator), ("disc", c.disc)):
    if "num_classes" in part and part.num_classes != n:
      raise ConfigError(f"{name}.num_classes={part.num_classes} differs from "
                        f"model.num_classes={n}: set both to the data set's class count.")
  size = getattr(registry.GENERATORS.get(c.model.generator.name), "resolution", None)
  if size is not None and c.data.image_size != size:
    raise ConfigError(f"data.image_size={c.data.image_size}, but generator "
                      f"{c.model.generator.name!r} makes {size}x{size} images: set "
                      f"data.image_size={size}.")
  validate_mesh(c)
  check_batch_split(c, num_devices, process_count,
                    ("train.batch_size", "eval.batch_size", "sample.batch_size"))
  check_grad_accum(c, num_devices, process_count)


def check_data_classes(c) -> None:
  """ConfigError when model.num_classes does not match the training split's classes (read
  from the TFDS metadata, or the labels of a file source) — before anything is compiled."""
  from vqjax.data.sources import build_source

  source = build_source(c.data, c.data.train_split)
  tfds_source = getattr(source, "source", None)
  if tfds_source is not None:
    label = tfds_source.dataset_info.features["label"]
    classes, what = int(label.num_classes), f"TFDS {c.data.name} has {label.num_classes} classes"
  else:
    classes = max(source.labels) + 1 if source.labels else 0
    what = f"the {c.data.source} training split has labels up to {classes - 1}"
  n = c.model.num_classes
  if n and n != classes:
    raise ConfigError(f"model.num_classes={n}, but {what}: set model.num_classes, "
                      f"model.generator.num_classes and disc.num_classes to {classes}.")
