"""Tokenizer training: one jitted step updates generator and discriminator.

Generator loss (SPEC section 1):
    sum_terms w_t L_t(x, x_hat) + w_q L_vq + [step >= disc_start] disc_weight * lambda * L_G
with the terms of `config.loss.terms`, L_G the generator side of the GAN loss
`config.loss.gan`, and lambda the adaptive weight from the gradients at the
decoder's declared last layer (VQGAN, Esser et al. 2021, Eq. 7).
Discriminator loss from `disc_start` on: the GAN loss, the discriminator's
own extra losses, and optionally R1 and LeCam.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vqjax import registry
from vqjax.checks import check_table
from vqjax.core import trees
from vqjax.core.partitioning import (
  check_batch_split,
  check_grad_accum,
  param_shardings,
  validate_mesh,
)
from vqjax.data.sources import validate_data_config
from vqjax.errors import ConfigError
from vqjax.eval.settings import validate_fid_settings
from vqjax.losses import gan as gan_lib
from vqjax.losses.adaptive import last_layer_grad
from vqjax.losses.terms import build_terms, total_loss
from vqjax.nn.layers import PRECISIONS, REMAT_CHOICES, compute_dtype
from vqjax.nn.quantizers import STAT_SUMS
from vqjax.nn.vgg import LPIPS
from vqjax.nn.vqgan import VQGAN
from vqjax.ops import losses
from vqjax.ops.metrics import psnr, ssim
from vqjax.train import accumulate
from vqjax.train.state import TokenizerState

sg = jax.lax.stop_gradient


class TokenizerModels(NamedTuple):
  vqgan: nn.Module
  disc: nn.Module
  terms: dict  # label -> loss term (vqjax.losses.terms)
  gan: Any  # GAN loss with d_loss / g_loss
  lpips: nn.Module  # the eval metric
  tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation


def make_optimizer(o, lr: float, steps: int, frozen: tuple[str, ...] = ()):
  """Adam or AdamW (`optim.name`) at `lr`, constant or warmup + cosine; frozen paths get 0."""
  if o.schedule == "warmup_cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, max(o.warmup_steps, 1),
                                            max(steps, o.warmup_steps + 1))
  if o.name == "adamw":
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  else:
    tx = optax.adam(lr, b1=o.b1, b2=o.b2)
  if not frozen:
    return tx
  # Labels by the paths of the unboxed tree: a prefix of boxed params as well, so the
  # optimiser also initialises from the logically named parameters (init_boxed_state).
  labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train",
                                       trees.match_mask(nn.unbox(params), frozen))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def build_models(config) -> TokenizerModels:
  """The tokenizer's models: the VQGAN and discriminator compute in `config.precision`'s
  dtype (`model.remat` recomputes the encoder's and decoder's blocks); the loss networks,
  the quantiser and the optimisers stay float32."""
  o = config.optim
  dtype = compute_dtype(config.precision)
  disc_fields = registry.DISCRIMINATORS.trainer_fields(config.disc.name, dtype=dtype,
                                                       remat=config.model.remat)
  return TokenizerModels(
      vqgan=VQGAN(config.model, dtype=dtype),
      disc=registry.DISCRIMINATORS.build(config.disc, **disc_fields),
      terms=build_terms(config.loss.terms),
      gan=registry.GAN_LOSSES.build(config.loss.gan),
      lpips=LPIPS(),
      tx=make_optimizer(o, o.lr, config.train.steps, tuple(o.frozen)),
      disc_tx=make_optimizer(o, o.disc_lr, config.train.steps),
  )


def variables(params, stats: dict, collection: str) -> dict:
  """{'params': params} plus the statistics collection when there is one."""
  return {"params": params, **({collection: stats} if stats else {})}


def tokenizer_variables(state) -> dict:
  """The tokenizer's variables in a state: params and, when it has them, vq_stats."""
  return variables(state.params, state.vq_stats, "vq_stats")


def init_state(models: TokenizerModels, config, rng: jax.Array) -> TokenizerState:
  """Fresh state of plain arrays; run under jit with out_shardings to place it on the mesh.

  The shardings come from `init_boxed_state`'s logical axis names
  (`vqjax.core.partitioning.param_shardings` of its `jax.eval_shape`).
  """
  return nn.unbox(init_boxed_state(models, config, rng))


