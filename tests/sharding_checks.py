"""Checks shared by the 8-fake-device sharding scripts (tokenizer and transformer)."""

import jax


def mesh_axes(x) -> set:
  """The mesh axes an array's sharding splits it over."""
  return {a for axes in x.sharding.spec if axes is not None
          for a in (axes if isinstance(axes, tuple) else (axes,))}


def check_opt_state_follows_params(params, opt_state) -> None:
  """optax's copies of the parameter tree (Adam's mu and nu) have their parameter's
  sharding; step counts and other scalars are replicated."""
  specs = {jax.tree_util.keystr(p): x.sharding for p, x in
           jax.tree_util.tree_flatten_with_path(params)[0]}
  mirrored = 0
  for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    key = jax.tree_util.keystr(path)
    hits = [sh for k, sh in specs.items() if key.endswith(k)]
    if x.ndim == 0:
      assert x.sharding.is_fully_replicated, key
    else:
      assert len(hits) == 1 and x.sharding == hits[0], (key, x.sharding)
      mirrored += 1
  assert mirrored == 2 * len(specs), (mirrored, len(specs))
