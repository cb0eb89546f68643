"""A sharded `.npy` store of token maps (and labels), written resumably, read by Grain.

Layout of a store folder:
  meta.json                   token shape, codebook size, shard list, `complete`
  tokens_00000.npy  [n, h, w] or [n, h, w, c] (int16 when K <= 32767, else int32)
  labels_00000.npy  [n] int32
  conditions_00000.npy  [n, h', w'] int16/int32, only in stores with condition maps: the
                    semantic ids of each example's label map on a grid (Reg-VQ's
                    semantic image synthesis); meta.json says `condition_shape`
Each shard is written to a temporary name and renamed, and `meta.json`
(also replaced atomically) lists only finished shards. A killed writer
therefore leaves a consistent store, and `TokenStoreWriter.num_done` says
how many examples to skip when it is reopened.
"""

from __future__ import annotations

import json
import os
import shlex

import numpy as np

from vqjax.errors import UserError


class TokenStoreError(UserError, ValueError):
  """A token store that does not fit the request, or is damaged; the message says what to do."""


def _write_npy(path: str, array: np.ndarray) -> None:
  tmp = f"{path}.tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def _write_json(path: str, payload: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _dtype(codebook_size: int):
  return np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32


class TokenStoreWriter:
  """Appends (tokens, labels[, condition maps]) batches; flushes every `shard_size` examples.

  `condition_shape` (h', w'), when given, makes every `add` take condition maps of that shape.
  """

  def __init__(self, folder: str, token_shape: tuple[int, ...], codebook_size: int,
               shard_size: int = 10_000, source: dict | None = None,
               condition_shape: tuple[int, ...] | None = None):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    self.meta_path = os.path.join(folder, "meta.json")
    meta = {"token_shape": list(token_shape), "codebook_size": int(codebook_size),
            "source": source or {}, "shards": [], "complete": False, "format": 1}
    if condition_shape is not None:
      meta["condition_shape"] = list(condition_shape)
    if os.path.exists(self.meta_path):
      with open(self.meta_path) as f:
        old = json.load(f)
      for key in ("token_shape", "codebook_size", "source", "condition_shape"):
        if old.get(key) != meta.get(key):
          raise TokenStoreError(
              f"{folder} already holds tokens with {key}={old.get(key)!r}, "
              f"not {meta.get(key)!r}: "
              "use another token directory, or delete this one to start over")
      meta = old
    self.meta = meta
    self.shard_size = shard_size
    self.dtype = _dtype(codebook_size)
    self._tokens: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []
    self._conditions: list[np.ndarray] = []
    self._positions: list[np.ndarray] = []
    self._buffered = 0
    _write_json(self.meta_path, self.meta)

  @property
  def num_done(self) -> int:
    """Examples already stored in finished shards (skip these when resuming)."""
    return sum(s["count"] for s in self.meta["shards"])

  @property
  def complete(self) -> bool:
    return bool(self.meta["complete"])

  @property
  def next_position(self) -> int | None:
    """The source position after the last stored example: where a resumed extraction starts
    (0 for an empty store; None for a store written without positions, by an older vqjax)."""
    shards = self.meta["shards"]
    return shards[-1].get("end_position") if shards else 0

  def add(self, tokens: np.ndarray, labels: np.ndarray,
          conditions: np.ndarray | None = None, positions: np.ndarray | None = None) -> None:
    """Append a batch; `positions` (each example's index in its source) are recorded per
    shard as `end_position`, the position after its last example (`next_position`)."""
    tokens = np.asarray(tokens)
    if tokens.shape[1:] != tuple(self.meta["token_shape"]):
      raise TokenStoreError(f"tokens of shape {tokens.shape[1:]}, store expects "
                            f"{tuple(self.meta['token_shape'])}")
    shape = self.meta.get("condition_shape")
    if (conditions is None) != (shape is None) or (
        conditions is not None and np.shape(conditions)[1:] != tuple(shape)):
      got = None if conditions is None else np.shape(conditions)[1:]
      raise TokenStoreError(f"condition maps of shape {got}, store expects "
                            f"{None if shape is None else tuple(shape)}")
    if conditions is not None:
      self._conditions.append(np.ascontiguousarray(conditions, dtype=np.int32))
    self._tokens.append(tokens.astype(self.dtype))
    self._labels.append(np.asarray(labels, np.int32))
    if positions is not None:
      self._positions.append(np.asarray(positions, np.int64).reshape(-1))
    self._buffered += tokens.shape[0]
    while self._buffered >= self.shard_size:
      self._flush(self.shard_size)

  def _flush(self, count: int) -> None:
    tokens = np.concatenate(self._tokens)
    labels = np.concatenate(self._labels)
    index = len(self.meta["shards"])
    names = (f"tokens_{index:05d}.npy", f"labels_{index:05d}.npy")
    _write_npy(os.path.join(self.folder, names[0]), tokens[:count])
    _write_npy(os.path.join(self.folder, names[1]), labels[:count])
    shard = {"tokens": names[0], "labels": names[1], "count": int(count)}
    if self._conditions:
      conditions = np.concatenate(self._conditions)
      shard["conditions"] = f"conditions_{index:05d}.npy"
      _write_npy(os.path.join(self.folder, shard["conditions"]), conditions[:count])
      self._conditions = [conditions[count:]]
    if self._positions:
      positions = np.concatenate(self._positions)
      shard["end_position"] = int(positions[count - 1]) + 1
      self._positions = [positions[count:]]
    self.meta["shards"].append(shard)
    _write_json(self.meta_path, self.meta)
    self._tokens, self._labels = [tokens[count:]], [labels[count:]]
    self._buffered -= count

  def finish(self) -> None:
    if self._buffered:
      self._flush(self._buffered)
    self.meta["complete"] = True
    _write_json(self.meta_path, self.meta)


