"""`mmar-jax prepare-data --config CFG --src SOURCE --out DIR`: encode a data source's images once.

Runs the config's image tokenizer (the VAE of `init.vae`, or the weightless patchify tokenizer)
over every record of SOURCE (any `data.source` but `latents:`) and writes, per record, the
posterior mean and log-variance of the image's tokens and of its horizontal flip, plus the
caption, into ArrayRecord shards (`latents-00000-of-000NN.array_record`, npz records, group size
1 for random access) and `latents.json` (record count, shards, and the fingerprint of the image
tokenizer that `latents:DIR` checks against the training config).

Why this gives exactly the batches of on-the-fly encoding: record i of DIR is record i of
SOURCE (an unreadable image stays as a record marked with its error, which training skips and
counts just as it would have), so the same seed picks the same records; the pipeline picks the
flipped or plain posterior with the same per-example draw that flips pixels; and the train step
samples the posterior with the same per-example key either way. Text is not tokenized here:
captions stay text, so the tokenizer and `max_text_len` of the training run apply.

A deterministic tokenizer (patchify) has a point-mass posterior: its log-variance is stored as
-inf, so the sample exp(-inf / 2) * noise adds exactly zero.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
from etils import epath

from mmar_jax.errors import ConfigError
from mmar_jax.data import sources

log = logging.getLogger(__name__)

SHARD = "latents-{:05d}-of-{:05d}.array_record"


def image_tokenizer(config):
  """(graphdef, state) of the config's image tokenizer with the weights training starts from."""
  from flax import nnx

  from mmar_jax.models.image_tokenizer import make_image_tokenizer
  image = config.model.image.to_dict()
  if image["kind"] == "vae":
    if not config.init.vae:
      raise ConfigError("prepare-data with model.image.kind=vae needs init.vae (a `convert mar-vae` "
                        "output): a randomly initialised VAE gives meaningless latents")
    image = dict(image, path=config.init.vae)
  return nnx.split(make_image_tokenizer(image, rngs=nnx.Rngs(config.seed)))


