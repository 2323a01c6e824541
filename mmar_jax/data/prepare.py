"""Encode a data source's images once, on one process or on every process of a pod (the body of
`mmar-jax prepare-data --config CFG --src SOURCE --out DIR`: commands/prepare_data.py).

Runs the config's image tokenizer (the VAE of `init.vae`, or the weightless patchify tokenizer)
over every record of SOURCE (any `data.source` but `latents:`) and writes, per record, the
posterior mean and log-variance of the image's tokens and of its horizontal flip, plus the
caption, into ArrayRecord shards (`latents-00000-of-000NN.array_record`, npz records, group size
1 for random access; shard k holds records [k * R, (k + 1) * R) of `--records-per-shard` R) and
`latents.json` (record count, shards, unreadable records, and the fingerprint of the image
tokenizer that `latents:DIR` checks against the training config).

Why this gives exactly the batches of on-the-fly encoding: record i of DIR is record i of
SOURCE (an unreadable image stays as a record marked with its error, which training skips and
counts just as it would have), so the same seed picks the same records; the pipeline picks the
flipped or plain posterior with the same per-example draw that flips pixels; and the train step
samples the posterior with the same per-example key either way. Text is not tokenized here:
captions stay text, so the tokenizer and `max_text_len` of the training run apply.

A deterministic tokenizer (patchify) has a point-mass posterior: its log-variance is stored as
-inf, so the sample exp(-inf / 2) * noise adds exactly zero.

Across processes, per host (not SPMD): the VAE is small and encoding needs no collective, so each
process encodes its share of the missing shards (parallel/shares.py) on its local devices with
the weights replicated, and no process waits on another until the end. A shard is written under
a temporary name and renamed into place (on gs://: uploaded whole) after its summary in
`DIR/.progress/`; so a shard on disk is complete, and a re-run, on any number of processes,
encodes the missing shards only. After a barrier, process 0 writes `latents.json` from the
summaries, last: until then DIR is not a `latents:` source. The bytes do not depend on the
process count (the records of a shard and their encoding are the same).
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from mmar_jax.data import prepare_out, sources
from mmar_jax.errors import ConfigError
from mmar_jax.models.image_tokenizer import make_image_tokenizer
from mmar_jax.parallel import distributed, shares

log = logging.getLogger(__name__)


def image_tokenizer(config):
  """(graphdef, state) of the config's image tokenizer with the weights training starts from."""
  image = config.model.image.to_dict()
  if image["kind"] == "vae":
    if not config.init.vae:
      raise ConfigError("prepare-data with model.image.kind=vae needs init.vae (a `convert mar-vae` "
                        "output): a randomly initialised VAE gives meaningless latents")
    image = dict(image, path=config.init.vae)
  return nnx.split(make_image_tokenizer(image, rngs=nnx.Rngs(config.seed)))


def make_encoder(graphdef, state, per_device: int):
  """(encode, batch): a jitted images [batch, H, W, 3] in [-1, 1] -> (mean, logvar) of the
  tokens, `per_device` images on each local device. The same number on every device whatever
  the device or process count: XLA:CPU rounds a convolution over one image differently from one
  over several, and the latents must not depend on the topology."""
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("batch",))
  state = jax.device_put(state, NamedSharding(mesh, P()))

  @jax.jit
  def encode(state, images):
    mean, logvar = nnx.merge(graphdef, state).encode(images)
    if logvar is None:  # a point mass: see the module docstring
      logvar = jnp.full(mean.shape, -jnp.inf, mean.dtype)
    return mean.astype(jnp.float32), logvar.astype(jnp.float32)

  images_sharding = NamedSharding(mesh, P("batch"))
  return (lambda images: jax.device_get(encode(state, jax.device_put(images, images_sharding))),
          per_device * len(devices))


def read_record(source, i: int) -> tuple[np.ndarray | None, str, str | None]:
  """(uint8 image or None, caption, error or None) of record i."""
  try:
    rec = source[i]
    image = np.asarray(rec["image"], np.uint8)
    caption = sources.text_of(rec.get("caption") or "")
    return image, caption, None
  except Exception as e:  # noqa: BLE001 - kept as a marked record, see the module docstring
    return None, "", f"{type(e).__name__}: {e}"


