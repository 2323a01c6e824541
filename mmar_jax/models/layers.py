"""Parameter-holding building blocks shared by every model.

Every parameter carries logical axis names (`out_sharding` metadata) that
`mmar_jax.parallel.sharding` maps to mesh axes through the config's rules table. Parameters are
created with `eager_sharding=False`: placement is decided once, by `jax.jit(out_shardings=...)`,
so modules can be built anywhere (converters, tests, abstract evaluation) without a mesh.

`stack=L` gives a parameter a leading `layers` axis: the weights of L identical layers live in one
array that `lax.scan` (or an unrolled loop) walks, so checkpoints are the same under either.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

normal_002 = jax.nn.initializers.normal(0.02)
xavier = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32, stack: int | None = None) -> nnx.Param:
  """A parameter with logical axis names; `stack` prepends a `layers` axis of that size."""
  shape, axes = tuple(shape), tuple(axes)
  assert len(shape) == len(axes), (shape, axes)
  if stack is not None:
    key = rngs.params() if rngs is not None else jax.random.key(0)
    # Each layer draws from its own key so stacked init equals L separate inits in distribution
    # (and fan-in/fan-out ignore the layers axis).
    value = jax.vmap(lambda k: init(k, shape, dtype))(jax.random.split(key, stack))
    shape, axes = (stack,) + shape, ("layers",) + axes
  else:
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = init(key, shape, dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel + bias with kernel [in, out] (torch stores [out, in]: converters transpose)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
               use_bias: bool = True, kernel_init: Initializer = xavier, bias_init: Initializer = zeros,
               stack: int | None = None, param_dtype=jnp.float32):
    self.kernel = param(rngs, kernel_init, (d_in, d_out), axes, param_dtype, stack)
    self.bias = param(rngs, bias_init, (d_out,), axes[1:], param_dtype, stack) if use_bias else None

  def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
    dtype = dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm computed in fp32; `affine=False` has no parameters (MAR's final layer)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True, axis_name: str = "embed",
               stack: int | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype, stack) if affine else None
    self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype, stack) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, None if self.scale is None else self.scale[...],
                      None if self.bias is None else self.bias[...], self.eps)


def layer_norm(x, scale, bias, eps):
  dtype = x.dtype
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype)


def rms_norm(x, scale, eps):
  """Qwen2's RMSNorm: normalise in fp32, cast back, then multiply by the weight (HF order)."""
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + eps)
  return scale.astype(dtype) * y.astype(dtype)


def scan_or_unroll(body, carry, xs, scan: bool):
  """Walks stacked layer weights `xs` (leading `layers` axis): `lax.scan` when `scan` (one compiled
  body, flat compile time at depth), else an unrolled Python loop (faster on CPU, and what
  cost_analysis counts in full). `body(carry, x) -> (carry, y)`; returns (carry, stacked ys or
  None when every y is None)."""
  if scan:
    return jax.lax.scan(body, carry, xs)
  n = jax.tree.leaves(xs)[0].shape[0]
  ys = []
  for i in range(n):
    carry, y = body(carry, jax.tree.map(lambda a, i=i: a[i], xs))
    ys.append(y)
  if ys[0] is None:
    return carry, None
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
