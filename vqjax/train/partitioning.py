"""Device mesh and shardings (DESIGN principle 5).

A `Mesh` with axes ('data', 'model'). Batches are split over `data`;
parameters are replicated or have their output-channel axis split over
`model` (config.mesh.param_sharding). The compiler inserts the collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqjax.config_lib import mesh_data_size


def make_mesh(config, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  data = mesh_data_size(config, len(devices))
  grid = mesh_utils.create_device_mesh((data, config.mesh.model), devices=devices)
  return Mesh(grid, ("data", "model"))


def param_partition_spec(x, mode: str, model_size: int) -> P:
  """PartitionSpec of one parameter (or optimizer-state leaf) under `mode`."""
  shape = np.shape(x)
  if mode == "channels" and len(shape) >= 2 and model_size > 1 and shape[-1] % model_size == 0:
    return P(*([None] * (len(shape) - 1)), "model")
  return P()


def tree_shardings(mesh: Mesh, tree, mode: str):
  """NamedSharding for every leaf of a (possibly abstract) pytree."""
  model_size = mesh.shape["model"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_partition_spec(x, mode, model_size)),
                      tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over `data`, replicated over `model`."""
  return NamedSharding(mesh, P("data"))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Per-process NumPy batch -> global jax.Arrays split over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def logical_shardings(mesh: Mesh, abstract_boxed, rules) -> object:
  """NamedShardings for a tree of logically partitioned (boxed) leaves under `rules`.

  A dimension whose size the mapped mesh axes do not divide (e.g. a
  vocabulary of K + classes + 1 rows) stays replicated instead of failing.
  """
  import flax.linen as nn

  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), tuple(map(tuple, rules)))
  spec_leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, P))
  arrays = jax.tree.leaves(nn.unbox(abstract_boxed))

  def fit(x, spec: P) -> NamedSharding:
    dims = list(spec) + [None] * (len(x.shape) - len(spec))
    for i, axes in enumerate(dims):
      names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      if names and x.shape[i] % int(np.prod([mesh.shape[n] for n in names])):
        dims[i] = None
    return NamedSharding(mesh, P(*dims))

  return jax.tree.unflatten(treedef, [fit(x, s) for x, s in zip(arrays, spec_leaves,
                                                                  strict=True)])
