"""Where results go: metric writers, image grids and JSON files (the console is
`vqjax.console`)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
from clu import metric_writers
from PIL import Image

from vqjax.ops.images import to_uint8


def image_grid(columns: list[np.ndarray], max_rows: int = 8) -> np.ndarray:
  """Side-by-side columns of [B, H, W, 3] images in [-1, 1] -> uint8 [rows*H, cols*W, 3]."""
  rows = min(max_rows, columns[0].shape[0])
  tiles = [np.concatenate([np.asarray(col[r]) for col in columns], axis=1) for r in range(rows)]
  grid = np.concatenate(tiles, axis=0)
  return to_uint8(grid)


def write_images(writer, workdir: str, step: int, name: str, grid: np.ndarray) -> str:
  """TensorBoard image and `workdir/images/<name>_<step>.png`."""
  writer.write_images(step, {name: grid[None]})
  folder = os.path.join(workdir, "images")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}_{step:07d}.png")
  Image.fromarray(grid).save(path)
  return path


def make_writer(workdir: str, is_main_process: bool):
  """CLU's TensorBoard writer on the main process; logging only elsewhere."""
  return metric_writers.create_default_writer(workdir, just_logging=not is_main_process)


def _json_values(value, path: str, bad: list[str]):
  """`value` with NumPy scalars and arrays as Python values, tuples as lists, and NaN/inf
  floats as None (their dotted paths appended to `bad`)."""
  if isinstance(value, dict):
    return {k: _json_values(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_values(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
  if isinstance(value, (np.ndarray, np.generic)):
    return _json_values(value.tolist(), path, bad)
  if isinstance(value, float) and not math.isfinite(value):
    bad.append(path or "(value)")
    return None
  return value


def json_payload(payload):
  """`payload` as strict JSON can hold it: NumPy values as Python ones, and each non-finite
  float as null, with a line in `notes` (added to a dict payload) naming those fields."""
  bad: list[str] = []
  out = _json_values(payload, "", bad)
  if bad and isinstance(out, dict):
    notes = out.get("notes")
    notes = list(notes) if isinstance(notes, list) else ([notes] if notes else [])
    fields = ", ".join(sorted(bad))
    out["notes"] = notes + [f"non-finite values (NaN or inf) written as null: {fields}"]
  return out


def write_json(path: str, payload: dict) -> None:
  """Atomically write `payload` as indented, valid JSON (`json_payload`: NaN/inf as null)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(json_payload(payload), f, indent=2, sort_keys=True, allow_nan=False)
  os.replace(tmp, path)


def flat_dict(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
