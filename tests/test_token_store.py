"""The sharded token store: round trip, resume after a kill, mismatch errors, damaged shards,
Grain reading."""

import grain
import numpy as np
import pytest

from vqjax.data.sources import DataSetNotFoundError
from vqjax.data.tokens import TokenStore, TokenStoreError, TokenStoreWriter
from vqjax.errors import UserError


def _data(n, shape=(4, 4, 3), k=1000, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, k, (n,) + shape), rng.integers(0, 10, n)


def test_round_trip_across_shards(tmp_path):
  tokens, labels = _data(25)
  w = TokenStoreWriter(str(tmp_path), (4, 4, 3), 1000, shard_size=10)
  for i in range(0, 25, 7):  # batches that straddle shard boundaries
    w.add(tokens[i:i + 7], labels[i:i + 7])
  w.finish()
  store = TokenStore(str(tmp_path))
  assert len(store) == 25 and store.token_shape == (4, 4, 3)
  assert [s["count"] for s in store.meta["shards"]] == [10, 10, 5]
  for i in (0, 9, 10, 24):
    np.testing.assert_array_equal(store[i]["tokens"], tokens[i])
    assert store[i]["label"] == labels[i]
  with pytest.raises(IndexError):
    store[25]


def test_killed_writer_resumes_without_duplicates(tmp_path):
  tokens, labels = _data(23, shape=(2, 2), k=40000)
  w = TokenStoreWriter(str(tmp_path), (2, 2), 40000, shard_size=8)
  w.add(tokens[:19], labels[:19])  # two shards written, 3 examples only in memory: "killed"
  with pytest.raises(TokenStoreError, match="incomplete"):
    TokenStore(str(tmp_path))
  again = TokenStoreWriter(str(tmp_path), (2, 2), 40000, shard_size=8)
  assert again.num_done == 16 and not again.complete
  again.add(tokens[16:], labels[16:])
  again.finish()
  store = TokenStore(str(tmp_path))
  got = np.stack([store[i]["tokens"] for i in range(len(store))])
  np.testing.assert_array_equal(got, tokens)  # int32 codes above int16 survive
  with pytest.raises(TokenStoreError, match="token_shape"):
    TokenStoreWriter(str(tmp_path), (4, 4), 40000)


def test_grain_reads_the_store(tmp_path):
  tokens, labels = _data(12, shape=(3, 3))
  w = TokenStoreWriter(str(tmp_path), (3, 3), 1000, shard_size=5)
  w.add(tokens, labels)
  w.finish()
  ds = grain.MapDataset.source(TokenStore(str(tmp_path))).to_iter_dataset().batch(4)
  batches = list(ds)
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]), tokens)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)


def test_missing_store_says_to_tokenize(tmp_path):
  with pytest.raises(TokenStoreError, match="--mode=tokenize"):
    TokenStore(str(tmp_path / "none"))


def _finished_store(folder, workdir, split="train"):
  tokens, labels = _data(12, shape=(3, 3))
  w = TokenStoreWriter(str(folder), (3, 3), 1000, shard_size=5,
                       source={"data": {"source": "folder", "split": split},
                               "tokenizer_workdir": str(workdir), "checkpoint_step": 4})
  w.add(tokens, labels)
  w.finish()


def test_truncated_shard_names_the_file_and_the_rebuild_command(tmp_path):
  workdir = tmp_path / "tok"
  folder = workdir / "tokens_train"
  _finished_store(folder, workdir)
  shard = folder / "tokens_00001.npy"
  shard.write_bytes(shard.read_bytes()[:-7])
  with pytest.raises(TokenStoreError) as info:
    TokenStore(str(folder))
  message = str(info.value)
  assert str(shard) in message and "truncated" in message
  assert (f"python -m vqjax.main --config=<the tokenizer recipe> --workdir={workdir} "
          "--mode=tokenize --config.tokenize.split=train`") in message
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_shard_of_the_wrong_dtype_or_shape_or_missing(tmp_path):
  workdir = tmp_path / "tok"
  folder = tmp_path / "elsewhere"
  _finished_store(folder, workdir, split="validation")
  np.save(folder / "tokens_00000.npy", np.zeros((5, 3, 3), np.int32))  # store holds int16
  with pytest.raises(TokenStoreError, match=r"tokens_00000\.npy holds int32 \(5, 3, 3\)") as info:
    TokenStore(str(folder))
  assert f"--config.tokenize.output_dir={folder}" in str(info.value)
  assert "--config.tokenize.split=validation" in str(info.value)
  np.save(folder / "tokens_00000.npy", np.zeros((4, 3, 3), np.int16))
  with pytest.raises(TokenStoreError, match=r"int16 \(4, 3, 3\), but meta.json says"):
    TokenStore(str(folder))
  (folder / "tokens_00000.npy").unlink()
  (folder / "labels_00002.npy").write_bytes(b"not npy")
  with pytest.raises(TokenStoreError, match=r"tokens_00000\.npy is missing"):
    TokenStore(str(folder))


def test_data_errors_are_user_errors():
  assert issubclass(DataSetNotFoundError, UserError)
  assert issubclass(DataSetNotFoundError, FileNotFoundError)
  assert issubclass(TokenStoreError, UserError)


def test_condition_maps_round_trip_resume_and_mismatch(tmp_path):
  tokens, labels = _data(13, shape=(2, 2), k=50)
  conditions = np.random.default_rng(1).integers(0, 151, (13, 2, 2))
  w = TokenStoreWriter(str(tmp_path), (2, 2), 50, shard_size=5, condition_shape=(2, 2))
  # two shards; one example only in memory (a Fortran-ordered batch, as label-map slicing gives)
  w.add(tokens[:11], labels[:11], np.asfortranarray(conditions[:11]))
  with pytest.raises(TokenStoreError, match="condition maps of shape None"):
    w.add(tokens[11:], labels[11:])  # a store with maps takes no batch without them
  again = TokenStoreWriter(str(tmp_path), (2, 2), 50, shard_size=5, condition_shape=(2, 2))
  assert again.num_done == 10
  again.add(tokens[10:], labels[10:], conditions[10:])
  again.finish()
  store = TokenStore(str(tmp_path))
  assert store.condition_shape == (2, 2) and store.max_condition() == conditions.max()
  for i in range(13):
    np.testing.assert_array_equal(store[i]["condition"], conditions[i])
    np.testing.assert_array_equal(store[i]["tokens"], tokens[i])
  # the same folder cannot be reopened without maps, or with maps of another shape
  for shape in (None, (4, 4)):
    with pytest.raises(TokenStoreError, match="condition_shape"):
      TokenStoreWriter(str(tmp_path), (2, 2), 50, condition_shape=shape)
  # a damaged condition shard is named
  with open(tmp_path / store.meta["shards"][1]["conditions"], "r+b") as f:
    f.truncate(100)
  with pytest.raises(TokenStoreError, match="conditions_00001.npy"):
    TokenStore(str(tmp_path))
  # a store without maps has no 'condition' key and no condition shape
  plain = TokenStoreWriter(str(tmp_path / "plain"), (2, 2), 50)
  plain.add(tokens, labels)
  plain.finish()
  assert TokenStore(str(tmp_path / "plain")).condition_shape is None
  assert "condition" not in TokenStore(str(tmp_path / "plain"))[0]
