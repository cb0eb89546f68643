"""Sampling speed of MaskGIT (T steps) and AR (one token per step, with and without KV cache).

  python benchmarks/sampling.py --sizes=smoke,base --batch_size=4

Prints one JSON line per case: ms per image and tokens/s. Models have
random weights (speed does not depend on them); 16x16 = 256 tokens,
K = 1024, class-conditional. The recompute-everything AR decoder runs only
at `--nocache_sizes` (at base size on a CPU it would take many minutes).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["smoke", "base"], "model sizes to time")
_BATCH = flags.DEFINE_integer("batch_size", 4, "images per sampling call")
_TOKENS = flags.DEFINE_integer("side", 16, "token map side (tokens = side^2)")
_STEPS = flags.DEFINE_integer("maskgit_steps", 12, "MaskGIT decoding steps")
_NOCACHE = flags.DEFINE_list("nocache_sizes", ["smoke"],
                             "sizes at which to also time AR without the cache")

SIZES = {  # (width, depth, heads)
    "smoke": (128, 2, 4),
    "small": (256, 4, 4),
    "base": (768, 24, 12),
    "L": (1024, 24, 16),
}


def _time(fn, *args):
  import jax

  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, compile_s


def bench_size(size: str, b: int, n: int, k: int, report) -> None:
  import jax
  import jax.numpy as jnp

  from vqjax.nn.transformers import GPT, MaskGITTransformer
  from vqjax.sampling import autoregressive as ar
  from vqjax.sampling import maskgit

  width, depth, heads = SIZES[size]
  labels = jnp.arange(b) % 1000
  mg = MaskGITTransformer(codebook_size=k, seq_len=n, num_conditions=1000, width=width,
                          depth=depth, heads=heads, mlp_dim=4 * width, dropout=0.0)
  start = jnp.full((b, n), mg.mask_id, jnp.int32)
  mg_params = jax.jit(mg.init)(jax.random.PRNGKey(0), start, labels)
  run_mg = jax.jit(lambda p, r: maskgit.decode(
      lambda t: mg.apply(p, t, labels), start, mg.mask_id, r, _STEPS.value)[0])
  report("maskgit", size, *_time(run_mg, mg_params, jax.random.PRNGKey(1)),
         steps=_STEPS.value)
  del mg_params

  gpt = GPT(codebook_size=k, seq_len=n, num_conditions=1000, cond_len=1, width=width,
            depth=depth, heads=heads, mlp_dim=4 * width, dropout=0.0)
  params = jax.jit(gpt.init)(jax.random.PRNGKey(0), jnp.zeros((b, n), jnp.int32), labels)
  prefix = gpt.codebook_size + labels[:, None]

  def decode_fn(p, ids, cache, index):
    return gpt.apply(p, ids, cache, index, method=GPT.decode)

  run_cached = jax.jit(lambda p, r: ar.sample(
      lambda i, c, x: decode_fn(p, i, c, x), gpt.init_cache(b), prefix, n, r, top_k=100))
  cached_s, cached_c = _time(run_cached, params, jax.random.PRNGKey(2))
  report("ar_kv_cache", size, cached_s, cached_c)
  if size in _NOCACHE.value:
    run_full = jax.jit(lambda p, r: ar.sample_without_cache(
        lambda ids: decode_fn(p, ids, None, 0)[0], prefix, n, r, top_k=100))
    full_s, full_c = _time(run_full, params, jax.random.PRNGKey(2))
    report("ar_no_cache", size, full_s, full_c, cache_speedup=round(full_s / cached_s, 1))


def main(argv):
  del argv
  import jax

  b, n, k = _BATCH.value, _TOKENS.value ** 2, 1024
  common = {"benchmark": "sampling", "batch_size": b, "tokens": n, "codebook_size": k,
            "platform": jax.devices()[0].platform}

  def report(case, size, seconds, compile_s, **extra):
    print(json.dumps({**common, "case": case, "size": size,
                      "ms_per_image": round(1000 * seconds / b, 2),
                      "tokens_per_s": round(b * n / seconds, 1),
                      "compile_s": round(compile_s, 2), **extra}), flush=True)

  for size in _SIZES.value:
    bench_size(size, b, n, k, report)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
