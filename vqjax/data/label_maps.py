"""Semantic label maps: an integer id per pixel, paired with every image (`config.data.label_maps`).

Where a map comes from (`config.data.label_maps`):
  ''                 none; batches have no 'label_map' (the default).
  'paired'           an image folder and a label folder (`data.label_folder`; for a validation
                     `data.val_folder`, `data.val_label_folder` or else `data.label_folder`)
                     holding a map file with the same stem as each image (PNG preferred).
  'tfds'             the TFDS feature `data.label_map_key` of each record.
  'colour_clusters'  derived from the image itself (`colour_cluster_ids`): each pixel gets the
                     id of its nearest colour in `palette(data.semantic_classes)`.

A map file or array is decoded by `decode_label_map`, which never rescales values:
  * single channel (PNG 'L', 16-bit 'I;16' / 'I', bilevel '1' as 0/1, [H, W] or [H, W, 1]
    arrays): the values are the ids;
  * palette PNG ('P', 'PA'): the palette indices are the ids (the colours are ignored);
  * RGB / RGBA (and grey + alpha): the colour channels must be equal, and that value is the id;
    alpha is ignored;
  * with `data.label_map_channel` = k >= 0, channel k of a multi-channel map is the id (e.g. 0
    for TFDS scene_parse150, whose RGB annotations hold the category in R, the instance in G).
Anything else (CMYK, float samples, negative values, unequal colour channels) is a
`LabelMapError` naming the file. The pipeline checks that a map has its image's height and
width and that every id is below `data.semantic_classes`, then applies the image's geometry
to it with nearest-neighbour resizing (`resize_nearest`).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from vqjax.errors import UserError

MODES = ("", "paired", "tfds", "colour_clusters")
# Roberts' R3 low-discrepancy sequence: alpha_k = phi3**-k for k = 1, 2, 3, where phi3 is the
# real root of x**3 = x + 1 (the "plastic number").
_PHI3 = 1.324717957244746
_R3 = np.array([_PHI3 ** -1, _PHI3 ** -2, _PHI3 ** -3])
# Pillow modes whose samples (palette: indices) are ids; 'PA' keeps its index channel.
_MODES = ("1", "L", "LA", "P", "PA", "I", "I;16", "I;16B", "RGB", "RGBA", "RGBX")


class LabelMapError(UserError, ValueError):
  """A label map that cannot be used with its image; the one-line message names the file."""


def palette(classes: int) -> np.ndarray:
  """uint8 [classes, 3]: the fixed colour of each id, evenly spread over the RGB cube.

  Colour i is floor(256 * frac(0.5 + (i + 1) * alpha)) per channel, alpha = (phi3**-1,
  phi3**-2, phi3**-3) with phi3 = 1.3247... (Roberts' R3 sequence): every prefix of the
  sequence covers the cube evenly, so any `classes` gives well-separated colours, and the
  colour of an id does not depend on `classes`. Used by `colour_cluster_ids` and `colorize`.
  """
  i = np.arange(1, classes + 1, dtype=np.float64)[:, None]
  return np.floor(256.0 * np.mod(0.5 + i * _R3, 1.0)).astype(np.uint8)


def colour_cluster_ids(image: np.ndarray, classes: int) -> np.ndarray:
  """int32 [H, W]: the id of each pixel's nearest colour (squared RGB distance, ties to the
  lower id) in `palette(classes)`, for uint8 RGB `image` [H, W, 3]."""
  p = palette(classes).astype(np.int32)
  x = np.asarray(image, np.int32).reshape(-1, 3)
  # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; |x|^2 is the same for every colour of a pixel.
  distance = (p * p).sum(-1)[None, :] - 2 * (x @ p.T)
  return np.argmin(distance, axis=-1).astype(np.int32).reshape(image.shape[:2])


def colorize(ids, classes: int) -> np.ndarray:
  """uint8 [..., H, W, 3]: ids [..., H, W] in [0, classes) shown as `palette(classes)` colours,
  for [map | real | sample] grids."""
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= classes):
    raise ValueError(f"ids in [{ids.min()}, {ids.max()}] to colorize with {classes} classes")
  return palette(classes)[ids]


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """The source index of each of `n_out` cells over `n_in` pixels: the pixel under the cell's
  centre, floor((i + 0.5) * n_in / n_out) (exact, in integers)."""
  return (2 * np.arange(n_out) + 1) * n_in // (2 * n_out)


def downsample_nearest(label_map, grid: tuple[int, int]):
  """[B, h, w]: the id at the centre pixel of each cell of an (h, w) grid over [B, H, W] maps
  (row floor((i + 0.5) * H / h), column likewise). Numpy in, numpy out (jax arrays work too)."""
  _, height, width = label_map.shape
  rows, cols = nearest_indices(height, grid[0]), nearest_indices(width, grid[1])
  return label_map[:, rows][:, :, cols]


def resize_nearest(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[h, w] of a [H, W] map by nearest neighbour with the centre alignment of `downsample_nearest`
  (and of PIL's resampling, so the map stays on its bicubically resized image)."""
  return downsample_nearest(ids[None], size)[0]


