"""Image <-> continuous tokens, behind one interface (method.md §1 steps 2 and 10).

* `VAETokenizer`: MAR's KL-16 VAE. The latent grid [B, h, w, 16] is grouped into p x p patches
  (p = `patch_size`, default 1: one latent pixel per token) and multiplied by `scale` (0.2325
  for MAR's KL-16, 1/std of its ImageNet latents).
* `PatchifyTokenizer`: pixels as tokens (p x p x 3 per token), no weights: the small demo.

Tokens are always in the scaled space: `encode` returns the posterior OF THE TOKENS (mean * scale,
logvar + 2 log scale), so `sample` needs no scale and a mean used at inference is already a token.
Channel order inside a token is MAR's patchify order (channel, row, column) so a MAR diffusion
head with patch_size > 1 reads the same layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax.files import load_params, read_json
from mmar_jax.models.vae import VAE, VAEConfig, vae_from_params

MAR_KL16_SCALE = 0.2325


def _pair(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), C*p*p], tokens row-major, channels (c, i, j) as MAR's."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"patchify: grid {h}x{w} is not a multiple of patch size {p}")
  x = x.reshape(b, h // p, p, w // p, p, c)
  x = jnp.einsum("bhiwjc->bhwcij", x)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: jax.Array, p: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of `patchify`: [B, gh*gw, C*p*p] -> [B, gh*p, gw*p, C]."""
  b, n, d = tokens.shape
  gh, gw = grid
  if n != gh * gw or d % (p * p):
    raise ValueError(f"unpatchify: {n} tokens of {d} channels do not fit a {gh}x{gw} grid "
                     f"of {p}x{p} patches")
  c = d // (p * p)
  x = tokens.reshape(b, gh, gw, c, p, p)
  x = jnp.einsum("bhwcij->bhiwjc", x)
  return x.reshape(b, gh * p, gw * p, c)


def square_grid(n: int) -> tuple[int, int]:
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"{n} tokens are not a square grid; pass grid=(rows, cols)")
  return side, side


def sample_posterior(mean: jax.Array, logvar: jax.Array | None, rng: jax.Array) -> jax.Array:
  """mean + exp(logvar / 2) * N(0, 1); a deterministic tokenizer (logvar None) returns mean."""
  if logvar is None:
    return mean
  noise = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


