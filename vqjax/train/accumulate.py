"""Gradient accumulation (`config.train.grad_accum` = k): k micro-batches per optimiser update.

Every trainer's jitted step splits the per-process batch [B, ...] into k micro-batches of
B / k rows (`split`: micro-batch j holds rows j, j + k, j + 2k, ...), runs the forward and
backward pass of each, adds up what the update needs (gradients, loss sums, codebook
statistics) and makes one optimiser update. A data-sharded global batch holds contiguous
rows on each device, so the strided split gives every micro-batch an equal share of every
device and moves no data (`vqjax.core.partitioning.check_grad_accum` asks that B / k still
splits over the mesh's data axis). grad_accum = 1 runs the trainers' plain programs, which
never call this module.

The loop (`accumulate`) is a `lax.scan` on accelerators and a Python-unrolled loop on CPU
(`loop='auto'`):

* A scan runs one micro-batch at a time: its activations are freed before the next one
  runs, which is the point of accumulating (a batch that does not fit in memory). XLA may
  interleave the micro-batches of an unrolled loop and keep several alive at once.
* On XLA:CPU a convolution inside a loop body (scan, while, cond) compiles to a loop about
  15x slower than the same straight-line code, and memory is rarely the constraint there.
* XLA's cost analysis (benchmarks/mfu.py) counts a scan's body once.

Both loops add the same values in the same order; tests/test_grad_accum.py checks that they
agree to float tolerance.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LOOPS = ("auto", "scan", "unroll")


def split(tree: Any, k: int) -> Any:
  """Leaves [B, ...] -> [k, B / k, ...]; micro-batch j holds rows j, j + k, j + 2k, ...."""
  def one(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"a batch of {b} rows does not split into {k} micro-batches")
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)

  return jax.tree.map(one, tree)


def use_scan(loop: str = "auto") -> bool:
  """Whether `accumulate` scans: 'scan', 'unroll', or 'auto' (scan unless on CPU)."""
  if loop not in LOOPS:
    raise ValueError(f"accumulation loop must be one of {LOOPS}, not {loop!r}")
  return loop == "scan" or (loop == "auto" and jax.default_backend() != "cpu")


def zeros_like(tree: Any) -> Any:
  """Zeros with the shapes and dtypes of a tree of arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def accumulate(fn: Callable, xs: Any, carry: Any, loop: str = "auto") -> tuple[Any, Any]:
  """Runs `summand_j, carry = fn(j, x_j, carry)` over the micro-batches x_j of `xs` (leaves
  [k, ...], from `split`) in order; returns (sum over j of summand_j, the last carry).

  `summand` is a tree of arrays added up in micro-batch order (starting from zeros);
  `carry` is threaded from one micro-batch to the next (e.g. codebook statistics summed so
  far, the state after the latest micro-batch) and must keep its structure. `j` is a Python
  int (unrolled) or a traced int32 (scan).
  """
  k = jax.tree.leaves(xs)[0].shape[0]
  first = jax.tree.map(lambda x: x[0], xs)
  total = zeros_like(jax.eval_shape(lambda x, c: fn(0, x, c)[0], first, carry))
  add = lambda a, b: jax.tree.map(jnp.add, a, b)
  if use_scan(loop):
    def body(state, inputs):
      total, carry = state
      j, x = inputs
      summand, carry = fn(j, x, carry)
      return (add(total, summand), carry), None

    (total, carry), _ = jax.lax.scan(body, (total, carry),
                                     (jnp.arange(k, dtype=jnp.int32), xs))
    return total, carry
  for j in range(k):
    summand, carry = fn(j, jax.tree.map(lambda x, j=j: x[j], xs), carry)
    total = add(total, summand)
  return total, carry


def mean(tree: Any, k: int) -> Any:
  """A sum over k micro-batches -> their mean: floating leaves keep their dtype, integer
  ones (counts) become float32 means."""
  def one(v):
    if jnp.issubdtype(v.dtype, jnp.floating):
      return v / jnp.asarray(k, v.dtype)
    return v.astype(jnp.float32) / k

  return jax.tree.map(one, tree)
