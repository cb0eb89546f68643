"""Model FLOPs utilisation of the train steps and of AR sampling; one JSON line per step kind.

  python benchmarks/mfu.py                      # the demo-size steps on this machine
  python benchmarks/mfu.py --steps=tokenizer --tokenizer_config=configs/vqgan_imagenet.py \
      --tokenizer_batch=16 --matmul_precision=bfloat16

For each step kind:
  tokenizer    the tokenizer train step (GAN branch on) of `--tokenizer_config`
  transformer  the transformer train step of `--transformer_config` on random tokens
  sampling     GPT sampling with the KV cache (`--sampling_*` sizes)
  gan          the GAN trainer's step (n_critic D updates and one G update) of `--gan_config`
the line gives the model FLOPs per call, calls/s and `fraction_of_peak` = achieved FLOP/s
divided by the device's peak.

FLOPs: the train steps' are XLA's cost analysis of the lowered step (every loss
network included; counted before the backend's rewrites, so CPU and GPU agree).
Sampling is a `lax.scan`, whose body XLA's analysis counts once, so its FLOPs
are counted by formula instead: per generated token 2 x (weights it multiplies
by) plus 4 x depth x width x (cache positions it attends to), summed over the
tokens; `attended_positions` says which positions the sampler attends to.

Peak: on CPU, a float32 matmul of `--peak_matmul` squared, measured in the same
run (best of several). On GPU/TPU, the dense bf16 peak of the device kind
(table below; `peak_source` says which) and, where it runs, a measured bf16
matmul for comparison. `--matmul_precision=bfloat16` runs the steps' float32
matmuls and convolutions as single bf16 passes (f32 storage; full bf16
activations are `config.precision`'s work).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_STEPS = flags.DEFINE_list("steps", ["tokenizer", "transformer", "sampling", "gan"],
                           "step kinds to measure")
_TOK_CONFIG = flags.DEFINE_string("tokenizer_config", "configs/demo.py", "recipe[:variant]")
_TOK_BATCH = flags.DEFINE_integer("tokenizer_batch", 8, "global batch of the tokenizer step")
_TR_CONFIG = flags.DEFINE_string("transformer_config", "configs/maskgit_imagenet.py:demo",
                                 "recipe[:variant]")
_TR_BATCH = flags.DEFINE_integer("transformer_batch", 8, "global batch of the transformer step")
_TR_SIDE = flags.DEFINE_integer("token_side", 16, "token map side of the transformer step")
_TR_CODES = flags.DEFINE_integer("codebook_size", 256, "codebook size of the transformer step")
_SAMPLE_SIZE = flags.DEFINE_string("sampling_size", "256,4,4",
                                   "GPT width,depth,heads for the sampling case")
_CACHE_BLOCKS = flags.DEFINE_integer(
    "cache_blocks", 4, "scans the AR sampler splits its steps into (1: one scan attending "
    "over the whole cache under a mask, as before the blocks)")
_SAMPLE_BATCH = flags.DEFINE_integer("sampling_batch", 8, "images per sampling call")
_GAN_CONFIG = flags.DEFINE_string("gan_config", "configs/fqgan_cifar10.py", "recipe[:variant]")
_GAN_BATCH = flags.DEFINE_integer("gan_batch", 16, "batch of each D and G update")
_ITERS = flags.DEFINE_integer("iters", 5, "timed calls after two untimed ones")
_PEAK_N = flags.DEFINE_integer("peak_matmul", 2048, "side of the peak-measuring matmul")
_LOSS_WEIGHTS = flags.DEFINE_enum(
    "loss_weights", "shipped", ["shipped", "random"],
    "loss networks' weights (LPIPS VGG16): the shipped files, or random values of the same "
    "shapes where the files are not installed (the speed does not depend on them)")
_PRECISION = flags.DEFINE_enum("matmul_precision", "float32", ["float32", "bfloat16"],
                               "precision of the steps' matmuls and convolutions")

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {
    "H100": 989e12,  # SXM; PCIe cards are lower (756e12)
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
}


def load_config(spec: str):
  from vqjax.core.config_files import load_config_file

  return load_config_file(spec)


def time_calls(fn, n: int) -> float:
  """Seconds per call of `fn()` (returning arrays), after two untimed calls."""
  import jax

  for _ in range(2):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n


def measured_matmul(n: int, dtype) -> float:
  """Best FLOP/s of an n x n x n matmul over a few timed rounds."""
  import jax

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  best = min(time_calls(lambda: mm(a, b), 3) for _ in range(3))
  return 2 * n**3 / best


def device_peak() -> dict:
  import jax
  import jax.numpy as jnp

  dev = jax.devices()[0]
  if dev.platform == "cpu":
    peak = measured_matmul(_PEAK_N.value, jnp.float32)
    return {"peak_flops": peak, "peak_source": f"measured f32 matmul {_PEAK_N.value}^3"}
  kind = dev.device_kind
  listed = next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)
  measured = measured_matmul(8192, jnp.bfloat16)
  if listed is None:
    return {"peak_flops": measured, "peak_source": f"measured bf16 matmul 8192^3 ({kind} "
            "is not in the table)"}
  return {"peak_flops": listed, "peak_source": f"data sheet dense bf16 for {kind}",
          "measured_bf16_matmul_flops": measured}


def program_flops(jitted, *args) -> tuple[float, str]:
  """(FLOPs, how they were counted) of one call of `jitted` on `args`.

  XLA's cost analysis of the lowered program, before the backend's rewrites
  (on GPU the compiled program's matmuls become library calls that the
  compiled program's analysis does not count). Where the backend gives no
  analysis of the lowered program, the program lowered for the CPU is
  analysed (the same HLO); the compiled program's count is the last resort.
  """
  def first(cost):
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if cost and "flops" in cost else None

  flops = first(jitted.lower(*args).cost_analysis())
  if flops is not None:
    return flops, "lowered program"
  try:
    flops = first(jitted.trace(*args).lower(lowering_platforms=("cpu",)).cost_analysis())
  except Exception:  # noqa: BLE001  (older JAX: no cross-platform lowering)
    flops = None
  if flops is not None:
    return flops, "program lowered for the CPU"
  return first(jitted.lower(*args).compile().cost_analysis()) or 0.0, (
      "compiled program (library calls not counted: a lower bound)")


def tokenizer_case() -> dict:
  import jax
  import numpy as np

  from vqjax.core import partitioning
  from vqjax.train.tokenizer import build_models, make_train_step, sharded_init

  config = load_config(_TOK_CONFIG.value)
  b = _TOK_BATCH.value
  with config.unlocked():
    config.train.batch_size = b
  models = build_models(config)
  mesh = partitioning.make_mesh(config, jax.devices())
  state, shardings = sharded_init(models, config, mesh, jax.random.PRNGKey(0))
  size = config.data.image_size
  gen = np.random.default_rng(0)
  images = gen.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
  rep = partitioning.replicated(mesh)
  term_params = {}
  for label, term in models.terms.items():
    if not term.weight:
      continue
    if _LOSS_WEIGHTS.value == "shipped":
      term_params[label] = jax.device_put(term.load_params(), rep)
    else:  # same shapes, random values: the speed does not depend on them
      term_params[label] = jax.device_put(term.init_params(jax.random.PRNGKey(1)), rep)
  batch = partitioning.shard_batch({"image": images, "label": np.zeros((b,), np.int32)}, mesh)
  step = jax.jit(make_train_step(models, config, gan=True),
                 in_shardings=(shardings, partitioning.batch_sharding(mesh), rep),
                 out_shardings=(shardings, rep), donate_argnums=0)
  flops, counted = program_flops(step, state, batch, term_params)
  box = {"state": state}

  def call():
    box["state"], metrics = step(box["state"], batch, term_params)
    return metrics

  return {"config": _TOK_CONFIG.value, "batch_size": b, "image_size": size,
          "loss_network_weights": _LOSS_WEIGHTS.value, "flops_per_call": flops,
          "flops_counted_from": counted,
          "seconds_per_call": time_calls(call, _ITERS.value)}


def transformer_case() -> dict:
  import jax
  import numpy as np

  from vqjax.core import partitioning
  from vqjax.train.transformer_step import (
    build_objective,
    make_optimizer,
    make_train_step,
    sharded_init,
  )

  config = load_config(_TR_CONFIG.value)
  b, side, k = _TR_BATCH.value, _TR_SIDE.value, _TR_CODES.value
  objective = build_objective(config, (side, side), k)
  tx = make_optimizer(config)
  mesh = partitioning.make_mesh(config, jax.devices())
  state, shardings = sharded_init(objective, tx, config, mesh, jax.random.PRNGKey(0))
  gen = np.random.default_rng(0)
  batch = partitioning.shard_batch(
      {"tokens": gen.integers(0, k, (b, side, side)).astype(np.int32),
       "label": gen.integers(0, max(config.model.num_classes, 1), (b,)).astype(np.int32)}, mesh)
  step = jax.jit(make_train_step(objective, tx), in_shardings=(
      shardings, partitioning.batch_sharding(mesh)), donate_argnums=0)
  flops, counted = program_flops(step, state, batch)
  box = {"state": state}

  def call():
    box["state"], metrics = step(box["state"], batch)
    return metrics

  return {"config": _TR_CONFIG.value, "objective": config.model.objective.name,
          "batch_size": b, "tokens": side * side, "width": config.model.width,
          "depth": config.model.depth, "flops_per_call": flops, "flops_counted_from": counted,
          "seconds_per_call": time_calls(call, _ITERS.value)}


def sampling_case() -> dict:
  import jax
  import jax.numpy as jnp

  from vqjax.nn.transformers import GPT
  from vqjax.sampling import autoregressive as ar

  width, depth, heads = (int(v) for v in _SAMPLE_SIZE.value.split(","))
  b, n, k = _SAMPLE_BATCH.value, _TR_SIDE.value ** 2, _TR_CODES.value
  gpt = GPT(codebook_size=k, seq_len=n, num_conditions=10, cond_len=1, width=width,
            depth=depth, heads=heads, mlp_dim=4 * width, dropout=0.0)
  labels = jnp.arange(b) % 10
  params = jax.jit(gpt.init)(jax.random.PRNGKey(0), jnp.zeros((b, n), jnp.int32), labels)
  prefix = gpt.prefix_ids(labels)
  run = jax.jit(lambda p, r: ar.sample(
      lambda i, c, x: gpt.apply(p, i, c, x, method=GPT.decode), gpt.init_cache(b), prefix, n,
      r, top_k=100, cache_blocks=_CACHE_BLOCKS.value))
  visible = ar.attended_lengths(prefix.shape[1], n, _CACHE_BLOCKS.value)
  # Per fed position: q/k/v/out (4 w^2) and MLP (2 w * 4w) per layer, the head (w * K);
  # attention scores and values: 2 x 2 x width per attended position per layer.
  dense = depth * (4 * width**2 + 8 * width**2) + width * k
  fed = prefix.shape[1] + n - 1  # the prefix once, then every token but the last
  attended = sum(visible)
  flops = b * (2 * dense * fed + 4 * depth * width * attended)
  key = jax.random.PRNGKey(1)
  return {"width": width, "depth": depth, "heads": heads, "batch_size": b, "tokens": n,
          "cache_blocks": _CACHE_BLOCKS.value,
          "attended_positions": f"{attended} of {fed * (prefix.shape[1] + n)}",
          "flops_per_call": flops, "flops_counted_from": "formula (see the docstring)",
          "seconds_per_call": time_calls(lambda: run(params, key), max(_ITERS.value // 2, 1))}


def gan_case() -> dict:
  import numpy as np

  from vqjax.core import partitioning
  from vqjax.train import gan

  config = load_config(_GAN_CONFIG.value)
  with config.unlocked():
    config.train.batch_size = _GAN_BATCH.value
  s = gan.setup(config)
  b, k = _GAN_BATCH.value, config.train.n_critic
  gen = np.random.default_rng(0)
  size = config.data.image_size
  batch = partitioning.shard_batch(
      {"image": gen.uniform(-1, 1, (k * b, size, size, 3)).astype(np.float32),
       "label": gen.integers(0, max(config.model.num_classes, 1), (k * b,)).astype(np.int32)},
      s.mesh)
  flops, counted = program_flops(s.train_step, s.state, batch)
  box = {"state": s.state}

  def call():
    box["state"], metrics = s.train_step(box["state"], batch)
    return metrics

  return {"config": _GAN_CONFIG.value, "batch_size": b, "n_critic": k,
          "fq_layers": list(config.disc.fq_layers), "flops_per_call": flops,
          "flops_counted_from": counted, "seconds_per_call": time_calls(call, _ITERS.value)}


CASES = {"tokenizer": tokenizer_case, "transformer": transformer_case,
         "sampling": sampling_case, "gan": gan_case}


def main(argv):
  del argv
  import jax

  unknown = set(_STEPS.value) - set(CASES)
  if unknown:
    raise app.UsageError(f"unknown step kinds {sorted(unknown)}: use {sorted(CASES)}")
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  peak = device_peak()
  common = {"benchmark": "mfu", "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "matmul_precision": _PRECISION.value}
  for kind in _STEPS.value:
    r = CASES[kind]()
    flops, seconds = r.pop("flops_per_call"), r.pop("seconds_per_call")
    achieved = flops / seconds / jax.device_count()
    print(json.dumps({
        **common, "step": kind, **r, "ms_per_call": round(1000 * seconds, 2),
        "gflop_per_call": round(flops / 1e9, 3),
        "achieved_tflops_per_device": round(achieved / 1e12, 4),
        "peak_tflops_per_device": round(peak["peak_flops"] / 1e12, 4),
        "peak_source": peak["peak_source"],
        **({"measured_bf16_matmul_tflops": round(peak["measured_bf16_matmul_flops"] / 1e12, 1)}
           if "measured_bf16_matmul_flops" in peak else {}),
        "fraction_of_peak": round(achieved / peak["peak_flops"], 4),
    }), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
