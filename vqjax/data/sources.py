"""Random-access image sources (SPEC section 8).

Every source is a sequence of records `{'image': bytes | uint8 [H, W, 3],
'label': int, 'path': str}` with `__len__` and `__getitem__`, as Grain's
`MapDataset.source` expects. Decoding (`vqjax.data.images`) happens in the
pipeline so that a corrupt file is counted and skipped there, never fatal here.
With `config.data.label_maps` 'paired' or 'tfds', records also hold 'label_map'
(the map file's path, a TFDS feature's array, or None for an image without a
map, which the pipeline skips and counts like a corrupt file) and 'label_map_path'
(what errors about the map name); see `vqjax.data.label_maps`.
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

from vqjax.console import warn
from vqjax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# The colour (RGB) sample images that ship inside scikit-image.
EMBEDDED_IMAGES = (
    "astronaut.png", "chelsea.png", "chessboard_RGB.png", "coffee.png", "color.png",
    "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png",
    "phantom.png", "retina.jpg", "rocket.jpg",
)
# Deterministic split by image: these two are never seen in training.
EMBEDDED_VAL_IMAGES = ("coffee.png", "motorcycle_right.png")
VAL_SPLITS = ("val", "validation", "test")

# (image folder, label folder) pairs already warned about: one line per process, not per pass.
_WARNED_UNPAIRED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


class DataSetNotFoundError(UserError, FileNotFoundError):
  """A configured data set is not where the config says; the message says what to do."""


class ImagesNotDecodableError(DataSetNotFoundError):
  """Every image file a pipeline was given failed to decode; the message names the folder."""


class FileImageSource:
  """Records read lazily from image files; the label is the index of the file's class.

  `root` (the folder the files came from) is what error messages name. With `label_paths`
  (one map file or None per image), records also hold 'label_map' (that path) and
  'label_map_path'.
  """

  def __init__(self, paths: Sequence[str], labels: Sequence[int], repeats: int = 1,
               root: str = "", label_paths: Sequence[str | None] | None = None):
    self.paths = list(paths)
    self.labels = list(labels)
    self.repeats = repeats
    self.root = root
    self.label_paths = None if label_paths is None else list(label_paths)

  def __len__(self) -> int:
    return len(self.paths) * self.repeats

  def __getitem__(self, index: int) -> dict:
    i = index % len(self.paths)
    with open(self.paths[i], "rb") as f:
      data = f.read()
    record = {"image": data, "label": self.labels[i], "path": self.paths[i]}
    if self.label_paths is not None:
      record.update(label_map=self.label_paths[i], label_map_path=self.label_paths[i])
    return record


def embedded_source(split: str, crops_per_image: int) -> FileImageSource:
  """scikit-image's colour sample images; each image appears `crops_per_image`
  times per epoch so that random crops give many distinct examples."""
  import skimage

  root = os.path.join(os.path.dirname(skimage.__file__), "data")
  if split == "train":
    names = [n for n in EMBEDDED_IMAGES if n not in EMBEDDED_VAL_IMAGES]
  elif split in VAL_SPLITS:
    names = list(EMBEDDED_VAL_IMAGES)
  else:
    raise ValueError(f"embedded data has splits 'train' and 'validation', not {split!r}")
  paths = [os.path.join(root, n) for n in names]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataSetNotFoundError(
        f"embedded images missing from scikit-image ({missing[0]}): reinstall scikit-image.")
  return FileImageSource(paths, [EMBEDDED_IMAGES.index(n) for n in names], crops_per_image,
                         root=root)


def image_paths(folder: str) -> list[str]:
  """Every file with an image extension under `folder`, recursively, in sorted walk order."""
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    paths.extend(os.path.join(root, f) for f in sorted(files)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  return paths


def list_images(folder: str) -> tuple[list[str], list[int]]:
  """All images under `folder` (recursive, sorted); label = index of the top-level subfolder."""
  if not os.path.isdir(folder):
    raise DataSetNotFoundError(
        f"image folder {folder!r} does not exist: set config.data.folder to a directory "
        f"of {'/'.join(IMAGE_EXTENSIONS)} files (searched recursively).")
  paths = image_paths(folder)
  if not paths:
    raise DataSetNotFoundError(
        f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {folder!r}: point "
        "config.data.folder at a folder that holds them.")
  classes = sorted({os.path.relpath(p, folder).split(os.sep)[0] for p in paths
                    if os.sep in os.path.relpath(p, folder)})
  index = {c: i for i, c in enumerate(classes)}
  labels = [index.get(os.path.relpath(p, folder).split(os.sep)[0], 0) for p in paths]
  return paths, labels


def folder_source(folder: str, val_folder: str, split: str, val_fraction: float) -> FileImageSource:
  """An image folder; without `val_folder`, every round(1/val_fraction)-th file is validation."""
  is_val = split in VAL_SPLITS
  if is_val and val_folder:
    return FileImageSource(*list_images(val_folder), root=val_folder)
  paths, labels = list_images(folder)
  if val_folder:
    return FileImageSource(paths, labels, root=folder)
  every = max(2, round(1.0 / val_fraction))
  keep = [i for i in range(len(paths)) if (i % every == every - 1) == is_val]
  if not keep:
    raise DataSetNotFoundError(
        f"{folder!r} has too few images ({len(paths)}) to hold out a validation split; "
        "add images or set config.data.val_folder.")
  return FileImageSource([paths[i] for i in keep], [labels[i] for i in keep], root=folder)


def _label_files(label_folder: str) -> tuple[dict, dict]:
  """Map files under `label_folder` by relative stem (path without extension) and by bare
  file stem (only stems that occur once); where one stem has several extensions, the first
  of IMAGE_EXTENSIONS (PNG) wins."""
  by_rel: dict[str, str] = {}
  by_name: dict[str, list[str]] = {}
  rank = lambda p: IMAGE_EXTENSIONS.index(os.path.splitext(p)[1].lower())
  for path in sorted(image_paths(label_folder), key=rank):
    rel = os.path.splitext(os.path.relpath(path, label_folder))[0]
    if rel not in by_rel:
      by_rel[rel] = path
      by_name.setdefault(os.path.basename(rel), []).append(path)
  return by_rel, {k: v[0] for k, v in by_name.items() if len(v) == 1}


def pair_label_files(paths: Sequence[str], root: str, label_folder: str) -> list[str | None]:
  """The map file of each image path (relative to `root`): the file of `label_folder` with
  the same relative stem, else the one with the same bare file stem; None where there is none."""
  by_rel, by_name = _label_files(label_folder)
  out = []
  for path in paths:
    rel = os.path.splitext(os.path.relpath(path, root))[0]
    out.append(by_rel.get(rel) or by_name.get(os.path.basename(rel)))
  return out


def with_label_maps(source: FileImageSource, label_folder: str) -> FileImageSource:
  """`source` whose records carry their map files from `label_folder` (paired by stem).

  Images without a map stay in the source with 'label_map' None: the pipeline skips and
  counts them like corrupt files; one warning per process names the first. No map for any
  image is a DataSetNotFoundError naming both folders.
  """
  if not os.path.isdir(label_folder):
    raise DataSetNotFoundError(
        f"label folder {label_folder!r} does not exist: set config.data.label_folder (and "
        "data.val_label_folder) to the folder of label maps named as the images.")
  label_paths = pair_label_files(source.paths, source.root, label_folder)
  missing = [p for p, m in zip(source.paths, label_paths, strict=True) if m is None]
  if len(missing) == len(label_paths):
    example = os.path.splitext(os.path.relpath(missing[0], source.root))[0]
    raise DataSetNotFoundError(
        f"none of the {len(missing)} images under {source.root!r} has a label map in "
        f"{label_folder!r} (paired by file stem, e.g. {example}.png): point "
        "config.data.label_folder at the maps of config.data.folder's images.")
  if missing:
    _warn_unpaired(source.root, label_folder, missing, len(label_paths))
  return FileImageSource(source.paths, source.labels, source.repeats, source.root, label_paths)


def _warn_unpaired(root: str, label_folder: str, missing: list[str], total: int) -> None:
  with _WARNED_LOCK:
    first = (root, label_folder) not in _WARNED_UNPAIRED
    _WARNED_UNPAIRED.add((root, label_folder))
  if first:
    warn(f"{len(missing)} of the {total} images under {root} have no label map in "
         f"{label_folder} (first: {missing[0]}); they are skipped and counted with the "
         "undecodable images")


class TfdsSource:
  """A TFDS `data_source` (random access over ArrayRecord files); with `label_map_key`,
  records also hold that feature as 'label_map'."""

  def __init__(self, name: str, split: str, data_dir: str | None, label_map_key: str = ""):
    import tensorflow_datasets as tfds

    self.root = f"TFDS {name} split {split}"
    self.label_map_key = label_map_key
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                     download=False)
    except Exception as e:  # TFDS raises several types for "not prepared"
      raise DataSetNotFoundError(
          f"TFDS data set {name!r} (split {split!r}) is not prepared in data_dir {where!r} "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it with "
          f"`tfds build {name} --data_dir={where} --file_format=array_record` (ImageNet also "
          "needs --manual_dir with the downloaded archives), or set config.data.data_dir "
          "to where it is.") from e
    if label_map_key:
      _check_feature(self.source, name, label_map_key)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = self.source[index]
    out = {"image": record["image"], "label": int(record.get("label", 0)),
           "path": f"{self.root} record {index}"}
    if self.label_map_key:
      if self.label_map_key not in record:
        raise _no_feature_error(self.root, self.label_map_key, record)
      out.update(label_map=record[self.label_map_key],
                 label_map_path=f"{out['path']} feature {self.label_map_key!r}")
    return out


def _check_feature(source, name: str, key: str) -> None:
  """ConfigError when the data set's features (where the source lists them) lack `key`."""
  info = getattr(source, "dataset_info", None)
  features = getattr(info, "features", None)
  try:
    names = list(features.keys()) if features is not None else None
  except (AttributeError, TypeError):
    names = None
  if names is not None and key not in names:
    raise _no_feature_error(f"TFDS {name}", key, names)


