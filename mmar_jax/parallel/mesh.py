"""The device mesh: axes (data, fsdp, tensor), Auto axis types (annotation-driven sharding).

`mesh` gives the axis sizes within a slice (-1 = all remaining devices); `mesh_dcn` the sizes
across slices, combined as a hybrid mesh (data parallel over DCN, FSDP inside a slice).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from mmar_jax.config import parse_mesh
from mmar_jax.errors import ConfigError
from mmar_jax.parallel.sharding import MESH_AXES


def resolve_shape(shape, num_devices: int) -> tuple[int, ...]:
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh {tuple(shape)}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"mesh {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices, "
                      f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(mesh="1,-1,1", mesh_dcn="1,1,1", devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  dcn = parse_mesh(mesh_dcn)
  n_slices = math.prod(dcn)
  ici = resolve_shape(parse_mesh(mesh), len(devices) // n_slices)
  if n_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    try:
      arr = mesh_utils.create_device_mesh(ici, devices=devices)
    except Exception:  # noqa: BLE001 - CPU / odd topologies: plain order is fine
      arr = np.asarray(devices).reshape(ici)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


SAMPLING_MESH = ("1,-1,1", "1,1,1")  # every device present on fsdp, one slice


def sampling_overrides(overrides) -> list:
  """A sampling command's config overrides with the mesh it runs on: `--mesh` (or
  `--config.mesh=`) when given, else every device present on the fsdp axis (params sharded the
  FSDP way over all hosts, the batch over data x fsdp). The training run's mesh does not bind
  sampling: users sample on another slice, or another machine, than they trained on."""
  given = {key for key, _ in overrides}
  out = list(overrides)
  for key, value in zip(("mesh", "mesh_dcn"), SAMPLING_MESH):
    if key not in given:
      out.append((key, value))
  return out
