"""Device mesh and shardings (DESIGN principle 5).

A `Mesh` with axes ('data', 'model'). Batches are split over `data`.
Parameters carry logical axis names (`vqjax.nn.layers`,
`vqjax.nn.transformers`); `param_shardings` places them, and the optimiser
states that mirror them, for both trainers by `config.mesh.param_sharding`
('replicate', 'channels' or 'fsdp') and the logical -> mesh rules
`config.mesh.rules`. The compiler inserts the collectives.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqjax.errors import ConfigError


def mesh_data_size(c: ml_collections.ConfigDict, num_devices: int) -> int:
  """Size of the `data` mesh axis; raises if (data, model) does not fit the devices."""
  model = c.mesh.model
  if model < 1 or num_devices % model:
    raise ConfigError(f"mesh.model={model} does not divide the {num_devices} devices.")
  data = c.mesh.data if c.mesh.data > 0 else num_devices // model
  if data * model != num_devices:
    raise ConfigError(f"mesh (data={data}, model={model}) needs {data * model} devices, "
                      f"but {num_devices} are visible: set mesh.data=-1 or fix the sizes.")
  return data


def check_batch_split(c: ml_collections.ConfigDict, num_devices: int, process_count: int,
                      fields: tuple[str, ...]) -> None:
  """ConfigError naming the first of `fields` (dotted, e.g. 'train.batch_size') whose batch
  the mesh's data axis and the processes cannot split evenly."""
  data_size = mesh_data_size(c, num_devices)
  multiple = math.lcm(data_size, process_count)
  for name in fields:
    section, field = name.split(".")
    value = c[section][field]
    if value % multiple:
      raise ConfigError(
          f"{name}={value} cannot be split over the mesh's data axis of size {data_size} "
          f"and {process_count} process(es): use a multiple of {multiple}.")