def sharded_init(models: TokenizerModels, config, mesh, rng: jax.Array):
  """(fresh state placed on `mesh`, its shardings from the logical axis names and
  `config.mesh`)."""
  abstract = jax.eval_shape(lambda r: init_boxed_state(models, config, r), rng)
  shardings = param_shardings(mesh, abstract, config.mesh.param_sharding, config.mesh.rules)
  state = jax.jit(lambda r: init_state(models, config, r), out_shardings=shardings)(rng)
  return state, shardings


def init_boxed_state(models: TokenizerModels, config, rng: jax.Array) -> TokenizerState:
  """The fresh state with every parameter and statistic boxed with its logical axis names.

  Optimiser states are built from the boxed parameters, so their copies of
  the parameter tree carry the same names; step, rng, optimiser counts and
  loss statistics are plain arrays. `nn.unbox` of it is `init_state`.
  """
  s = config.data.image_size
  x = jnp.zeros((1, s, s, 3), jnp.float32)
  k_model, k_disc, k_train = jax.random.split(rng, 3)
  model_vars = models.vqgan.init(k_model, x, train=False)
  params = model_vars["params"]
  disc_vars = models.disc.init(k_disc, x, train=False)
  disc_params = disc_vars["params"]
  lecam = config.loss.lecam_weight > 0
  return TokenizerState(
      step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
      opt_state=models.tx.init(params), disc_opt_state=models.disc_tx.init(disc_params),
      vq_stats=model_vars.get("vq_stats", {}), disc_stats=disc_vars.get("disc_stats", {}),
      loss_stats={"real": jnp.zeros(()), "fake": jnp.zeros(())} if lecam else {},
      rng=k_train)


def make_train_step(models: TokenizerModels, config, gan: bool = True, loop: str = "auto"):
  """(state, batch, term_params) -> (state, metrics). Pure; jit it with shardings.

  `gan=True` is the step from `loss.disc_start` on (adversarial term and
  discriminator update), `gan=False` the step before it (discriminator state
  unchanged, its losses and metrics zero). The two are separate programs that
  the host chooses between (`PhasedStep`): a `lax.cond` around the
  discriminator would keep both in one program, but XLA on CPU then compiles
  the convolutions inside the branch as slow loops (about 17x slower).
  `term_params` maps a loss-term label to its fixed network's parameters.

  `config.train.grad_accum` = k > 1 accumulates k micro-batches per update
  (`make_accumulated_step`, with the micro-batch `loop` of `vqjax.train.accumulate`).
  """
  if config.train.get("grad_accum", 1) > 1:
    return make_accumulated_step(models, config, gan, loop)
  lc = config.loss
  decoder_cfg = config.model.decoder
  last_name = registry.DECODERS.get(decoder_cfg.name).LAST_LAYER
  last_layer = registry.DECODERS.build(decoder_cfg, out_channels=3).last_layer()
  finish = _finish_step(models, config)

  def train_step(state: TokenizerState, batch: dict, term_params) -> tuple[TokenizerState, dict]:
    x = batch["image"]
    step_key = jax.random.fold_in(state.rng, state.step)  # quantiser noise, masks, restarts
    terms_key = jax.random.fold_in(step_key, 1)  # sampled loss terms

    def generator(params):
      (x_hat, q), mutated = models.vqgan.apply(
          variables(params, state.vq_stats, "vq_stats"), x, train=True,
          mutable=["vq_stats", "intermediates"], rngs={"quantizer": step_key})
      features = mutated["intermediates"]["decoder"]["last_features"][0]
      quant = sum(q.losses.values())
      return (x_hat, quant), (q, features, mutated.get("vq_stats", {}))

    # One generator forward; every loss network (terms, D) runs forward and
    # backward once, giving d L / d x_hat, which is pulled back through the
    # generator with the adaptive weight applied. Equal to differentiating
    # L_rec + w_q L_vq + disc_weight * sg(lambda) * L_G with respect to params.
    (x_hat, quant), pullback, (q, features, vq_stats) = jax.vjp(
        generator, state.params, has_aux=True)
    (rec, rec_metrics), g_rec = jax.value_and_grad(
        lambda o: total_loss(models.terms, term_params, x, o, q, terms_key), has_aux=True)(x_hat)
    x_fake = sg(x_hat)
    d_update = make_disc_update(models, config, state, x, x_fake)
    if gan:
      disc_vars = variables(state.disc_params, state.disc_stats, "disc_stats")
      g_loss, g_gan = jax.value_and_grad(
          lambda o: models.gan.g_loss(models.disc.apply(disc_vars, o, train=True)[0]))(x_hat)
      last_params = state.params["decoder"][last_name]
      weight = losses.adaptive_weight(last_layer_grad(last_layer, g_rec, features, last_params),
                                      last_layer_grad(last_layer, g_gan, features, last_params),
                                      lc.adaptive_weight_max)
      g_out = g_rec + lc.disc_weight * weight * g_gan
      disc_out = d_update()
    else:
      g_loss = weight = jnp.zeros((), rec.dtype)
      g_out = g_rec
      disc_out = disc_idle(state, d_update)
    total = rec + lc.codebook_weight * quant + lc.disc_weight * weight * g_loss
    (grads,) = pullback((g_out, jnp.asarray(lc.codebook_weight, quant.dtype)))
    return finish(state, grads, vq_stats, disc_out, total, g_loss, weight, rec_metrics,
                  q.losses, q.metrics)

  return train_step


