"""Record sources, named in the config as `data.source`: random access from a record number to
`{"image": uint8 [S, S, 3], "caption": str}` (or, for `latents:`, the stored posterior).

  demo            the built-in shapes data (data/shapes.py)
  folder:PATH     image files with a caption in a `.txt` beside each (same stem), found recursively
  jsonl:PATH      a manifest of `{"image": path, "caption": text}` lines (paths relative to it)
  wds:GLOB        webdataset tar shards as img2dataset writes them (`KEY.jpg` + `KEY.txt`);
                  the glob may use webdataset's braces: `shards/{00000..00099}.tar`
  tfds            a TFDS dataset read with `tfds.data_source` (array_record), named by
                  `data.tfds.name` / `data.tfds.split` / `data.tfds.data_dir`
  latents:DIR     shards written by `mmar-jax prepare-data` (data/prepare.py)

Every source follows grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`), so the
pipeline can shuffle and map it as a grain MapDataset. The record list is fixed when the source
is opened (files are listed and shards indexed once), so record i is the same record in every
process. A record that cannot be used raises `BadRecord` (or any error) from `__getitem__`; the
pipeline skips and counts it. Images are decoded with PIL and centre-cropped to the model's size
as MAR does (preprocess.center_crop_arr). Paths go through etils.epath: local or gs://.
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import itertools
import json
import logging
import re
import tarfile
import threading
from typing import Any

import grain
import numpy as np
from etils import epath
from PIL import Image

from mmar_jax.data.preprocess import center_crop_arr
from mmar_jax.data.shapes import ShapesDataset, ShapesSpec
from mmar_jax.errors import ConfigError
from mmar_jax.models.image_tokenizer import token_spec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
CAPTION_EXTENSIONS = ("txt", "caption")
LATENTS_META = "latents.json"
OPEN_SHARDS = 8  # webdataset shards kept open per reading thread


class BadRecord(ValueError):
  """A record that cannot be used (a corrupt image, a missing file); skipped and counted."""


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3], MAR's resize and centre crop."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # decodes now, so a truncated file fails here and not later
      rgb = im.convert("RGB")
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
    raise BadRecord(f"not a readable image ({image_error(e)})") from None
  return np.asarray(center_crop_arr(rgb, size), np.uint8)


def image_error(e: Exception) -> str:
  """Why PIL could not read a picture, without the buffer's address it names: an output that
  records it must not depend on the run."""
  return f"{type(e).__name__}: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))


def array_image(array, size: int) -> np.ndarray:
  """A decoded image array (HWC or HW) -> uint8 [size, size, 3], MAR's resize and centre crop."""
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
    raise BadRecord(f"image array of shape {a.shape} and dtype {a.dtype}: expected uint8 HxWx3")
  if a.shape[:2] == (size, size) and a.ndim == 3 and a.shape[-1] == 3:
    return a
  return np.asarray(center_crop_arr(Image.fromarray(a).convert("RGB"), size), np.uint8)


def text_of(value) -> str:
  """A caption from str, bytes or a 0-d array of either."""
  if isinstance(value, np.ndarray):
    value = value.item() if value.ndim == 0 else value.tolist()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      raise BadRecord("caption is not UTF-8") from None
  if not isinstance(value, str):
    raise BadRecord(f"caption of type {type(value).__name__}")
  return value


def _ext(name: str) -> str:
  return name.rsplit(".", 1)[-1].lower() if "." in name else ""


# -- folder: and jsonl: -----------------------------------------------------------------------------


def _files_under(root: epath.Path):
  """Every file below `root` (epath has no recursive glob on gs://: walk the directories)."""
  for p in root.iterdir():
    if p.is_dir():
      yield from _files_under(p)
    else:
      yield p