def check_grad_accum(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  """ConfigError unless `train.grad_accum` (k) is an integer >= 1 that splits each process's
  batch (train.batch_size / process_count) into k micro-batches which the mesh's data axis
  can still split: train.batch_size / k a multiple of lcm(data axis, processes), as
  `check_batch_split` asks of a batch. Call it after `check_batch_split`."""
  k, b = c.train.get("grad_accum", 1), c.train.batch_size
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"train.grad_accum={k!r} must be an integer >= 1 (micro-batches per "
                      "update; 1 = no accumulation).")
  per_process, share = b // process_count, mesh_data_size(c, num_devices)
  multiple = math.lcm(share, process_count)  # what a global (micro-)batch must be a multiple of
  fits = [d for d in range(1, per_process + 1) if per_process % d == 0 and (b // d) % multiple == 0]
  if per_process % k:
    raise ConfigError(
        f"train.grad_accum={k} does not divide the per-process batch of {per_process} "
        f"(train.batch_size={b} over {process_count} process(es)): use one of {fits}.")
  if (b // k) % multiple:
    raise ConfigError(
        f"train.grad_accum={k} makes micro-batches of {per_process // k} per process "
        f"(train.batch_size={b} over {process_count} process(es)), which the mesh's data "
        f"axis of size {share} cannot split evenly: use one of {fits}.")


PARAM_SHARDING_MODES = ("replicate", "channels", "fsdp")

# Logical axis -> mesh axis, for the names both trainers' parameters carry (the
# transformer's in vqjax/nn/transformers.py, the tokenizer's in vqjax/nn/layers.py):
# output-channel-like axes go over `model` under mesh.param_sharding='channels'/'fsdp'.
# Quantiser codebooks and their statistics (codes, code_dim) stay whole: they are small,
# and a nearest-code search split over devices can break near-ties differently from one
# device ('fsdp' still splits their largest axis over `data`).
DEFAULT_LOGICAL_RULES = (
    ("embed", None), ("mlp", "model"), ("heads", "model"), ("kv", None), ("vocab", "model"),
    ("conv_height", None), ("conv_width", None), ("conv_in", None), ("conv_out", "model"),
    ("embed_in", None), ("embed_out", "model"), ("codes", None), ("code_dim", None))


def validate_mesh(c: ml_collections.ConfigDict) -> None:
  """`config.mesh.param_sharding` is a known mode and `mesh.rules` maps names to mesh axes."""
  if c.mesh.param_sharding not in PARAM_SHARDING_MODES:
    raise ConfigError(f"mesh.param_sharding must be one of {PARAM_SHARDING_MODES}, "
                      f"not {c.mesh.param_sharding!r}.")
  for rule in c.mesh.rules:
    axes = rule[1] if len(rule) == 2 else None
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    if len(rule) != 2 or not isinstance(rule[0], str) or not all(
        a in (None, "data", "model") for a in axes):
      raise ConfigError(f"mesh.rules entry {tuple(rule)!r} must be (logical axis name, mesh "
                        "axis) with the mesh axis 'data', 'model', a tuple of them, or None.")


def make_mesh(config, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  data = mesh_data_size(config, len(devices))
  # Auto axes: shardings come from in/out_shardings and the compiler inserts the collectives
  # (jax.make_mesh's default, Explicit, would type every array with its sharding).
  return jax.make_mesh((data, config.mesh.model), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


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


def fetch(x) -> np.ndarray:
  """A jax.Array's whole value on this host, also when it spans other processes' devices
  (then gathered: every process must call this together)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order, on the host: the rows its
  `shard_batch` input held (one copy per row when replicated over `model`). No collective."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {}
  for shard in x.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def param_shardings(mesh: Mesh, abstract_boxed, mode: str, rules=()) -> object:
  """NamedShardings for a (possibly abstract) state whose parameters carry logical axis names.

  Every leaf boxed with logical names (`flax.linen.Partitioned`: parameters,
  model statistics, and the copies of them that optax keeps in optimiser
  states, which inherit the boxes) is placed by `mode`
  (`config.mesh.param_sharding`):
  - 'replicate': on every device;
  - 'channels': each named axis on the mesh axes `rules` map it to
    (`config.mesh.rules`; by default the output-channel-like axes conv_out,
    embed_out, mlp, heads and vocab go over `model`, the rest is whole);
  - 'fsdp': as 'channels', and in addition the largest remaining axis whose
    size the `data` axis divides (the later one on a tie) is split over
    `data`, unless a rule already put one of its axes there.
  An axis whose size its mesh axes do not divide stays replicated (e.g. a
  vocabulary of K + classes + 1 rows). Unboxed leaves (step, rng, optimiser
  step counts, running loss statistics) are replicated. The result has the
  structure of the unboxed tree: a prefix of the boxed one, so it serves as
  `in_shardings`/`out_shardings` for either.

  Raises ValueError for an unknown mode, or (outside 'replicate') a leaf with
  a logical axis name that `rules` does not mention.
  """
  if mode not in PARAM_SHARDING_MODES:
    raise ValueError(f"param sharding mode must be one of {PARAM_SHARDING_MODES}, "
                     f"not {mode!r}")
  rules = tuple(map(tuple, rules))
  known = {name for name, _ in rules}
  data_size = mesh.shape["data"]
  is_box = lambda x: isinstance(x, nn.Partitioned)

  def place(path, x) -> NamedSharding:
    if not is_box(x) or mode == "replicate":
      return NamedSharding(mesh, P())
    missing = [n for n in x.names if n is not None and n not in known]
    if missing:
      raise ValueError(f"logical axis {missing[0]!r} of {jax.tree_util.keystr(path)} has no "
                       f"rule in config.mesh.rules {rules}: add ({missing[0]!r}, None) to "
                       "replicate it, or map it to a mesh axis.")
    shape = x.value.shape
    dims = list(nn.logical_to_mesh_axes(x.names, rules))
    dims += [None] * (len(shape) - len(dims))
    for i, axes in enumerate(dims):
      if axes is not None and shape[i] % _axes_size(mesh, axes):
        dims[i] = None
    used = {a for axes in dims if axes is not None for a in _axis_names(axes)}
    if mode == "fsdp" and data_size > 1 and "data" not in used:
      free = [i for i, axes in enumerate(dims) if axes is None and shape[i] % data_size == 0]
      if free:
        dims[max(free, key=lambda i: (shape[i], i))] = "data"
    return NamedSharding(mesh, P(*dims))

  return jax.tree_util.tree_map_with_path(place, abstract_boxed, is_leaf=is_box)


def _axis_names(axes) -> tuple[str, ...]:
  """A PartitionSpec entry ('model' or ('data', 'model')) as a tuple of mesh axis names."""
  return axes if isinstance(axes, tuple) else (axes,)


def _axes_size(mesh: Mesh, axes) -> int:
  """The number of devices a PartitionSpec entry splits an axis into."""
  return int(np.prod([mesh.shape[a] for a in _axis_names(axes)]))
