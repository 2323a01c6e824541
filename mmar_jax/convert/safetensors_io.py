"""The safetensors format, read and written from its specification, one tensor at a time.

A file is: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (padded
with spaces), then the raw little-endian C-order bytes of every tensor, offsets relative to the
end of the header, contiguous and without holes.

Why our own: the `safetensors` package gives bf16 only through torch, and its writer wants every
tensor in memory at once. Here reading is by mmap (bf16 comes back as `ml_dtypes.bfloat16`, bit
for bit) and writing streams: the header is built from the declared shapes and dtypes, then each
tensor is produced, written and dropped, so peak memory stays about one tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import ml_dtypes
import numpy as np

from mmar_jax.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The reference implementation refuses larger headers; a bigger one means a corrupt file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {v: k for k, v in DTYPES.items()}


class TensorSpec(NamedTuple):
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def dtype_code(dtype) -> str:
  """numpy dtype -> safetensors code ("F32", "BF16", ...)."""
  dt = np.dtype(dtype)
  code = _CODES.get(dt.newbyteorder("<") if dt.byteorder == ">" else dt)
  if code is None:
    raise ConversionError(f"dtype {dt} has no safetensors code")
  return code


# -- reading ----------------------------------------------------------------------------------------


class SafetensorsFile:
  """One .safetensors file, opened by mmap; tensors are read on demand.

  `get(name)` returns a copy and drops the mapped pages again, so a loop over all tensors keeps
  resident memory at about one tensor (the pages stay in the OS file cache, not in our RSS).
  """

  def __init__(self, path: str):
    self.path = str(path)
    if not os.path.isfile(self.path):
      raise ConversionError(f"safetensors file not found: {self.path}")
    self._file = open(self.path, "rb")
    try:
      self._parse_header()
      self._mmap = (mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                    if self._size else None)
    except BaseException:
      self._file.close()
      raise

  def _parse_header(self):
    size = os.fstat(self._file.fileno()).st_size
    raw = self._file.read(8)
    if len(raw) < 8:
      raise ConversionError(f"{self.path}: too short for a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > size:
      raise ConversionError(f"{self.path}: header length {n} does not fit the file ({size} bytes)")
    try:
      header = json.loads(self._file.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{self.path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
      raise ConversionError(f"{self.path}: header is not a JSON object")
    self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._size = size
    self._entries: dict[str, tuple[TensorSpec, int, int]] = {}
    for name, entry in header.items():
      self._entries[name] = self._parse_entry(name, entry)
    self._check_layout(size - self._start)

  def _parse_entry(self, name, entry) -> tuple[TensorSpec, int, int]:
    try:
      code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ConversionError(f"{self.path}: tensor {name!r} has a malformed header entry: {entry}") from None
    if code not in DTYPES:
      raise ConversionError(f"{self.path}: tensor {name!r} has unsupported dtype {code!r}")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
      raise ConversionError(f"{self.path}: tensor {name!r} has a bad shape {shape}")
    spec = TensorSpec(DTYPES[code], tuple(shape))
    if end - begin != spec.nbytes or begin < 0:
      raise ConversionError(f"{self.path}: tensor {name!r} offsets [{begin}, {end}] do not match "
                            f"{code} {list(shape)} ({spec.nbytes} bytes)")
    return spec, begin, end

  def _check_layout(self, buffer_bytes: int):
    """Tensors must tile the byte buffer exactly (the spec forbids holes and overlaps)."""
    pos = 0
    for name, (_, begin, end) in sorted(self._entries.items(), key=lambda kv: (kv[1][1], kv[1][2])):
      if begin != pos:
        raise ConversionError(f"{self.path}: tensor {name!r} starts at byte {begin}, expected {pos} "
                              "(overlapping or non-contiguous data)")
      pos = end
    if pos != buffer_bytes:
      raise ConversionError(f"{self.path}: tensors cover {pos} bytes but the file holds {buffer_bytes} "
                            "(truncated or trailing data)")

  # -- access

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def spec(self, name: str) -> TensorSpec:
    return self._lookup(name)[0]

  def specs(self) -> dict[str, TensorSpec]:
    return {k: v[0] for k, v in self._entries.items()}

  def _lookup(self, name):
    if name not in self._entries:
      raise ConversionError(f"{self.path}: no tensor named {name!r}")
    return self._entries[name]

  def get(self, name: str, copy: bool = True) -> np.ndarray:
    """The tensor as a numpy array; `copy=False` gives a read-only view valid until close()."""
    spec, begin, end = self._lookup(name)
    if spec.nbytes == 0:
      return np.zeros(spec.shape, spec.dtype)
    view = np.frombuffer(self._mmap, dtype=spec.dtype, count=int(np.prod(spec.shape, dtype=np.int64)),
                         offset=self._start + begin)
    view = view.reshape(spec.shape)
    if not copy:
      return view
    out = view.copy()
    del view
    self.release(name)
    return out

  def release(self, name: str):
    """Drops the mapped pages of a tensor read with copy=False once the caller is done with it."""
    _, begin, end = self._lookup(name)
    if end > begin:
      self._release(self._start + begin, self._start + end)

  def _release(self, begin: int, end: int):
    # Drop the mapped pages from this process (they stay in the page cache): without this a pass
    # over a large checkpoint would count the whole file in our resident memory.
    if not hasattr(mmap, "MADV_DONTNEED"):
      return
    page = mmap.PAGESIZE
    start = begin - begin % page
    try:
      self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
      pass

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) in file order (sequential reads)."""
    for name, _ in sorted(self._entries.items(), key=lambda kv: kv[1][1]):
      yield name, self.get(name)

  def close(self):
    if getattr(self, "_mmap", None) is not None:
      try:
        self._mmap.close()
      except BufferError:  # a copy=False view is still alive; the OS unmaps it with the object
        pass
      self._mmap = None
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_file(path: str) -> SafetensorsFile:
  return SafetensorsFile(path)


