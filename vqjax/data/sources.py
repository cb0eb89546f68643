"""Random-access image sources (SPEC section 8).

Every source is a sequence of records `{'image': bytes | uint8 [H, W, 3],
'label': int}` with `__len__` and `__getitem__`, as Grain's
`MapDataset.source` expects. Decoding (`vqjax.data.images`) happens in the
pipeline so that a corrupt file is counted and skipped there, never fatal here.
"""

from __future__ import annotations

import os
from typing import Sequence

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


class DataSetNotFoundError(UserError, FileNotFoundError):
  """A configured data set is not where the config says; the message says what to do."""


class ImagesNotDecodableError(DataSetNotFoundError):
  """Every image file a pipeline was given failed to decode; the message names the folder."""


class FileImageSource:
  """Records read lazily from image files; the label is the index of the file's class.

  `root` (the folder the files came from) is what error messages name.
  """

  def __init__(self, paths: Sequence[str], labels: Sequence[int], repeats: int = 1,
               root: str = ""):
    self.paths = list(paths)
    self.labels = list(labels)
    self.repeats = repeats
    self.root = root

  def __len__(self) -> int:
    return len(self.paths) * self.repeats

  def __getitem__(self, index: int) -> dict:
    i = index % len(self.paths)
    with open(self.paths[i], "rb") as f:
      data = f.read()
    return {"image": data, "label": self.labels[i], "path": self.paths[i]}


def embedded_source(split: str, crops_per_image: int) -> FileImageSource:
  """scikit-image's colour sample images; each image appears `crops_per_image`
  times per epoch so that random crops give many distinct examples."""
  import skimage

  root = os.path.join(os.path.dirname(skimage.__file__), "data")
  if split == "train":
    names = [n for n in EMBEDDED_IMAGES if n not in EMBEDDED_VAL_IMAGES]
  elif split in ("val", "validation", "test"):
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
  is_val = split in ("val", "validation", "test")
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


class TfdsSource:
  """A TFDS `data_source` (random access over ArrayRecord files)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    self.root = f"TFDS {name} split {split}"
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

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = self.source[index]
    return {"image": record["image"], "label": int(record.get("label", 0)),
            "path": f"{self.root} record {index}"}


def build_source(data_cfg, split: str):
  """The source named by `config.data.source` for one split."""
  if data_cfg.source == "embedded":
    return embedded_source(split, data_cfg.crops_per_image if split == "train" else
                           data_cfg.eval_crops_per_image)
  if data_cfg.source == "folder":
    return folder_source(data_cfg.folder, data_cfg.val_folder, split, data_cfg.val_fraction)
  if data_cfg.source == "tfds":
    return TfdsSource(data_cfg.name, split, data_cfg.data_dir)
  raise ValueError(f"config.data.source must be 'embedded', 'folder' or 'tfds', "
                   f"not {data_cfg.source!r}")


# Ranges and choices of `config.data` (vqjax.checks), checked before anything is built.
DATA_RULES = {"source": ("embedded", "folder", "tfds"), "image_size": ">=1",
              "resize_shorter": ">=1", "val_fraction": "(0,1)", "crops_per_image": ">=1",
              "eval_crops_per_image": ">=1"}


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


def check_data_exists(data_cfg, splits) -> None:
  """DataSetNotFoundError, before any model is built, when a split of `splits` is not there.

  A folder (and `val_folder`) must be a directory holding at least one image (found
  without listing the whole tree); a TFDS data set must be prepared in its data_dir; the
  embedded images must be installed.
  """
  if data_cfg.source == "folder":
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
