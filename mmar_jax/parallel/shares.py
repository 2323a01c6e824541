"""Which process does which item of a many-item job (generate --prompts, prepare-data, caption
--images, eval understanding, eval fid).

The rule every such command follows: the items still to do are the input list minus what is
already on disk, in input order, and process p of P does its part of that list. Both steps are
pure functions of (input list, done set, P), so any run, a resumed one on another process count
included, does each missing item exactly once. What is "already done" is process 0's view of the
output folder, broadcast to the others (`agreed`): a shared folder seen from several hosts can
disagree for a moment (an object store lists lazily), and processes that disagree on the list
would run different programs.

Two ways to take a share:
  * per host (`share`): process p does todo[p::P] on its local devices, params replicated per
    host; strided, so a partial tail spreads over every process;
  * SPMD (`global_rows` / `owned_rows`): every process runs the same program over a global batch
    on a global mesh; a row of the output belongs to the process whose device holds it (replica
    0 of it), so every row is written once.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmar_jax.parallel import distributed

T = TypeVar("T")


def missing(items: Sequence[T], done: Sequence[bool]) -> list[T]:
  """The items not done, in input order."""
  if len(items) != len(done):
    raise ValueError(f"{len(items)} items but {len(done)} done flags")
  return [it for it, d in zip(items, done) if not d]


def share(todo: Sequence[T], process_index: int, process_count: int) -> list[T]:
  """Process `process_index`'s part of `todo` (per-host mode): every P-th item from its index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process {process_index} is not in [0, {process_count})")
  return list(todo[process_index::process_count])


def batches(todo: Sequence[T], batch_size: int) -> Iterator[tuple[list[T], list[T]]]:
  """(chunk, padded) pairs: consecutive chunks of `todo`, each padded with repeats of its last
  item to `batch_size` (one static shape; the repeats' results are dropped)."""
  for start in range(0, len(todo), batch_size):
    chunk = list(todo[start:start + batch_size])
    yield chunk, chunk + [chunk[-1]] * (batch_size - len(chunk))


def agreed(check: Callable[[int], bool], count: int, name: str) -> list[bool]:
  """[check(i) for i < count] as process 0 sees it, on every process (module docstring).

  Only process 0 calls `check` (one look at the folder, not P). The others meet it at a
  coordination-service barrier first: the broadcast is a device collective, whose peers on CPU
  must join within seconds of each other."""
  if jax.process_count() == 1:
    return [bool(check(i)) for i in range(count)]

  flags = np.zeros((count,), np.int32)
  if jax.process_index() == 0:
    flags[:] = [bool(check(i)) for i in range(count)]
  distributed.barrier(f"mmar_{name}_listed")
  return [bool(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(flags))]


# -- SPMD: global batches in, this process's rows out ---------------------------------------------

def global_rows(host: np.ndarray, sharding) -> "jax.Array":
  """A global array from a host array every process holds whole (the same global batch)."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def owned_rows(array) -> Iterator[tuple[int, np.ndarray]]:
  """(row, value) of each row of a global array that this process writes: the rows of its
  addressable shards with replica id 0. Over all processes, every row exactly once."""
  for shard in array.addressable_shards:
    if shard.replica_id != 0:
      continue
    rows = shard.index[0] if shard.index else slice(None)
    start = rows.start or 0
    data = np.asarray(shard.data)
    for j in range(data.shape[0]):
      yield start + j, data[j]