class FolderSource:
  """Image files under a directory, each with a caption file of the same stem beside it."""

  def __init__(self, root: str, image_size: int):
    self.root, self.image_size = epath.Path(root), int(image_size)
    if not self.root.is_dir():
      raise FileNotFoundError(f"data source folder:{root}: not a directory")
    self.files = sorted((p for p in _files_under(self.root) if _ext(p.name) in IMAGE_EXTENSIONS),
                        key=str)
    if not self.files:
      raise FileNotFoundError(f"data source folder:{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")

  def __len__(self) -> int:
    return len(self.files)

  def name(self, i: int) -> str:
    return str(self.files[i])

  def __getitem__(self, i: int) -> dict:
    path = self.files[i]
    caption = ""
    for ext in CAPTION_EXTENSIONS:
      cap = path.with_suffix("." + ext)
      if cap.exists():
        caption = text_of(cap.read_bytes())
        break
    return {"image": decode_image(path.read_bytes(), self.image_size), "caption": caption}


class JsonlSource:
  """A JSON-lines manifest; a line that is not JSON, or lacks the keys, is a bad record."""

  def __init__(self, manifest: str, image_size: int, image_key: str = "image",
               caption_key: str = "caption"):
    self.path = epath.Path(manifest)
    if not self.path.exists():
      raise FileNotFoundError(f"data source jsonl:{manifest}: no such file")
    self.lines = [line for line in self.path.read_text().splitlines() if line.strip()]
    if not self.lines:
      raise FileNotFoundError(f"data source jsonl:{manifest}: no records")
    self.image_size, self.image_key, self.caption_key = int(image_size), image_key, caption_key

  def __len__(self) -> int:
    return len(self.lines)

  def _entry(self, i: int) -> dict:
    try:
      entry = json.loads(self.lines[i])
    except json.JSONDecodeError as e:
      raise BadRecord(f"line {i + 1} is not JSON ({e})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get(self.image_key), str):
      raise BadRecord(f"line {i + 1} has no {self.image_key!r} path")
    return entry

  def name(self, i: int) -> str:
    try:
      return f"{self.path}:{i + 1} ({self._entry(i)[self.image_key]})"
    except BadRecord:
      return f"{self.path}:{i + 1}"

  def __getitem__(self, i: int) -> dict:
    entry = self._entry(i)
    image = entry[self.image_key]
    path = epath.Path(image) if "://" in image or image.startswith("/") else self.path.parent / image
    if not path.exists():
      raise BadRecord(f"image {path} not found")
    return {"image": decode_image(path.read_bytes(), self.image_size),
            "caption": text_of(entry.get(self.caption_key) or "")}


# -- wds: -----------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
  """webdataset's shard notation: `{000..099}` (zero-padded ranges) and `{a,b}` alternatives."""
  m = re.search(r"\{([^{}]*)\}", pattern)
  if not m:
    return [pattern]
  body = m.group(1)
  rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if rng:
    lo, hi = rng.groups()
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    options = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
  else:
    options = body.split(",")
  head, tail = pattern[:m.start()], pattern[m.end():]
  return [p for o in options for p in expand_braces(head + o + tail)]


def list_paths(pattern: str) -> list[epath.Path]:
  """Braces expanded, then glob characters matched, sorted; existing files only. Remote
  (gs://) patterns may use glob characters in the file name only."""
  found = set()
  for p in expand_braces(pattern):
    if not any(c in p for c in "*?["):
      if epath.Path(p).exists():
        found.add(p)
    elif "://" not in p:
      found.update(glob.glob(p))
    else:
      parent, _, name = p.rpartition("/")
      found.update(str(x) for x in epath.Path(parent).glob(name))
  return [epath.Path(x) for x in sorted(found)]


class WebDatasetSource:
  """img2dataset's webdataset tars, indexed once (member headers only) for random access.

  Members are grouped into samples by key (the member name up to the first dot of its base
  name, webdataset's rule). A sample needs an image member; its caption is the `.txt` member.
  A shard that ends early (truncated) keeps the samples whose headers were read; the rest of the
  shard is counted and named in the log. Reads seek straight to a member's bytes.
  """

  def __init__(self, pattern: str, image_size: int, threads: int = 8):
    self.pattern, self.image_size = pattern, int(image_size)
    self.shards = list_paths(pattern)
    if not self.shards:
      raise FileNotFoundError(f"data source wds:{pattern}: no shards")
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(self.shards)))) as pool:
      indexes = list(pool.map(self._index_shard, range(len(self.shards))))
    self.samples = list(itertools.chain.from_iterable(indexes))
    if not self.samples:
      raise FileNotFoundError(f"data source wds:{pattern}: no samples with an image in "
                              f"{len(self.shards)} shards")
    self._local = threading.local()

  def _index_shard(self, k: int) -> list[tuple]:
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    shard = self.shards[k]
    try:
      with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        while True:
          try:
            info = tar.next()
          except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("data: %s: unreadable after %d samples (%s); the rest is skipped",
                        shard, len(order), e)
            break
          if info is None:
            break
          if not info.isfile():
            continue
          base = info.name.rsplit("/", 1)
          stem, _, ext = base[-1].partition(".")
          key = (base[0] + "/" if len(base) > 1 else "") + stem
          if key not in members:
            members[key] = {}
            order.append(key)
          members[key][ext.lower()] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
      log.warning("data: %s: not a readable tar (%s); skipped", shard, e)
      return []
    out = []
    for key in order:
      m = members[key]
      image = next((m[e] for e in IMAGE_EXTENSIONS if e in m), None)
      if image is None:
        continue  # img2dataset's failed downloads leave only .json: not a sample
      caption = next((m[e] for e in CAPTION_EXTENSIONS if e in m), None)
      out.append((k, key, image, caption))
    return out

  def __len__(self) -> int:
    return len(self.samples)

  def name(self, i: int) -> str:
    k, key, _, _ = self.samples[i]
    return f"{self.shards[k]}:{key}"

  def _read(self, k: int, where: tuple[int, int]) -> bytes:
    # Open files per thread (reads seek; threads must not share a position), the few most
    # recently used ones only: a shuffled stream touches every shard.
    handles = self._local.__dict__.setdefault("handles", {})
    f = handles.pop(k, None)
    if f is None:
      f = self.shards[k].open("rb")
      if len(handles) >= OPEN_SHARDS:
        handles.pop(next(iter(handles))).close()
    handles[k] = f  # re-inserted: dict order is least recently used first
    offset, size = where
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
      raise BadRecord(f"member cut short ({len(data)} of {size} bytes): truncated shard")
    return data

  def __getitem__(self, i: int) -> dict:
    k, _, image, caption = self.samples[i]
    text = text_of(self._read(k, caption)) if caption is not None else ""
    return {"image": decode_image(self._read(k, image), self.image_size), "caption": text}


