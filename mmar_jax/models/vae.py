"""The LDM AutoencoderKL ("KL-16", MAR's image tokenizer) in Flax NNX.

Numerics follow the PyTorch original (method.md §7): GroupNorm(32, eps 1e-6) with fp32
statistics, SiLU, single-head spatial attention, downsampling by a (0,1,0,1) pad and a 3x3
stride-2 VALID conv, upsampling by nearest x2 and a 3x3 conv. Activations are NHWC (JAX's
native conv layout); images are [B, H, W, 3] in [-1, 1].

The attribute tree mirrors MAR's state-dict names (`encoder.down[i].block[j].norm1`, ...), so
`convert/mar_vae.py` maps names with a table of leaf names only: a conv's `weight` is `kernel`
([kh, kw, I, O] here, [O, I, kh, kw] in torch), a norm's `weight` is `scale`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from mmar_jax.dtypes import get_dtype
from mmar_jax.models.layers import ones, param, zeros

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's DiagonalGaussianDistribution clamp

CONV_AXES = ("conv_kh", "conv_kw", "conv_in", "conv_out")
_PRECISIONS = {None: None, "default": None, "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2  # per down level; the decoder has one more per up level (LDM)
  embed_dim: int = 16
  z_channels: int = 16
  in_channels: int = 3
  out_ch: int = 3
  # Down levels of the encoder with attention after each res block. None: the last level only,
  # which is where MAR's "attn_resolutions=(16,)" lands for its 256 training resolution; MAR
  # fixes it by level, not by the actual input size, and so do we.
  attn_levels: tuple[int, ...] | None = None
  dec_attn_levels: tuple[int, ...] = ()  # MAR's decoder has attention in `mid` only
  norm_groups: int = 32
  norm_eps: float = 1e-6
  # Execution switches (not part of the checkpoint's shapes).
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  precision: str | None = None  # None/default | high | highest: conv and attention matmuls

  SHAPE_KEYS = ("ch", "ch_mult", "num_res_blocks", "embed_dim", "z_channels", "in_channels",
                "out_ch", "attn_levels", "dec_attn_levels")

  def __post_init__(self):
    # JSON gives lists; the dataclass is hashable (it is static metadata of the module) only with tuples.
    for name in ("ch_mult", "attn_levels", "dec_attn_levels"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(int(v) for v in value))
    if self.precision not in _PRECISIONS:
      raise ValueError(f"unknown VAE precision {self.precision!r}; use one of {list(_PRECISIONS)}")

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  @property
  def enc_attn_levels(self) -> tuple[int, ...]:
    return (self.num_levels - 1,) if self.attn_levels is None else self.attn_levels

  @property
  def downsample_factor(self) -> int:
    return 2 ** (self.num_levels - 1)

  def replace(self, **kw) -> "VAEConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["attn_levels"] = list(self.enc_attn_levels)  # written explicitly: readers need no default
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  @classmethod
  def from_dict(cls, d) -> "VAEConfig":
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown VAEConfig keys: {unknown}")
    return cls(**d)


# -- building blocks --------------------------------------------------------------------------------


def _conv_init(key, shape, dtype):
  # torch's Conv2d default (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)). Only matters for
  # training from scratch; real weights come from MAR's checkpoint.
  bound = 1.0 / math.sqrt(np.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv(nnx.Module):
  """2-D convolution, NHWC activations, kernel [kh, kw, I, O]."""

  def __init__(self, c_in: int, c_out: int, kernel: int, *, rngs: nnx.Rngs, cfg: VAEConfig):
    pd = get_dtype(cfg.param_dtype)
    self.kernel = param(rngs, _conv_init, (kernel, kernel, c_in, c_out), CONV_AXES, pd)
    self.bias = param(rngs, zeros, (c_out,), ("conv_out",), pd)
    self.dtype = get_dtype(cfg.compute_dtype)
    self.precision = _PRECISIONS[cfg.precision]

  def __call__(self, x: jax.Array, stride: int = 1, padding=None) -> jax.Array:
    k = self.kernel.shape[0]
    if padding is None:  # 'same' for odd kernels, as torch's padding=k//2
      padding = ((k // 2, k // 2), (k // 2, k // 2))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (stride, stride), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    return y + self.bias[...].astype(self.dtype)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
  """torch.nn.GroupNorm on NHWC: biased variance over (H, W, C/groups), in fp32."""
  b, h, w, c = x.shape
  dtype = x.dtype
  xf = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
  mean = xf.mean((1, 2, 4), keepdims=True)
  var = jnp.square(xf - mean).mean((1, 2, 4), keepdims=True)
  y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class GroupNorm(nnx.Module):

  def __init__(self, c: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    if c % cfg.norm_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {cfg.norm_groups} groups")
    pd = get_dtype(cfg.param_dtype)
    self.scale = param(rngs, ones, (c,), ("channels",), pd)
    self.bias = param(rngs, zeros, (c,), ("channels",), pd)
    self.groups, self.eps = cfg.norm_groups, cfg.norm_eps

  def __call__(self, x):
    return group_norm(x, self.scale[...], self.bias[...], self.groups, self.eps)


class ResnetBlock(nnx.Module):
  """norm-SiLU-conv twice plus a shortcut (a 1x1 `nin_shortcut` when the width changes)."""

  def __init__(self, c_in: int, c_out: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(c_in, cfg=cfg, rngs=rngs)
    self.conv1 = Conv(c_in, c_out, 3, cfg=cfg, rngs=rngs)
    self.norm2 = GroupNorm(c_out, cfg=cfg, rngs=rngs)
    self.conv2 = Conv(c_out, c_out, 3, cfg=cfg, rngs=rngs)
    self.nin_shortcut = Conv(c_in, c_out, 1, cfg=cfg, rngs=rngs) if c_in != c_out else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))  # LDM's dropout is 0 for KL-16
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):
  """LDM's single-head attention over all h*w positions; q, k, v, proj_out are 1x1 convs."""

  def __init__(self, c: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.norm = GroupNorm(c, cfg=cfg, rngs=rngs)
    self.q = Conv(c, c, 1, cfg=cfg, rngs=rngs)
    self.k = Conv(c, c, 1, cfg=cfg, rngs=rngs)
    self.v = Conv(c, c, 1, cfg=cfg, rngs=rngs)
    self.proj_out = Conv(c, c, 1, cfg=cfg, rngs=rngs)
    self.precision = _PRECISIONS[cfg.precision]

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
    logits = jnp.einsum("bic,bjc->bij", q, k, precision=self.precision,
                        preferred_element_type=jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # softmax over the keys, in fp32
    o = jnp.einsum("bij,bjc->bic", weights, v, precision=self.precision)
    return x + self.proj_out(o.reshape(b, h, w, c))


class Downsample(nnx.Module):

  def __init__(self, c: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.conv = Conv(c, c, 3, cfg=cfg, rngs=rngs)

  def __call__(self, x):
    # LDM pads right/bottom only, then a VALID stride-2 conv: the asymmetric padding matters for
    # parity (a symmetric 'SAME' pad shifts the sampling grid by one pixel).
    return self.conv(x, stride=2, padding=((0, 1), (0, 1)))


class Upsample(nnx.Module):

  def __init__(self, c: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.conv = Conv(c, c, 3, cfg=cfg, rngs=rngs)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # torch's nearest, scale 2
    return self.conv(x)


class Level(nnx.Module):
  """One resolution: res blocks, optional attention after each, optional resampling."""

  def __init__(self, c_in: int, c_out: int, n_blocks: int, attn: bool, *, cfg, rngs):
    blocks = []
    for j in range(n_blocks):
      blocks.append(ResnetBlock(c_in if j == 0 else c_out, c_out, cfg=cfg, rngs=rngs))
    self.block = nnx.List(blocks)
    self.attn = nnx.List([AttnBlock(c_out, cfg=cfg, rngs=rngs) for _ in range(n_blocks)] if attn else [])

  def blocks(self, x):
    for j, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[j](x)
    return x


class DownLevel(Level):

  def __init__(self, c_in, c_out, n_blocks, attn, downsample: bool, *, cfg, rngs):
    super().__init__(c_in, c_out, n_blocks, attn, cfg=cfg, rngs=rngs)
    self.downsample = Downsample(c_out, cfg=cfg, rngs=rngs) if downsample else None


class UpLevel(Level):

  def __init__(self, c_in, c_out, n_blocks, attn, upsample: bool, *, cfg, rngs):
    super().__init__(c_in, c_out, n_blocks, attn, cfg=cfg, rngs=rngs)
    self.upsample = Upsample(c_out, cfg=cfg, rngs=rngs) if upsample else None


class Mid(nnx.Module):

  def __init__(self, c: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(c, c, cfg=cfg, rngs=rngs)
    self.attn_1 = AttnBlock(c, cfg=cfg, rngs=rngs)
    self.block_2 = ResnetBlock(c, c, cfg=cfg, rngs=rngs)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    widths = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = Conv(cfg.in_channels, cfg.ch, 3, cfg=cfg, rngs=rngs)
    levels, c_in = [], cfg.ch
    for i, c_out in enumerate(widths):
      levels.append(DownLevel(c_in, c_out, cfg.num_res_blocks, i in cfg.enc_attn_levels,
                              i != cfg.num_levels - 1, cfg=cfg, rngs=rngs))
      c_in = c_out
    self.down = nnx.List(levels)
    self.mid = Mid(c_in, cfg=cfg, rngs=rngs)
    self.norm_out = GroupNorm(c_in, cfg=cfg, rngs=rngs)
    self.conv_out = Conv(c_in, 2 * cfg.z_channels, 3, cfg=cfg, rngs=rngs)  # double_z

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level.blocks(h)
      if level.downsample is not None:
        h = level.downsample(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    widths = [cfg.ch * m for m in cfg.ch_mult]
    c = widths[-1]
    self.conv_in = Conv(cfg.z_channels, c, 3, cfg=cfg, rngs=rngs)
    self.mid = Mid(c, cfg=cfg, rngs=rngs)
    # Built from the coarsest level down, stored fine-to-coarse (`up[0]` is full resolution), as
    # LDM's `self.up.insert(0, up)` does: the state-dict indices follow that order.
    levels = [None] * cfg.num_levels
    for i in reversed(range(cfg.num_levels)):
      levels[i] = UpLevel(c, widths[i], cfg.num_res_blocks + 1, i in cfg.dec_attn_levels, i != 0,
                          cfg=cfg, rngs=rngs)
      c = widths[i]
    self.up = nnx.List(levels)
    self.norm_out = GroupNorm(c, cfg=cfg, rngs=rngs)
    self.conv_out = Conv(c, cfg.out_ch, 3, cfg=cfg, rngs=rngs)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for i in reversed(range(len(self.up))):
      level = self.up[i]
      h = level.blocks(h)
      if level.upsample is not None:
        h = level.upsample(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class VAE(nnx.Module):
  """AutoencoderKL: `encode(images) -> (mean, logvar)` [B, h, w, embed_dim], `decode(z)`."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    for i in tuple(cfg.enc_attn_levels) + tuple(cfg.dec_attn_levels):
      if not 0 <= i < cfg.num_levels:
        raise ValueError(f"attention level {i} outside 0..{cfg.num_levels - 1}")
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = Conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, cfg=cfg, rngs=rngs)
    self.post_quant_conv = Conv(cfg.embed_dim, cfg.z_channels, 1, cfg=cfg, rngs=rngs)

  def _check_size(self, h: int, w: int, what: str):
    f = self.cfg.downsample_factor
    if h % f or w % f:
      raise ValueError(f"VAE {what}: image size {h}x{w} is not a multiple of {f}")

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, logvar), each [B, H/f, W/f, embed_dim] in fp32; logvar clamped."""
    self._check_size(images.shape[1], images.shape[2], "encode")
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)  # torch's chunk(2, dim=1): mean first
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents [B, h, w, embed_dim] -> images [B, h*f, w*f, out_ch] (fp32, not clipped)."""
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _abstract(cfg: VAEConfig):
  """(graphdef, abstract param state) of a VAE; tracing the initialisers costs about a second, and
  converters and loaders ask for the same config repeatedly."""
  return nnx.split(nnx.eval_shape(lambda: VAE(cfg, rngs=nnx.Rngs(0))))


def param_paths(cfg: VAEConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """{path (string parts): ShapeDtypeStruct} of every parameter, without allocating any."""
  _, state = _abstract(cfg)
  out = {}
  for path, var in nnx.to_flat_state(state):
    out[tuple(str(p) for p in path)] = var.get_value()
  return out


def vae_from_params(cfg: VAEConfig, params: dict) -> VAE:
  """A VAE holding `params` (a nested dict as `nnx.State.to_pure_dict()` or the converter gives,
  list indices as int or str), without a random initialisation first. Every parameter must be
  present with its exact shape; the error names the first that is not."""
  expected = param_paths(cfg)
  given = {tuple(str(p) for p in k): v for k, v in traversals.flatten_mapping(params).items()}
  for path in expected:
    if path not in given:
      raise ValueError(f"VAE params: missing {'.'.join(path)}")
    if tuple(given[path].shape) != tuple(expected[path].shape):
      raise ValueError(f"VAE params: {'.'.join(path)} has shape {tuple(given[path].shape)}, "
                       f"expected {tuple(expected[path].shape)}")
  extra = sorted(".".join(p) for p in set(given) - set(expected))
  if extra:
    raise ValueError(f"VAE params: unexpected {extra[:5]}")
  graphdef, abstract = _abstract(cfg)
  state = jax.tree.map(lambda x: x, abstract)  # a fresh container: the cached one stays abstract
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
