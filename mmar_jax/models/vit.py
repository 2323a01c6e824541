"""EmbeddingViT and VisProjector (method.md §1.4-1.5).

EmbeddingViT: h = where(masked, mask_token, Linear(C -> W)(x)) + pos_embed, then pre-LN ViT blocks
(bidirectional over the image's tokens) and a final LayerNorm. The position embedding is added
AFTER the mask token is substituted: otherwise every masked position has the same input, every
condition z_i coincides, and the head cannot draw anything spatial (the LLM gives the whole image
block one position).
VisProjector: Linear(W -> d_LLM), SiLU, Linear(d_LLM -> d_LLM).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mmar_jax.models import attention as attn
from mmar_jax.models.layers import (Linear, layer_norm, normal_002, ones, param, scan_or_unroll,
                                    xavier, zeros)
from mmar_jax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  token_channels: int = 16
  num_tokens: int = 256
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  eps: float = 1e-6
  scan_layers: bool = True
  # How the learned position embedding starts. 'sincos': a 2D sine-cosine grid (as MAE), so every
  # position is distinct at full scale from step 0; 'normal': N(0, 0.02) (MAR), which leaves the
  # masked positions nearly identical until the embedding has grown.
  pos_init: str = "normal"
  # What a token attends to inside the ViT. 'visible': MAR's encoder/decoder split -- visible tokens
  # attend to the visible ones and a masked slot only to itself, so the ViT cannot fill a masked
  # position and the LLM has to (it is the decoder); 'all': every slot sees every slot, mask tokens
  # included (stored runs from before the split read back as this).
  attend: str = "all"


class EmbeddingViT(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.cfg = cfg
    w, n, hidden = cfg.width, cfg.layers, int(cfg.width * cfg.mlp_ratio)
    if w % cfg.heads:
      raise ValueError(f"ViT width {w} must be a multiple of heads {cfg.heads}")
    self.in_proj = Linear(cfg.token_channels, w, ("channels", "vit_embed"), rngs=rngs,
                          param_dtype=param_dtype)
    self.mask_token = param(rngs, normal_002, (w,), ("vit_embed",), param_dtype)
    if cfg.pos_init not in ("sincos", "normal"):
      raise ValueError(f"unknown ViT pos_init {cfg.pos_init!r}; use sincos or normal")
    if cfg.attend not in ("visible", "all"):
      raise ValueError(f"unknown ViT attend {cfg.attend!r}; use visible or all")
    pos_init = sincos_2d if cfg.pos_init == "sincos" else normal_002
    self.pos_embed = param(rngs, pos_init, (cfg.num_tokens, w), ("length", "vit_embed"), param_dtype)
    p = functools.partial(param, rngs, dtype=param_dtype, stack=n)
    self.blocks = nnx.Dict(
        ln1_scale=p(ones, (w,), ("vit_embed",)), ln1_bias=p(zeros, (w,), ("vit_embed",)),
        qkv_kernel=p(xavier, (w, 3 * w), ("vit_embed", "heads")), qkv_bias=p(zeros, (3 * w,), ("heads",)),
        proj_kernel=p(xavier, (w, w), ("heads", "vit_embed")), proj_bias=p(zeros, (w,), ("vit_embed",)),
        ln2_scale=p(ones, (w,), ("vit_embed",)), ln2_bias=p(zeros, (w,), ("vit_embed",)),
        fc1_kernel=p(xavier, (w, hidden), ("vit_embed", "vit_mlp")), fc1_bias=p(zeros, (hidden,), ("vit_mlp",)),
        fc2_kernel=p(xavier, (hidden, w), ("vit_mlp", "vit_embed")), fc2_bias=p(zeros, (w,), ("vit_embed",)),
    )
    self.final_scale = param(rngs, ones, (w,), ("vit_embed",), param_dtype)
    self.final_bias = param(rngs, zeros, (w,), ("vit_embed",), param_dtype)

  def __call__(self, tokens: jax.Array, masked: jax.Array, dtype=jnp.float32,
               cut_context: bool = False) -> jax.Array:
    """tokens [B, N, C], masked bool [B, N] -> [B, N, W]. `cut_context` (the context diagnostic):
    masked slots do not attend to visible ones, whatever `attend` says."""
    cfg = self.cfg
    h = self.in_proj(tokens, dtype)
    h = jnp.where(masked[..., None], self.mask_token[...].astype(dtype), h)
    h = h + self.pos_embed[...].astype(dtype)
    h = constrain(h, ("batch", "length", "act_embed"))  # the ViT runs data-parallel, like the LLM
    mask = attention_mask(masked, cfg.attend)
    if cut_context:
      mask = mask & ~(masked[:, None, :, None] & ~masked[:, None, None, :])
    block = functools.partial(_vit_block, heads=cfg.heads, eps=cfg.eps, mask=mask, dtype=dtype)
    weights = {k: v[...] for k, v in self.blocks.items()}
    h, _ = scan_or_unroll(lambda x, w: (block(x, w), None), h, weights, cfg.scan_layers)
    return layer_norm(h, self.final_scale[...], self.final_bias[...], cfg.eps)


def attention_mask(masked: jax.Array, attend: str) -> jax.Array:
  """bool [B, 1, N, N]: may query i attend key j. 'visible': both are visible, or j is i (a masked
  slot keeps its own mask token + position, and every row has a key); 'all': always."""
  n = masked.shape[1]
  if attend == "all":
    return jnp.ones((masked.shape[0], 1, n, n), bool)
  visible = ~masked
  return (visible[:, None, :, None] & visible[:, None, None, :]) | jnp.eye(n, dtype=bool)[None, None]


def sincos_2d(key, shape, dtype=jnp.float32):
  """[n, w] 2D sine-cosine embedding of a square grid of n tokens: half the width encodes the row,
  half the column, each as sin/cos at geometrically spaced frequencies."""
  del key
  n, w = shape
  side = int(round(n ** 0.5))
  if side * side != n or w % 4:
    raise ValueError(f"sincos position embedding needs a square grid and width % 4 == 0, got {shape}")
  omega = 1.0 / 10000 ** (jnp.arange(w // 4, dtype=jnp.float32) / (w // 4))
  rows, cols = jnp.meshgrid(jnp.arange(side, dtype=jnp.float32), jnp.arange(side, dtype=jnp.float32),
                            indexing="ij")
  enc = lambda p: jnp.concatenate([jnp.sin(p.reshape(-1, 1) * omega), jnp.cos(p.reshape(-1, 1) * omega)], 1)
  return jnp.concatenate([enc(rows), enc(cols)], axis=1).astype(dtype)


def _vit_block(x, w, *, heads, eps, mask, dtype):
  b, n, width = x.shape
  c = lambda a: a.astype(dtype)
  y = layer_norm(x, w["ln1_scale"], w["ln1_bias"], eps)
  qkv = (y @ c(w["qkv_kernel"]) + c(w["qkv_bias"])).reshape(b, n, 3, heads, width // heads)
  o = attn.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask).reshape(b, n, width)
  x = x + o @ c(w["proj_kernel"]) + c(w["proj_bias"])
  y = layer_norm(x, w["ln2_scale"], w["ln2_bias"], eps)
  y = jax.nn.gelu(y @ c(w["fc1_kernel"]) + c(w["fc1_bias"]), approximate=False)
  return constrain(x + y @ c(w["fc2_kernel"]) + c(w["fc2_bias"]), ("batch", "length", "act_embed"))


class VisProjector(nnx.Module):
  """ViT width -> LLM width: Linear, SiLU, Linear (method.md §1.5 DEFAULT)."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.fc1 = Linear(d_in, d_out, ("vit_embed", "embed"), rngs=rngs, param_dtype=param_dtype)
    self.fc2 = Linear(d_out, d_out, ("mlp", "embed"), rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x, dtype=jnp.float32):
    return self.fc2(jax.nn.silu(self.fc1(x, dtype)), dtype)

