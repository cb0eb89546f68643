"""The one image decoder: file bytes (or a decoded array) -> uint8 RGB [H, W, 3].

Training, evaluation, tokenization and the FID command all read images through
`decode_image`, so every consumer sees the same pixels. Nothing is clipped or
reinterpreted silently: a file whose samples have no defined 8-bit meaning, or
that cannot be read at all, raises `ImageDecodeError` (the input pipeline warns
once and skips it; the FID command stops with the message).

Rules, by what the file holds:
  * 8-bit RGB as stored; 'L' grayscale and '1' bilevel (0 -> 0, 1 -> 255) repeated to
    three channels.
  * Palette ('P', 'PA'): each pixel is its palette entry's colour, transparent entries
    included (their stored colour is kept, like any alpha below).
  * Alpha ('LA', 'RGBA', 'PA', 16-bit RGBA, TIFF extra samples) is dropped and the stored
    colour kept, as PIL's `convert('RGB')`, torchvision and clean-fid do, so FID statistics
    agree with theirs.
  * CMYK: through the file's embedded ICC profile to sRGB when it has a usable one,
    otherwise R = round((255 - C) * (255 - K) / 255), G and B likewise from M and Y
    (Pillow's conversion).
  * Other 8-bit colour spaces (YCbCr, LAB, HSV, premultiplied alpha): Pillow's conversion.
  * Unsigned integer samples of b bits -> round(v * 255 / (2**b - 1)); 16-bit v ->
    round(v * 255 / 65535). b is what the file declares: 16 for 16-bit PNGs, TIFF's
    BitsPerSample (12-bit TIFF samples use 4095), the array dtype's width otherwise.
    Pillow's 32-bit 'I' mode from other formats (old Pillow's 16-bit PNGs, PGM) is taken as
    16-bit when every value lies in [0, 65535] and as signed 32-bit otherwise.
  * Signed integer samples of b bits -> round(v * 255 / (2**(b-1) - 1)); a negative value
    has no 8-bit meaning and the file is refused.
  * Floating point ('F', float TIFF): round(v * 255) when every value lies in [0, 1], else
    round(v) when every value lies in [0, 255]; anything else (negative, above 255, NaN,
    inf) is refused.
  * EXIF orientation (tag 274, TIFF's own tag for TIFF) is applied exactly as
    `PIL.ImageOps.exif_transpose` applies it; an unreadable EXIF block leaves the image as
    stored. ICC profiles of non-CMYK images are ignored (as other tools ignore them).
  * Multi-frame files (GIF, APNG, multi-page TIFF): the first frame.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ORIENTATION_TAG = 0x0112
# Pillow keeps only the high byte of 16-bit colour PNGs; these are their raw modes.
_PNG16_COLOUR = ("RGB;16B", "RGBA;16B", "LA;16B")
# EXIF orientation -> the array operation that shows the image upright, as
# `ImageOps.exif_transpose` (FLIP_LEFT_RIGHT, ROTATE_180, ..., ROTATE_90) does it.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


class ImageDecodeError(ValueError):
  """An image file (or array) that cannot be decoded to RGB; the message says why."""


def decode_image(source: bytes | bytearray | str | os.PathLike) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an image file's bytes, or of the file at a path, by the rules in
  the module docstring. Raises ImageDecodeError for anything that cannot be decoded."""
  try:
    if isinstance(source, (str, os.PathLike)):
      with open(source, "rb") as f:
        data = f.read()
    else:
      data = bytes(source)
    return _decode(data)
  except ImageDecodeError:
    raise
  except UnidentifiedImageError:
    raise ImageDecodeError("not an image format Pillow can read") from None
  except Exception as e:  # PIL and tifffile raise many types for damaged files
    raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def array_to_rgb(array, bits: int | None = None) -> np.ndarray:
  """uint8 RGB [H, W, 3] of a decoded image array: [H, W] or [H, W, 1] grey, [H, W, 2] grey +
  alpha, [H, W, 3] RGB or [H, W, 4] RGBA (alpha dropped), of any integer, bool or float dtype,
  scaled to 8 bits by `to_uint8` (unsigned `bits`-bit samples when `bits` is given)."""
  a = np.asarray(array)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or not 1 <= a.shape[-1] <= 4 or 0 in a.shape:
    raise ImageDecodeError(f"an image array of shape {a.shape}; expected [H, W] or "
                           "[H, W, C] with 1 to 4 channels")
  a = to_uint8(a[..., :1] if a.shape[-1] <= 2 else a[..., :3], bits)
  return np.ascontiguousarray(np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a)