def decode_label_map(source, where: str, channel: int = -1) -> np.ndarray:
  """int32 [H, W] ids of a map file (path or bytes) or array, by the rules of the module
  docstring. `where` names the map in errors; `channel` is `data.label_map_channel`."""
  if isinstance(source, (str, os.PathLike, bytes, bytearray)):
    samples = _read_file(source, where)
  else:
    samples = np.asarray(source)
  return _ids(samples, where, channel)


def _read_file(source, where: str) -> np.ndarray:
  try:
    if isinstance(source, (str, os.PathLike)):
      with open(source, "rb") as f:
        source = f.read()
    with Image.open(io.BytesIO(bytes(source))) as im:
      mode = im.mode
      samples = np.array(im.getchannel(0) if mode == "PA" else im) if mode in _MODES else None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    why = str(e).splitlines()[0] if str(e) else ""
    raise LabelMapError(f"label map {where} cannot be read ({type(e).__name__}: {why}): replace "
                        "it with a single-channel PNG of ids.") from None
  if samples is None:
    raise LabelMapError(f"label map {where} has mode {mode!r}: store the ids as a single-channel "
                        "or palette PNG.")
  return samples


def _ids(samples: np.ndarray, where: str, channel: int) -> np.ndarray:
  a = samples[..., None] if samples.ndim == 2 else samples
  if a.ndim != 3 or not 1 <= a.shape[-1] <= 4 or 0 in a.shape:
    raise LabelMapError(f"label map {where} has shape {samples.shape}: store it as [H, W] ids "
                        "(a single-channel PNG).")
  if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
    raise LabelMapError(f"label map {where} has {a.dtype} samples: store integer ids.")
  if channel >= 0:
    if channel >= a.shape[-1]:
      raise LabelMapError(f"label map {where} has {a.shape[-1]} channel(s), so "
                          f"data.label_map_channel={channel} does not exist: set it to -1 "
                          "or a channel it has.")
    ids = a[..., channel]
  elif a.shape[-1] <= 2:  # grey (+ alpha)
    ids = a[..., 0]
  else:
    colour = a[..., :3]
    if not (np.array_equal(colour[..., 0], colour[..., 1])
            and np.array_equal(colour[..., 0], colour[..., 2])):
      raise LabelMapError(f"label map {where} is colour with unequal channels: store ids as a "
                          "single-channel or palette PNG, or set data.label_map_channel to the "
                          "channel that holds them.")
    ids = colour[..., 0]
  if np.issubdtype(ids.dtype, np.signedinteger) and ids.size and ids.min() < 0:
    raise LabelMapError(f"label map {where} has negative ids (down to {ids.min()}): ids must be "
                        ">= 0.")
  if ids.size and int(ids.max()) > np.iinfo(np.int32).max:
    raise LabelMapError(f"label map {where} has ids up to {ids.max()}: ids must fit in int32.")
  return np.ascontiguousarray(ids, np.int32)


def check_label_map(ids: np.ndarray, image_shape, where: str, classes: int) -> None:
  """LabelMapError unless `ids` has the image's height and width and every id < `classes`."""
  if tuple(ids.shape[:2]) != tuple(image_shape[:2]):
    raise LabelMapError(f"label map {where} is {ids.shape[0]}x{ids.shape[1]} (HxW) but its image "
                        f"is {image_shape[0]}x{image_shape[1]}: give every image a map of its "
                        "own size.")
  top = int(ids.max()) if ids.size else 0
  if top >= classes:
    raise LabelMapError(f"label map {where} has id {top}, but data.semantic_classes={classes}: "
                        f"set data.semantic_classes to at least {top + 1}.")
