"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> the FID network.

The file is a torch state dict of torchvision's Inception3 with pytorch-fid's FID blocks. The JAX
module tree uses its names (models/inception.py), so the name table is only the leaf:
  conv  `<path>.conv.weight` [O, I, kh, kw]  ->  `<path>.conv.kernel` [kh, kw, I, O]
  bn    `<path>.bn.weight` / `.bias`          ->  `<path>.bn.scale` / `.bias`
        `<path>.bn.running_mean` / `_var`     ->  `<path>.bn.mean` / `.var`
The classifier (`fc.*`) and the BatchNorm step counters (`num_batches_tracked`) are part of the
file but not of pool3: they may be there (their shapes are checked) or not. Any other tensor, a
missing one, or a misshapen one is refused by name. Nothing is downloaded: the user brings the
file once.
"""

from __future__ import annotations

import os

import numpy as np

from mmar_jax.convert.common import load_state_dict
from mmar_jax.errors import ConversionError
from mmar_jax.models.inception import abstract, state_from_arrays, variable_shapes

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
# In the file, unused for pool3 features: the 1008-way classifier of the 2015 graph.
OPTIONAL = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}


def _torch_name(path: tuple[str, ...]) -> str:
  return ".".join(path[:-1] + (_LEAVES[path[-1]],))


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """{state-dict name: torch shape} of every tensor the pool3 network needs."""
  out = {}
  for path, shape in variable_shapes().items():
    out[_torch_name(path)] = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
  return out


def inception_from_torch(state_dict: dict, source: str = "Inception weights") -> dict:
  """{torch name: array} -> {JAX path: float32 array}; the errors name the tensor and `source`."""
  paths = {_torch_name(p): p for p in variable_shapes()}
  need = torch_shapes()
  counters = {n.rsplit(".", 1)[0] + ".num_batches_tracked" for n in need if n.endswith(".bn.weight")}
  missing = sorted(set(need) - set(state_dict))
  if missing:
    raise ConversionError(f"{source}: missing tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + f"; is this pytorch-fid's {WEIGHTS_FILE}?")
  unknown = sorted(set(state_dict) - set(need) - set(OPTIONAL) - counters)
  if unknown:
    raise ConversionError(f"{source}: unexpected tensor {unknown[0]}"
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                          + f"; is this pytorch-fid's {WEIGHTS_FILE}?")
  for name, value in state_dict.items():
    want = need.get(name) or OPTIONAL.get(name) or (() if name in counters else None)
    if tuple(np.shape(value)) != want:
      raise ConversionError(f"{source}: tensor {name} has shape {tuple(np.shape(value))}, "
                            f"expected {want}")
  out = {}
  for name, path in paths.items():
    value = np.asarray(state_dict[name])
    if not np.issubdtype(value.dtype, np.floating):
      raise ConversionError(f"{source}: tensor {name} has dtype {value.dtype}, expected floating")
    value = value.astype(np.float32)
    out[path] = np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if path[-1] == "kernel" else value
  return out


def missing_weights_message(path: str) -> str:
  return (f"FID Inception weights not found: {path}. FID uses pytorch-fid's {WEIGHTS_FILE} "
          f"(nothing is downloaded at run time): get it once from {WEIGHTS_URL} and pass its path "
          "with --inception")


def load_inception(path: str):
  """(graphdef, state) of the FID network from pytorch-fid's weights file at `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(missing_weights_message(path))
  arrays = inception_from_torch(load_state_dict(path), source=path)
  return abstract()[0], state_from_arrays(arrays)