# -- tfds -------------------------------------------------------------------------------------------


class TfdsSource:
  """A prepared TFDS dataset through `tfds.data_source` (array_record; TensorFlow not needed)."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_size: int,
               image_key: str = "image", caption_key: str = "caption"):
    if not name:
      raise FileNotFoundError("data.source tfds needs data.tfds.name")
    import tensorflow_datasets as tfds  # lazy: seconds to import, only when asked for
    try:
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises assorted types for a missing dataset
      raise FileNotFoundError(f"tfds dataset {name!r} split {split!r} in {data_dir}: {e}") from e
    self.label = f"tfds:{name}/{split}"
    self.image_size, self.image_key, self.caption_key = int(image_size), image_key, caption_key

  def __len__(self) -> int:
    return len(self.ds)

  def name(self, i: int) -> str:
    return f"{self.label}[{i}]"

  def __getitem__(self, i: int) -> dict:
    rec = self.ds[i]
    for key in (self.image_key, self.caption_key):
      if key not in rec:
        raise BadRecord(f"no field {key!r} (fields: {sorted(rec)})")
    image = rec[self.image_key]
    image = (decode_image(image, self.image_size) if isinstance(image, bytes)
             else array_image(image, self.image_size))
    return {"image": image, "caption": text_of(rec[self.caption_key])}


# -- latents: ---------------------------------------------------------------------------------------


def encode_latent_record(caption: str | None, mean=None, logvar=None, mean_flip=None,
                         logvar_flip=None, error: str | None = None) -> bytes:
  """One `latents:` record as .npz bytes (no pickle). A record whose image could not be read is
  kept, with its `error`, so record numbers match the source's and the same keys pick the same
  records."""
  arrays: dict[str, Any] = {"caption": np.asarray(caption or "")}
  if error is not None:
    arrays["error"] = np.asarray(error)
  else:
    arrays.update(mean=mean, logvar=logvar, mean_flip=mean_flip, logvar_flip=logvar_flip)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_latent_record(data: bytes) -> dict:
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    if "error" in z:
      raise BadRecord(f"image unreadable when the latents were prepared: {z['error'].item()}")
    return {"latent_mean": z["mean"], "latent_logvar": z["logvar"],
            "latent_mean_flip": z["mean_flip"], "latent_logvar_flip": z["logvar_flip"],
            "caption": str(z["caption"].item())}


class LatentSource:
  """`prepare-data` output: ArrayRecord shards of npz records plus `latents.json`, read with
  grain's ArrayRecordDataSource (array_record reads gs:// itself)."""

  def __init__(self, directory: str):
    self.directory = epath.Path(directory)
    meta_path = self.directory / LATENTS_META
    if not meta_path.exists():
      raise FileNotFoundError(f"data source latents:{directory}: no {LATENTS_META} (not a "
                              "complete `mmar-jax prepare-data` output)")
    self.meta = json.loads(meta_path.read_text())
    self.ds = grain.sources.ArrayRecordDataSource(
        [str(self.directory / s) for s in self.meta["shards"]])
    if len(self.ds) != self.meta["records"]:
      raise FileNotFoundError(f"latents:{directory}: {len(self.ds)} records in the shards, "
                              f"{LATENTS_META} says {self.meta['records']}")

  def __len__(self) -> int:
    return len(self.ds)

  def name(self, i: int) -> str:
    return f"latents:{self.directory}[{i}]"

  def __getitem__(self, i: int) -> dict:
    return decode_latent_record(self.ds[i])

  def check_config(self, config):
    """The shards must come from the image tokenizer the config trains with."""
    want = latent_fingerprint(config)
    have = self.meta.get("fingerprint", {})
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if differ:
      raise ValueError(f"latents:{self.directory} was prepared with a different image tokenizer: "
                       + ", ".join(f"{k} ({have.get(k)!r} there, {want.get(k)!r} here)" for k in differ))


