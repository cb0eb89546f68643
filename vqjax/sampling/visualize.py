"""SeQ-GAN's visualisation pipeline (Sec. 3.2): what an AR model predicts under teacher forcing.

The ground-truth token sequence goes through the causal model once; the
top-1 prediction at every position is the model's guess of that token given
all the true tokens before it. Decoding both sequences with the tokenizer
shows which image content the transformer has learned.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


def teacher_forced_top1(logits_fn: Callable, tokens, cond):
  """(top-1 predictions [B, N], per-example accuracy [B]) in one forward pass.

  `logits_fn(tokens, cond) -> [B, N, K]` returns, at position i, the logits
  of token i given tokens < i and the condition (e.g. `GPT.__call__`).
  """
  logits = logits_fn(tokens, cond)
  pred = jnp.argmax(logits, axis=-1).astype(tokens.dtype)
  return pred, jnp.mean((pred == tokens).astype(jnp.float32), axis=1)
