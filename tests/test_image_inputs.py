"""The one image decoder: bit depths, palettes, alpha, CMYK, EXIF orientation, corrupt files."""

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from tests.conftest import folder_config
from vqjax.data import sources
from vqjax.data.images import ImageDecodeError, array_to_rgb, decode_image
from vqjax.data.pipeline import eval_batches, train_dataset


def _png16(path, samples):
  """A 16-bit PNG written byte by byte (no PIL): grey [H, W], grey+alpha, RGB or RGBA."""
  a = np.asarray(samples, ">u2")
  colour_type = 0 if a.ndim == 2 else {2: 4, 3: 2, 4: 6}[a.shape[2]]
  rows = b"".join(b"\x00" + a[i].tobytes() for i in range(a.shape[0]))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, colour_type, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                   + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
  return path


def _to8(v, top=65535):
  return np.array([[round(x * 255 / top) for x in row] for row in np.asarray(v).tolist()])


def _grey(v):
  return np.repeat(np.asarray(v)[..., None], 3, axis=-1)


SIXTEEN = [[0, 257 * 100, 65535], [65280, 128, 32896]]  # -> 0, 100, 255 / 254, 0, 128


def test_16bit_png_scales_by_65535(tmp_path):
  expected = _to8(SIXTEEN)
  assert expected.tolist() == [[0, 100, 255], [254, 0, 128]]
  np.testing.assert_array_equal(decode_image(str(_png16(tmp_path / "g.png", SIXTEEN))),
                                _grey(expected))
  rgb = np.stack([SIXTEEN, np.array(SIXTEEN)[:, ::-1], np.full((2, 3), 257 * 7)], axis=-1)
  want = np.stack([_to8(rgb[..., c]) for c in range(3)], axis=-1)
  np.testing.assert_array_equal(decode_image(str(_png16(tmp_path / "rgb.png", rgb))), want)
  rgba = np.concatenate([rgb, np.zeros((2, 3, 1), int)], axis=-1)  # alpha 0: colour kept
  np.testing.assert_array_equal(decode_image(str(_png16(tmp_path / "rgba.png", rgba))), want)
  la = np.stack([SIXTEEN, np.full((2, 3), 1000)], axis=-1)
  np.testing.assert_array_equal(decode_image(str(_png16(tmp_path / "la.png", la))),
                                _grey(expected))


def _tiff(path, array, **kwargs):
  tifffile.imwrite(path, array, **kwargs)
  return str(path)


def test_wide_integer_and_float_tiffs(tmp_path):
  rgb = np.stack([SIXTEEN, np.array(SIXTEEN)[::-1], np.full((2, 3), 4369)], -1).astype(np.uint16)
  want = np.stack([_to8(rgb[..., c]) for c in range(3)], axis=-1)
  np.testing.assert_array_equal(decode_image(_tiff(tmp_path / "rgb16.tif", rgb)), want)
  np.testing.assert_array_equal(
      decode_image(_tiff(tmp_path / "grey16.tif", np.array(SIXTEEN, np.uint16))),
      _grey(_to8(SIXTEEN)))
  u32 = np.array([[0, 2**31, 2**32 - 1]], np.uint32)
  np.testing.assert_array_equal(decode_image(_tiff(tmp_path / "u32.tif", u32)),
                                _grey(_to8(u32, 2**32 - 1)))
  i32 = np.array([[0, 2**30, 2**31 - 1]], np.int32)
  np.testing.assert_array_equal(decode_image(_tiff(tmp_path / "i32.tif", i32)),
                                _grey(_to8(i32, 2**31 - 1)))
  with pytest.raises(ImageDecodeError, match="negative"):
    decode_image(_tiff(tmp_path / "neg.tif", np.array([[-5, 3]], np.int32)))
  unit = np.array([[0.0, 0.5, 1.0]], np.float32)
  np.testing.assert_array_equal(decode_image(_tiff(tmp_path / "f01.tif", unit)),
                                _grey([[0, 128, 255]]))
  byte_range = np.array([[0.0, 100.4, 254.6]], np.float32)
  np.testing.assert_array_equal(decode_image(_tiff(tmp_path / "f255.tif", byte_range)),
                                _grey([[0, 100, 255]]))
  float_rgb = np.array([[[0.2, 0.4, 1.0]]], np.float32)  # Pillow cannot open this one
  np.testing.assert_array_equal(decode_image(_tiff(tmp_path / "frgb.tif", float_rgb)),
                                [[[51, 102, 255]]])
  for name, bad in (("big.tif", [[0.0, 300.0]]), ("nan.tif", [[0.0, np.nan]])):
    with pytest.raises(ImageDecodeError, match=r"\[0, 1\] or \[0, 255\]"):
      decode_image(_tiff(tmp_path / name, np.array(bad, np.float32)))