class ImageTokenizer(nnx.Module):
  """The interface. Images are [B, H, W, 3] in [-1, 1]; tokens are [B, n, token_channels]."""

  patch_size: int
  scale: float

  @property
  def stride(self) -> int:
    """Pixels per token side."""
    raise NotImplementedError

  @property
  def token_channels(self) -> int:
    raise NotImplementedError

  def grid(self, image_size) -> tuple[int, int]:
    """(rows, cols) of the token grid for an image of `image_size` (int or (H, W))."""
    h, w = _pair(image_size)
    if h % self.stride or w % self.stride:
      raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer stride {self.stride}")
    return h // self.stride, w // self.stride

  def num_tokens(self, image_size) -> int:
    gh, gw = self.grid(image_size)
    return gh * gw

  def encode(self, images: jax.Array, rng: jax.Array | None = None):
    """-> (mean_tokens, logvar_tokens or None), the posterior of the scaled tokens. `rng` is
    reserved for tokenizers whose encoder itself is stochastic (none here)."""
    raise NotImplementedError

  def sample(self, mean: jax.Array, logvar: jax.Array | None, rng: jax.Array) -> jax.Array:
    """A posterior sample of the tokens (already scaled: see the module docstring)."""
    return sample_posterior(mean, logvar, rng)

  def tokens_to_images(self, tokens: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
    """Tokens [B, n, C] -> images [B, H, W, 3] (not clipped); `grid` defaults to square."""
    raise NotImplementedError


class PatchifyTokenizer(ImageTokenizer):
  """Pixels as tokens: [B, H, W, C] -> [B, (H/p)(W/p), C*p*p] * scale. No parameters."""

  def __init__(self, patch_size: int = 4, scale: float = 1.0, channels: int = 3):
    self.patch_size, self.scale, self.channels = int(patch_size), float(scale), int(channels)

  @property
  def stride(self) -> int:
    return self.patch_size

  @property
  def token_channels(self) -> int:
    return self.channels * self.patch_size ** 2

  def encode(self, images, rng=None):
    return patchify(images.astype(jnp.float32), self.patch_size) * self.scale, None

  def tokens_to_images(self, tokens, grid=None):
    grid = grid or square_grid(tokens.shape[1])
    return unpatchify(tokens.astype(jnp.float32) / self.scale, self.patch_size, grid)


class VAETokenizer(ImageTokenizer):
  """KL-16 latents as tokens; the VAE's parameters are part of this module's state."""

  def __init__(self, vae_cfg: VAEConfig, patch_size: int = 1, scale: float = MAR_KL16_SCALE, *,
               rngs: nnx.Rngs | None = None, vae: VAE | None = None):
    self.patch_size, self.scale = int(patch_size), float(scale)
    self.vae = vae if vae is not None else VAE(vae_cfg, rngs=rngs)

  @property
  def stride(self) -> int:
    return self.vae.cfg.downsample_factor * self.patch_size

  @property
  def token_channels(self) -> int:
    return self.vae.cfg.embed_dim * self.patch_size ** 2

  def encode(self, images, rng=None):
    mean, logvar = self.vae.encode(images)
    p = self.patch_size
    # Scaling z by s scales its std by s: the variance gains s^2, the log-variance 2 log s.
    return patchify(mean, p) * self.scale, patchify(logvar, p) + 2.0 * math.log(self.scale)

  def tokens_to_images(self, tokens, grid=None):
    grid = grid or square_grid(tokens.shape[1])
    z = unpatchify(tokens.astype(jnp.float32) / self.scale, self.patch_size, grid)
    return self.vae.decode(z)


# -- normalisation ----------------------------------------------------------------------------------


NORMS = ("data", "fixed")


def token_norm(image) -> tuple[np.ndarray, np.ndarray] | None:
  """(shift [C], scale [C]) of the image group's per-channel token normalisation, or None.

  The diffusion schedule assumes tokens of about unit variance, and the ViT's input layer a centred
  input. 'data': tokens become (token - shift) * scale with the mean and 1/std of each channel,
  estimated from the training data when a run starts (data/token_stats.py) and stored in the run
  config (`token_shift`, `token_scale`). 'fixed': only the tokenizer's own scalar `scale` (MAR's
  0.2325 for KL-16, the 1/std of its ImageNet latents: the same idea fixed for one VAE and one data
  set); nothing more here."""
  norm = _get(image, "norm", "fixed")
  if norm not in NORMS:
    raise ValueError(f"unknown model.image.norm {norm!r}; use data or fixed")
  if norm == "fixed":
    return None
  shift, scale = _get(image, "token_shift", ()), _get(image, "token_scale", ())
  if not len(scale) or len(shift) != len(scale):
    raise ValueError("model.image.norm=data needs model.image.token_shift and token_scale (one "
                     f"value per token channel; got {len(shift)} and {len(scale)}): a new training "
                     "run estimates them from its data source")
  return np.asarray(shift, np.float32), np.asarray(scale, np.float32)


def normalize(tokens: jax.Array, norm) -> jax.Array:
  """Tokenizer space -> model space (what the ViT reads and the head draws)."""
  if norm is None:
    return tokens
  return (tokens - norm[0]) * norm[1]


def denormalize(tokens: jax.Array, norm) -> jax.Array:
  """Model space -> tokenizer space (what the tokenizer decodes)."""
  if norm is None:
    return tokens
  return tokens / norm[1] + norm[0]


# -- factory ----------------------------------------------------------------------------------------


def _get(cfg, key: str, default=None):
  """Reads dicts and ConfigDicts alike; a None value means the default."""
  if cfg is None:
    return default
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def _as_dict(sub) -> dict:
  if sub is None:
    return {}
  return dict(sub.to_dict() if hasattr(sub, "to_dict") else sub)


def make_image_tokenizer(cfg, *, rngs: nnx.Rngs | None = None) -> ImageTokenizer:
  """From a dict-like config: `kind` ('vae' | 'patchify'), `patch_size`, `scale`, `vae` (the
  VAEConfig fields) and, for 'vae', an optional `path`: a `convert mar-vae` output directory whose
  config and weights are loaded (its shapes must agree with any `vae` keys given)."""
  kind = _get(cfg, "kind", "vae")
  if kind == "patchify":
    return PatchifyTokenizer(_get(cfg, "patch_size", 4), _get(cfg, "scale", 1.0),
                             _get(cfg, "channels", 3))
  if kind != "vae":
    raise ValueError(f"unknown image tokenizer kind {kind!r}; use 'vae' or 'patchify'")
  patch_size, scale = _get(cfg, "patch_size", 1), _get(cfg, "scale", MAR_KL16_SCALE)
  vae_fields = _as_dict(_get(cfg, "vae"))
  path = _get(cfg, "path")
  if path:
    return load_vae_tokenizer(path, patch_size, scale, overrides=vae_fields)
  return VAETokenizer(VAEConfig.from_dict(vae_fields), patch_size, scale, rngs=rngs)


def token_spec(cfg) -> tuple[int, int]:
  """(stride in pixels per token side, token_channels) of what `make_image_tokenizer(cfg)` builds,
  without building it (a KL-16's random initialisation costs seconds; this reads the config)."""
  kind = _get(cfg, "kind", "vae")
  if kind == "patchify":
    p = int(_get(cfg, "patch_size", 4))
    return p, int(_get(cfg, "channels", 3)) * p * p
  if kind != "vae":
    raise ValueError(f"unknown image tokenizer kind {kind!r}; use 'vae' or 'patchify'")
  p = int(_get(cfg, "patch_size", 1))
  fields = _as_dict(_get(cfg, "vae"))
  if _get(cfg, "path"):
    fields = dict(read_json(_get(cfg, "path"), "vae_config.json"), **fields)
  vae_cfg = VAEConfig.from_dict(fields)
  return vae_cfg.downsample_factor * p, vae_cfg.embed_dim * p * p


def load_vae_tokenizer(directory: str, patch_size: int = 1, scale: float = MAR_KL16_SCALE,
                       overrides: dict | None = None) -> VAETokenizer:
  """A VAETokenizer with the weights of a `convert mar-vae` output (`params/`, `vae_config.json`).
  `overrides` may change execution switches (dtype, precision); shape keys must match the file."""
  stored = read_json(directory, "vae_config.json")
  overrides = dict(overrides or {})
  stored_cfg = VAEConfig.from_dict(stored)
  cfg = stored_cfg.replace(**overrides)
  given, have = cfg.to_dict(), stored_cfg.to_dict()  # to_dict resolves attn_levels=None
  differ = [k for k in VAEConfig.SHAPE_KEYS if k in overrides and given[k] != have[k]]
  if differ:
    raise ValueError(f"VAE config keys {differ} differ from {directory}/vae_config.json")
  vae = vae_from_params(cfg, load_params(directory))
  return VAETokenizer(cfg, patch_size, scale, vae=vae)