def encoded_records(source, lo: int, hi: int, encode, image_size: int, batch_size: int, pool,
                    stats: dict, bar=None):
  """Record bytes of records [lo, hi) in source order: images read in threads, encoded a batch
  at a time. `stats` gathers the shard's summary (unreadable records, the token shape)."""
  for start in range(lo, hi, batch_size):
    stop = min(start + batch_size, hi)
    got = list(pool.map(lambda i: read_record(source, i), range(start, stop)))
    images = np.zeros((batch_size, image_size, image_size, 3), np.float32)
    for j, (image, _, error) in enumerate(got):
      if error is None and image.shape != (image_size, image_size, 3):
        got[j] = (None, "", f"image of shape {image.shape}, expected {image_size}x{image_size}x3")
      elif error is None:
        # The pipeline's conversion, so the encoder sees the pixels training would.
        images[j] = image.astype(np.float32) / 127.5 - 1.0
    mean, logvar = encode(images)
    mean_f, logvar_f = encode(np.ascontiguousarray(images[:, :, ::-1]))
    for j, (_, caption, error) in enumerate(got):
      if error is not None:
        name = getattr(source, "name", lambda i: f"record {i}")(start + j)
        stats["unreadable_count"] += 1
        if len(stats["unreadable"]) < prepare_out.NAMED:
          stats["unreadable"].append([start + j, name, error])
        if stats["unreadable_count"] <= 5:  # per shard: the log names a few, latents.json more
          log.warning("prepare-data: %s: %s (kept as a marked record)", name, error)
        yield sources.encode_latent_record(caption, error=error)
      else:
        if stats["token_shape"] is None:
          stats["token_shape"] = list(mean[j].shape)
        yield sources.encode_latent_record(caption, mean[j], logvar[j], mean_f[j], logvar_f[j])
    if bar is not None:
      bar.update(stop - start)


def prepare(config, src: str, out: str, *, records_per_shard: int = 10000, batch_size: int = 64,
            threads: int = 8, overwrite: bool = False, progress: bool = True) -> dict:
  """Writes this process's share of `out` (module docstring). Returns (the content of
  latents.json on process 0, else None; what this process did, with `wait_s`: the seconds it
  waited for the others at the end)."""
  if src.startswith("latents:"):
    raise ConfigError("--src latents:... is already encoded")
  if records_per_shard < 1 or batch_size < 1:
    raise ConfigError("--records-per-shard and --batch-size must be >= 1")
  source = sources.make_source(config, source=src)
  n = len(source)
  plan = {"records": n, "records_per_shard": records_per_shard, "source": src,
          "shards": prepare_out.shard_names(n, records_per_shard),
          "fingerprint": sources.latent_fingerprint(config), "init_vae": config.init.vae}
  output = prepare_out.Output(out, plan)
  # Every process checks everything that can fail before the first barrier, so a bad input
  # stops all of them with the same error instead of leaving the others waiting.
  verdict = output.verdict(overwrite)
  encode, call_batch = make_encoder(*image_tokenizer(config), batch_size)
  distributed.barrier("mmar_prepare_checked")
  lead = jax.process_index() == 0
  if lead:
    output.start(verdict)
  done = shares.agreed(output.done, len(plan["shards"]), "prepare")
  mine = shares.share(shares.missing(list(range(len(plan["shards"]))), done),
                      jax.process_index(), jax.process_count())
  t0 = time.perf_counter()
  unreadable = 0
  if mine:
    size = int(config.model.image.size)
    spans = [(k * records_per_shard, min((k + 1) * records_per_shard, n)) for k in mine]
    bar = None
    if progress:
      bar = tqdm(total=sum(hi - lo for lo, hi in spans), unit="img", file=sys.stderr,
                 dynamic_ncols=True, mininterval=1.0)
    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
      for k, (lo, hi) in zip(mine, spans):
        stats = {"records": hi - lo, "unreadable_count": 0, "unreadable": [], "token_shape": None}
        output.write_shard(k, encoded_records(source, lo, hi, encode, size, call_batch, pool,
                                              stats, bar), lambda: stats)
        unreadable += stats["unreadable_count"]
    if bar is not None:
      bar.close()
  encode_s = time.perf_counter() - t0
  # Every share, however long, before the index: the slowest host sets the pace. A dead peer
  # aborts the waiting ones (JAX's heartbeat), it does not leave them here.
  distributed.barrier("mmar_prepare_written", timeout_s=7 * 24 * 3600)
  wait_s = time.perf_counter() - t0 - encode_s
  here = dict(process=jax.process_index(), shards_encoded=len(mine), unreadable=unreadable,
              records_encoded=sum(min((k + 1) * records_per_shard, n) - k * records_per_shard
                                  for k in mine), encode_s=encode_s, wait_s=wait_s)
  return (output.finish() if lead else None), here
