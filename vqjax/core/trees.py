"""Pytree helpers: '/'-joined paths, pattern masks, finite checks and selection."""

from __future__ import annotations

import re
from typing import Iterable

import jax
import jax.numpy as jnp


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_string(path) -> str:
  """A jax key path -> 'encoder/conv_in/kernel'."""
  return "/".join(_key_name(k) for k in path)


def paths(tree) -> list[str]:
  """Every leaf's path, in leaf order."""
  return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def match_mask(tree, patterns: Iterable[str], prefix: str = ""):
  """Tree of bools: True where `prefix + path` fully matches one of the regular expressions."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.fullmatch(prefix + path_string(path)) for c in compiled), tree)


def keep_where(mask, new, old):
  """`old` where the (static, Python bool) mask is True, `new` elsewhere."""
  return jax.tree.map(lambda m, a, b: b if m else a, mask, new, old)


def all_finite(*trees) -> jax.Array:
  """One bool: every element of every leaf is finite (True for empty trees)."""
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def select(pred: jax.Array, new, old):
  """Elementwise `new if pred else old` over matching trees (pred a traced scalar)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def copy_matching(target, source: dict, patterns: Iterable[str], what: str):
  """`target` with every leaf whose path matches a pattern replaced by `source`'s leaf.

  Paths are '/'-joined (e.g. 'params/decoder/conv_out/kernel'). A matched leaf
  that `source` lacks keeps its value (a layer the source does not have).
  Raises ValueError listing the paths when a shape differs, or when a pattern
  copies nothing. Returns (new target, list of copied paths).
  """
  from vqjax.errors import ConfigError

  flat_source = {path_string(p): v for p, v in
                 jax.tree_util.tree_flatten_with_path(source)[0]}
  compiled = {p: re.compile(p) for p in patterns}
  used = {p: 0 for p in patterns}
  copied, mismatched = [], []

  def pick(path, leaf):
    name = path_string(path)
    hits = [p for p, c in compiled.items() if c.fullmatch(name)]
    if not hits or name not in flat_source:
      return leaf
    value = flat_source[name]
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f"{name}: {what} {tuple(value.shape)}, this run {tuple(leaf.shape)}")
      return leaf
    for p in hits:
      used[p] += 1
    copied.append(name)
    return jnp.asarray(value, leaf.dtype)

  out = jax.tree_util.tree_map_with_path(pick, target)
  if mismatched:
    raise ConfigError(f"init_from: shapes differ for {len(mismatched)} path(s): "
                      + "; ".join(mismatched[:10]) + " -- narrow init_from.patterns")
  unused = [p for p, n in used.items() if n == 0]
  if unused:
    raise ConfigError(f"init_from.patterns {unused} match no path present in both {what} and "
                      f"this run; paths here look like {paths(target)[:5]}")
  return out, copied
