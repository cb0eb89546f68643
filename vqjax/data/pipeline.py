"""Grain input pipelines: decode, resize + crop, flip, scale to [-1, 1], batch.

With `config.data.label_maps`, each example's semantic label map goes through the same
resize (nearest neighbour), crop and flip as its image, and batches gain 'label_map'
[B, H, W] int32 (`vqjax.data.label_maps`).

Deterministic given a seed; the training iterator's state (`get_state()`)
is saved with every checkpoint so a resumed run sees the same batches.
Multi-host: each process reads a disjoint slice of the source and yields its
share of the global batch.
"""

from __future__ import annotations

import math
import threading

import grain
import numpy as np
from PIL import Image

from vqjax.console import warn
from vqjax.data import label_maps
from vqjax.data.images import ImageDecodeError, array_to_rgb, decode_image
from vqjax.data.rows import distinct_positions, process_rows
from vqjax.data.sources import ImagesNotDecodableError, build_source
from vqjax.data.workers import WorkerBatches

# Paths already warned about in this process: every pipeline over the same files (each
# periodic evaluation builds one) warns about a bad file once, not once per pass.
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()
# Label-map modes whose maps come with the record (the others: none, or derived from pixels).
_MAPS_IN_RECORD = ("paired", "tfds")
_NO_MAP = "no label map"


