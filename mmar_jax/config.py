"""Config files (big_vision style) and `--config.key=value` overrides.

A config is a Python file whose `get_config(arg=None)` returns an `ml_collections.ConfigDict`;
`path.py:arg` picks a variant. Overrides may only name keys the config declares, so a typo is an
error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Iterable, Sequence

import ml_collections
from ml_collections import config_dict

from mmar_jax.errors import ConfigError


def _packaged_configs() -> str:
  """The shipped configs: `mmar_jax.configs` in an installed package (pyproject.toml maps the
  repository's `configs/` there), else the checkout's `configs/` beside the package."""
  try:
    spec = importlib.util.find_spec("mmar_jax.configs")
  except ImportError:
    spec = None
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_path(path: str) -> str:
  """A config file on disk: the path as given when it exists (a user's own or edited copy), else
  the shipped config of that name (`configs/demo.py`, `demo.py` or `demo`), so an installed
  package runs the README's commands from any directory."""
  if os.path.isfile(path):
    return path
  parent, name = os.path.split(path)
  if parent in ("", "configs"):
    shipped = os.path.join(_packaged_configs(), name if name.endswith(".py") else name + ".py")
    if os.path.isfile(shipped):
      return shipped
  raise ConfigError(f"config file not found: {path} (nor a shipped config of that name in "
                    f"{_packaged_configs()})")


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/cfg.py[:arg]` (or a shipped config's name, `demo:arg`) and calls its
  `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  path = config_path(path)
  module_spec = importlib.util.spec_from_file_location(
      f"_mmar_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config()")
  cfg = module.get_config(arg or None)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return a ConfigDict")
  return cfg


def _coerce(key: str, current: Any, raw: str) -> Any:
  """Parses `raw` into the type of the value (or placeholder) currently at `key`."""
  field_type = type(current)
  if isinstance(current, config_dict.FieldReference):
    field_type = current.get_type()
  if field_type is bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"--config.{key}: expected a boolean, got {raw!r}")
  if field_type in (int, float):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      raise ConfigError(f"--config.{key}: expected a {field_type.__name__}, got {raw!r}") from None
    if field_type is int and isinstance(value, float) and value.is_integer():
      value = int(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ConfigError(f"--config.{key}: expected a {field_type.__name__}, got {raw!r}")
    return field_type(value)
  if field_type in (tuple, list):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = tuple(v.strip() for v in raw.split(",") if v.strip())
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return field_type(value)
  if field_type is str or current is None:
    return raw
  raise ConfigError(f"--config.{key}: cannot override a value of type {field_type.__name__}")


def _lookup(cfg: ml_collections.ConfigDict, dotted: str):
  """Returns (parent, leaf_name, current value or placeholder reference) for a dotted key."""
  parts = dotted.split(".")
  parent, node = None, cfg
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"unknown config key: {dotted!r} (no {'.'.join(parts[:i + 1])!r})")
    parent = node
    ref = node.get_ref(part) if not isinstance(node[part], ml_collections.ConfigDict) else None
    node = ref if ref is not None and ref.get() is None else node[part]
  return parent, parts[-1], node


def load(spec: str, overrides: Iterable[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """`load_file(spec)` with `(dotted_key, raw_string)` overrides applied."""
  return apply_overrides(load_file(spec), overrides)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]]):
  """Applies (dotted_key, raw_string) pairs in order; unknown keys raise ConfigError."""
  for key, raw in overrides:
    parent, leaf, current = _lookup(cfg, key)
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key} names a group of keys, not a value")
    parent[leaf] = _coerce(key, current, raw)
  return cfg


def split_override_args(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.key=value` / `--config.key value` from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" in body:
        key, value = body.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg} needs a value")
        key, value = body, argv[i + 1]
        i += 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def from_dict(d: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(d)


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def parse_mesh(value: str | Sequence[int]) -> tuple[int, int, int]:
  """'1,8,1' -> (1, 8, 1); -1 means all remaining devices (resolved by parallel.mesh)."""
  if isinstance(value, str):
    try:
      parts = tuple(int(p) for p in value.split(","))
    except ValueError:
      raise ConfigError(f"mesh must be three integers 'data,fsdp,tensor', got {value!r}") from None
  else:
    parts = tuple(int(p) for p in value)
  if len(parts) != 3:
    raise ConfigError(f"mesh must be three integers 'data,fsdp,tensor', got {value!r}")
  return parts