def _finish_step(models: TokenizerModels, config):
  """The end of a train step, once the gradients are known: the optimiser update (frozen
  paths kept bitwise), the skip of a non-finite step, the new state and the metrics."""
  frozen = tuple(config.optim.frozen)

  def finish(state, grads, vq_stats, disc_out, total, g_loss, weight, rec_metrics, q_losses,
             q_metrics):
    updates, opt_state = models.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if frozen:  # bitwise: p + 0 can flip the sign of a zero
      params = trees.keep_where(trees.match_mask(params, frozen), params, state.params)
      vq_stats = trees.keep_where(trees.match_mask(vq_stats, frozen), vq_stats, state.vq_stats)

    disc_params, disc_opt_state, disc_stats, loss_stats, d_loss, d_metrics, d_grads = disc_out
    finite = trees.all_finite(total, d_loss, grads, d_grads)
    keep = lambda new, old: trees.select(finite, new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        disc_params=keep(disc_params, state.disc_params),
        disc_opt_state=keep(disc_opt_state, state.disc_opt_state),
        vq_stats=keep(vq_stats, state.vq_stats),
        disc_stats=keep(disc_stats, state.disc_stats),
        loss_stats=keep(loss_stats, state.loss_stats),
    )
    metrics = {
        "loss/total": total, "loss/g": g_loss, "loss/d": d_loss, "adaptive_weight": weight,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        **{f"loss/{k}": v for k, v in rec_metrics.items()},
        **d_metrics,
        **{f"loss/{k}": v for k, v in q_losses.items()},
        **{f"vq/{k}": v for k, v in q_metrics.items()},
    }
    return new_state, metrics

  return finish