def make_encoder(graphdef, state, batch_size: int):
  """A jitted images [B, H, W, 3] in [-1, 1] -> (mean, logvar) of the tokens, batch split over
  the local devices when it divides."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = jax.local_devices()
  n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0 and len(devices) % d == 0)
  mesh = Mesh(np.asarray(devices[:n]), ("batch",))
  state = jax.device_put(state, NamedSharding(mesh, P()))

  @jax.jit
  def encode(state, images):
    mean, logvar = nnx.merge(graphdef, state).encode(images)
    if logvar is None:  # a point mass: see the module docstring
      logvar = jnp.full(mean.shape, -jnp.inf, mean.dtype)
    return mean.astype(jnp.float32), logvar.astype(jnp.float32)

  images_sharding = NamedSharding(mesh, P("batch"))
  return lambda images: jax.device_get(encode(state, jax.device_put(images, images_sharding)))


def read_record(source, i: int) -> tuple[np.ndarray | None, str, str | None]:
  """(uint8 image or None, caption, error or None) of record i."""
  try:
    rec = source[i]
    image = np.asarray(rec["image"], np.uint8)
    caption = sources.text_of(rec.get("caption") or "")
    return image, caption, None
  except Exception as e:  # noqa: BLE001 - kept as a marked record, see the module docstring
    return None, "", f"{type(e).__name__}: {e}"


def write_shards(directory: str, records, total: int, per_shard: int) -> list[str]:
  """Writes an iterator of record bytes into ceil(total / per_shard) ArrayRecord shards."""
  from array_record.python.array_record_module import ArrayRecordWriter
  num = max(1, -(-total // per_shard))
  names = [SHARD.format(k, num) for k in range(num)]
  writer, count = None, 0
  for data in records:
    if count % per_shard == 0:
      if writer is not None:
        writer.close()
      writer = ArrayRecordWriter(os.path.join(directory, names[count // per_shard]), "group_size:1")
    writer.write(data)
    count += 1
  if writer is not None:
    writer.close()
  if count != total:
    raise RuntimeError(f"wrote {count} records, expected {total}")
  return names


def encoded_records(source, encode, image_size: int, batch_size: int, threads: int, stats: dict,
                    progress: bool = True):
  """Record bytes in source order: images read in threads, encoded a batch at a time."""
  n = len(source)
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    for lo in range(0, n, batch_size):
      hi = min(lo + batch_size, n)
      got = list(pool.map(lambda i: read_record(source, i), range(lo, hi)))
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
          stats["unreadable"] += 1
          if stats["unreadable"] <= 5:
            name = getattr(source, "name", lambda i: f"record {i}")(lo + j)
            log.warning("prepare-data: %s: %s (kept as a marked record)", name, error)
          yield sources.encode_latent_record(caption, error=error)
        else:
          yield sources.encode_latent_record(caption, mean[j], logvar[j], mean_f[j], logvar_f[j])
      if bar:
        bar.update(hi - lo)
  if bar:
    bar.close()


def prepare(config, src: str, out: str, *, records_per_shard: int = 10000, batch_size: int = 64,
            threads: int = 8, overwrite: bool = False, progress: bool = True) -> dict:
  """Writes `out` (see the module docstring); returns its latents.json content."""
  if src.startswith("latents:"):
    raise ConfigError("--src latents:... is already encoded")
  out_path = epath.Path(out)
  if out_path.exists() and not overwrite:
    raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")
  source = sources.make_source(config, source=src)
  graphdef, state = image_tokenizer(config)
  encode = make_encoder(graphdef, state, batch_size)
  size = int(config.model.image.size)
  stats = {"unreadable": 0}
  n = len(source)
  with tempfile.TemporaryDirectory(prefix="mmar-latents-") as tmp:
    records = encoded_records(source, encode, size, batch_size, threads, stats, progress)
    shards = write_shards(tmp, records, n, records_per_shard)
    first = sources.decode_latent_record(_first_good(tmp, shards)) if n > stats["unreadable"] else None
    meta = {"records": n, "shards": shards, "source": src, "unreadable": stats["unreadable"],
            "fingerprint": sources.latent_fingerprint(config), "init_vae": config.init.vae,
            "token_shape": list(first["latent_mean"].shape) if first else None,
            "created_by": "mmar-jax prepare-data"}
    with open(os.path.join(tmp, sources.LATENTS_META), "w") as f:
      f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _publish(tmp, out, [*shards, sources.LATENTS_META], overwrite)
  return meta


def _first_good(directory: str, shards: list[str]) -> bytes:
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  ds = ArrayRecordDataSource([os.path.join(directory, s) for s in shards])
  for i in range(len(ds)):
    try:
      sources.decode_latent_record(ds[i])
      return ds[i]
    except sources.BadRecord:
      continue
  raise RuntimeError("no readable record")


def _publish(tmp: str, out: str, names: list[str], overwrite: bool):
  """All or nothing: a local --out is renamed into place; a remote one gets latents.json last,
  so a half-copied directory is never a `latents:` source."""
  if "://" not in out:
    from mmar_jax.files import atomic_output
    with atomic_output(out, overwrite=overwrite) as staging:
      for name in names:
        shutil.move(os.path.join(tmp, name), os.path.join(staging, name))
    return
  dst = epath.Path(out)
  if dst.exists() and overwrite:
    dst.rmtree()
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:  # latents.json is last in `names`
    epath.Path(tmp, name).copy(dst / name)


def cli_prepare_data(args) -> int:
  from mmar_jax import config as config_lib
  from mmar_jax.parallel import distributed
  distributed.maybe_initialize()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  import jax
  if jax.process_count() > 1:
    raise ConfigError("prepare-data runs as one process; encode shards of the data separately "
                      "and train from each, or run it on one host")
  config = config_lib.apply_overrides(config_lib.load_file(args.config), args.config_overrides)
  meta = prepare(config, args.src, args.out, records_per_shard=args.records_per_shard,
                 batch_size=args.batch_size, threads=args.threads, overwrite=args.overwrite)
  print(f"prepare-data: {meta['records']} records ({meta['unreadable']} unreadable), tokens "
        f"{meta['token_shape']} -> {args.out}", flush=True)
  return 0
