"""Tokenizer evaluation over the validation split (SPEC section 7).

PSNR, SSIM, LPIPS averaged over images; codebook usage (fraction of codes
hit over the whole pass) and perplexity of the pass's code histogram.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from vqjax.data.pipeline import eval_batches
from vqjax.train import partitioning
from vqjax.train.loop import image_grid, write_images, write_json
from vqjax.train.tokenizer import summarize_eval


def evaluate_tokenizer(eval_step, params, vq_stats, lpips_params, config,
                       mesh) -> tuple[dict, np.ndarray | None]:
  """One pass over the val split; returns (metrics, grid of the first batch)."""
  totals = None
  grid = None
  for i, batch in enumerate(eval_batches(config, jax.process_index(), jax.process_count())):
    device_batch = partitioning.shard_batch(batch, mesh)
    sums, x_hat = eval_step(params, vq_stats, device_batch, lpips_params)
    sums = jax.device_get(sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if i == 0 and jax.process_count() == 1:
      grid = image_grid([batch["image"], np.asarray(jax.device_get(x_hat))])
  if totals is None:
    raise ValueError("the validation split yielded no images: check config.data and "
                     "config.eval.max_examples")
  return summarize_eval(totals), grid


def write_eval(writer, workdir: str, step: int, metrics: dict, grid: np.ndarray | None) -> str:
  """Scalars to TensorBoard (prefix eval/), `workdir/eval_<step>.json`, and the grid."""
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  if grid is not None:
    write_images(writer, workdir, step, "eval_reconstructions", grid)
  path = os.path.join(workdir, f"eval_{step}.json")
  if jax.process_index() == 0:
    write_json(path, {"step": step, **metrics})
  logging.info("eval at step %d: %s", step, metrics)
  print(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()), flush=True)
  return path
