"""The image pathway and the diffusion head of MMAR in PyTorch, written from method.md §1.4-1.5
and MAR's SimpleMLPAdaLN, not from the JAX code: `repro torch-parity` compares the two.

Module and parameter names are those `convert jax-to-safetensors` writes, so a state dict loads
with no renaming: `vit.*` and `projector.*` (our module paths, one entry per layer), and MAR's
head names under `diffloss.net.*`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FREQUENCY_DIM = 256  # MAR's frequency_embedding_size
MAX_PERIOD = 10000


class ViTBlock(nn.Module):
  """Pre-LN transformer block, bidirectional over the image's tokens, exact (erf) GELU."""

  def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
    super().__init__()
    hidden = int(width * mlp_ratio)
    self.heads = heads
    self.ln1 = nn.LayerNorm(width, eps=eps)
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)
    self.ln2 = nn.LayerNorm(width, eps=eps)
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x, mask=None):
    b, n, w = x.shape
    q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, w)
    x = x + self.proj(o)
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class EmbeddingViT(nn.Module):
  """h = where(masked, mask_token, in_proj(x)) + pos_embed, the blocks, a final LayerNorm. The
  position embedding comes after the mask token, so masked positions stay distinct."""

  def __init__(self, cfg: dict):
    super().__init__()
    w = cfg["width"]
    self.in_proj = nn.Linear(cfg["token_channels"], w)
    self.mask_token = nn.Parameter(torch.zeros(w))
    self.pos_embed = nn.Parameter(torch.zeros(cfg["num_tokens"], w))
    self.blocks = nn.ModuleList(ViTBlock(w, cfg["heads"], cfg["mlp_ratio"], cfg["eps"])
                                for _ in range(cfg["layers"]))
    self.final = nn.LayerNorm(w, eps=cfg["eps"])
    self.attend = cfg.get("attend", "all")

  def forward(self, tokens, masked):
    h = torch.where(masked[..., None], self.mask_token, self.in_proj(tokens)) + self.pos_embed
    mask = None
    if self.attend == "visible":  # visible keys, and each slot itself (models/vit.attention_mask)
      eye = torch.eye(masked.shape[1], dtype=torch.bool, device=masked.device)
      mask = ((~masked)[:, None, :, None] & (~masked)[:, None, None, :]) | eye
    for block in self.blocks:
      h = block(h, mask)
    return self.final(h)


class VisProjector(nn.Module):
  """ViT width -> LLM width: Linear, SiLU, Linear."""

  def __init__(self, d_in: int, d_out: int):
    super().__init__()
    self.fc1 = nn.Linear(d_in, d_out)
    self.fc2 = nn.Linear(d_out, d_out)

  def forward(self, x):
    return self.fc2(F.silu(self.fc1(x)))


def timestep_frequencies(dim: int = FREQUENCY_DIM) -> torch.Tensor:
  """MAR's exp(-ln(10000) k / half) with the exponent rounded to fp32 as MAR's code rounds it and
  then a correctly rounded exp (numpy, fp64): torch's CPU exp is off by one ulp for a few k, which
  shows at t ~ 1000."""
  half = dim // 2
  exponent = (np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32)) / np.float32(half)
  return torch.from_numpy(np.exp(exponent.astype(np.float64)).astype(np.float32))


class TimestepEmbedder(nn.Module):

  def __init__(self, width: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width))
    self.register_buffer("freqs", timestep_frequencies(), persistent=False)

  def forward(self, t):
    args = t.to(torch.float32)[:, None] * self.freqs
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class ResBlock(nn.Module):

  def __init__(self, width: int):
    super().__init__()
    self.in_ln = nn.LayerNorm(width, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

  def forward(self, x, y):
    shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
    return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
  def __init__(self, width: int, out_channels: int):
    super().__init__()
    self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(width, out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

  def forward(self, x, y):
    shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
  """MAR's diffusion head: out = net(x_t, t, z), 2C outputs with a learned variance."""

  def __init__(self, cfg: dict):
    super().__init__()
    c, w = cfg["token_channels"], cfg["width"]
    out = 2 * c if cfg["learn_sigma"] else c
    self.time_embed = TimestepEmbedder(w)
    self.cond_embed = nn.Linear(cfg["cond_dim"], w)
    self.input_proj = nn.Linear(c, w)
    self.res_blocks = nn.ModuleList(ResBlock(w) for _ in range(cfg["depth"]))
    self.final_layer = FinalLayer(w, out)

  def forward(self, x, t, c):
    y = self.time_embed(t) + self.cond_embed(c)
    x = self.input_proj(x)
    for block in self.res_blocks:
      x = block(x, y)
    return self.final_layer(x, y)


class DiffLoss(nn.Module):
  """MAR's container of the head (`diffloss.net`), so MAR's key names load as they are."""

  def __init__(self, cfg: dict):
    super().__init__()
    self.net = SimpleMLPAdaLN(cfg)


def patchify(x, p: int):
  """[B, H, W, C] -> [B, (H/p)(W/p), C p p]: tokens row-major, channels (c, i, j) as MAR's."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens, p: int):
  """Inverse of `patchify` on a square grid."""
  b, n, d = tokens.shape
  side, c = math.isqrt(n), d // (p * p)
  x = tokens.reshape(b, side, side, c, p, p).permute(0, 1, 4, 2, 5, 3)
  return x.reshape(b, side * p, side * p, c)
