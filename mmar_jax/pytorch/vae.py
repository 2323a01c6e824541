"""The LDM AutoencoderKL ("KL-16", MAR's image tokenizer) in PyTorch, NCHW, with MAR's module
names: MAR's own `kl16.ckpt` state dict (`encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`) loads into it as it is. Sizes come from the `vae_config.json` fields
(models/vae.py VAEConfig): attention after each res block of the encoder levels in
`attn_levels` (MAR: the last) and of the decoder levels in `dec_attn_levels` (MAR: none), and in
`mid` always.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class ResnetBlock(nn.Module):

  def __init__(self, c_in: int, c_out: int, groups: int, eps: float):
    super().__init__()
    self.norm1, self.conv1 = nn.GroupNorm(groups, c_in, eps=eps), nn.Conv2d(c_in, c_out, 3, 1, 1)
    self.norm2, self.conv2 = nn.GroupNorm(groups, c_out, eps=eps), nn.Conv2d(c_out, c_out, 3, 1, 1)
    self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
  """Single-head attention over the h*w positions; q, k, v and proj_out are 1x1 convolutions."""

  def __init__(self, c: int, groups: int, eps: float):
    super().__init__()
    self.norm = nn.GroupNorm(groups, c, eps=eps)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q, k, v = (f(y).reshape(b, c, h * w).transpose(1, 2) for f in (self.q, self.k, self.v))
    o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    return x + self.proj_out(o.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only


class Upsample(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in, c_out, n_blocks, attn, groups, eps):
  level = nn.Module()
  level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups, eps)
                              for j in range(n_blocks))
  level.attn = nn.ModuleList(AttnBlock(c_out, groups, eps) for _ in range(n_blocks if attn else 0))
  return level


def _run_level(level, h):
  for j, block in enumerate(level.block):
    h = block(h)
    if len(level.attn):
      h = level.attn[j](h)
  return h


def _mid(c, groups, eps):
  mid = nn.Module()
  mid.block_1 = ResnetBlock(c, c, groups, eps)
  mid.attn_1 = AttnBlock(c, groups, eps)
  mid.block_2 = ResnetBlock(c, c, groups, eps)
  return mid


def _run_mid(mid, h):
  return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):

  def __init__(self, cfg: dict):
    super().__init__()
    g, eps, widths = cfg["norm_groups"], cfg["norm_eps"], [cfg["ch"] * m for m in cfg["ch_mult"]]
    levels = len(widths)
    attn = cfg.get("attn_levels")
    attn = [levels - 1] if attn is None else list(attn)
    self.conv_in = nn.Conv2d(cfg["in_channels"], cfg["ch"], 3, 1, 1)
    self.down = nn.ModuleList()
    c = cfg["ch"]
    for i, w in enumerate(widths):
      level = _level(c, w, cfg["num_res_blocks"], i in attn, g, eps)
      if i != levels - 1:
        level.downsample = Downsample(w)
      self.down.append(level)
      c = w
    self.mid = _mid(c, g, eps)
    self.norm_out = nn.GroupNorm(g, c, eps=eps)
    self.conv_out = nn.Conv2d(c, 2 * cfg["z_channels"], 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = _run_level(level, h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class Decoder(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    g, eps, widths = cfg["norm_groups"], cfg["norm_eps"], [cfg["ch"] * m for m in cfg["ch_mult"]]
    attn = list(cfg.get("dec_attn_levels") or ())
    c = widths[-1]
    self.conv_in = nn.Conv2d(cfg["z_channels"], c, 3, 1, 1)
    self.mid = _mid(c, g, eps)
    levels = [None] * len(widths)
    for i in reversed(range(len(widths))):  # built coarse to fine, stored fine first (LDM's order)
      levels[i] = _level(c, widths[i], cfg["num_res_blocks"] + 1, i in attn, g, eps)
      if i != 0:
        levels[i].upsample = Upsample(widths[i])
      c = widths[i]
    self.up = nn.ModuleList(levels)
    self.norm_out = nn.GroupNorm(g, c, eps=eps)
    self.conv_out = nn.Conv2d(c, cfg["out_ch"], 3, 1, 1)

  def forward(self, z):
    h = _run_mid(self.mid, self.conv_in(z))
    for level in reversed(self.up):
      h = _run_level(level, h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
  """`encode(images NCHW in [-1, 1]) -> (mean, logvar)` (logvar clamped as LDM), `decode(z)`."""

  def __init__(self, cfg: dict):
    super().__init__()
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = nn.Conv2d(2 * cfg["z_channels"], 2 * cfg["embed_dim"], 1)
    self.post_quant_conv = nn.Conv2d(cfg["embed_dim"], cfg["z_channels"], 1)

  def encode(self, x):
    mean, logvar = torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)
    return mean, torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))
