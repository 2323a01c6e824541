"""Pictures in and out of the sampling commands.

PNGs are written with deterministic bytes (no timestamp, no text chunks, fixed compression), so
the same arguments give byte-identical files, and atomically (files.write_bytes_atomic), so an
interrupted run never leaves half a picture. Paths go through etils.epath (gs:// works).
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image

from mmar_jax.data.preprocess import center_crop_arr, to_model_range
from mmar_jax.data.sources import image_error
from mmar_jax.files import write_bytes_atomic


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes, with nothing in them but the pixels."""
  arr = np.ascontiguousarray(np.asarray(image))
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"png_bytes wants uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
  buf = io.BytesIO()
  Image.fromarray(arr, "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
  return buf.getvalue()


def save_png(path, image: np.ndarray) -> None:
  write_bytes_atomic(path, png_bytes(image))


def make_grid(images: Sequence[np.ndarray] | np.ndarray, cols: int | None = None, pad: int = 2,
              pad_value: int = 255) -> np.ndarray:
  """Images [B, H, W, 3] -> one uint8 picture, row-major, `cols` per row (default: a near
  square), `pad` pixels of `pad_value` around and between them."""
  images = np.asarray(images, np.uint8)
  b, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(b))
  rows = math.ceil(b / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    grid[y:y + h, x:x + w] = img
  return grid


def sample_paths(out, num: int) -> list[epath.Path]:
  """Where `save_samples` writes: `out` alone, or for num > 1 the grid at `out` and the single
  images NAME-0.png ... beside it."""
  out = epath.Path(out)
  if num <= 1:
    return [out]
  stem, suffix = out.stem, out.suffix or ".png"
  return [out] + [out.parent / f"{stem}-{i}{suffix}" for i in range(num)]


def check_writable(paths: Sequence, overwrite: bool) -> None:
  """Refuses (FileExistsError naming them) paths that exist, unless `overwrite`."""
  if overwrite:
    return
  existing = [os.fspath(p) for p in paths if epath.Path(p).exists()]
  if existing:
    raise FileExistsError(f"would overwrite {', '.join(existing)} (pass --overwrite)")


def save_samples(out, images: np.ndarray, overwrite: bool = False) -> list[epath.Path]:
  """One image to `out`, or a grid to `out` plus each image beside it; returns the paths."""
  images = np.asarray(images, np.uint8)
  paths = sample_paths(out, len(images))
  check_writable(paths, overwrite)
  if len(images) == 1:
    save_png(paths[0], images[0])
    return paths
  save_png(paths[0], make_grid(images))
  for p, img in zip(paths[1:], images):
    save_png(p, img)
  return paths


def load_image(path, size: int) -> np.ndarray:
  """A picture file -> float32 [size, size, 3] in [-1, 1]: RGB, and when it is not already
  size x size, MAR's resize of the short side and centre crop (preprocess.center_crop_arr)."""

  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"image not found: {path}")
  try:
    img = Image.open(io.BytesIO(p.read_bytes()))
    img.load()
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds; the message names the file
    raise ValueError(f"cannot read image {path}: {image_error(e)}") from None
  img = img.convert("RGB")
  if img.size != (size, size):
    img = center_crop_arr(img, size)
  return to_model_range(img)
