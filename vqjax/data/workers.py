"""Training batches decoded in Grain worker processes (`config.data.workers` > 0).

The examples stream (`train_dataset`'s shuffled, repeated, augmented MapDataset) is cut
into chunks of `batch_size` consecutive positions, starting at the iterator's position.
Grain's `mp_prefetch` gives worker w of n the chunks w, w + n, ... and hands them back
in chunk order; a worker decodes and augments its chunk's examples and stacks the
decodable ones. The main process re-cuts the chunks into batches, so the batches are the
ones `workers = 0` gives (the decodable examples in stream order, `batch_size` at a time;
crops and flips are seeded by the stream position, whichever process draws them), and
a chunk without corrupt images passes through as the batch itself.

Corrupt images: each chunk also carries the failures its worker met for the first time
(`Preprocess.take_failures`; workers neither warn nor count). The main process hands
them to the Preprocess that `train_dataset` returns (`Preprocess.record_failures`),
which warns once per file, counts each distinct file once and raises
ImagesNotDecodableError once every file has failed. Chunks with no decodable image
still arrive, so a folder of undecodable files is an error, not a hang.

State: `{'next_index': position of the first example not yet returned}`, the format
of the `workers = 0` iterator, so a checkpoint resumes with any number of workers.
`set_state` restarts the workers at that position; `close()` (also on an error, and
when the iterator is garbage collected or the interpreter exits) stops them. Workers
ignore Ctrl-C (SIGINT): the main process decides when they stop.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import weakref

import grain
import numpy as np
from absl import flags


class _Chunk:
  """Chunk c: the examples at positions [start + c*size, start + (c+1)*size) of `examples`.

  Runs in a worker process. Returns {'positions': int64 [k] (of the k decodable examples),
  'failures': [(path, why)] met for the first time in this worker, 'examples': the k
  examples stacked (absent when k = 0)}.
  """

  def __init__(self, examples: grain.MapDataset, mapper, start: int, size: int):
    self.examples = examples
    self.mapper = mapper  # the Preprocess inside `examples` (the same object once unpickled)
    self.start = start
    self.size = size

  def __call__(self, c: int) -> dict:
    lo = self.start + c * self.size
    kept, positions = [], []
    for i in range(lo, min(lo + self.size, len(self.examples))):
      example = self.examples[i]
      if example is not None:
        kept.append(example)
        positions.append(i)
    out = {"positions": np.asarray(positions, np.int64), "failures": self.mapper.take_failures()}
    if kept:
      out["examples"] = {k: _stack_in_shared_memory([e[k] for e in kept]) for k in kept[0]}
    return out


def _stack_in_shared_memory(values: list) -> np.ndarray:
  """np.stack(values), written straight into shared memory: Grain then hands the block
  to the main process as it is, without another copy."""
  first = np.asarray(values[0])
  out = grain.multiprocessing.SharedMemoryArray((len(values),) + first.shape, first.dtype)
  for i, v in enumerate(values):
    out[i] = v
  return out


def _leave_interrupts_to_the_main_process(worker_index: int, worker_count: int) -> None:
  """Worker start-up: ignore SIGINT. Ctrl-C reaches the whole process group; the trainer
  stops at the next step (vqjax.train.loop.StopRequest) and closes the iterator, which
  stops the workers, instead of meeting workers killed mid-batch."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerBatches:
  """Per-process training batches of `examples`, decoded in `workers` Grain processes.

  Iterated like the `workers = 0` IterDataset: `iter()` gives a WorkerBatchIterator
  (`get_state()` / `set_state()` / `close()`).
  """

  def __init__(self, examples: grain.MapDataset, batch_size: int, preprocess, mapper,
               workers: int, prefetch: int):
    self.examples = examples
    self.batch_size = batch_size
    self.preprocess = preprocess  # main process: warns, counts, raises
    self.mapper = mapper  # workers' copy (Preprocess.for_workers), used inside `examples`
    self.workers = workers
    self.prefetch = prefetch

  def __iter__(self) -> WorkerBatchIterator:
    return WorkerBatchIterator(self)


class WorkerBatchIterator:
  """Batches of a WorkerBatches; the worker processes start at the first `next()`."""

  def __init__(self, ds: WorkerBatches):
    self._ds = ds
    self._next_index = 0  # stream position of the first example not yet returned
    self._pieces: collections.deque = collections.deque()  # (arrays, positions) not returned
    self._buffered = 0
    self._chunks = None  # Grain iterator over the chunks (the workers)
    self._stop = None  # weakref.finalize closing `_chunks`

  def __iter__(self) -> WorkerBatchIterator:
    return self

  def _start(self) -> None:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()  # (tests, notebooks) they keep their defaults
    ds = self._ds
    start = self._next_index
    count = -(-(len(ds.examples) - start) // ds.batch_size)
    chunks = grain.MapDataset.range(count).map(_Chunk(ds.examples, ds.mapper, start,
                                                      ds.batch_size))
    # In each worker one chunk at a time, no threads: the processes are the parallelism.
    chunks = chunks.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it = iter(chunks.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=ds.workers, per_worker_buffer_size=ds.prefetch),
        worker_init_fn=_leave_interrupts_to_the_main_process))
    self._stop = weakref.finalize(self, it.close)  # holds `it`, not self
    self._chunks = it
    # get_state() creates every worker's iterator now (Grain would create them one by one
    # as the interleave reaches them), so that close() reaches all of them; then start
    # all the processes together.
    it.get_state()
    it.start_prefetch()

  def __next__(self) -> dict:
    try:
      return self._next_batch()
    except BaseException:
      with contextlib.suppress(Exception):  # the error to see is the one that stopped us
        self.close()  # an error (or the end) leaves no worker running
      raise

  def _next_batch(self) -> dict:
    if self._chunks is None:
      self._start()
    size = self._ds.batch_size
    while self._buffered < size:
      chunk = next(self._chunks)
      self._ds.preprocess.record_failures(chunk["failures"])
      if len(chunk["positions"]):
        self._ds.preprocess.decoded_any = True
        self._pieces.append((chunk["examples"], chunk["positions"]))
        self._buffered += len(chunk["positions"])
    parts, need = [], size
    while need:
      arrays, positions = self._pieces[0]
      k = min(need, len(positions))
      if k == len(positions):
        self._pieces.popleft()
      else:
        self._pieces[0] = ({key: v[k:] for key, v in arrays.items()}, positions[k:])
        arrays, positions = {key: v[:k] for key, v in arrays.items()}, positions[:k]
      parts.append(arrays)
      need -= k
    self._buffered -= size
    self._next_index = int(positions[-1]) + 1
    if len(parts) > 1:
      return {key: np.asarray(np.concatenate([p[key] for p in parts])) for key in parts[0]}
    return {key: np.asarray(v) for key, v in parts[0].items()}  # plain arrays over shared memory

  def get_state(self) -> dict:
    return {"next_index": self._next_index}

  def set_state(self, state: dict) -> None:
    index = int(state["next_index"])
    if not 0 <= index <= len(self._ds.examples):
      raise IndexError(f"data iterator state next_index={index} is outside the stream "
                       f"(length {len(self._ds.examples)})")
    self.close()
    self._next_index = index

  def close(self) -> None:
    """Stop the worker processes (a later `next()` starts them again at the same position)."""
    if self._stop is not None:
      self._stop()  # it.close(): each worker is asked to stop, joined, killed if it hangs
    self._stop = self._chunks = None
    self._pieces.clear()
    self._buffered = 0
