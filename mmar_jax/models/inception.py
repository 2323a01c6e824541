"""The FID Inception-v3 (pytorch-fid's `fid_inception_v3`, the 2015-12-05 TensorFlow graph) in Flax NNX.

FID is only comparable across papers when it is computed with this one network, so the numerics
follow pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True)` step by step:
  input     images in [0, 1], bilinearly resized to 299 x 299 as torch's
            `F.interpolate(mode="bilinear", align_corners=False)` does it (no antialiasing, unlike
            `jax.image.resize`), then scaled to [-1, 1];
  blocks    torchvision's Inception3 stem and Mixed_5b..7c, every conv a BasicConv2d (no bias,
            BatchNorm with eps 1e-3 in inference form, ReLU), with the FID graph's differences:
            the 3x3 average pools in the A, C and E_1 blocks leave the zero padding out of the
            count (TensorFlow's pooling), and the pool branch of the last E block is a max pool;
  output    the final average pool: pool3 features [B, 2048].
Activations are NHWC. The attribute tree mirrors the torch state dict (`Mixed_5b.branch1x1.conv`,
`.bn`), so convert/inception.py maps names by their leaf only: a conv's `weight` [O, I, kh, kw] is
`kernel` [kh, kw, I, O], a BatchNorm's `weight` is `scale`, `running_mean` / `running_var` are the
`mean` / `var` batch statistics. The weights only ever come from pytorch-fid's file; the
initialisers here exist for the shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax import trees
from mmar_jax.models.layers import ones, param, zeros

INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
CONV_AXES = ("conv_kh", "conv_kw", "conv_in", "conv_out")
# FID numbers must not depend on the accelerator's default matmul precision (TF32 on GPUs).
PRECISION = jax.lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


# -- input: torch's bilinear resize ---------------------------------------------------------------


def _linear_taps(in_size: int, out_size: int):
  """(index0, index1, lambda0, lambda1) per output pixel, as torch's CPU upsample kernel computes
  them for align_corners=False: a float32 scale in / out, the source coordinate
  scale * (i + 0.5) - 0.5 rounded once to float32 (torch's build contracts it into an FMA; the
  float64 product here is exact), clamped at 0, the right tap clamped to the last pixel; equal
  sizes are a copy."""
  dst = np.arange(out_size)
  if in_size == out_size:
    return dst, dst, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
  i1 = i0 + (i0 < in_size - 1)
  return i0, i1, (np.float32(1) - lam1).astype(np.float32), lam1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, h, w, C], torch's `F.interpolate(..., mode="bilinear",
  align_corners=False)` (along W first, then H: the order of torch's arithmetic)."""
  (h, w), (in_h, in_w) = size, x.shape[1:3]
  i0, i1, l0, l1 = _linear_taps(in_w, w)
  x = x[:, :, i0] * l0[:, None] + x[:, :, i1] * l1[:, None]
  i0, i1, l0, l1 = _linear_taps(in_h, h)
  return x[:, i0] * l0[:, None, None] + x[:, i1] * l1[:, None, None]


# -- pooling ----------------------------------------------------------------------------------------


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool; torch pads with -inf, and so does the reduction's init value here."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool over the pixels inside the image (count_include_pad=False): at
  the border TensorFlow divides by the number of real pixels, not by 9."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window = dict(window_dimensions=(1, 3, 3, 1), window_strides=(1, 1, 1, 1), padding=pad)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, **window)
  count = jax.lax.reduce_window(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), 0.0, jax.lax.add,
                                **window)
  return total / count


# -- layers -----------------------------------------------------------------------------------------


class Conv(nnx.Module):
  """Bias-free 2-D convolution, NHWC, kernel [kh, kw, I, O]."""

  def __init__(self, c_in: int, c_out: int, kernel, *, stride=1, padding=0):
    kh, kw = _pair(kernel)
    self.kernel = param(None, zeros, (kh, kw, c_in, c_out), CONV_AXES)
    self.stride = _pair(stride)
    self.padding = tuple((p, p) for p in _pair(padding))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, self.kernel[...], self.stride, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISION)