def _no_feature_error(where: str, key: str, names) -> Exception:
  from vqjax.errors import ConfigError

  return ConfigError(f"{where} has no feature {key!r} (it has {', '.join(sorted(names))}): set "
                     "config.data.label_map_key to the feature that holds the label maps.")


def _label_folder(data_cfg, split: str) -> str:
  """The folder of maps for `split`: val_label_folder for a separate val_folder (when set)."""
  if split in VAL_SPLITS and data_cfg.val_folder and data_cfg.get("val_label_folder", ""):
    return data_cfg.val_label_folder
  return data_cfg.label_folder


def build_source(data_cfg, split: str):
  """The source named by `config.data.source` for one split."""
  if data_cfg.source == "embedded":
    return embedded_source(split, data_cfg.crops_per_image if split == "train" else
                           data_cfg.eval_crops_per_image)
  mode = data_cfg.get("label_maps", "")
  if data_cfg.source == "folder":
    source = folder_source(data_cfg.folder, data_cfg.val_folder, split, data_cfg.val_fraction)
    return with_label_maps(source, _label_folder(data_cfg, split)) if mode == "paired" else source
  if data_cfg.source == "tfds":
    return TfdsSource(data_cfg.name, split, data_cfg.data_dir,
                      data_cfg.label_map_key if mode == "tfds" else "")
  raise ValueError(f"config.data.source must be 'embedded', 'folder' or 'tfds', "
                   f"not {data_cfg.source!r}")