def to_uint8(values: np.ndarray, bits: int | None = None) -> np.ndarray:
  """Samples scaled to uint8 by their type's range: unsigned b-bit v -> round(v * 255 /
  (2**b - 1)) (b = `bits` or the dtype's width), signed b-bit v >= 0 -> round(v * 255 /
  (2**(b-1) - 1)), bool -> 0/255, float in [0, 1] -> round(v * 255), float in [0, 255] ->
  round(v). Raises ImageDecodeError for negative integers and out-of-range or non-finite
  floats."""
  v = np.asarray(values)
  if v.dtype == np.uint8 and bits in (None, 8):
    return v
  if v.dtype == np.bool_:
    return v.astype(np.uint8) * np.uint8(255)
  if np.issubdtype(v.dtype, np.integer):
    signed = np.issubdtype(v.dtype, np.signedinteger)
    if signed and v.size and v.min() < 0:
      raise ImageDecodeError(f"signed {v.dtype.itemsize * 8}-bit samples with negative values "
                             f"(down to {v.min()}), which have no 8-bit meaning")
    b = bits or v.dtype.itemsize * 8
    top = (1 << (b - 1 if signed else b)) - 1
    if v.size and v.max() > top:
      raise ImageDecodeError(f"samples up to {v.max()} in a {b}-bit image")
    # round(v * 255 / top) in integers; top is odd, so v * 255 / top is never a half.
    return ((v.astype(np.uint64) * 255 + top // 2) // top).astype(np.uint8)
  if np.issubdtype(v.dtype, np.floating):
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
      raise ImageDecodeError(f"floating-point samples in [{lo}, {hi}]: only [0, 1] or "
                             "[0, 255] have a defined 8-bit meaning")
    scale = 255.0 if hi <= 1.0 else 1.0
    return np.floor(v.astype(np.float64) * scale + 0.5).astype(np.uint8)
  raise ImageDecodeError(f"samples of type {v.dtype} are not an image")


def orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
  """The [H, W, C] array shown upright for an EXIF orientation (1-8; others: unchanged)."""
  op = _ORIENT.get(orientation)
  return np.ascontiguousarray(op(rgb) if op else rgb)


def _decode(data: bytes) -> np.ndarray:
  try:
    im = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    if data[:4] in _TIFF_MAGIC:  # e.g. float RGB, which Pillow does not open
      return _decode_tiff(data)
    raise
  with im:
    if im.format == "TIFF" and _tiff_beyond_8_bits(im):
      return _decode_tiff(data)
    # The raw mode, read before anything loads the pixels (PNG's getexif does).
    rawmode = im.tile[0][3] if im.format == "PNG" and len(im.tile) == 1 else None
    orientation = _exif_orientation(im)
    rgb = _png16_to_rgb(data, rawmode) if rawmode in _PNG16_COLOUR else _pil_to_rgb(im)
  return orient(rgb, orientation)


def _exif_orientation(im: Image.Image) -> int:
  try:
    return int(im.getexif().get(_ORIENTATION_TAG, 1))
  except Exception:  # a damaged EXIF block does not make the pixels unreadable
    return 1


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
  mode = im.mode
  if mode in ("RGB", "L", "1"):
    return array_to_rgb(np.asarray(im))
  if mode in ("LA", "RGBA", "RGBX"):
    return array_to_rgb(np.asarray(im))
  if mode in ("P", "PA"):
    with_alpha = mode == "PA" or "transparency" in im.info
    return array_to_rgb(np.asarray(im.convert("RGBA" if with_alpha else "RGB")))
  if mode == "CMYK":
    return _cmyk_to_rgb(im, im.info.get("icc_profile"))
  if mode.startswith("I;16"):
    return array_to_rgb(np.asarray(im).astype(np.uint16))
  if mode == "I":
    v = np.asarray(im)
    if im.format == "PNG" or (v.size and v.min() >= 0 and v.max() <= 65535):
      return array_to_rgb(v.astype(np.uint16))
    return array_to_rgb(v.astype(np.int32))
  if mode == "F":
    return array_to_rgb(np.asarray(im))
  return np.asarray(im.convert("RGB"))


def _png16_to_rgb(data: bytes, rawmode: str) -> np.ndarray:
  """RGB of a 16-bit colour or grey + alpha PNG from all 16 bits of each sample. Pillow decodes
  these to their high bytes; decoding the same stream again with a raw mode of the same bit
  width that picks the other byte of each sample gives the low bytes."""
  if rawmode == "LA;16B":  # 4 bytes a pixel, read as 8-bit RGBA: L high, L low, A high, A low
    b = _png_with_rawmode(data, "RGBA")
    return array_to_rgb((b[..., 0::2].astype(np.uint16) << 8) | b[..., 1::2])
  high = _png_with_rawmode(data, rawmode)
  low = _png_with_rawmode(data, rawmode.replace(";16B", ";16L"))
  return array_to_rgb((high.astype(np.uint16) << 8) | low)


def _png_with_rawmode(data: bytes, rawmode: str) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    tile = im.tile[0]
    im.tile = [type(tile)(*tuple(tile)[:3], rawmode)]
    im.load()
    return np.asarray(im)


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> np.ndarray:
  if icc:
    from PIL import ImageCms

    try:
      profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
      return np.asarray(ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"),
                                                  outputMode="RGB"))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
      pass  # an unusable profile: the profile-free conversion below
  return np.asarray(im.convert("RGB"))


def _tiff_beyond_8_bits(im: Image.Image) -> bool:
  """Whether a TIFF has samples Pillow would narrow or wrap: over 8 bits, signed or float."""
  bits = np.atleast_1d(im.tag_v2.get(258, 1))
  formats = np.atleast_1d(im.tag_v2.get(339, 1))
  return int(bits.max()) > 8 or bool(np.any(formats != 1))


def _decode_tiff(data: bytes) -> np.ndarray:
  """A TIFF's first page through tifffile, which keeps every sample type and width."""
  import tifffile

  with tifffile.TiffFile(io.BytesIO(data)) as tif:
    page = tif.pages[0]
    samples = page.asarray()
    axes = page.axes
    photometric = int(page.photometric)
    bits = int(page.bitspersample)
    orientation_tag = page.tags.get(274)
    icc_tag = page.tags.get(34675)
  if "S" in axes:
    samples = np.moveaxis(samples, axes.index("S"), -1)
    axes = axes.replace("S", "") + "S"
  if axes.replace("S", "") != "YX":
    raise ImageDecodeError(f"a TIFF page with axes {page.axes!r}; expected a 2-D image")
  integer = np.issubdtype(samples.dtype, np.integer) and samples.dtype != np.bool_
  unsigned = integer and np.issubdtype(samples.dtype, np.unsignedinteger)
  values = to_uint8(samples, bits if unsigned else None)
  if values.ndim == 2:
    values = values[..., None]
  if photometric in (0, 1):  # MINISWHITE, MINISBLACK: the first sample; the rest are extras
    grey = 255 - values[..., 0] if photometric == 0 else values[..., 0]
    rgb = array_to_rgb(grey)
  elif photometric == 2 and values.shape[-1] >= 3:  # RGB (+ extra samples)
    rgb = array_to_rgb(values[..., :3])
  elif photometric == 5 and values.shape[-1] >= 4:  # SEPARATED: CMYK inks
    inks = np.ascontiguousarray(values[..., :4])
    cmyk = Image.frombytes("CMYK", (inks.shape[1], inks.shape[0]), inks.tobytes())
    rgb = _cmyk_to_rgb(cmyk, bytes(icc_tag.value) if icc_tag is not None else None)
  else:
    raise ImageDecodeError(f"a TIFF with photometric interpretation {photometric} and "
                           f"{values.shape[-1]} samples a pixel is not supported")
  return orient(rgb, int(orientation_tag.value) if orientation_tag is not None else 1)
