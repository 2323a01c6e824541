"""Tiny real HuggingFace Qwen2 checkpoints for tests, built offline and cached for the session.

One family of shapes (hidden 64, 2 layers, vocab 256, intermediate 128) keeps the number of
distinct jit compiles small; the named variants differ in what a converter can get wrong.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

import numpy as np

from mmar_jax.convert.hf import make_tiny_hf_checkpoint

CONFIGS = {
    # untied, GQA (2 query heads per kv head), rope_theta 1e4
    "base": dict(num_heads=4, num_kv_heads=2, rope_theta=1e4, tie_word_embeddings=False),
    # tied embeddings, one kv head (MQA), rope_theta 1e6
    "tied_mqa": dict(num_heads=4, num_kv_heads=1, rope_theta=1e6, tie_word_embeddings=True),
    # an odd head count with kv heads == heads and head_dim != hidden / heads (3 x 32 = 96 != 64)
    "odd_heads": dict(num_heads=3, num_kv_heads=3, head_dim=32, rope_theta=1e6, tie_word_embeddings=False),
    # larger weights: clear top-1 margins, so greedy decoding is not decided by rounding
    "peaked": dict(num_heads=4, num_kv_heads=2, rope_theta=1e4, tie_word_embeddings=False, init_std=0.1),
}

# Stand-ins for a tokenizer's files: the converters copy them byte for byte.
TOKENIZER_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer"}),
    "vocab.json": json.dumps({"a": 0, "b": 1}),
    "merges.txt": "#version: 0.2\na b\n",
}

# Small enough that every tiny checkpoint (bf16 included) is split into several shards.
SHARD_SIZE = "100KB"

_ROOT: list[str] = []


def scratch_root() -> str:
  if not _ROOT:
    _ROOT.append(tempfile.mkdtemp(prefix="mmar_test_hf_"))
    atexit.register(shutil.rmtree, _ROOT[0], True)
  return _ROOT[0]


@functools.lru_cache(maxsize=None)
def tiny_hf(name: str = "base", dtype: str = "float32", sharded: bool = False) -> str:
  """Path of a tiny `save_pretrained` checkpoint (treat it as read-only: it is shared)."""
  out = os.path.join(scratch_root(), f"{name}-{dtype}-{'sharded' if sharded else 'single'}")
  make_tiny_hf_checkpoint(out, dtype=dtype, max_shard_size=SHARD_SIZE if sharded else None, **CONFIGS[name])
  for fname, text in TOKENIZER_FILES.items():
    with open(os.path.join(out, fname), "w") as fh:
      fh.write(text)
  return out


def copy_hf(name: str = "base", dtype: str = "float32", sharded: bool = False, dst: str | None = None) -> str:
  """A private, editable copy of a tiny checkpoint."""
  dst = dst or tempfile.mkdtemp(prefix=f"{name}-", dir=scratch_root())
  shutil.copytree(tiny_hf(name, dtype, sharded), dst, dirs_exist_ok=True)
  return dst


def hf_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  from mmar_jax.convert import safetensors_io
  return dict(safetensors_io.iter_dir(hf_dir))


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  """Same names, dtypes, shapes and bits."""
  assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
  for name in a:
    assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
    assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
    assert np.array_equal(a[name].reshape(-1).view(np.uint8), b[name].reshape(-1).view(np.uint8)), name


def jax_model(hf_dir: str, compute_dtype: str = "float32"):
  """The JAX Qwen2 of a HF directory, fp32 params (converted in memory)."""
  from mmar_jax.convert import hf
  cfg, params = hf.params_from_hf_dir(hf_dir)
  cfg = cfg.replace(param_dtype="float32", compute_dtype=compute_dtype)
  return hf.qwen2_from_params(cfg, params)


@functools.lru_cache(maxsize=None)
def torch_model(hf_dir: str):
  from mmar_jax.repro.hf_parity import load_torch_model
  return load_torch_model(hf_dir)


def edit_config(hf_dir: str, **changes):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as fh:
    cfg = json.load(fh)
  for k, v in changes.items():
    if v is None:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  with open(path, "w") as fh:
    json.dump(cfg, fh)


def left_padded_batch(vocab: int, length: int, pad: int, seed: int = 0):
  """ids [2, length] and mask: row 0 full, row 1 left-padded by `pad` tokens."""
  ids = np.random.RandomState(seed).randint(0, vocab, size=(2, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :pad] = 0
  ids[1, :pad] = 0
  return ids, mask
