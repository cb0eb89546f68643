"""VQGAN tokenizer training: one jitted step updates generator and discriminator.

Generator loss (SPEC 1):  l1 |x - x_hat| + w_p LPIPS(x, x_hat) + w_q L_vq
                          + [step >= disc_start] disc_weight * lambda * L_G
with lambda the adaptive weight from the decoder's last-layer gradients.
Discriminator loss: hinge, from `disc_start` on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqjax.nn.discriminators import PatchDiscriminator
from vqjax.nn.vgg import LPIPS
from vqjax.nn.vqgan import VQGAN
from vqjax.ops import losses
from vqjax.ops import quantize as vq
from vqjax.ops.metrics import psnr, ssim
from vqjax.train.state import TokenizerState

sg = jax.lax.stop_gradient


class TokenizerModels(NamedTuple):
  vqgan: nn.Module
  disc: nn.Module
  lpips: nn.Module
  tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation


def build_models(config) -> TokenizerModels:
  o = config.optim
  return TokenizerModels(
      vqgan=VQGAN(config.model),
      disc=PatchDiscriminator(ndf=config.disc.ndf, num_layers=config.disc.num_layers),
      lpips=LPIPS(),
      tx=optax.adam(o.lr, b1=o.b1, b2=o.b2),
      disc_tx=optax.adam(o.disc_lr, b1=o.b1, b2=o.b2),
  )


def init_state(models: TokenizerModels, config, rng: jax.Array) -> TokenizerState:
  """Fresh state; run under jit with out_shardings to place it on the mesh."""
  s = config.data.image_size
  x = jnp.zeros((1, s, s, 3), jnp.float32)
  k_model, k_disc, k_train = jax.random.split(rng, 3)
  variables = models.vqgan.init(k_model, x, train=False)
  params = variables["params"]
  vq_stats = variables.get("vq_stats", {})
  disc_params = models.disc.init(k_disc, x)["params"]
  return TokenizerState(
      step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
      opt_state=models.tx.init(params), disc_opt_state=models.disc_tx.init(disc_params),
      vq_stats=vq_stats, rng=k_train)


def _variables(params, vq_stats) -> dict:
  return {"params": params, **({"vq_stats": vq_stats} if vq_stats else {})}


def last_layer_grad(grad_output: jax.Array, features: jax.Array, conv_params) -> jax.Array:
  """d loss / d W of the decoder's last conv, given d loss / d x_hat.

  x_hat = conv(features; W, b), so the kernel gradient is one VJP through
  that conv: no second pass through the decoder or the loss networks. All
  inputs are constants here (the adaptive weight carries no gradient).
  """
  conv = nn.Conv(grad_output.shape[-1], (3, 3))
  _, vjp = jax.vjp(lambda k: conv.apply({"params": {"kernel": k, "bias": conv_params["bias"]}},
                                        sg(features)), sg(conv_params["kernel"]))
  return vjp(sg(grad_output))[0]


def _all_finite(*trees) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves))


def _select(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(models: TokenizerModels, config):
  """(state, batch, lpips_params) -> (state, metrics). Pure; jit it with shardings."""
  lc = config.loss

  def rec_loss(x, x_hat, lpips_params):
    l1 = losses.l1_loss(x, x_hat)
    perceptual = jnp.zeros(())
    if lc.perceptual_weight > 0:
      perceptual = jnp.mean(models.lpips.apply({"params": lpips_params}, x, x_hat))
    return lc.l1_weight * l1 + lc.perceptual_weight * perceptual, (l1, perceptual)

  def train_step(state: TokenizerState, batch: dict, lpips_params) -> tuple[TokenizerState, dict]:
    x = batch["image"]
    use_gan = state.step >= lc.disc_start
    step_key = jax.random.fold_in(state.rng, state.step)  # quantiser noise, masks, restarts

    def generator(params):
      (x_hat, q), mutated = models.vqgan.apply(
          _variables(params, state.vq_stats), x, train=True,
          mutable=["vq_stats", "intermediates"], rngs={"quantizer": step_key})
      features = mutated["intermediates"]["decoder"]["last_features"][0]
      quant = sum(q.losses.values())
      return (x_hat, quant), (q, features, mutated.get("vq_stats", {}))

    # One generator forward; the loss networks (LPIPS, D) each run forward and
    # backward once, giving d L / d x_hat, which is pulled back through the
    # generator with the adaptive weight applied. Equal to differentiating
    # L_rec + w_q L_vq + disc_weight * sg(lambda) * L_G with respect to params.
    (x_hat, quant), pullback, (q, features, vq_stats) = jax.vjp(
        generator, state.params, has_aux=True)
    (rec, (l1, perceptual)), g_rec = jax.value_and_grad(
        lambda o: rec_loss(x, o, lpips_params), has_aux=True)(x_hat)

    def gan_terms():
      g_loss, g_gan = jax.value_and_grad(
          lambda o: losses.hinge_g_loss(models.disc.apply({"params": state.disc_params}, o)))(x_hat)
      conv_params = state.params["decoder"]["conv_out"]
      weight = losses.adaptive_weight(last_layer_grad(g_rec, features, conv_params),
                                      last_layer_grad(g_gan, features, conv_params),
                                      lc.adaptive_weight_max)
      return g_loss, weight, g_gan

    g_loss, weight, g_gan = jax.lax.cond(
        use_gan, gan_terms, lambda: (jnp.zeros(()), jnp.zeros(()), jnp.zeros_like(x_hat)))
    total = rec + lc.codebook_weight * quant + lc.disc_weight * weight * g_loss
    (grads,) = pullback((g_rec + lc.disc_weight * weight * g_gan,
                         jnp.asarray(lc.codebook_weight, quant.dtype)))
    updates, opt_state = models.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux = dict(x_hat=x_hat, vq_stats=vq_stats, l1=l1, perceptual=perceptual, g_loss=g_loss,
               weight=weight)

    x_fake = sg(aux["x_hat"])

    def disc_update():
      def disc_loss(dp):
        real = models.disc.apply({"params": dp}, x)
        fake = models.disc.apply({"params": dp}, x_fake)
        return losses.hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))
      (d_loss, logits), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(state.disc_params)
      d_updates, d_opt = models.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
      return optax.apply_updates(state.disc_params, d_updates), d_opt, d_loss, logits, d_grads

    def disc_idle():
      zero = jnp.zeros(())
      zeros_like = jax.tree.map(jnp.zeros_like, state.disc_params)
      return state.disc_params, state.disc_opt_state, zero, (zero, zero), zeros_like

    disc_params, disc_opt_state, d_loss, (logit_real, logit_fake), d_grads = jax.lax.cond(
        use_gan, disc_update, disc_idle)

    finite = _all_finite(total, d_loss, grads, d_grads)
    new_state = state.replace(
        step=state.step + 1,
        params=_select(finite, params, state.params),
        opt_state=_select(finite, opt_state, state.opt_state),
        disc_params=_select(finite, disc_params, state.disc_params),
        disc_opt_state=_select(finite, disc_opt_state, state.disc_opt_state),
        vq_stats=_select(finite, aux["vq_stats"], state.vq_stats),
    )
    metrics = {
        "loss/total": total, "loss/l1": aux["l1"], "loss/perceptual": aux["perceptual"],
        "loss/g": aux["g_loss"], "loss/d": d_loss, "adaptive_weight": aux["weight"],
        "logits/real": logit_real, "logits/fake": logit_fake,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        **{f"loss/{k}": v for k, v in q.losses.items()},
        **{f"vq/{k}": v for k, v in q.metrics.items()},
    }
    return new_state, metrics

  return train_step


def make_eval_step(models: TokenizerModels, config):
  """(params, vq_stats, batch, lpips_params) -> per-batch sums for the evaluator."""
  k = config.model.quantizer.codebook_size

  def eval_step(params, vq_stats, batch, lpips_params) -> dict[str, Any]:
    x, mask = batch["image"], batch["mask"]
    x_hat, q = models.vqgan.apply(_variables(params, vq_stats), x, train=False)
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


def summarize_eval(sums: dict) -> dict[str, float]:
  """Per-batch sums -> means, codebook usage and perplexity over the pass."""
  n = max(float(sums["count"]), 1.0)
  counts = sums["code_counts"]
  return {
      "psnr": float(sums["psnr"]) / n,
      "ssim": float(sums["ssim"]) / n,
      "lpips": float(sums["lpips"]) / n,
      "codebook_usage": float(vq.usage_fraction(counts)),
      "perplexity": float(vq.perplexity(counts)),
      "num_examples": int(n),
  }