class TokenStore:
  """Random-access source over a finished store: record i -> {'tokens', 'label'} and, in a
  store with condition maps, 'condition' [h', w'] int32."""

  def __init__(self, folder: str, require_complete: bool = True):
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
      raise TokenStoreError(f"no token store in {folder} (meta.json missing): extract tokens "
                            "first with --mode=tokenize")
    with open(meta_path) as f:
      self.meta = json.load(f)
    if require_complete and not self.meta["complete"]:
      raise TokenStoreError(f"the token store in {folder} is incomplete: rerun --mode=tokenize "
                            "with the same settings to finish it")
    self.folder = folder
    dtype = _dtype(self.codebook_size)
    for s in self.meta["shards"]:
      self._check_shard(s["tokens"], dtype, (s["count"], *self.token_shape))
      self._check_shard(s["labels"], np.int32, (s["count"],))
      if self.condition_shape is not None:
        if "conditions" not in s:
          raise TokenStoreError(f"meta.json of {folder} lists a shard without condition maps "
                                f"in a store that has them: {self.rebuild_hint()}")
        self._check_shard(s["conditions"], np.int32, (s["count"], *self.condition_shape))
    self._tokens = [np.load(os.path.join(folder, s["tokens"]), mmap_mode="r")
                    for s in self.meta["shards"]]
    self._conditions = ([np.load(os.path.join(folder, s["conditions"]), mmap_mode="r")
                         for s in self.meta["shards"]]
                        if self.condition_shape is not None else None)
    self._labels = [np.load(os.path.join(folder, s["labels"])) for s in self.meta["shards"]]
    self._starts = np.cumsum([0] + [s["count"] for s in self.meta["shards"]])

  def _check_shard(self, name: str, dtype, shape: tuple[int, ...]) -> None:
    """Raise TokenStoreError unless shard file `name` is a whole .npy of `dtype` and `shape`."""
    path = os.path.join(self.folder, name)
    try:
      with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        got_shape, fortran, got_dtype = read_header(f)
        data_start = f.tell()
      size = os.path.getsize(path)
    except FileNotFoundError:
      raise TokenStoreError(f"token shard {path} is missing: {self.rebuild_hint()}") from None
    except (OSError, ValueError) as e:
      raise TokenStoreError(f"token shard {path} is not a readable .npy file ({e}): "
                            f"{self.rebuild_hint()}") from None
    if got_dtype != np.dtype(dtype) or tuple(got_shape) != tuple(shape) or fortran:
      raise TokenStoreError(
          f"token shard {path} holds {got_dtype} {tuple(got_shape)}, but meta.json says "
          f"{np.dtype(dtype)} {tuple(shape)}: {self.rebuild_hint()}")
    expected = data_start + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size != expected:
      raise TokenStoreError(
          f"token shard {path} is {size} bytes, but {tuple(shape)} {np.dtype(dtype)} needs "
          f"{expected} (the file is {'truncated' if size < expected else 'too long'}): "
          f"{self.rebuild_hint()}")

  def rebuild_hint(self) -> str:
    """What to run to write this store again, from what its meta.json records."""
    source = self.meta.get("source") or {}
    workdir = source.get("tokenizer_workdir")
    split = (source.get("data") or {}).get("split")
    folder = os.path.abspath(self.folder)
    args = [f"--workdir={shlex.quote(workdir)}" if workdir else "--workdir=<the tokenizer workdir>",
            "--mode=tokenize"]
    if split:
      args.append(f"--config.tokenize.split={shlex.quote(split)}")
    if not (workdir and split and folder == os.path.join(workdir, f"tokens_{split}")):
      args.append(f"--config.tokenize.output_dir={shlex.quote(folder)}")
    command = " ".join(["python -m vqjax.main --config=<the tokenizer recipe>", *args])
    data = source.get("data") or {}
    described = ", ".join(f"{k}={data[k]}" for k in ("source", "name", "folder", "split",
                                                     "image_size") if data.get(k))
    return (f"delete {self.folder} and rebuild it with `{command}`"
            + (f" (the store was written from data {described})" if described else ""))

  @property
  def token_shape(self) -> tuple[int, ...]:
    return tuple(self.meta["token_shape"])

  @property
  def codebook_size(self) -> int:
    return int(self.meta["codebook_size"])

  @property
  def condition_shape(self) -> tuple[int, ...] | None:
    """(h', w') of the stored condition maps, None in a store without them."""
    shape = self.meta.get("condition_shape")
    return None if shape is None else tuple(shape)

  def max_label(self) -> int:
    return max((int(x.max()) for x in self._labels if x.size), default=-1)

  def max_condition(self) -> int:
    """The largest stored condition id (-1 if there are none)."""
    return max((int(np.max(x)) for x in self._conditions or () if x.size), default=-1)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(index)
    shard = int(np.searchsorted(self._starts, index, side="right") - 1)
    row = index - int(self._starts[shard])
    record = {"tokens": np.asarray(self._tokens[shard][row], np.int32),
              "label": self._labels[shard][row]}
    if self._conditions is not None:
      record["condition"] = np.asarray(self._conditions[shard][row], np.int32)
    return record
