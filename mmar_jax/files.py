"""Files every command writes or reads: all-or-nothing outputs, JSON beside them, and the orbax
`params/` directories of converter outputs.

Outputs are atomic: a temporary file or directory beside the target, renamed onto it only when it
is complete, so an interrupted command never leaves half a file and never loses what was there.
Reads and object-store writes go through etils.epath (gs:// works); a rename on an object store
is not atomic, so there the bytes are written in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import jax
import orbax.checkpoint as ocp
from etils import epath

from mmar_jax.errors import InputError


@contextlib.contextmanager
def atomic_output(out: str, overwrite: bool = False, is_dir: bool = True) -> Iterator[str]:
  """Yields a temporary local path beside `out`; renamed onto `out` only if the block succeeds.

  An existing `out` is refused (FileExistsError) without `overwrite`; on any error nothing is left
  behind and an existing `out` is untouched.
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(out)
  if is_dir:
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: outputs must be readable like any mkdir
  else:
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
    os.close(fd)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True) if is_dir else _unlink(tmp)
    raise
  if os.path.exists(out):
    old = f"{tmp}.old"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else _unlink(old)
  else:
    if not is_dir:  # mkstemp makes 0600: a written file is as readable as any other
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)
    os.rename(tmp, out)


def _unlink(path):
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def write_bytes_atomic(path, data: bytes) -> None:
  """`data` to `path` whole or not at all (replacing what is there)."""
  if "://" in os.fspath(path):
    epath.Path(path).write_bytes(data)
    return
  with atomic_output(os.fspath(path), overwrite=True, is_dir=False) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def remove_temporaries(directory) -> list[str]:
  """Deletes what `atomic_output` leaves in `directory` when its process is killed mid-write
  (`.NAME.tmp-*`); returns their names. Only while no other process writes there."""
  if "://" in os.fspath(directory):  # object stores are written in place: nothing to leave
    return []
  removed = []
  for name in sorted(os.listdir(directory)):
    if name.startswith(".") and ".tmp-" in name:
      path = os.path.join(directory, name)
      shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
      removed.append(name)
  return removed


def write_json(directory, name: str, obj: dict) -> None:
  write_bytes_atomic(epath.Path(directory) / name,
                     (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(directory, name: str) -> dict:
  path = epath.Path(directory) / name
  if not path.exists():
    raise FileNotFoundError(f"{path} not found")
  return json.loads(path.read_text())


# -- converter outputs: DIR/params/ (an orbax checkpoint of a nested dict) beside a JSON config ----
# Arrays keep their dtype (a bf16 checkpoint stays bf16). Restores always go against an abstract
# target so a checkpoint written on one topology restores on another.

def save_params(directory: str, params: dict) -> None:
  path = epath.Path(directory) / "params"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path.absolute() if hasattr(path, "absolute") else path, params)
    ckptr.wait_until_finished()


def param_metadata(directory: str) -> dict:
  """{name: ShapeDtypeStruct} nested dict as stored, without reading the arrays."""
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
  on this process's first device: in a multi-process run each process reads its own copy)."""
  path = epath.Path(directory) / "params"
  if target is None:
    dev = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          param_metadata(directory))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def jsonl_records(path, what: str = "file", required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
  """(line number, record) of every non-empty line of a JSONL file; a line that is not a JSON
  object, or lacks a `required` key, is an InputError naming the file and line."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{what} not found: {path}")
  out = []
  for n, line in enumerate(p.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise InputError(f"{path}:{n}: not a JSON object")
    missing = [k for k in required if k not in record]
    if missing:
      raise InputError(f"{path}:{n}: no {missing[0]!r} key")
    out.append((n, record))
  return out