def make_accumulated_step(models: TokenizerModels, config, gan: bool = True,
                          loop: str = "auto"):
  """`make_train_step` with `config.train.grad_accum` = k > 1 micro-batches per update.

  The batch is split into k micro-batches (`vqjax.train.accumulate.split`); each runs the
  generator forward, the loss networks and the discriminator on its own rows, and one
  update follows from what they add up to, so that it equals the step on the whole batch
  up to float rounding (tests/test_grad_accum.py):

  * The adaptive weight is a nonlinear function of the whole batch's last-layer gradients,
    known only after the last micro-batch. Each micro-batch therefore pulls the
    reconstruction cotangent (with the codebook loss) and the GAN cotangent back through
    the generator separately (two backward passes instead of one), and adds them up
    separately, together with the last-layer gradients of each. After the loop, the
    weight lambda comes from the summed last-layer gradients and the parameters' gradient
    is G_rec + disc_weight * lambda * G_gan, as the big batch's.
  * Every loss is a mean over the batch, so means over micro-batches equal it: gradients,
    losses, metrics, R1 and LeCam (its anchors' EMA too) are averaged.
  * Codebook statistics (EMA codebooks, FQ dictionaries in the discriminator) add up over
    the micro-batches (`vqjax.nn.quantizers` docstring): every micro-batch starts from the
    step's state, and the state after the last is one update from the whole batch.
  * The discriminator updates its statistics on the real images, then on the fakes with
    the statistics after the real pass. When it has FQ dictionaries, the real images of
    all micro-batches first run through it forward only, so that every fake pass sees the
    dictionaries after the whole batch's real pass (one more forward pass of D on the
    reals); spectral-norm vectors advance once per update, as in the big batch.

  Not equal to the big batch: batch statistics inside the networks (the PatchGAN's
  BatchNorm normalises each micro-batch with its own moments, as accumulation in other
  frameworks does), losses that compare the examples of a batch (Reg-VQ's contrastive
  terms, SeQ-GAN's entropy of the mean code assignment), and random draws inside the
  models: stochastic quantisers, sampled loss terms and dead-code restarts draw per
  micro-batch (keys folded with its index), from the same distributions; k-means
  initialisation runs on each micro-batch on the first step, and the last one is kept.
  Metrics that are not means (codebook usage, perplexity) are averaged over micro-batches.
  """
  lc = config.loss
  k = config.train.grad_accum
  decoder_cfg = config.model.decoder
  last_name = registry.DECODERS.get(decoder_cfg.name).LAST_LAYER
  last_layer = registry.DECODERS.build(decoder_cfg, out_channels=3).last_layer()
  finish = _finish_step(models, config)
  with_sums = lambda vars_, sums: {**vars_, **({STAT_SUMS: sums} if sums else {})}

  def train_step(state: TokenizerState, batch: dict, term_params) -> tuple[TokenizerState, dict]:
    xs = accumulate.split(batch["image"], k)
    step_key = jax.random.fold_in(state.rng, state.step)  # quantiser noise, masks, restarts
    terms_key = jax.random.fold_in(step_key, 1)  # sampled loss terms
    cw = jnp.asarray(lc.codebook_weight, jnp.float32)
    disc_vars = variables(state.disc_params, state.disc_stats, "disc_stats")

    def generator(params, x, j, sums):
      (x_hat, q), mutated = models.vqgan.apply(
          with_sums(variables(params, state.vq_stats, "vq_stats"), sums), x, train=True,
          mutable=["vq_stats", "intermediates", STAT_SUMS],
          rngs={"quantizer": jax.random.fold_in(step_key, j)})
      features = mutated["intermediates"]["decoder"]["last_features"][0]
      quant = sum(q.losses.values())
      return (x_hat, quant), (q, features, mutated.get("vq_stats", {}),
                              mutated.get(STAT_SUMS, {}))

    def disc_real_pass(sums, x):
      """D's statistics and summed statistics after its real pass over `x`."""
      _, mutated = models.disc.apply(with_sums(disc_vars, sums), x, train=True,
                                     mutable=["disc_stats", STAT_SUMS])
      return mutated.get("disc_stats", state.disc_stats), mutated.get(STAT_SUMS, {})

    x0 = jax.tree.map(lambda a: a[0], xs)
    vq_sums = accumulate.zeros_like(jax.eval_shape(
        lambda p: generator(p, x0, 0, {})[1][3], state.params))
    d_sums = (accumulate.zeros_like(jax.eval_shape(lambda: disc_real_pass({}, x0)[1]))
              if gan else {})
    fake_stats = None
    if d_sums:  # statistics summed over the batch (FQ): the whole real pass first
      def real_pass(j, x, carry):
        stats, sums = disc_real_pass(carry[1], x)
        return {}, (stats, sums)

      _, (fake_stats, _) = accumulate.accumulate(real_pass, xs, (state.disc_stats, d_sums),
                                                 loop)

    def micro(j, x, carry):
      vq_sums, vq_stats, d_sums, d_stats = carry
      (x_hat, quant), pullback, (q, features, vq_stats, vq_sums) = jax.vjp(
          lambda p: generator(p, x, j, vq_sums), state.params, has_aux=True)
      (rec, rec_metrics), g_rec = jax.value_and_grad(
          lambda o: total_loss(models.terms, term_params, x, o, q,
                               jax.random.fold_in(terms_key, j)), has_aux=True)(x_hat)
      (grads_rec,) = pullback((g_rec, cw.astype(quant.dtype)))
      out = {"rec": rec, "quant": quant, "rec_metrics": rec_metrics, "q_losses": q.losses,
             "q_metrics": q.metrics, "grads_rec": grads_rec}
      if gan:
        g_loss, g_gan = jax.value_and_grad(
            lambda o: models.gan.g_loss(models.disc.apply(disc_vars, o, train=True)[0]))(x_hat)
        (grads_gan,) = pullback((g_gan, jnp.zeros((), quant.dtype)))
        last_params = state.params["decoder"][last_name]
        disc_loss = make_disc_loss(models, config, state, x, sg(x_hat), fake_stats, d_sums)
        (d_loss, (d_metrics, d_stats, loss_stats, d_sums)), d_grads = jax.value_and_grad(
            disc_loss, has_aux=True)(state.disc_params)
        out.update(g_loss=g_loss, grads_gan=grads_gan,
                   last_rec=last_layer_grad(last_layer, g_rec, features, last_params),
                   last_gan=last_layer_grad(last_layer, g_gan, features, last_params),
                   d_loss=d_loss, d_metrics=d_metrics, d_grads=d_grads, loss_stats=loss_stats)
      return out, (vq_sums, vq_stats, d_sums, d_stats)

    sums, (_, vq_stats, _, d_stats) = accumulate.accumulate(
        micro, xs, (vq_sums, state.vq_stats, d_sums, state.disc_stats), loop)
    m = accumulate.mean(sums, k)
    if gan:
      weight = losses.adaptive_weight(m["last_rec"], m["last_gan"], lc.adaptive_weight_max)
      grads = jax.tree.map(lambda r, g: r + lc.disc_weight * weight * g, m["grads_rec"],
                           m["grads_gan"])
      g_loss, d_grads = m["g_loss"], m["d_grads"]
      d_updates, d_opt = models.disc_tx.update(d_grads, state.disc_opt_state,
                                               state.disc_params)
      disc_out = (optax.apply_updates(state.disc_params, d_updates), d_opt, d_stats,
                  m["loss_stats"] if lc.lecam_weight > 0 else state.loss_stats, m["d_loss"],
                  m["d_metrics"], d_grads)
    else:
      weight = g_loss = jnp.zeros((), m["rec"].dtype)
      grads = m["grads_rec"]
      disc_out = disc_idle(state, make_disc_update(models, config, state, x0, x0))
    total = m["rec"] + lc.codebook_weight * m["quant"] + lc.disc_weight * weight * g_loss
    return finish(state, grads, vq_stats, disc_out, total, g_loss, weight, m["rec_metrics"],
                  m["q_losses"], m["q_metrics"])

  return train_step


