"""What every converter shares: safe reading of torch files and exact torch <-> numpy arrays."""

from __future__ import annotations

import argparse
import os

import ml_dtypes
import numpy as np

from mmar_jax.convert import safetensors_io
from mmar_jax.errors import ConversionError


def load_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
  """A flat {name: numpy array} from a safetensors file or a torch checkpoint.

  Torch files are read with `weights_only=True`; MAR's training checkpoints also pickle an
  `argparse.Namespace`, which is the only extra type allowed. `key` selects a nested state dict
  ("model", "model_ema"); without it, a checkpoint that holds one of those under "model" is unwrapped.
  bf16 tensors are returned as ml_dtypes.bfloat16 arrays, bit for bit.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    return safetensors_io.read_all(path)
  import torch  # lazy: seconds to import, this path only
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
      raise ConversionError(f"cannot read {path} as a torch checkpoint: {e}") from e
  if key is not None:
    if not isinstance(obj, dict) or key not in obj:
      found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ConversionError(f"{path} has no {key!r} entry (found: {found})")
    obj = obj[key]
  elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  out = {}
  for name, tensor in obj.items():
    if not hasattr(tensor, "detach"):
      continue
    out[name] = torch_to_numpy(tensor)
  return out


def torch_to_numpy(tensor) -> np.ndarray:
  """Exact conversion, bf16 included (numpy has no bf16: go through the raw bits)."""
  import torch  # lazy: seconds to import, this path only
  t = tensor.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_torch(array: np.ndarray):
  import torch  # lazy: seconds to import, this path only
  a = np.ascontiguousarray(array).reshape(np.shape(array))  # ascontiguousarray makes 0-d 1-d
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)
