"""`mmar-jax eval fid`: Fréchet Inception Distance of an image folder, with the user's copy of
pytorch-fid's Inception weights.

Comparable with pytorch-fid (and so with MAR's and most papers' numbers) step by step: the
pool3 features of models/inception.py (the same network, input resize and scaling), the mean and
covariance as pytorch-fid takes them (`np.mean(axis=0)`, `np.cov(rowvar=False)`, float64), and
its `calculate_frechet_distance` (scipy's `sqrtm`, the eps * I retry when the product's root is
not finite, the imaginary-part check). The reference is a second folder or a `.npz` with `mu` and
`sigma` (MAR's `fid_stats/` files, pytorch-fid's `--save-stats` output, or this command's).

A folder is read as pytorch-fid reads it: its PNG / JPEG files (not recursive) sorted by name,
each converted to RGB and scaled by 1/255. A file that does not decode is skipped, counted and
named (the first few in the log of the process that read it); the run goes on. Features are
computed in batches of one static shape (the last batch padded), so each image size compiles
once.

Across processes, per host (not SPMD): the Inception network is small (24M parameters) and its
features need no collective, so each process computes the features of its share of the files
(every P-th, parallel/shares.py) data-parallel over its local devices, the weights replicated,
`--batch-size` images per device (the same on every device, a function of the folder and the
device count only, so a file's features do not depend on the process count). The shares are then
gathered in file order, and process 0 takes the statistics and the Fréchet distance, exactly as
one process would.

`eval fid --workdir RUN --prompts FILE --num N --images DIR ...` is the whole measurement in one
command: it draws the first N / K prompts, K each (`--num-per-prompt`), into DIR with
`generate --prompts`'s own code (commands/generate_files.py: SPMD over every process, resumable,
the same files), then computes the FID of DIR as above.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import logging
import sys
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from mmar_jax import startup
from mmar_jax.commands.generate_files import generate_files
from mmar_jax.commands.sample_files import (add_sampling_args, open_run, read_prompts,
                                            sampling_kwargs)
from mmar_jax.convert.inception import WEIGHTS_FILE, WEIGHTS_URL, load_inception
from mmar_jax.data.sources import image_error
from mmar_jax.errors import ConfigError
from mmar_jax.files import write_bytes_atomic
from mmar_jax.models.inception import FEATURES, pool3_features
from mmar_jax.parallel import distributed, shares

log = logging.getLogger("mmar_jax.fid")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
NAMED = 10  # skipped files named in the log and the JSON line; all are counted
READ_THREADS = 8  # PIL decodes outside the GIL


# -- the Fréchet distance ---------------------------------------------------------------------------


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) in float64, as pytorch-fid's `calculate_activation_statistics`."""
  act = np.asarray(features, np.float64)
  return np.mean(act, axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), computed as pytorch-fid's
  `calculate_frechet_distance` does, operation for operation."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"FID statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  # pytorch-fid passes disp=False, which only adds an error estimate (an extra D^3 product) and
  # is deprecated in scipy >= 1.16; the root itself is the same.
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():  # the product is (numerically) singular
    log.warning("fid calculation produces singular product; adding %s to diagonal of cov "
                "estimates", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):  # rounding can leave a small imaginary part
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# -- statistics files -------------------------------------------------------------------------------


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"FID statistics file not found: {path}")
  try:
    with np.load(io.BytesIO(p.read_bytes())) as f:
      mu, sigma = f["mu"][:], f["sigma"][:]
  except KeyError as e:
    raise ConfigError(f"{path}: no {e} array; FID statistics files hold 'mu' and 'sigma'") from None
  except (ValueError, OSError) as e:
    raise ConfigError(f"{path} is not a .npz file: {e}") from None
  if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
    raise ConfigError(f"{path}: mu {mu.shape} and sigma {sigma.shape}; pool3 statistics are "
                      f"({FEATURES},) and ({FEATURES}, {FEATURES})")
  return mu, sigma


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """pytorch-fid's format (`np.savez_compressed`, `mu` and `sigma`), written whole or not at all."""
  buf = io.BytesIO()
  np.savez_compressed(buf, mu=mu, sigma=sigma)
  write_bytes_atomic(path, buf.getvalue())