class PhasedStep:
  """The tokenizer's train step: the host picks the jitted program for the state's step.

  `plain` runs before `disc_start`, `gan` from it on (`make_train_step`). Each
  is compiled on its first use, so a run that never reaches `disc_start`
  compiles only `plain`. Reading the step waits for the previous step, which
  the training loop does anyway to log its metrics.
  """

  def __init__(self, plain: Callable, gan: Callable, disc_start: int):
    self.plain, self.gan, self.disc_start = plain, gan, disc_start

  def __call__(self, state: TokenizerState, batch: dict, term_params):
    use_gan = int(jax.device_get(state.step)) >= self.disc_start
    return (self.gan if use_gan else self.plain)(state, batch, term_params)


def make_disc_loss(models: TokenizerModels, config, state: TokenizerState, x, x_fake,
                   fake_stats=None, sums=None):
  """dp -> (D's loss, (metrics, its statistics after the step, loss_stats, summed
  statistics)): a real pass from the state's statistics, then a fake pass from those after
  it. With gradient accumulation, `fake_stats` (when not None) are the statistics the fake
  pass starts from instead (those after every micro-batch's real pass), and `sums` (when not
  None) the statistics summed over the micro-batches before this one, which the fake pass
  adds its own to (`vqjax.nn.quantizers.STAT_SUMS`)."""
  lc = config.loss

  def disc_loss(dp):
    stats = state.disc_stats
    (real, extra_real), mutated = models.disc.apply(
        variables(dp, stats, "disc_stats"), x, train=True, mutable=["disc_stats"])
    stats = mutated.get("disc_stats", stats) if fake_stats is None else fake_stats
    fake_vars, mutable = variables(dp, stats, "disc_stats"), ["disc_stats"]
    if sums is not None:
      fake_vars, mutable = {**fake_vars, **({STAT_SUMS: sums} if sums else {})}, [
          "disc_stats", STAT_SUMS]
    (fake, extra_fake), mutated = models.disc.apply(fake_vars, x_fake, train=True,
                                                    mutable=mutable)
    stats = mutated.get("disc_stats", stats)
    new_sums = mutated.get(STAT_SUMS, sums) if sums is not None else None
    loss = models.gan.d_loss(real, fake) + sum(extra_real.values()) + sum(extra_fake.values())
    metrics = {"logits/real": jnp.mean(real), "logits/fake": jnp.mean(fake),
               **{f"loss/d_{k}": v for k, v in extra_real.items()}}
    loss_stats = state.loss_stats
    if lc.r1_weight > 0:
      frozen_vars = variables(dp, state.disc_stats, "disc_stats")
      r1 = gan_lib.r1_penalty(lambda xr: models.disc.apply(frozen_vars, xr, train=True)[0], x)
      loss, metrics["loss/r1"] = loss + lc.r1_weight * r1, r1
    if lc.lecam_weight > 0:
      lecam = gan_lib.lecam_penalty(real, fake, state.loss_stats["real"],
                                    state.loss_stats["fake"])
      loss, metrics["loss/lecam"] = loss + lc.lecam_weight * lecam, lecam
      loss_stats = gan_lib.lecam_ema(state.loss_stats, sg(real), sg(fake), lc.lecam_decay)
    return loss, (metrics, stats, loss_stats, new_sums)

  return disc_loss


