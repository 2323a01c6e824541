"""Dtype names as configs spell them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NAMES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32,
          "fp32": jnp.float32, "float16": jnp.float16, "fp16": jnp.float16}


def get_dtype(name) -> jnp.dtype:
  """'bfloat16' / 'bf16' / 'float32' / 'fp32' -> dtype, with a clear error."""
  if not isinstance(name, str):
    return jnp.dtype(name)
  if name not in _NAMES:
    raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_NAMES)}")
  return jnp.dtype(_NAMES[name])


def resolve_dtype(name: str) -> str:
  """'auto': fp32 on CPU (XLA:CPU is no faster in bf16), bf16 on accelerators."""
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name