class Preprocess:
  """record -> {'image': float32 [S, S, 3] in [-1, 1], 'label': int32}, or None if corrupt.

  With `label_maps` (config.data.label_maps) the result also has 'label_map' int32 [S, S]:
  'paired' / 'tfds' decode the record's map (`vqjax.data.label_maps.decode_label_map`),
  check its size and ids (a LabelMapError otherwise, fatal) and resize it by nearest
  neighbour onto the image's resize, crop and flip; 'colour_clusters' derives it from the
  final uint8 pixels (`colour_cluster_ids`). A record whose 'label_map' is None (an image
  without a map) is skipped and counted in `num_corrupt` (and `num_without_map`) without a
  warning line of its own: the source warned once.

  Used with `MapDataset.random_map`, which hands each element its own
  generator seeded from (seed, index): crops and flips are reproducible.
  Images are decoded by `vqjax.data.images` (file bytes or arrays alike). One
  that cannot be decoded is skipped, warned about once per process and counted
  once: `num_corrupt` is the number of distinct failing files, however often
  Grain's read-ahead or the epochs meet them. When `num_files` (the distinct
  files this pipeline reads) is given and every one of them has failed,
  ImagesNotDecodableError naming `root` is raised instead of an endless stream
  of skips. In Grain worker processes a copy (`for_workers`) does the decoding and
  hands its failures to this object (`take_failures` -> `record_failures`), which
  warns, counts and raises as above.
  """

  def __init__(self, image_size: int, resize_shorter: int, random_crop: bool, random_flip: bool,
               num_files: int | None = None, root: str = "", label_maps: str = "",
               semantic_classes: int = 0, label_map_channel: int = -1):
    self.image_size = image_size
    self.resize_shorter = max(resize_shorter, image_size)
    self.random_crop = random_crop
    self.random_flip = random_flip
    self.num_files = num_files
    self.root = root
    self.label_maps = label_maps
    self.semantic_classes = semantic_classes
    self.label_map_channel = label_map_channel
    self._failed: dict[str, str] = {}  # path -> why it failed, first failure first
    self.decoded_any = False
    self._lock = threading.Lock()
    self._outbox: list | None = None  # a workers' copy (`for_workers`): failures to hand on

  def __getstate__(self) -> dict:  # picklable (Grain's worker processes): the lock stays
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def for_workers(self) -> Preprocess:
    """A copy for worker processes (`vqjax.data.workers`): it neither warns, counts against
    `num_files` nor raises for an undecodable file, but queues each file's first failure
    for `take_failures()`, whose lists the main process hands to this object's
    `record_failures`."""
    clone = Preprocess.__new__(Preprocess)
    clone.__setstate__({**self.__getstate__(), "num_files": None, "_failed": {},
                        "decoded_any": False, "_outbox": []})
    return clone

  def take_failures(self) -> list[tuple[str, str]]:
    """(path, why) of the files that failed for the first time since the last call."""
    with self._lock:
      out, self._outbox = self._outbox, []
    return out

  def record_failures(self, failures) -> None:
    """Count, and warn about, failures met elsewhere (`take_failures` of workers' copies)
    as if met here: each distinct file once; ImagesNotDecodableError once all have failed."""
    for path, why in failures:
      self._failed_once(path, why)

  @property
  def num_corrupt(self) -> int:
    """Distinct files (records) that failed to decode so far."""
    with self._lock:
      return len(self._failed)

  @property
  def num_without_map(self) -> int:
    """Distinct images skipped so far for having no label map (also in `num_corrupt`)."""
    with self._lock:
      return sum(why == _NO_MAP for why in self._failed.values())

  def not_decodable_error(self) -> ImagesNotDecodableError:
    """The error for a pipeline none of whose images decoded (names the folder)."""
    with self._lock:
      n, (path, why) = len(self._failed), next(iter(self._failed.items()), ("?", "?"))
    return ImagesNotDecodableError(
        f"the image files under {self.root or '?'} could not be decoded (none of the {n} read "
        f"did; first: {path}: {why}): replace them with readable images, or point "
        "config.data.folder / config.data.val_folder at a folder that holds some")

  def _decode(self, record: dict) -> np.ndarray | None:
    path = str(record.get("path", "?"))
    with self._lock:
      if path in self._failed:  # decoding is deterministic: it would fail again
        return None
    try:
      image = record["image"]
      image = decode_image(image) if isinstance(image, (bytes, bytearray)) else array_to_rgb(image)
    except ImageDecodeError as e:
      self._failed_once(path, str(e))
      return None
    self.decoded_any = True
    return image

  def _failed_once(self, path: str, why: str) -> None:
    if self._outbox is not None:  # in a worker: the main process warns, counts and raises
      with self._lock:
        if path not in self._failed:
          self._failed[path] = why
          self._outbox.append((path, why))
      return
    with _WARNED_LOCK:
      first = path not in _WARNED and why != _NO_MAP  # the source warned about those once
      _WARNED.add(path)
    if first:
      warn(f"skipping undecodable image {path} ({why})")
    with self._lock:  # counted after the warning: n undecodable files mean n lines printed
      self._failed.setdefault(path, why)
      everything_failed = self.num_files is not None and len(self._failed) >= self.num_files
    if everything_failed:
      raise self.not_decodable_error()

  def _label_map(self, record: dict, image_shape) -> np.ndarray:
    """The record's map as int32 [H, W] ids, checked against its image (LabelMapError)."""
    where = str(record.get("label_map_path") or record.get("path", "?"))
    ids = label_maps.decode_label_map(record["label_map"], where, self.label_map_channel)
    label_maps.check_label_map(ids, image_shape, where, self.semantic_classes)
    return ids

  def _window(self, h: int, w: int, rng: np.random.Generator):
    """(resized (h, w) or None, top, left, flip): the geometry shared by image and map."""
    size = None
    scale = self.resize_shorter / min(h, w)
    if scale != 1.0:
      size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
      h, w = size
    s = self.image_size
    if self.random_crop:
      top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    else:
      top, left = (h - s) // 2, (w - s) // 2
    return size, top, left, bool(self.random_flip and rng.random() < 0.5)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
    if self.label_maps in _MAPS_IN_RECORD and record.get("label_map") is None:
      self._failed_once(str(record.get("path", "?")), _NO_MAP)
      return None
    image = self._decode(record)
    if image is None:
      return None
    ids = self._label_map(record, image.shape) if self.label_maps in _MAPS_IN_RECORD else None
    window = self._window(*image.shape[:2], rng)
    image = _place(image, *window, self.image_size, _resize_bicubic)
    out = {"image": image.astype(np.float32) / 127.5 - 1.0, "label": np.int32(record["label"])}
    if ids is not None:
      out["label_map"] = np.ascontiguousarray(_place(ids, *window, self.image_size,
                                                     label_maps.resize_nearest))
    elif self.label_maps == "colour_clusters":
      out["label_map"] = label_maps.colour_cluster_ids(image, self.semantic_classes)
    return out


