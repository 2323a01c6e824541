"""MAR's image preprocessing (method.md §1): resize the short side, centre-crop, scale to [-1, 1]."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(pil_image, image_size: int):
  """MAR's (ADM's) centre crop: halve with a box filter while the short side is at least twice
  `image_size` (cheap anti-aliasing), resize the short side to `image_size` bicubically, then cut
  the centre square. Returns a PIL image of `image_size` x `image_size`."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return Image.fromarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])


def to_model_range(image) -> np.ndarray:
  """uint8 HWC (PIL or array) -> float32 in [-1, 1], as MAR's ToTensor + Normalize(0.5, 0.5)."""
  arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
  return arr.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, clipped (decoder outputs overshoot slightly)."""
  arr = np.asarray(images, np.float32)
  return np.clip(np.round((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)
