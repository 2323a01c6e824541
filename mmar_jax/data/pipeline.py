"""From records ({"image", "caption"}) to training batches.

One global index stream: the examples of step s are the global example indices
s * B .. s * B + B - 1, whatever the number of processes; each process builds only its slice and
`jax.make_array_from_process_local_data` assembles the global batch. An index maps to a record
through a per-epoch permutation (seeded), and to a sample kind ([text][img], [img][text], [img])
through the configured mix, both as pure functions of (seed, index): resuming at a step, on any
number of processes, reproduces the same batches.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from mmar_jax.models.sequence import IMAGE_ONLY, IMAGE_TO_TEXT, TEXT_TO_IMAGE

log = logging.getLogger(__name__)


def parse_mix(mix: str) -> np.ndarray:
  try:
    parts = np.array([float(x) for x in str(mix).split(",")], np.float64)
  except ValueError:
    raise ValueError(f"data.mix must be three fractions 'p_t2i,p_i2t,p_i', got {mix!r}") from None
  if parts.shape != (3,) or (parts < 0).any() or parts.sum() <= 0:
    raise ValueError(f"data.mix must be three non-negative fractions, got {mix!r}")
  return parts / parts.sum()


def _uniform(seed: int, index: np.ndarray, stream: int) -> np.ndarray:
  """A uniform [0, 1) per (seed, stream, index), independent of batch composition."""
  ss = [np.random.default_rng([seed, stream, int(i)]).random() for i in np.asarray(index).ravel()]
  return np.asarray(ss).reshape(np.shape(index))


@dataclasses.dataclass
class Counters:
  """Data problems met so far: skipped or truncated records, the first few named in the log."""
  skipped: int = 0
  truncated: int = 0
  named: int = 0

  def note(self, what: str, detail: str):
    if what == "skipped":
      self.skipped += 1
    else:
      self.truncated += 1
    if self.named < 5:
      self.named += 1
      log.warning("data: %s %s", what, detail)


class Batcher:
  """Builds this process's part of the global batch for any step, deterministically."""

  def __init__(self, source, tokenizer, *, batch_size: int, max_text_len: int, seed: int,
               mix: str = "0.45,0.45,0.1", random_flip: bool = False, long_caption: str = "truncate",
               process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    if long_caption not in ("truncate", "skip"):
      raise ValueError(f"data.long_caption must be truncate or skip, got {long_caption!r}")
    self.source, self.tokenizer = source, tokenizer
    self.batch_size, self.max_text_len, self.seed = batch_size, max_text_len, seed
    self.mix = np.cumsum(parse_mix(mix))
    self.random_flip, self.long_caption = random_flip, long_caption
    self.local = batch_size // process_count
    self.offset = process_index * self.local
    self.counters = Counters()

  def record_index(self, index: int) -> int:
    n = len(self.source)
    epoch, i = divmod(int(index), n)
    return int(np.random.default_rng([self.seed, 7, epoch]).permutation(n)[i])

  def encode_text(self, caption: str, index: int) -> tuple[np.ndarray, int] | None:
    ids = list(self.tokenizer.encode(caption)) + [self.tokenizer.eos_id]
    if len(ids) > self.max_text_len:
      if self.long_caption == "skip":
        self.counters.note("skipped", f"example {index}: caption of {len(ids)} tokens")
        return None
      self.counters.note("truncated", f"example {index}: caption of {len(ids)} tokens")
      ids = ids[:self.max_text_len - 1] + [self.tokenizer.eos_id]
    out = np.full((self.max_text_len,), self.tokenizer.pad_id, np.int32)
    out[:len(ids)] = ids
    return out, len(ids)

  def example(self, index: int) -> dict | None:
    try:
      rec = self.source[self.record_index(index)]
    except Exception as e:  # noqa: BLE001 - a bad record must not stop a run
      self.counters.note("skipped", f"example {index}: unreadable record ({e})")
      return None
    caption = rec.get("caption") or ""
    if not caption.strip():
      self.counters.note("skipped", f"example {index}: empty caption")
      return None
    text = self.encode_text(caption, index)
    if text is None:
      return None
    image = np.asarray(rec["image"], np.float32) / 127.5 - 1.0
    if self.random_flip and _uniform(self.seed, index, 3) < 0.5:
      image = image[:, ::-1]
    u = _uniform(self.seed, index, 1)
    kind = (TEXT_TO_IMAGE, IMAGE_TO_TEXT, IMAGE_ONLY)[int(np.searchsorted(self.mix, u, side="right"))]
    return dict(image=image, text=text[0], text_len=np.int32(text[1]), kind=np.int32(kind),
                index=np.int32(index))

  def local_batch(self, step: int) -> dict:
    """This process's examples of `step`. A skipped record is replaced by the next index past the
    global batch's range (deterministic, so every process agrees)."""
    start = step * self.batch_size + self.offset
    out = []
    for j in range(self.local):
      index = start + j
      ex = self.example(index)
      probe = 0
      while ex is None:
        probe += 1
        if probe > 100:
          raise RuntimeError("data: 100 consecutive unusable records; check the data source")
        ex = self.example(int(index + probe * 1_000_003))
      out.append(ex)
    return {k: np.stack([e[k] for e in out]) for k in out[0]}


def global_batch(batcher: Batcher, step: int, sharding):
  import jax
  local = batcher.local_batch(step)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)
