"""Each process's rows of every global batch, for multi-process training.

A training stream (shuffled, repeated, augmented) is defined once for the whole run,
identically in every process. Its elements are cut into global batches of
`global_batch` rows; process p of P reads rows [p*b, (p+1)*b) of each, b =
global_batch / P. So:
  - the processes read disjoint slices, and together exactly the 1-process batch
    (the step sees the same global batch, so a P-process run equals a 1-process run);
  - over an epoch every example is read once, by one process;
  - per-element randomness (Grain's `random_map` seeds by the element's index in the
    stream) is the same whatever P is.
Corrupt images (None elements) are dropped after the selection, so a process whose
rows hold one fills its batch from its next rows: batches then differ from the
1-process run's from that point on, though every example is still read once.
"""

from __future__ import annotations

import math

import grain


class _ProcessRows:
  """Random-access view: element i of process p's rows of a stream `ds`."""

  def __init__(self, ds, global_batch: int, process_index: int, process_count: int):
    self.ds = ds
    self.global_batch = global_batch
    self.per_process = global_batch // process_count
    self.offset = process_index * self.per_process
    n = len(ds)
    full, rest = divmod(n, global_batch)
    self.length = full * self.per_process + min(max(rest - self.offset, 0), self.per_process)

  def global_index(self, i: int) -> int:
    return (i // self.per_process) * self.global_batch + self.offset + i % self.per_process

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int):
    return self.ds[self.global_index(i)]


def process_rows(ds: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int) -> grain.MapDataset:
  """The MapDataset of process `process_index`'s rows of every `global_batch`-row batch of
  `ds` (see the module docstring). `global_batch` must be a multiple of `process_count`."""
  if global_batch % process_count:
    raise ValueError(f"a global batch of {global_batch} does not split over "
                     f"{process_count} processes")
  if process_count == 1:
    return ds
  return grain.MapDataset.source(_ProcessRows(ds, global_batch, process_index, process_count))


def distinct_positions(n: int, global_batch: int, process_count: int) -> int:
  """How many distinct positions (mod n) of an n-element epoch, repeated without end, a
  process's rows ever cover, the same for every process: the residues (p*b + j) mod
  gcd(B, n), j < b, each standing for n / gcd(B, n) positions."""
  b = global_batch // process_count
  d = math.gcd(global_batch, n)
  return (n // d) * min(b, d)