# -- folders ----------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
  return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str, *, quiet: bool = False) -> list[epath.Path]:
  """The folder's PNG / JPEG files (any case of the extension), sorted by name."""
  p = epath.Path(folder)
  if not p.is_dir():
    raise FileNotFoundError(f"image folder not found: {folder}")
  entries = [f for f in p.iterdir() if not f.is_dir()]
  files = sorted((f for f in entries if _is_image_name(f.name)), key=lambda f: f.name)
  others = sorted(f.name for f in entries if not _is_image_name(f.name))
  if others and not quiet:  # pytorch-fid would read .webp, .bmp, ...: say what is left out
    log.warning("%s: ignoring %d file(s) that are not PNG or JPEG (%s%s)", folder, len(others),
                ", ".join(others[:3]), ", ..." if len(others) > 3 else "")
  if not files:
    raise FileNotFoundError(f"no PNG or JPEG files in {folder}")
  return files


def read_image(path: epath.Path) -> np.ndarray:
  """float32 [H, W, 3] in [0, 1], as torchvision's ToTensor makes it (uint8 / 255 in float32)."""
  with path.open("rb") as fh, Image.open(fh) as im:
    im.load()  # decode now: a truncated file fails here
    rgb = np.asarray(im.convert("RGB"), np.uint8)
  return rgb.astype(np.float32) / np.float32(255)


@dataclasses.dataclass
class FolderFeatures:
  features: np.ndarray  # [N, 2048] float64, one row per readable file, in file order
  files: list[str]  # the readable files' names
  skipped: list[tuple[str, str]]  # (name, why) of each file that did not decode
  seconds: float


def _runs(files, batch_size: int, skipped: list):
  """Batches of up to `batch_size` decoded images of one shape, in file order."""
  run: list[np.ndarray] = []
  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    for start in range(0, len(files), batch_size):
      chunk = files[start:start + batch_size]
      for f, result in zip(chunk, pool.map(_try_read, chunk)):
        if isinstance(result, str):
          skipped.append((f.name, result))
          if len(skipped) <= NAMED:
            log.warning("skipping %s: %s", f, result)
          continue
        if run and (result.shape != run[0].shape or len(run) == batch_size):
          yield np.stack(run)
          run = []
        run.append(result)
  if run:
    yield np.stack(run)


def _try_read(path):
  try:
    return read_image(path)
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
    return f"not a readable image ({image_error(e)})"