def make_disc_update(models: TokenizerModels, config, state: TokenizerState, x, x_fake):
  """The discriminator's update as a thunk (run from `disc_start` on)."""
  disc_loss = make_disc_loss(models, config, state, x, x_fake)

  def update():
    (d_loss, (metrics, stats, loss_stats, _)), d_grads = jax.value_and_grad(
        disc_loss, has_aux=True)(state.disc_params)
    d_updates, d_opt = models.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    params = optax.apply_updates(state.disc_params, d_updates)
    return params, d_opt, stats, loss_stats, d_loss, metrics, d_grads

  return update


def disc_idle(state: TokenizerState, update):
  """Before `disc_start`: `update`'s outputs with the state unchanged and zero loss,
  metrics and gradients."""
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(update))
  _, _, _, _, d_loss, metrics, d_grads = zeros
  return (state.disc_params, state.disc_opt_state, state.disc_stats, state.loss_stats, d_loss,
          metrics, d_grads)


def make_eval_step(models: TokenizerModels, config):
  """(params, vq_stats, batch, lpips_params) -> per-batch sums for the evaluator."""
  k = config.model.quantizer.codebook_size

  def eval_step(params, vq_stats, batch, lpips_params) -> dict[str, Any]:
    x, mask = batch["image"], batch["mask"]
    x_hat, q = models.vqgan.apply(variables(params, vq_stats, "vq_stats"), x, train=False)
    x_hat = jnp.clip(x_hat, -1.0, 1.0)
    per_image = {
        "psnr": psnr(x, x_hat),
        "ssim": ssim(x, x_hat),
        "lpips": models.lpips.apply({"params": lpips_params}, x, x_hat),
    }
    sums = {name: jnp.sum(v * mask) for name, v in per_image.items()}
    weights = jnp.broadcast_to(mask.reshape((-1,) + (1,) * (q.indices.ndim - 1)), q.indices.shape)
    sums["code_counts"] = jnp.zeros((k,), jnp.float32).at[q.indices.reshape(-1)].add(
        weights.reshape(-1))
    sums["count"] = jnp.sum(mask)
    return sums, x_hat

  return eval_step


