"""Per-channel statistics of a data source's image tokens, for `model.image.norm=data`
(models/image_tokenizer.token_norm).

A new run reads `data.norm_samples` records spread evenly over the source, turns each into tokens
as training would (the image tokenizer's posterior mean of the picture, or the stored mean of a
`latents:` record) and takes each channel's mean and 1/std over every token of every record. The
records are fixed by the source alone (no shuffle, no seed), so the same source gives the same
statistics on any number of processes, and a resumed run keeps the ones in its config.json.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax.data.prepare import image_tokenizer
from mmar_jax.data.sources import make_source

log = logging.getLogger(__name__)

MIN_STD = 1e-3  # a constant channel (e.g. a border that is always black) is left unscaled


def record_indices(num_records: int, num: int) -> np.ndarray:
  if num_records <= 0:
    raise ValueError("data source has no records to estimate token statistics from")
  return np.unique(np.linspace(0, num_records - 1, min(num, num_records)).round().astype(np.int64))


def source_tokens(config, source, num: int, batch_size: int = 32):
  """Yields token arrays [b, N, C] (tokenizer space) of `num` records spread over `source`;
  unreadable records are skipped and counted."""
  compiled = []

  def encode(images):
    if not compiled:  # built on first use: a `latents:` source needs no tokenizer
      graphdef, state = image_tokenizer(config)
      compiled.extend([jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x)[0]), state])
    fn, state = compiled
    return np.asarray(fn(state, jnp.asarray(np.stack(images))))

  images, skipped = [], 0
  for i in record_indices(len(source), num):
    try:
      rec = source[int(i)]
    except Exception:  # noqa: BLE001 - one bad record must not stop a run
      skipped += 1
      continue
    if "latent_mean" in rec:
      yield np.asarray(rec["latent_mean"], np.float32)[None]
      continue
    images.append(np.asarray(rec["image"], np.float32) / 127.5 - 1.0)  # the pipeline's conversion
    if len(images) == batch_size:
      yield encode(images)
      images = []
  if images:
    yield encode(images)
  if skipped:
    log.warning("token statistics: %d unreadable records skipped", skipped)


def estimate(config, source) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(shift, scale) per token channel: the mean and 1/std over the sampled records' tokens,
  accumulated in float64."""
  total, total_sq, count = 0.0, 0.0, 0
  for tokens in source_tokens(config, source, int(config.data.norm_samples)):
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    total = total + flat.sum(0)
    total_sq = total_sq + (flat ** 2).sum(0)
    count += flat.shape[0]
  if not count:
    raise ValueError("no readable record to estimate token statistics from")
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  scale = 1.0 / np.maximum(std, MIN_STD)
  return tuple(float(v) for v in mean), tuple(float(v) for v in scale)


def fill_config(config) -> None:
  """Estimates and stores the statistics in `config` when it normalises by data and has none
  (a new run); the data source is opened only then."""
  image = config.model.image
  if image.norm != "data" or image.token_scale:
    return
  shift, scale = estimate(config, make_source(config))
  image.token_shift, image.token_scale = shift, scale
  log.info("token statistics from %d records: mean of channel means %.4f, of stds %.4f",
           int(config.data.norm_samples), float(np.mean(shift)), float(np.mean(1.0 / np.asarray(scale))))


def shapes_only(config) -> None:
  """Benchmarks and ahead-of-time compiles measure shapes and speed, which two per-channel
  constants do not change: a config that normalises by data but has no statistics (no run has
  estimated them) gets the fixed norm instead of a data pass."""
  if config.model.image.norm == "data" and not config.model.image.token_scale:
    config.model.image.norm = "fixed"
