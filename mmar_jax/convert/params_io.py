"""Converter outputs: `DIR/params/` (an orbax checkpoint of a nested dict of arrays) beside a JSON
config (`model_config.json`, `vae_config.json`, `head_config.json`).

Arrays keep their dtype (a bf16 checkpoint stays bf16). Restores always go against an abstract
target so a checkpoint written on one topology restores on another.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath


def save_params(directory: str, params: dict) -> None:
  import orbax.checkpoint as ocp
  path = epath.Path(directory) / "params"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path.absolute() if hasattr(path, "absolute") else path, params)
    ckptr.wait_until_finished()


def param_metadata(directory: str) -> dict:
  """{name: ShapeDtypeStruct} nested dict as stored, without reading the arrays."""
  import orbax.checkpoint as ocp
  path = epath.Path(directory) / "params"
  if not path.exists():
    raise FileNotFoundError(f"no params/ checkpoint in {directory}")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_params(directory: str, target=None, sharding=None) -> dict:
  """Restores params; `target` is a tree of ShapeDtypeStruct (with shardings) or None (as stored,
  on the default device)."""
  import orbax.checkpoint as ocp
  path = epath.Path(directory) / "params"
  if target is None:
    dev = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          param_metadata(directory))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def write_json(directory: str, name: str, obj: dict) -> None:
  (epath.Path(directory) / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(directory: str, name: str) -> dict:
  path = epath.Path(directory) / name
  if not path.exists():
    raise FileNotFoundError(f"{path} not found")
  return json.loads(path.read_text())
