"""From records to training batches: one global index stream that every process slices.

The examples of a step are consecutive global example indices: step s reads
`position(s) .. position(s) + B - 1`, where `position(s) = p0 + (s - s0) * B` from the last resume
point (s0, p0) (0, 0 for a fresh run). Each process builds only the rows of the global batch its
devices hold and `jax.make_array_from_process_local_data` assembles the global array, so the
numbers are the same for any number of processes, and the data position saved in a checkpoint
is a single global example index (no per-process iterator state to store or reshard).

An index maps to a record number through a grain MapDataset, `range(len) -> shuffle -> repeat`:
grain's shuffle draws a new permutation for each epoch (index // len) from the seed, in O(1) per
index. The horizontal flip is a pure function of (seed, index). The sample kind ([text][img]
P(I|T), [img][text] P(T|I), [img] P(I)) comes in fixed counts per batch (`kind_counts`: `data.mix`
times the batch size, rounded by largest remainder), placed by a permutation keyed by (seed,
block) where the index stream is cut into blocks of B from the resume point (a multiple of B
unless the batch size changed): so every batch holds exactly as many generation samples as the
train step's static shapes expect (models/mmar.py `head_rows`), and a kind is still a pure
function of (seed, index). Resuming at a step, on any number of processes, therefore rebuilds
the same batches.

Bad records: an unreadable record, an empty caption or (with `long_caption: skip`) an over-long
one is skipped and replaced by the example at a fixed stride past it (index + k * 1_000_003, the
first usable k), so every process agrees; an over-long caption is otherwise truncated. Each is
counted and the first few are named in the log; more than `max_bad_fraction` of the examples
read (after the first 200) stops the run, since the data source is then broken, not noisy.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading

import grain
import jax
import numpy as np

from mmar_jax.models.sequence import IMAGE_ONLY, IMAGE_TO_TEXT, TEXT_TO_IMAGE

log = logging.getLogger(__name__)

PROBE_STRIDE = 1_000_003  # a prime far beyond any batch: replacements never collide in a batch
MAX_PROBES = 100
NAMED = 5  # bad records named in the log


def parse_mix(mix: str) -> np.ndarray:
  try:
    parts = np.array([float(x) for x in str(mix).split(",")], np.float64)
  except ValueError:
    raise ValueError(f"data.mix must be three fractions 'p_t2i,p_i2t,p_i', got {mix!r}") from None
  if parts.shape != (3,) or (parts < 0).any() or parts.sum() <= 0:
    raise ValueError(f"data.mix must be three non-negative fractions, got {mix!r}")
  return parts / parts.sum()


def kind_counts(mix: str, batch_size: int) -> tuple[int, int, int]:
  """Examples of each kind ([text][img], [img][text], [img]) in a batch: mix x B, rounded by
  largest remainder (ties to the earlier kind), summing to B."""
  exact = parse_mix(mix) * int(batch_size)
  counts = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - counts), kind="stable")[:int(batch_size) - counts.sum()]:
    counts[i] += 1
  return tuple(int(c) for c in counts)


def generation_samples(mix: str, batch_size: int) -> int:
  """The samples of a batch that carry image loss: [text][img] and [img] (understanding samples
  see their image unmasked)."""
  t2i, _, uncond = kind_counts(mix, batch_size)
  return t2i + uncond


def _uniform(seed: int, index: np.ndarray, stream: int) -> np.ndarray:
  """A uniform [0, 1) per (seed, stream, index), independent of batch composition."""
  ss = [np.random.default_rng([seed, stream, int(i)]).random() for i in np.asarray(index).ravel()]
  return np.asarray(ss).reshape(np.shape(index))


@functools.lru_cache(maxsize=64)
def _block_permutation(seed: int, block: int, batch_size: int) -> np.ndarray:
  return np.random.default_rng([seed, 1, block]).permutation(batch_size)


def shuffle_seed(seed: int) -> int:
  """grain's shuffle takes a 32-bit seed; derive it from the run's seed and a stream id."""
  return int(np.random.SeedSequence([seed, 7]).generate_state(1)[0])


def record_order(num_records: int, seed: int):
  """grain MapDataset: global example index -> record number, reshuffled every epoch."""
  if num_records <= 0:
    raise ValueError("the data source has no records")
  return grain.MapDataset.range(num_records).shuffle(seed=shuffle_seed(seed)).repeat()


@dataclasses.dataclass
class Counters:
  """Data problems met so far by this process: skipped or truncated examples, out of `seen`."""
  skipped: int = 0
  truncated: int = 0
  seen: int = 0
  named: int = 0
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def note(self, what: str, detail: str):
    with self.lock:
      if what == "skipped":
        self.skipped += 1
      else:
        self.truncated += 1
      name = self.named < NAMED
      self.named += name
    if name:
      log.warning("data: %s %s%s", what, detail,
                  "" if self.named < NAMED else " (further ones are only counted)")

  def saw(self):
    with self.lock:
      self.seen += 1


class Batcher:
  """Builds any process's part of the global batch for any step, deterministically."""

  def __init__(self, source, tokenizer, *, batch_size: int, max_text_len: int, seed: int,
               mix: str = "0.45,0.45,0.1", random_flip: bool = False, long_caption: str = "truncate",
               process_index: int = 0, process_count: int = 1, max_bad_fraction: float = 0.5):
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    if long_caption not in ("truncate", "skip"):
      raise ValueError(f"data.long_caption must be truncate or skip, got {long_caption!r}")
    self.source, self.tokenizer = source, tokenizer
    self.order = record_order(len(source), seed)
    self.batch_size, self.max_text_len, self.seed = batch_size, max_text_len, seed
    counts = kind_counts(mix, batch_size)
    self.kinds = np.repeat(np.asarray([TEXT_TO_IMAGE, IMAGE_TO_TEXT, IMAGE_ONLY], np.int32), counts)
    self.random_flip, self.long_caption = random_flip, long_caption
    self.max_bad_fraction = max_bad_fraction
    local = batch_size // process_count
    self.rows = np.arange(process_index * local, (process_index + 1) * local)
    self.anchor = (0, 0)  # (step, global example index of its first example)
    self.counters = Counters()

  # -- the index stream -----------------------------------------------------------------------------

  def resume(self, step: int, position: int):
    """Step `step` starts at global example index `position` (a checkpoint's data position)."""
    self.anchor = (int(step), int(position))

  def position(self, step: int) -> int:
    """The global example index of the first example of `step`."""
    s0, p0 = self.anchor
    return p0 + (int(step) - s0) * self.batch_size

  def kind(self, index: int) -> int:
    """The sample kind of global example `index` (the fixed counts of the module docstring)."""
    offset = self.anchor[1] % self.batch_size
    block, slot = divmod(int(index) - offset, self.batch_size)
    return int(self.kinds[_block_permutation(self.seed, block, self.batch_size)[slot]])

  def record_index(self, index: int) -> int:
    """The source record that global example `index` reads."""
    return int(self.order[int(index)])

  # -- one example ----------------------------------------------------------------------------------

  def _describe(self, index: int) -> str:
    name = getattr(self.source, "name", None)
    if name is None:
      return f"example {index}"
    try:
      return f"example {index} ({name(self.record_index(index))})"
    except Exception:  # noqa: BLE001 - a name is only for the log
      return f"example {index}"

  def encode_text(self, caption: str, index: int) -> tuple[np.ndarray, int] | None:
    ids = list(self.tokenizer.encode(caption)) + [self.tokenizer.eos_id]
    if len(ids) > self.max_text_len:
      what = "skipped" if self.long_caption == "skip" else "truncated"
      self.counters.note(what, f"{self._describe(index)}: caption of {len(ids)} tokens "
                               f"(max_text_len {self.max_text_len})")
      if self.long_caption == "skip":
        return None
      ids = ids[:self.max_text_len - 1] + [self.tokenizer.eos_id]
    out = np.full((self.max_text_len,), self.tokenizer.pad_id, np.int32)
    out[:len(ids)] = ids
    return out, len(ids)

  def example(self, index: int, kind: int | None = None) -> dict | None:
    """The training example of global index `index` (of `kind`, default its own), or None
    (counted) if it is unusable."""
    self.counters.saw()
    try:
      rec = self.source[self.record_index(index)]
      caption = rec.get("caption") or ""
    except Exception as e:  # noqa: BLE001 - a bad record must not stop a run
      self.counters.note("skipped", f"{self._describe(index)}: unreadable record ({e})")
      return None
    if not caption.strip():
      self.counters.note("skipped", f"{self._describe(index)}: empty caption")
      return None
    text = self.encode_text(caption, index)
    if text is None:
      return None
    flip = self.random_flip and _uniform(self.seed, index, 3) < 0.5
    kind = self.kind(index) if kind is None else kind
    out = dict(text=text[0], text_len=np.int32(text[1]), kind=np.int32(kind), index=np.int32(index))
    if "latent_mean" in rec:  # prepared latents: the posterior of the (flipped) image
      suffix = "_flip" if flip else ""
      out["latent_mean"] = np.asarray(rec["latent_mean" + suffix], np.float32)
      out["latent_logvar"] = np.asarray(rec["latent_logvar" + suffix], np.float32)
    else:
      image = np.asarray(rec["image"], np.float32) / 127.5 - 1.0
      out["image"] = image[:, ::-1] if flip else image
    return out

  def usable_example(self, index: int) -> dict:
    """`example(index)`, or the first usable one at a fixed stride past it, in the slot's kind
    (so a bad record never changes a batch's kind counts)."""
    kind = self.kind(index)
    for probe in range(MAX_PROBES + 1):
      ex = self.example(int(index + probe * PROBE_STRIDE), kind)
      if ex is not None:
        return ex
    raise RuntimeError(f"data: {MAX_PROBES} unusable records in a row from example {index}; "
                       "check the data source")

  # -- batches --------------------------------------------------------------------------------------

  def local_batch(self, step: int, rows=None) -> dict:
    """The examples of `step` at global batch rows `rows` (default: this process's slice)."""
    rows = self.rows if rows is None else rows
    start = self.position(step)
    out = [self.usable_example(start + int(r)) for r in rows]
    self._check_bad_fraction()
    return {k: np.stack([e[k] for e in out]) for k in out[0]}

  def _check_bad_fraction(self):
    c = self.counters
    if c.seen >= 200 and c.skipped > self.max_bad_fraction * c.seen:
      raise RuntimeError(f"data: {c.skipped} of {c.seen} examples read were unusable, more than "
                         f"data.max_bad_fraction={self.max_bad_fraction}; check the data source")

  def batches(self, start_step: int, rows=None, threads: int = 0, prefetch: int = 2):
    """An iterator of local batches for start_step, start_step + 1, ...; with `threads`, grain
    builds the next `prefetch` batches in background threads (image decoding releases the GIL).
    Each batch is a pure function of its step, so threads change speed, never content."""
    if threads <= 0:  # (iterating a grain MapDataset would prefetch with its default threads)
      return (self.local_batch(s, rows) for s in itertools.count(int(start_step)))
    steps = grain.MapDataset.range(int(start_step), 2 ** 62)
    ds = steps.map(lambda s: self.local_batch(int(s), rows))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                     prefetch_buffer_size=max(prefetch, 1))))


def make_batcher(config, source, tokenizer, max_text_len: int) -> Batcher:
  """A Batcher with the config's data settings."""
  d = config.data
  return Batcher(source, tokenizer, batch_size=config.train.batch_size, max_text_len=max_text_len,
                 seed=config.seed, mix=d.mix, random_flip=d.random_flip, long_caption=d.long_caption,
                 max_bad_fraction=d.max_bad_fraction)


def local_rows(sharding, batch_size: int) -> np.ndarray:
  """The rows of a [batch_size, ...] global array whose shards live on this process's devices,
  in global order: exactly what `make_array_from_process_local_data` expects from it."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[index[0]])
  return np.asarray(sorted(rows))


def to_global(local: dict, sharding, batch_size: int) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, a, (batch_size,) + a.shape[1:])
          for k, a in local.items()}


def global_batch(batcher: Batcher, step: int, sharding):
  """The global batch of `step` as arrays with `sharding` (built from this process's rows)."""
  local = batcher.local_batch(step, local_rows(sharding, batcher.batch_size))
  return to_global(local, sharding, batcher.batch_size)
