"""Each process's rows of every global batch (vqjax.data.rows): disjoint, together the
1-process batch, every example once per epoch; checked by hand and on the real pipelines."""

import grain
import numpy as np
import pytest

from vqjax.data.rows import distinct_positions, process_rows


def rows_of(n, global_batch, p, count):
  return list(process_rows(grain.MapDataset.range(n), global_batch, p, count))


def test_hand_example_of_two_processes():
  # 10 elements, global batches of 4: [0 1 2 3] [4 5 6 7] [8 9]; process 0 reads 2 of each.
  assert rows_of(10, 4, 0, 2) == [0, 1, 4, 5, 8, 9]
  assert rows_of(10, 4, 1, 2) == [2, 3, 6, 7]
  assert rows_of(8, 4, 1, 1) == list(range(8))  # one process: the stream itself


@pytest.mark.parametrize("n,batch,count", [(24, 8, 2), (30, 8, 4), (7, 6, 3)])
def test_processes_are_disjoint_and_cover_each_global_batch(n, batch, count):
  per = batch // count
  rows = [rows_of(n, batch, p, count) for p in range(count)]
  assert sorted(sum(rows, [])) == list(range(n))  # every element once, by one process
  for j in range(n // batch):  # full global batches: the processes' b rows, in order
    assert sum((r[j * per:(j + 1) * per] for r in rows), []) == list(
        range(j * batch, (j + 1) * batch))


def test_global_batch_must_split():
  with pytest.raises(ValueError, match="does not split"):
    process_rows(grain.MapDataset.range(8), 6, 0, 4)


@pytest.mark.parametrize("n,batch,count", [(10, 4, 2), (12, 4, 2), (9, 6, 3), (16, 8, 4),
                                           (7, 4, 4)])
def test_distinct_positions_by_brute_force(n, batch, count):
  per = batch // count
  for p in range(count):
    seen = {((i // per) * batch + p * per + i % per) % n for i in range(n * batch * 2)}
    assert distinct_positions(n, batch, count) == len(seen)


def test_train_batches_of_two_processes_are_the_one_process_batches(smoke_config):
  from vqjax.data.pipeline import train_dataset

  c = smoke_config.copy_and_resolve_references()
  with c.unlocked():
    c.train.batch_size = 4
  one = iter(train_dataset(c, 0, 1)[0])
  two = [iter(train_dataset(c, p, 2)[0]) for p in range(2)]
  for _ in range(3):
    whole = next(one)
    halves = [next(it) for it in two]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_token_batches_of_two_processes_are_the_one_process_batches(tmp_path):
  from ml_collections import ConfigDict

  from vqjax.data.tokens import TokenStore, TokenStoreWriter
  from vqjax.train.transformer import token_dataset

  writer = TokenStoreWriter(str(tmp_path), (2, 2), 16, shard_size=5)
  writer.add(np.arange(12 * 4).reshape(12, 2, 2) % 16, np.arange(12))
  writer.finish()
  store = TokenStore(str(tmp_path))
  c = ConfigDict({"seed": 3, "train": {"batch_size": 4}})
  one = iter(token_dataset(c, store, 0, 1))
  two = [iter(token_dataset(c, store, p, 2)) for p in range(2)]
  labels = []
  for _ in range(6):  # two epochs of 12
    whole = next(one)
    halves = [next(it) for it in two]
    np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]),
                                  whole["label"])
    labels.append(whole["label"])
  epoch = np.concatenate(labels[:3])
  assert sorted(epoch) == list(range(12))  # each example once per epoch
