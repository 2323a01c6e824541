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
named (the first few in the log); the run goes on. Features are computed on the default device
in batches of one static shape (the last batch padded), so each image size compiles once.
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
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from mmar_jax.convert.inception import WEIGHTS_FILE, WEIGHTS_URL, load_inception
from mmar_jax.errors import ConfigError
from mmar_jax.files import write_bytes_atomic
from mmar_jax.models.inception import FEATURES, pool3_features

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
    return f"not a readable image ({type(e).__name__}: {e})"


def folder_features(graphdef, state, folder: str, batch_size: int, *, progress: bool = True,
                    label: str = "images") -> FolderFeatures:
  """pool3 features of every readable PNG / JPEG in `folder` (module docstring)."""
  t0 = time.perf_counter()
  files = list_images(folder)
  batch_size = min(batch_size, len(files))  # as pytorch-fid: no batch larger than the folder
  skipped: list[tuple[str, str]] = []
  rows: list[np.ndarray] = []
  pending = None  # the device works on batch k while the host decodes batch k + 1

  def collect(item):
    n, out = item
    rows.append(np.asarray(out)[:n].astype(np.float64))
    done = sum(len(r) for r in rows) + len(skipped)  # skipped files are progress too
    bar.update(done - bar.n)

  bar = tqdm(total=len(files), desc=label, unit="img", file=sys.stderr, mininterval=1.0,
             disable=not progress)
  for batch in _runs(files, batch_size, skipped):
    n = len(batch)
    if n < batch_size:  # one static shape per image size
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    out = pool3_features(graphdef, state, jax.device_put(batch))
    if pending is not None:
      collect(pending)
    pending = (n, out)
  if pending is not None:
    collect(pending)
  bar.update(len(files) - bar.n)  # files skipped after the last batch
  bar.close()
  if len(skipped) > NAMED:
    log.warning("skipped %d unreadable files in %s (the first %d named above)", len(skipped),
                folder, NAMED)
  bad = {name for name, _ in skipped}
  features = np.concatenate(rows) if rows else np.zeros((0, FEATURES))
  return FolderFeatures(features, [f.name for f in files if f.name not in bad], skipped,
                        time.perf_counter() - t0)


# -- the command ------------------------------------------------------------------------------------


def add_args(p):
  p.add_argument("--images", required=True, metavar="DIR", help="folder of PNG / JPEG images (not recursive)")
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


def _named(skipped) -> list[str]:
  return [name for name, _ in skipped[:NAMED]]


def cli_fid(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # orbax's import set absl's handler
  t0 = time.perf_counter()
  if args.ref_images is None and args.ref_stats is None and args.save_stats is None:
    raise ConfigError("eval fid: give a reference, --ref-images DIR or --ref-stats FILE.npz (or "
                      "--save-stats OUT.npz to write the statistics of --images only)")
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.save_stats and epath.Path(args.save_stats).exists() and not args.overwrite:
    raise FileExistsError(f"output {args.save_stats} exists; pass --overwrite to replace it")
  ref_stats = load_stats(args.ref_stats) if args.ref_stats else None  # fail before the long part
  list_images(args.images, quiet=True)
  if args.ref_images:
    list_images(args.ref_images, quiet=True)

  graphdef, state = load_inception(args.inception)
  state = jax.device_put(state)
  result = dict(images=args.images, batch_size=args.batch_size, device=str(jax.devices()[0]))
  ours = folder_features(graphdef, state, args.images, args.batch_size, label="images")
  _require_two(ours, args.images)
  mu, sigma = statistics(ours.features)
  result.update(num_images=len(ours.files), num_skipped=len(ours.skipped),
                skipped=_named(ours.skipped), seconds_features=ours.seconds)
  if args.save_stats:
    save_stats(args.save_stats, mu, sigma)
    result["saved_stats"] = args.save_stats
  if args.ref_images:
    ref = folder_features(graphdef, state, args.ref_images, args.batch_size, label="ref-images")
    _require_two(ref, args.ref_images)
    ref_stats = statistics(ref.features)
    result.update(ref_images=args.ref_images, num_ref_images=len(ref.files),
                  num_ref_skipped=len(ref.skipped), ref_skipped=_named(ref.skipped))
    result["seconds_features"] += ref.seconds
  elif args.ref_stats:
    result["ref_stats"] = args.ref_stats
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