# Ranges and choices of `config.data` (vqjax.checks), checked before anything is built.
DATA_RULES = {"source": ("embedded", "folder", "tfds"), "image_size": ">=1",
              "resize_shorter": ">=1", "val_fraction": "(0,1)", "crops_per_image": ">=1",
              "eval_crops_per_image": ">=1", "semantic_classes": ">=0",
              "label_maps": ("", "paired", "tfds", "colour_clusters"), "label_map_channel": ">=-1",
              "workers": ">=0", "prefetch": ">=1"}


def validate_data_config(data_cfg) -> None:
  """ConfigError for a `config.data` field out of range or a source without its location."""
  from vqjax.checks import check_fields
  from vqjax.errors import ConfigError

  check_fields(data_cfg, "data", DATA_RULES)
  if data_cfg.source == "folder" and not data_cfg.folder:
    raise ConfigError("data.source='folder' needs data.folder: set --config.data.folder to a "
                      "directory of images.")
  if data_cfg.source == "tfds" and not data_cfg.name:
    raise ConfigError("data.source='tfds' needs data.name, e.g. --config.data.name=imagenet2012.")
  _validate_label_maps(data_cfg)


def _validate_label_maps(data_cfg) -> None:
  """ConfigError for `config.data`'s label-map fields that do not fit together."""
  from vqjax.errors import ConfigError

  mode, classes = data_cfg.get("label_maps", ""), data_cfg.get("semantic_classes", 0)
  if mode and classes <= 0:
    raise ConfigError(f"data.label_maps={mode!r} needs data.semantic_classes > 0: set "
                      "--config.data.semantic_classes to the number of ids in the maps.")
  if classes > 0 and not mode:
    raise ConfigError(f"data.semantic_classes={classes} needs data.label_maps: set "
                      "--config.data.label_maps to 'paired', 'tfds' or 'colour_clusters', or "
                      "data.semantic_classes to 0.")
  if mode == "paired" and data_cfg.source != "folder":
    raise ConfigError(f"data.label_maps='paired' needs data.source='folder', not "
                      f"{data_cfg.source!r}: set --config.data.source=folder.")
  if mode == "paired" and not data_cfg.label_folder:
    raise ConfigError("data.label_maps='paired' needs data.label_folder: set "
                      "--config.data.label_folder to the folder of maps named as the images.")
  if mode == "paired" and data_cfg.val_label_folder and not data_cfg.val_folder:
    raise ConfigError("data.val_label_folder needs data.val_folder (the images it pairs with): "
                      "set --config.data.val_folder, or leave val_label_folder empty.")
  if mode == "tfds" and data_cfg.source != "tfds":
    raise ConfigError(f"data.label_maps='tfds' needs data.source='tfds', not "
                      f"{data_cfg.source!r}: set --config.data.source=tfds.")
  if mode == "tfds" and not data_cfg.label_map_key:
    raise ConfigError("data.label_maps='tfds' needs data.label_map_key: set it to the TFDS "
                      "feature that holds the maps, e.g. --config.data.label_map_key=annotation.")


