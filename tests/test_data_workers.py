"""config.data.workers: training batches decoded in Grain worker processes.

The same batches, iterator states and corrupt-file counts and warnings as with workers = 0;
a checkpointed state resumes exactly; an all-corrupt folder is an error, not a hang; no
worker process outlives its iterator. Each worker pipeline starts processes (seconds
each), so the worker tests build only three.
"""

import gc
import multiprocessing
import os
import pickle
import signal

import numpy as np
import pytest
from PIL import Image

from tests.conftest import folder_config
from vqjax.data import pipeline, sources
from vqjax.data.pipeline import Preprocess, train_dataset
from vqjax.errors import ConfigError

BAD = ("garbage.jpg", "truncated.jpg", "empty.jpg")


def _jpeg_folder(root, n_good=10):
  """`n_good` smooth JPEGs of a few sizes in two class folders, and the three BAD files."""
  rng = np.random.default_rng(3)
  for i in range(n_good):
    sub = root / ("a" if i % 2 else "b")
    sub.mkdir(parents=True, exist_ok=True)
    h, w = (40, 48) if i % 3 else (52, 36)
    coarse = Image.fromarray(rng.integers(0, 255, (4, 5, 3), np.uint8))
    coarse.resize((w, h), Image.BICUBIC).save(sub / f"im{i}.jpg", quality=90)
  (root / "a" / BAD[0]).write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 30)
  whole = (root / "b" / "im0.jpg").read_bytes()
  (root / "b" / BAD[1]).write_bytes(whole[: len(whole) // 3])
  (root / "b" / BAD[2]).write_bytes(b"")
  return root


def _config(smoke_config, folder, workers, prefetch=2):
  config = folder_config(smoke_config, folder)
  with config.unlocked():
    config.train.batch_size = 4
    config.data.workers = workers
    config.data.prefetch = prefetch
  return config


def _undecodable_lines(capfd) -> list[str]:
  return [x for x in capfd.readouterr().err.splitlines() if "undecodable" in x]


def _assert_same(batches, expected):
  assert len(batches) == len(expected)
  for got, want in zip(batches, expected, strict=True):
    assert sorted(got) == sorted(want)
    for key in want:
      assert type(got[key]) is np.ndarray and got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _no_workers_left():
  gc.collect()
  return not multiprocessing.active_children()


def test_workers_match_in_process_batches_counts_warnings_and_resume(tmp_path, smoke_config,
                                                                       capfd, monkeypatch):
  folder = _jpeg_folder(tmp_path / "imgs")
  n, cut = 8, 3  # 32 examples: three passes over the 10 good files, every bad file met
  capfd.readouterr()
  ds, reference_pre = train_dataset(_config(smoke_config, folder, workers=0))
  it = iter(ds)
  expected, states = [], []
  for _ in range(n):
    expected.append(next(it))
    states.append(it.get_state())
  assert all(b["image"].shape == (4, 32, 32, 3) for b in expected)
  assert reference_pre.num_corrupt == 3 and reference_pre.num_without_map == 0
  reference_lines = _undecodable_lines(capfd)
  assert sorted(x.split()[4].rsplit("/", 1)[1] for x in reference_lines) == sorted(BAD)

  monkeypatch.setattr(pipeline, "_WARNED", set())  # as in a fresh process: warn again
  ds, preprocess = train_dataset(_config(smoke_config, folder, workers=2, prefetch=1))
  it = iter(ds)
  got = [next(it) for _ in range(cut)]
  state = it.get_state()
  assert state == states[cut - 1]  # the workers = 0 format and value: portable
  got += [next(it) for _ in range(n - cut)]
  assert it.get_state() == states[-1]
  _assert_same(got, expected)
  assert preprocess.num_corrupt == 3 and preprocess.num_without_map == 0
  assert sorted(_undecodable_lines(capfd)) == sorted(reference_lines)  # once per file
  assert len(multiprocessing.active_children()) == 2
  it.close()
  assert _no_workers_left()

  resumed = iter(train_dataset(_config(smoke_config, folder, workers=2))[0])
  resumed.set_state(state)
  got = [next(resumed)]
  for worker in multiprocessing.active_children():  # Ctrl-C reaches the process group:
    os.kill(worker.pid, signal.SIGINT)  # the workers leave it to the main process
  got += [next(resumed) for _ in range(n - cut - 1)]
  _assert_same(got, expected[cut:])
  assert resumed.get_state() == states[-1]
  del resumed  # dropped without close(): its workers stop too
  assert _no_workers_left()


def test_all_corrupt_folder_with_workers_is_one_clear_error(tmp_path, smoke_config):
  folder = tmp_path / "bad"
  folder.mkdir()
  for i in range(5):
    (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8" + bytes([i]) * 50)
  ds, preprocess = train_dataset(_config(smoke_config, folder, workers=2))
  with pytest.raises(sources.ImagesNotDecodableError, match=str(folder)):
    next(iter(ds))
  assert preprocess.num_corrupt == 5
  assert _no_workers_left()


def test_workers_and_prefetch_are_validated(smoke_config):
  for workers, prefetch, field in ((-1, 2, "workers"), (2, 0, "prefetch")):
    with smoke_config.unlocked():
      smoke_config.data.update(workers=workers, prefetch=prefetch)
    with pytest.raises(ConfigError, match=f"data.{field}={min(workers, prefetch)}"):
      sources.validate_data_config(smoke_config.data)
  with smoke_config.unlocked():
    smoke_config.data.update(workers=4, prefetch=1)
  sources.validate_data_config(smoke_config.data)


def test_worker_copy_hands_failures_to_the_main_preprocess(tmp_path, capfd, monkeypatch):
  monkeypatch.setattr(pipeline, "_WARNED", set())
  main = Preprocess(8, 8, False, False, num_files=3, root="the-folder", label_maps="paired")
  clone = pickle.loads(pickle.dumps(main))  # picklable, lock and all
  assert clone.num_corrupt == 0 and clone.num_files == 3
  worker = pickle.loads(pickle.dumps(main.for_workers()))
  rng = np.random.default_rng(0)
  capfd.readouterr()
  bad = {"image": b"\xff\xd8 no", "label": 0, "path": "x/bad.jpg", "label_map": "x/bad.png"}
  no_map = {"image": b"", "label": 0, "path": "x/lonely.jpg", "label_map": None}
  for _ in range(2):  # the second time: known, not handed on again
    assert worker(bad, rng) is None and worker(no_map, rng) is None
    assert worker.num_corrupt == 2
  failures = worker.take_failures()
  assert [p for p, _ in failures] == ["x/bad.jpg", "x/lonely.jpg"] and not worker.take_failures()
  assert not _undecodable_lines(capfd)  # workers do not warn
  main.record_failures(failures)
  main.record_failures(failures)  # another worker meeting the same files
  assert main.num_corrupt == 2 and main.num_without_map == 1
  lines = _undecodable_lines(capfd)
  assert len(lines) == 1 and "x/bad.jpg" in lines[0]  # a file without a map: the source warned
  with pytest.raises(sources.ImagesNotDecodableError, match="the-folder"):
    main.record_failures([("x/third.jpg", "broken")])