class BatchNorm(nnx.Module):
  """Inference-form BatchNorm: x * scale / sqrt(var + eps) + (bias - mean * that factor), the
  fused form torch's CPU kernel evaluates."""

  def __init__(self, c: int):
    self.scale = param(None, ones, (c,), ("conv_out",))
    self.bias = param(None, zeros, (c,), ("conv_out",))
    self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32), out_sharding=("conv_out",),
                              eager_sharding=False)
    self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32), out_sharding=("conv_out",),
                             eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.scale[...] / jnp.sqrt(self.var[...] + BN_EPS)
    return x * alpha + (self.bias[...] - self.mean[...] * alpha)


class BasicConv2d(nnx.Module):
  """conv -> BatchNorm -> ReLU (torchvision's BasicConv2d)."""

  def __init__(self, c_in: int, c_out: int, kernel, *, stride=1, padding=0):
    self.conv = Conv(c_in, c_out, kernel, stride=stride, padding=padding)
    self.bn = BatchNorm(c_out)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


# -- the mixed blocks (torchvision's names; the FID variants' pooling) --------------------------------


class InceptionA(nnx.Module):
  """Mixed_5b..5d (FIDInceptionA)."""

  def __init__(self, c_in: int, pool_features: int):
    self.branch1x1 = BasicConv2d(c_in, 64, 1)
    self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(c_in, pool_features, 1)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_exclude_pad(x))],
                           axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: the 35 -> 17 reduction (torchvision's, unchanged in the FID graph)."""

  def __init__(self, c_in: int):
    self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convolutions."""

  def __init__(self, c_in: int, channels_7x7: int):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(c_in, 192, 1)
    self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(c_in, 192, 1)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = layer(d)
    return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_exclude_pad(x))],
                           axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: the 17 -> 8 reduction (torchvision's, unchanged in the FID graph)."""

  def __init__(self, c_in: int):
    self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def __call__(self, x):
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x, stride=2)],
                           axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (FIDInceptionE_1: average pool without the padding) and Mixed_7c (FIDInceptionE_2:
  a max pool, the TF graph's quirk that every FID number since carries)."""

  def __init__(self, c_in: int, pool: str):
    assert pool in ("avg", "max"), pool
    self.pool = pool
    self.branch1x1 = BasicConv2d(c_in, 320, 1)
    self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(c_in, 192, 1)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
    pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, stride=1, padding=1)
    return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """images [B, H, W, 3] in [0, 1] (any H, W) -> pool3 features [B, 2048], float32."""

  def __init__(self):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b = InceptionA(192, pool_features=32)
    self.Mixed_5c = InceptionA(256, pool_features=64)
    self.Mixed_5d = InceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, channels_7x7=128)
    self.Mixed_6c = InceptionC(768, channels_7x7=160)
    self.Mixed_6d = InceptionC(768, channels_7x7=160)
    self.Mixed_6e = InceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, pool="avg")
    self.Mixed_7c = InceptionE(2048, pool="max")

  def __call__(self, images: jax.Array) -> jax.Array:
    x = resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, stride=2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


@functools.lru_cache(maxsize=1)
def abstract():
  """(graphdef, abstract state) of the network, without allocating its 22M weights."""
  return nnx.split(nnx.eval_shape(FIDInceptionV3))


def variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path (string parts): shape} of every parameter and batch statistic."""
  return {tuple(str(p) for p in path): tuple(var.get_value().shape)
          for path, var in nnx.to_flat_state(abstract()[1])}


def state_from_arrays(arrays: dict) -> nnx.State:
  """The network's state from {path: array} holding every variable with its exact shape (the
  converter checks; this only places the arrays)."""
  state = jax.tree.map(lambda x: x, abstract()[1])  # a fresh container: the cached one stays abstract
  nnx.replace_by_pure_dict(state, trees.unflatten({p: jnp.asarray(v, jnp.float32)
                                                   for p, v in arrays.items()}))
  return state


@functools.partial(jax.jit, static_argnums=0)
def pool3_features(graphdef, state, images: jax.Array) -> jax.Array:
  """Jitted forward: one compile per (batch, H, W) shape."""
  return nnx.merge(graphdef, state)(images)