def check_data_exists(data_cfg, splits) -> None:
  """DataSetNotFoundError, before any model is built, when a split of `splits` is not there.

  A folder (and `val_folder`) must be a directory holding at least one image (found
  without listing the whole tree); a TFDS data set must be prepared in its data_dir; the
  embedded images must be installed.
  """
  if data_cfg.source == "folder":
    if data_cfg.get("label_maps", "") == "paired":
      _check_label_folders(data_cfg)
    for folder in (data_cfg.folder, data_cfg.val_folder):
      if not folder:
        continue
      if not os.path.isdir(folder):
        raise DataSetNotFoundError(
            f"image folder {folder!r} does not exist: set config.data.folder (and "
            "data.val_folder) to a directory of images (searched recursively).")
      if not any(f.lower().endswith(IMAGE_EXTENSIONS)
                 for _, _, files in os.walk(folder) for f in files):
        raise DataSetNotFoundError(
            f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {folder!r}: point "
            "config.data.folder at a folder that holds them.")
    return
  import logging

  from vqjax.errors import ConfigError

  absl_logger = logging.getLogger("absl")  # TFDS logs its probing of data_dir there
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    for split in dict.fromkeys(splits):
      try:
        build_source(data_cfg, split)
      except ValueError as e:  # a split the source does not have
        raise ConfigError(f"{e}: set the split fields of config.data (or tokenize.split) to "
                          "one it has.") from None
  finally:
    absl_logger.setLevel(level)


def _check_label_folders(data_cfg) -> None:
  for folder in (data_cfg.label_folder, data_cfg.val_label_folder):
    if folder and not os.path.isdir(folder):
      raise DataSetNotFoundError(
          f"label folder {folder!r} does not exist: set config.data.label_folder (and "
          "data.val_label_folder) to the folder of label maps named as the images.")