def read_all(path: str) -> dict[str, np.ndarray]:
  with SafetensorsFile(path) as f:
    return dict(iter(f))


def read_metadata(path: str) -> dict[str, str]:
  with SafetensorsFile(path) as f:
    return dict(f.metadata)


class CheckpointDir:
  """A HuggingFace-style directory: `model.safetensors`, or shards listed by
  `model.safetensors.index.json`. Names map to (file, spec) from the headers alone."""

  def __init__(self, directory: str):
    self.directory = str(directory)
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    try:
      self._open()
    except BaseException:
      self.close()
      raise

  def _open(self):
    index_path = os.path.join(self.directory, INDEX_NAME)
    single = os.path.join(self.directory, SINGLE_NAME)
    if os.path.isfile(index_path):
      weight_map = _read_index(index_path)
      for fname in sorted(set(weight_map.values())):
        self._files[fname] = SafetensorsFile(_shard_path(self.directory, fname, index_path))
      for name, fname in weight_map.items():
        if name not in self._files[fname]:
          raise ConversionError(f"{index_path} puts tensor {name!r} in {fname}, which does not hold it")
        self._where[name] = fname
      for fname, f in self._files.items():
        stray = sorted(set(f.keys()) - set(self._where))
        if stray:
          raise ConversionError(f"{os.path.join(self.directory, fname)} holds tensors the index does "
                                f"not list: {stray[:5]}")
    elif os.path.isfile(single):
      self._files[SINGLE_NAME] = SafetensorsFile(single)
      self._where = {name: SINGLE_NAME for name in self._files[SINGLE_NAME].keys()}
    else:
      found = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else None
      if found is None:
        raise ConversionError(f"checkpoint directory not found: {self.directory}")
      raise ConversionError(f"{self.directory} has neither {SINGLE_NAME} nor {INDEX_NAME} "
                            f"(found: {found[:10]})")

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name) -> bool:
    return name in self._where

  def spec(self, name: str) -> TensorSpec:
    return self._file_of(name).spec(name)

  def specs(self) -> dict[str, TensorSpec]:
    return {name: self.spec(name) for name in self._where}

  def _file_of(self, name) -> SafetensorsFile:
    if name not in self._where:
      raise ConversionError(f"{self.directory}: no tensor named {name!r}")
    return self._files[self._where[name]]

  def get(self, name: str, copy: bool = True) -> np.ndarray:
    return self._file_of(name).get(name, copy=copy)

  def release(self, name: str):
    self._file_of(name).release(name)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) file by file, each in file order."""
    for f in self._files.values():
      yield from f

  def close(self):
    for f in self._files.values():
      f.close()
    self._files = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _read_index(index_path: str) -> dict[str, str]:
  try:
    with open(index_path) as fh:
      index = json.load(fh)
    weight_map = index["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{index_path}: not a safetensors index ({e})") from None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ConversionError(f"{index_path}: empty or malformed weight_map")
  return weight_map


def _shard_path(directory, fname, index_path) -> str:
  # Shard names come from a file we did not write: keep them inside the checkpoint directory.
  if os.path.basename(fname) != fname:
    raise ConversionError(f"{index_path}: shard name {fname!r} must be a plain file name")
  path = os.path.join(directory, fname)
  if not os.path.isfile(path):
    raise ConversionError(f"{index_path} lists shard {fname}, which is missing")
  return path


# -- writing ----------------------------------------------------------------------------------------

Producer = Callable[[str], np.ndarray]


def _header_bytes(specs: Sequence[tuple[str, TensorSpec]], metadata: Mapping[str, str] | None) -> bytes:
  header: dict = {}
  if metadata:
    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
      raise ConversionError(f"safetensors metadata must map str to str; bad entries: {bad}")
    header["__metadata__"] = dict(metadata)
  pos = 0
  for name, spec in specs:
    if name == "__metadata__" or name in header:
      raise ConversionError(f"tensor name {name!r} is reserved or repeated")
    header[name] = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape),
                    "data_offsets": [pos, pos + spec.nbytes]}
    pos += spec.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
  raw += b" " * (-(len(raw) + 8) % 8)
  return struct.pack("<Q", len(raw)) + raw


def _as_spec(spec) -> TensorSpec:
  if isinstance(spec, TensorSpec):
    return spec
  dtype, shape = spec
  return TensorSpec(np.dtype(dtype), tuple(int(d) for d in shape))


def write_file(path: str, specs: Sequence[tuple[str, TensorSpec | tuple]], produce: Producer,
               metadata: Mapping[str, str] | None = None) -> int:
  """Streams tensors into one file: the header from `specs` [(name, (dtype, shape))], then
  `produce(name)` for each in that order (each array is written and dropped). Returns bytes written."""
  specs = [(name, _as_spec(s)) for name, s in specs]
  header = _header_bytes(specs, metadata)
  with open(path, "wb") as fh:
    fh.write(header)
    for name, spec in specs:
      arr = np.asarray(produce(name))
      if arr.shape != spec.shape or arr.dtype != spec.dtype:
        raise ConversionError(f"{path}: tensor {name!r} was declared {spec.dtype} {list(spec.shape)} "
                              f"but produced {arr.dtype} {list(arr.shape)}")
      arr = np.ascontiguousarray(arr)
      if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
      # A uint8 view writes without a bytes copy, and works for ml_dtypes (no buffer format).
      fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
      del arr
    written = fh.tell()
  expected = len(header) + sum(s.nbytes for _, s in specs)
  if written != expected:
    raise ConversionError(f"{path}: wrote {written} bytes, expected {expected}")
  return written


def save_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
  """{name: array} -> one file, through `write_file`: the one writer of the package (it streams,
  so the file's bytes are never a second copy of the arrays in memory)."""
  arrays = {k: np.asarray(v) for k, v in tensors.items()}
  return write_file(path, [(k, TensorSpec(a.dtype, a.shape)) for k, a in arrays.items()],
                    arrays.__getitem__, metadata)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """'5GB' -> 5e9 bytes, '200KB' -> 2e5, '2GiB' -> 2*2**30 (HuggingFace's convention)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
  if not m or m.group(2).upper() not in _SIZE_UNITS:
    raise ConversionError(f"bad size {size!r}; use e.g. 5GB, 500MB, 200KB or a byte count")
  value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
  if value <= 0:
    raise ConversionError(f"size {size!r} must be positive")
  return value


def plan_shards(specs: Sequence[tuple[str, TensorSpec]], max_bytes: int) -> list[list[tuple[str, TensorSpec]]]:
  """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
  shards: list[list] = [[]]
  size = 0
  for name, spec in specs:
    if shards[-1] and size + spec.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, spec))
    size += spec.nbytes
  return shards


