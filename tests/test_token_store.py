"""The sharded token store: round trip, resume after a kill, mismatch errors, Grain reading."""

import grain
import numpy as np
import pytest

from vqjax.data.tokens import TokenStore, TokenStoreError, TokenStoreWriter


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