def latent_fingerprint(config) -> dict:
  """What makes latents valid for a config: the image size and the image tokenizer (its kind,
  patching, scale and VAE architecture). The VAE's weights path is recorded beside it, not
  compared: a moved directory holds the same weights."""
  image = config.model.image.to_dict()
  stride, channels = token_spec(image)
  out = {"size": image["size"], "kind": image["kind"], "stride": stride, "channels": channels,
         "patch_size": image["patch_size"], "scale": image.get("scale")}
  if image["kind"] == "vae":
    out["vae"] = json.loads(json.dumps(image.get("vae", {})))
  return out


# -- by name ----------------------------------------------------------------------------------------


def make_source(config, source: str | None = None, split: str = "train"):
  """The record source a config names (`data.source`, or `source` if given)."""
  spec = config.data.source if source is None else source
  size = int(config.model.image.size)
  kind, _, arg = spec.partition(":")
  if kind == "demo":
    return ShapesDataset(ShapesSpec(image_size=size, seed=config.seed), split=split)
  if kind in ("folder", "jsonl", "wds", "latents") and not arg:
    raise ConfigError(f"data.source {spec!r}: {kind}: needs a path ({kind}:PATH)")
  if kind == "folder":
    return FolderSource(arg, size)
  if kind == "jsonl":
    return JsonlSource(arg, size, config.data.image_key, config.data.caption_key)
  if kind == "wds":
    return WebDatasetSource(arg, size)
  if kind == "tfds":
    t = config.data.tfds
    return TfdsSource(arg or t.name, t.split, t.data_dir, size, config.data.image_key,
                      config.data.caption_key)
  if kind == "latents":
    src = LatentSource(arg)
    try:
      src.check_config(config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    return src
  raise ConfigError(f"unknown data.source {spec!r}: use demo, folder:PATH, jsonl:PATH, wds:GLOB, "
                    "tfds or latents:DIR")