def folder_features(graphdef, state, folder: str, batch_size: int, *, progress: bool = True,
                    label: str = "images") -> FolderFeatures:
  """pool3 features of every readable PNG / JPEG in `folder` (module docstring), on every process
  (each computes its share, then all are gathered)."""

  # Lazy, as every JAX import here: cli builds its parser from add_args before the XLA flags.
  t0 = time.perf_counter()
  files = list_images(folder, quiet=jax.process_index() > 0)
  shares.check_same("\n".join(f.name for f in files), f"the file list of {folder}")
  # Images per device: a pure function of the folder and the device count, so an image's
  # features do not depend on how many processes share them (XLA:CPU rounds a convolution over
  # one image differently from one over several). No more than the folder fills, as pytorch-fid.
  per_device = min(batch_size, -(-len(files) // jax.device_count()))
  mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  rows_sharding = NamedSharding(mesh, P("batch"))
  call_batch = per_device * len(jax.local_devices())
  mine = shares.share(list(range(len(files))), jax.process_index(), jax.process_count())
  skipped: list[tuple[str, str]] = []
  rows: list[np.ndarray] = []
  pending = None  # the devices work on batch k while the host decodes batch k + 1

  def collect(item):
    n, out = item
    rows.append(np.asarray(out)[:n])
    done = sum(len(r) for r in rows) + len(skipped)  # skipped files are progress too
    bar.update(done - bar.n)

  bar = tqdm(total=len(mine), desc=label, unit="img", file=sys.stderr, mininterval=1.0,
             disable=not (progress and jax.process_index() == 0))
  for batch in _runs([files[k] for k in mine], call_batch, skipped):
    n = len(batch)
    if n < call_batch:  # one static shape per image size
      batch = np.concatenate([batch, np.zeros((call_batch - n,) + batch.shape[1:], batch.dtype)])
    out = pool3_features(graphdef, state, jax.device_put(batch, rows_sharding))
    if pending is not None:
      collect(pending)
    pending = (n, out)
  if pending is not None:
    collect(pending)
  bar.update(len(mine) - bar.n)  # files skipped after the last batch
  bar.close()
  if len(skipped) > NAMED:
    log.warning("skipped %d unreadable files in %s (the first %d named above)", len(skipped),
                folder, NAMED)
  bad = {name for name, _ in skipped}
  ok = [files[k].name not in bad for k in mine]
  mine_features = np.concatenate(rows) if rows else np.zeros((0, FEATURES), np.float32)
  features, ok = _in_file_order(mine_features, ok, len(files), label)
  if jax.process_count() > 1:  # the others' skipped files: named in their logs, counted here
    why = dict(skipped)
    skipped = [(f.name, why.get(f.name, "unreadable (named in another process's log)"))
               for f, good in zip(files, ok) if not good]
  return FolderFeatures(features.astype(np.float64), [f.name for f, good in zip(files, ok) if good],
                        skipped, time.perf_counter() - t0)


def _in_file_order(features: np.ndarray, ok: list[bool], count: int, label: str):
  """This process's share (rows of its readable files; a flag per file of its share) -> (the
  rows of every readable file of the folder in file order, a flag per file), gathered from every
  process: file k is process k % P's, at place k // P of its share."""

  procs = jax.process_count()
  if procs == 1:
    return features, ok
  slots = -(-count // procs)
  padded = np.zeros((slots, FEATURES), np.float32)
  flags = np.zeros((slots,), np.int32)
  flags[:len(ok)] = ok
  padded[np.flatnonzero(flags)] = features
  # Through the coordination service first: a device collective's peers must join within
  # seconds of each other, and the shares may take different times.
  distributed.barrier(f"mmar_fid_features_{label}")
  every, every_flag = multihost_utils.process_allgather((padded, flags))
  order = [(k % procs, k // procs) for k in range(count)]
  good = [bool(every_flag[p, j]) for p, j in order]
  rows = [every[p, j] for (p, j), g in zip(order, good) if g]
  return (np.stack(rows) if rows else np.zeros((0, FEATURES), np.float32)), good


# -- the command ------------------------------------------------------------------------------------


def add_args(p):
  p.add_argument("--images", required=True, metavar="DIR",
                 help="folder of PNG / JPEG images (not recursive); with --workdir, where the "
                      "drawings go (the missing ones are drawn first)")
  ref = p.add_mutually_exclusive_group()
  ref.add_argument("--ref-images", default=None, metavar="DIR", help="reference folder of PNG / JPEG images")
  ref.add_argument("--ref-stats", default=None, metavar="FILE.npz",
                   help="reference statistics: .npz with mu and sigma (MAR's fid_stats/, "
                        "pytorch-fid --save-stats, or --save-stats here)")
  p.add_argument("--inception", required=True, metavar="FILE",
                 help=f"pytorch-fid's {WEIGHTS_FILE} (get it once from {WEIGHTS_URL})")
  p.add_argument("--batch-size", type=int, default=50, metavar="B", help="images per device call")
  p.add_argument("--save-stats", default=None, metavar="OUT.npz",
                 help="also write mu and sigma of --images to this .npz (without a reference: "
                      "only that)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --save-stats file")
  draw = p.add_argument_group("drawing the images first (the whole measurement in one command: "
                              "exactly `generate --prompts` into --images, then the FID)")
  draw.add_argument("--workdir", default=None, help="the training run that draws")
  draw.add_argument("--prompts", default=None, help="text file (one a line) or JSONL, as generate")
  draw.add_argument("--prompt-key", default="caption", help="the prompt's key in a JSONL --prompts")
  draw.add_argument("--num", type=int, default=None,
                    help="images to draw: the first N / K prompts, K draws each")
  draw.add_argument("--num-per-prompt", type=int, default=1, metavar="K")
  draw.add_argument("--draw-batch-size", type=int, default=8, help="images per global batch")
  add_sampling_args(draw)
  distributed.add_arguments(p)


def _named(skipped) -> list[str]:
  return [name for name, _ in skipped[:NAMED]]


def draw_prompts(args) -> list[str]:
  """The prompts `--num N --num-per-prompt K` draws: the first N / K of the file."""
  if args.prompts is None or args.num is None:
    raise ConfigError("eval fid --workdir draws the images first: give --prompts FILE and --num N")
  k = args.num_per_prompt
  if k < 1 or args.num < 1 or args.num % k:
    raise ConfigError(f"--num {args.num} must be a positive multiple of --num-per-prompt {k}")
  prompts = read_prompts(args.prompts, args.prompt_key)
  if args.num // k > len(prompts):
    raise ConfigError(f"--num {args.num} / --num-per-prompt {k} needs {args.num // k} prompts; "
                      f"{args.prompts} has {len(prompts)}")
  return prompts[:args.num // k]


def cli_fid(args) -> int:
  distributed.join(args)  # before any other JAX call

  startup.log_to_console(quiet=())
  t0 = time.perf_counter()
  lead = jax.process_index() == 0
  if args.ref_images is None and args.ref_stats is None and args.save_stats is None:
    raise ConfigError("eval fid: give a reference, --ref-images DIR or --ref-stats FILE.npz (or "
                      "--save-stats OUT.npz to write the statistics of --images only)")
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.save_stats and epath.Path(args.save_stats).exists() and not args.overwrite:
    raise FileExistsError(f"output {args.save_stats} exists; pass --overwrite to replace it")
  ref_stats = load_stats(args.ref_stats) if args.ref_stats else None  # fail before the long part
  if not args.workdir and (args.prompts or args.num):
    raise ConfigError("--prompts and --num draw the images with a run's model: give --workdir RUN")
  prompts = draw_prompts(args) if args.workdir else None
  if prompts is None:
    list_images(args.images, quiet=True)
  if args.ref_images:
    list_images(args.ref_images, quiet=True)
  graphdef, state = load_inception(args.inception)  # a missing file fails before the drawing
  result = dict(images=args.images, batch_size=args.batch_size, processes=jax.process_count(),
                devices=jax.device_count(), device=str(jax.devices()[0]))
  if prompts is not None:
    run, model, step = open_run(args)
    drawn = generate_files(run, model, prompts, args.images, num_per_prompt=args.num_per_prompt,
                           batch_size=args.draw_batch_size, **sampling_kwargs(args))
    result.update(workdir=args.workdir, step=int(step), params=args.params,
                  drawn=drawn["drawn"], drawing_s=drawn["seconds"], drawing_wait_s=drawn["wait_s"])
  ours = folder_features(graphdef, state, args.images, args.batch_size, label="images")
  _require_two(ours, args.images)
  result.update(num_images=len(ours.files), num_skipped=len(ours.skipped),
                skipped=_named(ours.skipped), seconds_features=ours.seconds)
  if args.ref_images:
    ref = folder_features(graphdef, state, args.ref_images, args.batch_size, label="ref-images")
    _require_two(ref, args.ref_images)
    result.update(ref_images=args.ref_images, num_ref_images=len(ref.files),
                  num_ref_skipped=len(ref.skipped), ref_skipped=_named(ref.skipped))
    result["seconds_features"] += ref.seconds
  elif args.ref_stats:
    result["ref_stats"] = args.ref_stats
  if not lead:  # the statistics and the distance are process 0's
    print(json.dumps(dict(process=jax.process_index(), seconds=time.perf_counter() - t0)), flush=True)
    return 0
  mu, sigma = statistics(ours.features)
  if args.save_stats:
    save_stats(args.save_stats, mu, sigma)
    result["saved_stats"] = args.save_stats
  if args.ref_images:
    ref_stats = statistics(ref.features)
  result["fid"] = None
  if ref_stats is not None:
    t1 = time.perf_counter()
    result["fid"] = frechet_distance(mu, sigma, *ref_stats)
    result["seconds_frechet"] = time.perf_counter() - t1
  result["seconds"] = time.perf_counter() - t0
  print(json.dumps(result), flush=True)
  return 0


def _require_two(found: FolderFeatures, folder: str) -> None:
  if len(found.files) < 2:  # a covariance needs two samples
    raise ConfigError(f"FID needs at least 2 readable images in {folder}, found "
                      f"{len(found.files)} ({len(found.skipped)} unreadable)")
