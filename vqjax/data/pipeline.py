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

import threading

import grain
import numpy as np
from PIL import Image

from vqjax.console import warn
from vqjax.data import label_maps
from vqjax.data.images import ImageDecodeError, array_to_rgb, decode_image
from vqjax.data.sources import ImagesNotDecodableError, build_source

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
  of skips.
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
  """Infinite, shuffled, per-process training IterDataset and its Preprocess."""
  d = config.data
  source = build_source(d, d.train_split)
  preprocess = Preprocess(d.image_size, d.resize_shorter, True, d.random_flip,
                          _distinct_files(source, process_index, process_count),
                          getattr(source, "root", ""), **_label_args(d))
  per_process = config.train.batch_size // process_count
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=config.seed).repeat(None).random_map(preprocess, seed=config.seed + 1)
  ds = ds.to_iter_dataset().batch(per_process, drop_remainder=True)
  return ds, preprocess


def _distinct_files(source, process_index: int, process_count: int) -> int | None:
  """How many distinct files one process's slice of a file source reads (None: not files)."""
  paths = getattr(source, "paths", None)
  if not paths:
    return None
  if process_count == 1:
    return len(paths)
  return len({i % len(paths) for i in range(process_index, len(source), process_count)})


def _skip_then_batch(examples, skip: int, size: int):
  it = iter(examples)
  for _ in range(skip):
    if next(it, None) is None:
      return
  while True:
    chunk = [e for _, e in zip(range(size), it, strict=False)]
    if not chunk:
      return
    yield {k: np.stack([e[k] for e in chunk]) for k in chunk[0]}


def eval_batches(config, process_index: int = 0, process_count: int = 1, split: str | None = None,
                 batch_size: int | None = None, max_examples: int | None = None,
                 skip: int = 0):
  """A finite, deterministic pass over a split (default: the validation split).

  Yields per-process batches of a fixed size padded at the end; `mask` is 1
  for real examples and 0 for padding, so every batch splits over the mesh.
  `skip` drops the first `skip` decoded examples of the pass (resuming a
  writer that counted what it stored; corrupt images, already dropped, do
  not shift the count). A pass in which no image decodes raises
  ImagesNotDecodableError naming the folder.
  """
  d = config.data
  source = build_source(d, split or d.val_split)
  preprocess = Preprocess(d.image_size, d.resize_shorter, d.eval_random_crop, False,
                          root=getattr(source, "root", ""), **_label_args(d))
  per_process = (batch_size or config.eval.batch_size) // process_count
  max_examples = config.eval.max_examples if max_examples is None else max_examples
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.random_map(preprocess, seed=config.seed + 2)
  if max_examples > 0:
    ds = ds[: max_examples // process_count]
  examples = ds.to_iter_dataset()
  if skip:
    examples = _skip_then_batch(examples, skip, per_process)
  else:
    examples = examples.batch(per_process, drop_remainder=False)
  for batch in examples:
    yield pad_batch(batch, per_process)
  if not preprocess.decoded_any and preprocess.num_corrupt:
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
