"""Attention from per-token structure ids, shared by every transformer in the project.

Structure is given per token, never as a dense L x L array:
  segment_ids  int [B, L]: which sample a token belongs to; 0 marks padding (never attended).
  block_ids    int [B, L]: causal across blocks, bidirectional inside a block. Text tokens get one
               block each (increasing), all tokens of one image share a block.
A query at i may attend key j iff seg[j] == seg[i] != 0 and block[j] <= block[i]. The dense mask is
derived here, where a kernel needs one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmar_jax.models.flash_attention import flash_attention


def structure_mask(q_seg, q_block, k_seg, k_block) -> jax.Array:
  """bool [B, 1, T, S]: may query t attend key s."""
  same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  causal = k_block[:, None, :] <= q_block[:, :, None]
  return (same & causal)[:, None]


# The fused Pallas kernel (flash_attention.py): "flash" compiles it with Mosaic for TPU,
# "flash_interpret" runs it through Pallas' interpreter (any backend; tests and debugging).
FLASH = ("flash", "flash_interpret")
IMPLEMENTATIONS = ("einsum", "cudnn", "xla") + FLASH


def attend(q, k, v, mask, *, implementation: str = "einsum", structure=None) -> jax.Array:
  """Grouped-query attention.

  q [B, T, H, hd], k/v [B, S, KV, hd] with H a multiple of KV (head h uses kv head h // (H/KV),
  as HF's repeat_kv), mask bool [B, 1, T, S]. Softmax in fp32. Rows with no visible key (padding
  queries) produce zeros rather than NaN. `implementation`: "einsum" (this function's own, the
  default everywhere), a `jax.nn.dot_product_attention` implementation ("cudnn" on GPU, "xla"),
  or a FLASH kernel, which takes the ids themselves: `structure` = (q_seg, q_block, k_seg,
  k_block), and no mask.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; use one of "
                     f"{IMPLEMENTATIONS}")
  if implementation in FLASH:
    if structure is None:
      raise ValueError(f"attention {implementation!r} needs the structure ids, not a mask")
    out = flash_attention(q, k, v, *structure, interpret=implementation == "flash_interpret")
    return out.astype(v.dtype)
  if implementation != "einsum":
    # jax's fused attention ("cudnn" on GPU; "xla" for the reference path). A padding query sees
    # no key: its row is undefined there, so zero it as below (0 * NaN would poison the loss).
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0).astype(v.dtype)
  b, t, h, hd = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (hd ** -0.5)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask[:, :, None], probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, hd)


def rope(x, positions, theta: float):
  """Rotary embedding, HF's rotate-half convention. x [B, T, H, hd], positions int [B, T]."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (xf * cos + rotated * sin).astype(x.dtype)
