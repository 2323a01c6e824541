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
  * SPMD (`RowProgram`, `global_rows` / `owned_rows`): every process runs the same program over
    a global batch on a global mesh; a row of the output belongs to the process whose device
    holds it (replica 0 of it), so every row is written once.

A job whose outputs are records rather than files keeps one JSON file per finished item
(`ItemRecords`) until the merged output is written: that is what a re-run reads as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import shutil
from typing import Callable, Iterator, Sequence, TypeVar

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmar_jax.errors import InputError
from mmar_jax.files import remove_temporaries, write_bytes_atomic
from mmar_jax.parallel import distributed

T = TypeVar("T")
_CHECKS = itertools.count()  # barrier names: every process makes the same calls in the same order


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


def check_same(text: str, what: str) -> None:
  """Stops every process, naming `what`, unless `text` (a list of inputs each process read for
  itself) is the same on all of them: processes that disagree would share different lists."""

  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint32)
  distributed.barrier(f"mmar_same_{next(_CHECKS)}")
  every = np.asarray(multihost_utils.process_allgather(digest))
  if not (every == every[0]).all():
    differ = [p for p in range(len(every)) if not (every[p] == every[0]).all()]
    raise InputError(f"{what} differs between processes (process 0 and {differ}): every process "
                     f"must see the same inputs")


def item_keys(seed: int, items) -> np.ndarray:
  """uint32 [n, 2] key data of items given by integer tuples (i, j, ...): fold_in(fold_in(
  key(seed), i), j) ...; one key per item, so a draw depends on neither its batch nor the
  process count."""
  idx = np.asarray(items, np.int32)
  idx = idx.reshape(len(idx), -1)

  def fold(row):
    key = jax.random.key(seed)
    for j in range(idx.shape[1]):
      key = jax.random.fold_in(key, row[j])
    return key
  return np.asarray(jax.random.key_data(jax.vmap(fold)(idx)))


# -- SPMD: global batches in, this process's rows out ---------------------------------------------

def row_sharding(mesh, batch_size: int):
  """Rows over the mesh's batch axes (data x fsdp, as training splits its batch) when they
  divide the batch; replicated otherwise (each row then has one owner all the same)."""
  axes = ("data", "fsdp")
  split = int(np.prod([mesh.shape[a] for a in axes]))
  return NamedSharding(mesh, P(axes) if batch_size % split == 0 else P())


class RowProgram:
  """`fn(state, *rows) -> rows`, compiled once, ahead of its first call, for global batches of
  `rows[0].shape[0]` rows on `mesh` (params as `state` is sharded).

  Ahead of time, because every process must reach the first collective together: a command
  compiles, meets the others at a barrier, then calls. `held()` are the rows whose inputs this
  process must supply (its devices' rows): a process reads only its share of the pictures."""

  def __init__(self, fn, state, rows, mesh, context=None):
    self.batch = rows[0].shape[0]
    self.sharding = row_sharding(mesh, self.batch)
    self.state = state
    shapes = [jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=self.sharding) for r in rows]
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    with context if context is not None else contextlib.nullcontext():
      self.compiled = jax.jit(fn, in_shardings=(state_shardings, *[self.sharding] * len(rows)),
                              out_shardings=self.sharding).lower(state, *shapes).compile()

  def held(self) -> list[int]:
    """The rows on this process's devices, in order."""
    held = set()
    for index in self.sharding.addressable_devices_indices_map((self.batch,)).values():
      held.update(range(self.batch)[index[0] if index else slice(None)])
    return sorted(held)

  def __call__(self, *hosts):
    """Host arrays of the whole batch (rows not `held` may hold anything) -> the output."""
    return self.compiled(self.state, *(global_rows(h, self.sharding) for h in hosts))


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


# -- records of finished items, until the merged output is written ---------------------------------

class ItemRecords:
  """One JSON record per finished item in `DIR/.NAME.parts/` beside the merged output DIR/NAME.

  The folder is a job's unfinished state: an item is done when its record is there (written
  atomically by the one process that owns the item), and process 0 merges the records into the
  output once every share is done, then deletes the folder. `plan` (the job's inputs and
  settings) is stored with the records, so a re-run with other settings is refused instead of
  mixing two jobs' records in one output."""

  def __init__(self, out, plan: dict):
    out = epath.Path(out)
    self.out = out
    self.dir = out.parent / f".{out.name}.parts"
    self.plan = json.loads(json.dumps(plan))  # as it reads back from disk (tuples -> lists)

  def check(self, overwrite: bool) -> None:
    """Refuses, naming the folder, the records of another job (every process checks: a refusal
    must stop all of them before the first barrier). Whether the output may be replaced is the
    command's check, made before it loads a model."""
    if overwrite:
      return
    stored = self.dir / "plan.json"
    if stored.exists() and json.loads(stored.read_text()) != self.plan:
      raise InputError(f"{self.dir} holds the unfinished records of a run with other inputs or "
                       f"settings; run that command again to finish it, or pass --overwrite to "
                       f"start over")

  def start(self, overwrite: bool) -> None:
    """Process 0, before the others look: a fresh folder with --overwrite, the plan, and no
    temporary file of a process killed while writing."""
    if overwrite and self.dir.exists():
      shutil.rmtree(self.dir) if "://" not in str(self.dir) else self.dir.rmtree()
    self.dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(self.dir)
    write_bytes_atomic(self.dir / "plan.json", json.dumps(self.plan).encode())

  def _path(self, name: str):
    return self.dir / f"{name}.json"

  def has(self, name: str) -> bool:
    return self._path(name).exists()

  def write(self, name: str, record: dict) -> None:
    write_bytes_atomic(self._path(name), json.dumps(record).encode())

  def read(self, name: str) -> dict:
    return json.loads(self._path(name).read_text())

  def finish(self, data: bytes) -> None:
    """Process 0, after every share: the merged output, atomically, then the records go."""
    write_bytes_atomic(self.out, data)
    shutil.rmtree(self.dir) if "://" not in str(self.dir) else self.dir.rmtree()