def shard_name(i: int, n: int, prefix: str = "model") -> str:
  return f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(directory: str, specs: Sequence[tuple[str, TensorSpec | tuple]], produce: Producer,
                  max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None,
                  prefix: str = "model", progress: Callable[[str], None] | None = None) -> list[str]:
  """Writes `model.safetensors`, or shards `model-0000i-of-0000N.safetensors` plus
  `model.safetensors.index.json` when the tensors exceed `max_shard_size`. Returns file names."""
  specs = [(name, _as_spec(s)) for name, s in specs]
  shards = plan_shards(specs, parse_size(max_shard_size))
  if len(shards) == 1:
    if progress:
      progress(f"{prefix}.safetensors")
    write_file(os.path.join(directory, f"{prefix}.safetensors"), shards[0], produce, metadata)
    return [f"{prefix}.safetensors"]
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = shard_name(i, len(shards), prefix)
    if progress:
      progress(fname)
    write_file(os.path.join(directory, fname), shard, produce, metadata)
    weight_map.update({name: fname for name, _ in shard})
    names.append(fname)
  index = {"metadata": {"total_size": sum(s.nbytes for _, s in specs)},
           "weight_map": dict(sorted(weight_map.items()))}
  index_name = f"{prefix}.safetensors.index.json"
  with open(os.path.join(directory, index_name), "w") as fh:
    json.dump(index, fh, indent=2)
    fh.write("\n")
  return names + [index_name]


def iter_dir(directory: str) -> Iterable[tuple[str, np.ndarray]]:
  with CheckpointDir(directory) as ckpt:
    yield from ckpt
