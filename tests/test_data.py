"""Sources and the Grain pipeline: determinism, resumable state, corrupt files, clear errors."""

import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import folder_config
from vqjax.data import sources
from vqjax.data.pipeline import eval_batches, train_dataset


def _write_folder(root, n_good=4):
  rng = np.random.default_rng(0)
  for i in range(n_good):
    sub = root / ("cats" if i % 2 else "dogs")
    sub.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(sub / f"im{i}.png")
  (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
  good = (root / "cats" / "im1.png").read_bytes()
  (root / "cats" / "truncated.png").write_bytes(good[: len(good) // 3])




def test_corrupt_images_are_skipped_and_counted(tmp_path, smoke_config):
  _write_folder(tmp_path)
  config = folder_config(smoke_config, tmp_path)
  ds, preprocess = train_dataset(config)
  it = iter(ds)
  batches = [next(it) for _ in range(6)]  # 12 examples: two epochs of the 4 good files
  for b in batches:
    assert b["image"].shape == (2, 32, 32, 3)
    assert np.all(np.abs(b["image"]) <= 1.0)
  assert preprocess.num_corrupt == 2  # both bad files, each counted once
  labels = np.concatenate([b["label"] for b in batches])
  assert set(labels.tolist()) == {0, 1}  # classes from sub-folders: cats=0, dogs=1
  evals = list(eval_batches(config))
  assert sum(float(b["mask"].sum()) for b in evals) == 4.0
  assert all(b["image"].shape == (4, 32, 32, 3) for b in evals)


def test_training_stream_is_deterministic_and_resumable(smoke_config):
  ds, _ = train_dataset(smoke_config)
  a = iter(ds)
  first = [next(a)["image"] for _ in range(3)]
  state = a.get_state()
  following = next(a)["image"]
  b = iter(train_dataset(smoke_config)[0])
  np.testing.assert_array_equal(next(b)["image"], first[0])
  c = iter(train_dataset(smoke_config)[0])
  c.set_state(state)
  np.testing.assert_array_equal(next(c)["image"], following)
  assert not np.array_equal(first[0], first[1])


def test_process_slices_are_disjoint(smoke_config):
  halves = [train_dataset(smoke_config, process_index=i, process_count=2)[0] for i in range(2)]
  a, b = (next(iter(h))["image"] for h in halves)
  assert a.shape[0] == smoke_config.train.batch_size // 2
  assert not np.array_equal(a, b)


def test_embedded_split_is_by_image():
  train = sources.embedded_source("train", 1)
  val = sources.embedded_source("validation", 1)
  assert not set(train.paths) & set(val.paths)
  assert len(train) + len(val) == len(sources.EMBEDDED_IMAGES)


def test_missing_folder_and_tfds_errors_say_what_to_do(tmp_path):
  with pytest.raises(sources.DataSetNotFoundError, match="config.data.folder"):
    sources.list_images(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(sources.DataSetNotFoundError, match="no .* images"):
    sources.list_images(str(empty))
  with pytest.raises(sources.DataSetNotFoundError) as info:
    sources.TfdsSource("mnist", "train", str(tmp_path / "tfds"))
  message = str(info.value)
  assert str(tmp_path / "tfds") in message and "tfds build mnist" in message


def test_folder_without_val_folder_holds_out_every_nth(tmp_path):
  _write_folder(tmp_path)
  train = sources.folder_source(str(tmp_path), "", "train", 0.25)
  val = sources.folder_source(str(tmp_path), "", "validation", 0.25)
  assert len(train) == 5 and len(val) == 1  # 6 files (2 corrupt), every 4th held out
  assert not set(train.paths) & set(val.paths)
  assert all(os.path.exists(p) for p in train.paths + val.paths)


def test_embedded_eval_crops_are_distinct_and_repeatable(smoke_config):
  first = np.concatenate([b["image"] for b in eval_batches(smoke_config)])
  again = np.concatenate([b["image"] for b in eval_batches(smoke_config)])
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first[0], first[1])  # two crops of the same val image differ