def _resize_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def _place(a: np.ndarray, size, top: int, left: int, flip: bool, crop: int, resize) -> np.ndarray:
  """`a` resized to `size` ((h, w); None: as is) by `resize`, cropped to crop x crop at
  (top, left) and mirrored left-right when `flip`."""
  if size is not None:
    a = resize(a, size)
  a = a[top:top + crop, left:left + crop]
  return a[:, ::-1] if flip else a


def _label_args(d) -> dict:
  """Preprocess's label-map arguments from `config.data`."""
  return {"label_maps": d.get("label_maps", ""), "semantic_classes": d.get("semantic_classes", 0),
          "label_map_channel": d.get("label_map_channel", -1)}


def train_dataset(config, process_index: int = 0, process_count: int = 1):
  """Infinite, shuffled, per-process training IterDataset and its Preprocess.

  With `config.data.workers` > 0 the images are decoded, augmented and batched in that
  many Grain worker processes (`vqjax.data.workers.WorkerBatches`, iterated the same way):
  the same batches and iterator state as with 0, and the Preprocess still counts (and
  warns about) the corrupt files the workers meet.
  """
  d = config.data
  source = build_source(d, d.train_split)
  batch = config.train.batch_size
  preprocess = Preprocess(d.image_size, d.resize_shorter, True, d.random_flip,
                          _distinct_files(source, batch, process_count, config.seed),
                          getattr(source, "root", ""), **_label_args(d))
  workers = d.get("workers", 0)
  mapper = preprocess.for_workers() if workers > 0 else preprocess
  # One stream for the whole run, the same in every process; each process reads its rows of
  # every global batch (vqjax.data.rows), so P processes see the 1-process batches.
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=config.seed).repeat(None).random_map(mapper, seed=config.seed + 1)
  ds = process_rows(ds, batch, process_index, process_count)
  if workers > 0:
    return WorkerBatches(ds, batch // process_count, preprocess, mapper, workers,
                         d.get("prefetch", 2)), preprocess
  ds = ds.to_iter_dataset().batch(batch // process_count, drop_remainder=True)
  return ds, preprocess


def _distinct_files(source, global_batch: int, process_count: int, seed: int) -> int | None:
  """How many distinct files one process's rows of a file source's shuffled, repeated stream
  ever read (None: not files)."""
  paths = getattr(source, "paths", None)
  if not paths:
    return None
  n = len(source)
  covered = distinct_positions(n, global_batch, process_count)
  if covered == n:
    return len(paths)
  if n == len(paths):  # one record per file
    return covered
  # Several records per file (data.crops_per_image): the positions' records, through the
  # same shuffle as train_dataset's, modulo the file count.
  b = global_batch // process_count
  d = math.gcd(global_batch, n)
  order = grain.MapDataset.range(n).shuffle(seed=seed)
  residues = {j % d for j in range(b)}  # process 0's; every process covers as many
  return len({order[r + k * d] % len(paths) for r in residues for k in range(n // d)})


def eval_batches(config, process_index: int = 0, process_count: int = 1, split: str | None = None,
                 batch_size: int | None = None, max_examples: int | None = None):
  """A finite, deterministic pass over a split (default: the validation split).

  Yields per-process batches of a fixed size padded at the end; `mask` is 1
  for real examples and 0 for padding, so every batch splits over the mesh.
  Process p reads every P-th example; corrupt images are dropped. With several
  processes every one yields as many batches as the one with the most (all-padding
  batches after its own end), so their collectives stay in step. A pass in which no
  image decodes raises ImagesNotDecodableError naming the folder.
  """
  d = config.data
  source = build_source(d, split or d.val_split)
  preprocess = Preprocess(d.image_size, d.resize_shorter, d.eval_random_crop, False,
                          root=getattr(source, "root", ""), **_label_args(d))
  per_process = (batch_size or config.eval.batch_size) // process_count
  max_examples = config.eval.max_examples if max_examples is None else max_examples
  # Seeds (eval_random_crop) by the position in the whole split, whatever the process count.
  ds = grain.MapDataset.source(source).random_map(preprocess, seed=config.seed + 2)
  ds = ds[process_index::process_count]
  if max_examples > 0:
    ds = ds[: max_examples // process_count]
  batches = (pad_batch(b, per_process)
             for b in ds.to_iter_dataset().batch(per_process, drop_remainder=False))
  if process_count > 1:
    batches = _in_step(batches, _empty_batch(config, per_process))
  yield from batches
  if not preprocess.decoded_any and preprocess.num_corrupt:
    raise preprocess.not_decodable_error()


def _in_step(batches, empty: dict):
  """`batches`, continued with `empty` until no process has batches left (one all-gather
  of a flag per batch)."""
  from jax.experimental import multihost_utils

  it = iter(batches)
  while True:
    batch = next(it, None)
    more = multihost_utils.process_allgather(np.int32(batch is not None))
    if not np.any(more):
      return
    yield batch if batch is not None else dict(empty)


def _empty_batch(config, size: int) -> dict:
  """An all-padding batch of `size` rows (mask 0) shaped like the pipeline's."""
  d, s = config.data, config.data.image_size
  out = {"image": np.zeros((size, s, s, 3), np.float32), "label": np.zeros(size, np.int32)}
  if d.get("label_maps", ""):
    out["label_map"] = np.zeros((size, s, s), np.int32)
  out["mask"] = np.zeros(size, np.float32)
  return out


def positioned_batches(config, split: str, start: int, end: int, global_batch: int,
                       process_index: int = 0, process_count: int = 1):
  """Source positions [start, end) of a split with the evaluation preprocessing, in global
  batches of `global_batch` positions; process p gets rows [p*b, (p+1)*b) of each (b =
  global_batch / P; vqjax.data.rows), every process the same number of batches.

  Each per-process batch has 'image', 'label' (and 'label_map'), `mask` (0: padding or
  a corrupt image, which stays in its row) and `position` (int64, -1 for padding), so
  the real rows of the gathered global batches are the decoded examples in source order,
  whatever P is: a writer that records the position after its last stored row can resume
  there with any number of processes.
  """
  d = config.data
  source = build_source(d, split)
  preprocess = Preprocess(d.image_size, d.resize_shorter, d.eval_random_crop, False,
                          root=getattr(source, "root", ""), **_label_args(d))
  mapped = grain.MapDataset.source(source).random_map(preprocess, seed=config.seed + 2)
  end = min(end, len(source))
  size = global_batch // process_count
  empty = _empty_batch(config, 1)

  def example(position):
    record = mapped[position]
    if record is None:
      return {**{k: v[0] for k, v in empty.items()}, "position": np.int64(position)}
    return {**record, "mask": np.float32(1), "position": np.int64(position)}

  rows = process_rows(grain.MapDataset.range(start, max(start, end)), global_batch,
                      process_index, process_count).map(example)
  num_batches = -(-max(end - start, 0) // global_batch)
  batches = iter(rows.to_iter_dataset().batch(size, drop_remainder=False))
  for _ in range(num_batches):
    batch = next(batches, None)
    if batch is None:
      batch = {**_empty_batch(config, size), "position": np.full(size, -1, np.int64)}
    else:
      n = len(batch["mask"])
      batch = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
      batch["position"][n:] = -1
    yield batch
  if not num_batches:
    return
  decoded = preprocess.decoded_any
  if process_count > 1:  # every process takes part: one of them may have decoded nothing
    from jax.experimental import multihost_utils

    decoded = bool(np.any(multihost_utils.process_allgather(np.int32(decoded))))
  if not decoded:
    raise preprocess.not_decodable_error()


def pad_batch(batch: dict, size: int) -> dict:
  """Pad every array of a short batch ('label_map' included) to `size` rows by repeating its
  last row; adds `mask` (1 = real example, 0 = padding) so a fixed-size batch splits over the
  mesh."""
  n = len(next(iter(batch.values())))
  pad = size - n
  out = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v
         for k, v in batch.items()}
  out["mask"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return out