# Ranges and choices of the tokenizer's own fields (vqjax.checks); the parts check theirs
# (registry `check_config`), the data fields are checked in vqjax/data/sources.py, the FID
# fields in vqjax/eval/settings.py.
TOKENIZER_RULES = {
    "": {"precision": tuple(PRECISIONS)},
    "train": {"steps": ">=1", "epochs": ">=0", "batch_size": ">=1", "log_every": ">=1",
              "image_every": ">=0",  # 0 = only at the last step
              "checkpoint_every": ">=1", "keep_checkpoints": ">=1",
              "max_consecutive_nonfinite": ">=1"},
    "eval": {"every_steps": ">=0",  # 0 = only at the last step
             "batch_size": ">=1", "max_examples": ">=0", "checkpoint_step": ">=-1"},
    "tokenize": {"batch_size": ">=1", "max_examples": ">=0", "shard_size": ">=1"},
    "model": {"z_channels": ">=1", "remat": REMAT_CHOICES},
    "loss": {"codebook_weight": ">=0", "disc_weight": ">=0", "disc_start": ">=0",
             "adaptive_weight_max": ">0", "r1_weight": ">=0", "lecam_weight": ">=0",
             "lecam_decay": "[0,1)"},
    "optim": {"name": ("adam", "adamw"), "schedule": ("constant", "warmup_cosine"),
              "lr": ">0", "disc_lr": ">0", "b1": "[0,1)", "b2": "[0,1)",
              "weight_decay": ">=0", "warmup_steps": ">=0"},
    "init_from": {"step": ">=-1"},
}


def validate_tokenizer_config(c: ml_collections.ConfigDict, num_devices: int,
                              process_count: int = 1) -> None:
  """Check what would otherwise fail deep inside compilation: the ranges and choices of
  every field (`TOKENIZER_RULES`, the data fields), every part by its registry (names,
  fields, the part's own ranges), then the sizes that tie the parts together."""
  check_table(c, TOKENIZER_RULES)
  validate_data_config(c.data)
  validate_fid_settings(c.eval)
  m = c.model
  for reg, part in ((registry.ENCODERS, m.encoder), (registry.QUANTIZERS, m.quantizer),
                    (registry.DECODERS, m.decoder), (registry.DISCRIMINATORS, c.disc),
                    (registry.GAN_LOSSES, c.loss.gan)):
    reg.check(part)
  for label, term in c.loss.terms.items():
    if "name" not in term:
      raise ConfigError(f"loss.terms.{label} has no 'name': choose one of "
                        f"{registry.LOSS_TERMS.names()}.")
    registry.LOSS_TERMS.check(term, where=f"loss.terms.{label}")
    # A term that reads q.aux names the quantisers that give it (e.g. PCL: 'regvq').
    able = getattr(registry.LOSS_TERMS.get(term.name), "QUANTIZERS", None)
    if able and term.weight > 0 and m.quantizer.name not in able:
      raise ConfigError(f"loss.terms.{label} ({term.name}) reads what the quantisers {able} "
                        f"give, not model.quantizer.name={m.quantizer.name!r}: use one of "
                        f"them, or set loss.terms.{label}.weight=0.")
  downsampling = getattr(registry.ENCODERS.get(m.encoder.name), "downsampling", None)
  factor = downsampling(m.encoder) if downsampling else 1
  if c.data.image_size % factor:
    raise ConfigError(
        f"data.image_size={c.data.image_size} is not divisible by the encoder's downsampling "
        f"factor {factor} (model.encoder.ch_mult={tuple(m.encoder.ch_mult)}): use a multiple "
        f"of {factor}, e.g. {max(factor, c.data.image_size // factor * factor)}.")
  # A decoder whose layers need particular map sizes (e.g. attention windows) checks them.
  check_geometry = getattr(registry.DECODERS.get(m.decoder.name), "check_geometry", None)
  if check_geometry is not None:
    check_geometry(m.decoder, c.data.image_size // factor)
  check_batch_split(c, num_devices, process_count,
                    ("train.batch_size", "eval.batch_size", "tokenize.batch_size"))
  check_grad_accum(c, num_devices, process_count)
  _validate_frozen(c.optim.frozen)
  validate_mesh(c)
  from vqjax.train.loop import validate_guards  # here: loop imports TensorFlow (via clu)

  validate_guards(c.train)


def _validate_frozen(frozen) -> None:
  """ConfigError for an `optim.frozen` pattern that is not a regular expression."""
  import re

  for pattern in frozen:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"optim.frozen pattern {pattern!r} is not a regular expression: "
                        f"{e}") from None