def test_pil_float_and_32bit_modes(tmp_path):
  Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "f.tif")), _grey([[0, 64, 255]]))
  i16 = np.array([[0, 1000, 65535]], np.uint16)
  assert Image.fromarray(i16).mode == "I;16"
  Image.fromarray(i16).save(tmp_path / "i16.png")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "i16.png")), _grey(_to8(i16)))


def test_palette_with_transparency_and_grey_modes(tmp_path):
  palette = [10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9)
  indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
  im = Image.fromarray(indices, "L").convert("P")
  im.putpalette(palette)
  im.save(tmp_path / "p.png", transparency=1)  # entry 1 transparent: its colour is kept
  assert Image.open(tmp_path / "p.png").mode == "P"
  want = np.array(palette[:9]).reshape(3, 3)[indices]
  np.testing.assert_array_equal(decode_image(str(tmp_path / "p.png")), want)
  Image.fromarray(indices * 100, "L").save(tmp_path / "l.png")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "l.png")), _grey(indices * 100))
  Image.fromarray(indices > 0).save(tmp_path / "bw.png")
  assert Image.open(tmp_path / "bw.png").mode == "1"
  np.testing.assert_array_equal(decode_image(str(tmp_path / "bw.png")),
                                _grey((indices > 0) * 255))


def test_alpha_is_dropped_keeping_the_stored_colour(tmp_path):
  rgba = np.array([[[255, 0, 0, 0], [0, 255, 0, 128], [0, 0, 255, 255]]], np.uint8)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "rgba.png")), rgba[..., :3])
  la = np.array([[[7, 0], [200, 255]]], np.uint8)
  Image.fromarray(la, "LA").save(tmp_path / "la.png")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "la.png")), _grey(la[..., 0]))
  np.testing.assert_array_equal(array_to_rgb(rgba), rgba[..., :3])


def _cmyk_formula(cmyk):
  c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
  return np.stack([np.round((255 - x) * (255 - k) / 255) for x in (c, m, y)], axis=-1)


