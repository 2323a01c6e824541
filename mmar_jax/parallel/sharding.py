"""Logical axis names -> mesh axes, through one rules table from the config.

Parameters name their dimensions logically ('embed', 'mlp', 'vocab', 'layers', ...); activations
are constrained with names such as 'batch'. `spec_for` resolves a shape and its names into a
PartitionSpec for a given mesh:
  * each logical name maps to a mesh axis, a tuple of mesh axes, or None (replicated);
  * a mesh axis is used at most once per array, and only where the dimension divides evenly;
  * FSDP fallback: if the `fsdp` axis is still unused, the largest dimension it divides (never
    'layers') is sharded over it too, so no leaf is fully replicated when it can be split.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP by default: weights split over 'fsdp' (and 'tensor' where given), batch over data x fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("head_width", "tensor"),
    ("channels", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("length", None),
    ("act_embed", None),
)

_RULES: contextvars.ContextVar = contextvars.ContextVar("mmar_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules):
  token = _RULES.set(normalize_rules(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def normalize_rules(rules) -> tuple:
  """Accepts the config's rules (tuples or lists, mesh axes as str / tuple / None)."""
  out = []
  for entry in rules:
    name, axes = entry
    if axes is not None and not isinstance(axes, str):
      axes = tuple(axes) if len(axes) else None
    if isinstance(axes, str) and axes not in MESH_AXES:
      raise ValueError(f"sharding rule {name!r} -> unknown mesh axis {axes!r}")
    out.append((name, axes))
  return tuple(out)


def current_rules():
  return _RULES.get()


def _axis_sizes(mesh) -> dict:
  return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh, rules=None,
             fsdp_fallback: bool = True) -> P:
  """PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

  The FSDP fallback is for weights and optimizer state; activations keep exactly their rules.
  """
  rules = dict(normalize_rules(rules)) if rules is not None else dict(current_rules())
  sizes = _axis_sizes(mesh)
  if names is None:
    names = (None,) * len(shape)
  assert len(names) == len(shape), (shape, names)
  used: set[str] = set()
  dims: list[list[str]] = []
  for dim, name in zip(shape, names):
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    chosen, split = [], 1
    for ax in axes:
      if ax in used or ax not in sizes or sizes[ax] == 1:
        continue
      if dim % (split * sizes[ax]) == 0:
        chosen.append(ax)
        split *= sizes[ax]
    used.update(chosen)
    dims.append(chosen)
  fsdp = sizes.get("fsdp", 1)
  if fsdp_fallback and fsdp > 1 and "fsdp" not in used:
    candidates = [
        (shape[i] // math.prod(sizes[a] for a in dims[i]), i) for i in range(len(shape))
        if names[i] != "layers" and shape[i] % (math.prod(sizes[a] for a in dims[i]) * fsdp) == 0
    ]
    if candidates:
      _, i = max(candidates)
      dims[i].append("fsdp")
  return P(*[None if not d else (d[0] if len(d) == 1 else tuple(d)) for d in dims])


def named(mesh: Mesh, spec_tree):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                      is_leaf=lambda x: isinstance(x, P))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(x.shape, names, mesh, fsdp_fallback=False))


def map_variables(fn, state) -> dict:
  """fn(path, variable) for every nnx Variable of `state`, as a pure nested dict shaped like
  `state.to_pure_dict()` (so it lines up with params, gradients and optimizer state)."""
  out: dict = {}
  for path, var in state.flat_state():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = fn(tuple(path), var)
  return out


def logical_names(var) -> tuple:
  return tuple(var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim)


def param_specs(abstract_state, mesh, rules=None) -> dict:
  """Pure dict of PartitionSpecs for the parameters of an abstract nnx.State."""
  return map_variables(lambda _, v: spec_for(v.get_value().shape, logical_names(v), mesh, rules),
                       abstract_state)
