"""Nested dicts of arrays (pure param trees) by path: what converters and loaders walk."""

from __future__ import annotations

from typing import Any, Iterator


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  """{path tuple: leaf} in insertion order."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def leaves(tree) -> Iterator[Any]:
  """Every leaf of a nested dict (a non-dict is its own single leaf)."""
  if isinstance(tree, dict):
    for v in tree.values():
      yield from leaves(v)
  else:
    yield tree


def at(tree: dict, path, error=KeyError):
  """The node at `path`; `error(message)` naming the path when it is missing."""
  for i, k in enumerate(path):
    if not isinstance(tree, dict) or k not in tree:
      raise error(f"params have no {'/'.join(map(str, path[:i + 1]))}")
    tree = tree[k]
  return tree


def set_at(tree: dict, path, value) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value