def test_cmyk_tiff_converts_to_rgb(tmp_path):
  cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]],
                   [[100, 50, 20, 30], [200, 100, 50, 128], [10, 240, 90, 5]]], np.uint8)
  im = Image.frombytes("CMYK", (3, 2), cmyk.tobytes())
  im.save(tmp_path / "cmyk.tif")
  got = decode_image(str(tmp_path / "cmyk.tif")).astype(int)
  assert np.abs(got - _cmyk_formula(cmyk)).max() <= 1
  assert got[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
  im.save(tmp_path / "bad_icc.tif", icc_profile=b"not a profile")  # unusable: the formula
  np.testing.assert_array_equal(decode_image(str(tmp_path / "bad_icc.tif")), got)
  wide = cmyk.astype(np.uint16) * 257  # 16-bit inks go through tifffile
  np.testing.assert_array_equal(
      decode_image(_tiff(tmp_path / "cmyk16.tif", wide, photometric="separated")), got)


def test_exif_orientation_turns_the_image_upright(tmp_path):
  h, w = 16, 24
  a = np.zeros((h, w, 3), np.uint8)
  a[:6, :6] = (255, 0, 0)  # a red top-left corner
  for orientation, corner in ((6, (slice(0, 6), slice(h - 6, h))),  # 90 clockwise: top right
                              (8, (slice(w - 6, w), slice(0, 6)))):  # 90 anticlockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(a).save(path, quality=95, exif=exif)
    got = decode_image(str(path)).astype(int)
    assert got.shape == (w, h, 3)
    assert got[corner][1:-1, 1:-1, 0].min() > 200 and got[corner][1:-1, 1:-1, 1].max() < 60
    assert got[..., 0].sum() < 6 * 6 * 255 * 1.3  # the red block is the only red
  rng = np.random.default_rng(0)
  a = rng.integers(0, 255, (5, 7, 3), np.uint8)
  for orientation in range(1, 9):  # every orientation exactly as ImageOps.exif_transpose
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", exif=exif)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(decode_image(buf.getvalue()), want)


def test_undecodable_inputs_raise_one_error_type(tmp_path):
  for data in (b"", b"garbage" * 10, b"\x89PNG\r\n\x1a\n" + b"x" * 50):
    with pytest.raises(ImageDecodeError):
      decode_image(data)
  with pytest.raises(ImageDecodeError):
    decode_image(str(tmp_path / "missing.png"))


def test_fid_loader_uses_the_same_decoder(tmp_path):
  from vqjax.eval.feature_stats import FIDError
  from vqjax.eval.fid import load_image_299

  v = (np.arange(299 * 299, dtype=np.int64) * 7919 % 65536).reshape(299, 299)
  path = _png16(tmp_path / "g.png", v)
  x = load_image_299(str(path))
  np.testing.assert_allclose((x + 1.0) * 127.5, decode_image(str(path)), atol=1e-3)
  (tmp_path / "bad.png").write_bytes(b"garbage")
  with pytest.raises(FIDError, match="bad.png"):
    load_image_299(str(tmp_path / "bad.png"))


def _folder(root, n_good, n_bad):
  rng = np.random.default_rng(1)
  root.mkdir(exist_ok=True)
  for i in range(n_good):
    Image.fromarray(rng.integers(0, 255, (36, 40, 3), np.uint8)).save(root / f"good{i}.png")
  for i in range(n_bad):
    (root / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([i]) * 40)
  return root




def test_corrupt_files_warn_and_count_once_each(tmp_path, smoke_config, capfd):
  config = folder_config(smoke_config, _folder(tmp_path / "imgs", 5, 3))
  capfd.readouterr()
  ds, preprocess = train_dataset(config)
  it = iter(ds)
  for _ in range(10):  # 20 examples: four passes over the 5 good files, read-ahead beyond
    assert next(it)["image"].shape == (2, 32, 32, 3)
  assert preprocess.num_corrupt == 3
  lines = [x for x in capfd.readouterr().err.splitlines() if "undecodable" in x]
  assert len(lines) == 3 and len({x.split()[4] for x in lines}) == 3
  evals = list(eval_batches(config))  # a second pipeline over the same files: no new lines
  assert sum(float(b["mask"].sum()) for b in evals) == 5.0
  assert not [x for x in capfd.readouterr().err.splitlines() if "undecodable" in x]


def test_all_corrupt_folder_is_one_clear_error(tmp_path, smoke_config):
  folder = _folder(tmp_path / "bad", 0, 3)
  config = folder_config(smoke_config, folder)
  with pytest.raises(sources.ImagesNotDecodableError, match="could not be decoded") as info:
    list(eval_batches(config))
  assert str(folder) in str(info.value)
  assert isinstance(info.value, sources.DataSetNotFoundError)
  ds, _ = train_dataset(config)
  with pytest.raises(sources.ImagesNotDecodableError, match=str(folder)):
    next(iter(ds))
