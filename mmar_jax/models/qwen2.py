"""The Qwen2 decoder (HuggingFace-compatible numerics) in Flax NNX.

Layers are stored stacked: every per-layer weight has a leading `layers` axis and the forward
pass walks it with `lax.scan` (`scan_layers=True`) or an unrolled Python loop; the stored
parameters are identical either way. The layer itself is a pure function of one layer's arrays.

Inputs are embeddings, not token ids, so the MMAR model can splice image embeddings into the
sequence; `embed()` turns token ids into embeddings and `logits()` applies the LM head.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mmar_jax.dtypes import get_dtype
from mmar_jax.models import attention as attn
from mmar_jax.models.layers import normal_002, ones, param, rms_norm, scan_or_unroll, zeros
from mmar_jax.models.text_loss import tiled_cross_entropy
from mmar_jax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  vocab_size: int = 151936
  hidden_size: int = 896
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_heads
  intermediate_size: int = 4864
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  # Execution switches (not part of the checkpoint's shapes).
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots | dots_no_batch | attention (REMAT_POLICIES)
  # einsum (ours, the reference) | cudnn (fused, GPU) | xla (jax.nn reference) | flash (Pallas
  # kernel, TPU) | flash_interpret (the same kernel interpreted; CPU). Decoding with a KV cache
  # uses einsum under the flash names (a step's few queries would fill one tile of 128).
  attention: str = "einsum"
  # One matmul for q/k/v and one for gate/up, the kernels concatenated inside the step (the
  # checkpoint layout is unchanged). Off under tensor parallelism: the concatenation would
  # gather the head-sharded kernels.
  fuse_projections: bool = False

  @property
  def hd(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **kw) -> "Qwen2Config":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Qwen2Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown Qwen2Config keys: {unknown}")
    return cls(**d)


REMAT_POLICIES = {
    "full": None,  # save nothing
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Between full and dots_no_batch: keep the attention block's results (q, k, v after RoPE and
    # the attention output, `_layer`'s checkpoint names), recompute the MLP. Per token and layer
    # that stores (2 H + 2 KV) x hd values instead of dots_no_batch's (H + 2 KV) hd + 2 mlp + 2 d
    # (Qwen2-7B: 8 k instead of 50 k), and the backward pass never re-runs attention (the part
    # that is not a plain matmul: fp32 scores for einsum, the kernel for flash).
    "attention": jax.checkpoint_policies.save_only_these_names("qkv", "attention_out"),
}


class Qwen2(nnx.Module):
  """Qwen2 decoder. Parameter names follow the paper's/HF's concepts; see convert/hf.py."""

  def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, hd, f, n = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.hd,
                          cfg.intermediate_size, cfg.num_layers)
    if h % kv:
      raise ValueError(f"num_heads {h} must be a multiple of num_kv_heads {kv}")
    pd = get_dtype(cfg.param_dtype)
    p = functools.partial(param, rngs, dtype=pd, stack=n)
    self.embed_tokens = param(rngs, normal_002, (cfg.vocab_size, d), ("vocab", "embed"), pd)
    self.layers = nnx.Dict(
        attn_norm=p(ones, (d,), ("embed",)),
        q_kernel=p(normal_002, (d, h * hd), ("embed", "q_heads")),
        q_bias=p(zeros, (h * hd,), ("q_heads",)),
        k_kernel=p(normal_002, (d, kv * hd), ("embed", "kv_heads")),
        k_bias=p(zeros, (kv * hd,), ("kv_heads",)),
        v_kernel=p(normal_002, (d, kv * hd), ("embed", "kv_heads")),
        v_bias=p(zeros, (kv * hd,), ("kv_heads",)),
        o_kernel=p(normal_002, (h * hd, d), ("q_heads", "embed")),
        mlp_norm=p(ones, (d,), ("embed",)),
        gate_kernel=p(normal_002, (d, f), ("embed", "mlp")),
        up_kernel=p(normal_002, (d, f), ("embed", "mlp")),
        down_kernel=p(normal_002, (f, d), ("mlp", "embed")),
    )
    self.final_norm = param(rngs, ones, (d,), ("embed",), pd)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    param(rngs, normal_002, (d, cfg.vocab_size), ("embed", "vocab"), pd))

  # -- pieces -------------------------------------------------------------------------------------

  @property
  def dtype(self):
    return get_dtype(self.cfg.compute_dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM-head logits in fp32 (softmax statistics need it even with bf16 matmuls)."""
    w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
    return jnp.dot(hidden.astype(self.dtype), w.astype(self.dtype),
                   preferred_element_type=jnp.float32)

  def cross_entropy(self, hidden: jax.Array, targets: jax.Array, vocab_tiles: int = 0) -> jax.Array:
    """Per-row next-token cross-entropy fp32 [R] of hidden states [R, D] against int targets [R].
    vocab_tiles = 0: from the full `logits` (the reference); n > 0: the vocabulary walked in n
    tiles (text_loss.py), so no [R, vocab] fp32 array exists, in the forward or the backward."""
    if not vocab_tiles:
      logp = jax.nn.log_softmax(self.logits(hidden))
      return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
    # Without scan_layers the tiles are unrolled too: the cost compiles of `bench memory` count
    # every loop body once, so they need straight-line code (bench_cost.py).
    return tiled_cross_entropy(hidden, w, targets, num_tiles=vocab_tiles, compute_dtype=self.dtype,
                               unroll=not self.cfg.scan_layers)

  def init_cache(self, batch: int, length: int) -> dict:
    """An empty KV cache; unwritten slots have segment id 0, so they are never attended."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.hd)
    return dict(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                segment_ids=jnp.zeros((batch, length), jnp.int32),
                block_ids=jnp.zeros((batch, length), jnp.int32))

  # -- forward ------------------------------------------------------------------------------------

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               block_ids: jax.Array, cache: dict | None = None,
               cache_index: jax.Array | int | None = None) -> tuple[jax.Array, dict | None]:
    """Runs the decoder on embeddings x [B, T, D]; returns (final-norm hidden [B, T, D], cache).

    With `cache`, the new keys/values (and ids) are written at `cache_index` and the queries
    attend to the whole cache; this serves text decoding and the masked-AR image steps (which
    rewrite the image block's slots every step) alike.
    """
    cfg = self.cfg
    x = constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))
    if cache is not None:
      idx = jnp.asarray(cache_index, jnp.int32)
      k_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, idx))
      k_blk = jax.lax.dynamic_update_slice(cache["block_ids"], block_ids.astype(jnp.int32), (0, idx))
    else:
      idx, k_seg, k_blk = None, segment_ids, block_ids
    structure = (segment_ids, block_ids, k_seg, k_blk)
    implementation = cfg.attention
    if cache is not None and implementation in attn.FLASH:
      implementation = "einsum"
    mask = None if implementation in attn.FLASH else attn.structure_mask(*structure)
    layer = functools.partial(_layer, cfg=cfg, dtype=self.dtype, positions=positions, mask=mask,
                              structure=structure, implementation=implementation,
                              cache_index=idx)
    if cfg.remat != "none":
      if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {cfg.remat!r}; use none or {sorted(REMAT_POLICIES)}")
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    weights = {k: v[...] for k, v in self.layers.items()}
    kv_in = None if cache is None else (cache["k"], cache["v"])

    def body(h, xs):
      w, kv = xs
      h, kv_out = layer(h, w, kv)
      return h, kv_out

    x, kv_out = scan_or_unroll(body, x, (weights, kv_in), cfg.scan_layers)
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    new_cache = None
    if cache is not None:
      new_cache = dict(k=kv_out[0], v=kv_out[1], segment_ids=k_seg, block_ids=k_blk)
    return x, new_cache


def attention_weights(backbone: "Qwen2", x, positions, segment_ids, block_ids,
                      reduce=lambda probs: probs) -> jax.Array:
  """`reduce` of each layer's fp32 attention probabilities [B, H, T, T], stacked over layers, for
  embeddings x [B, T, D] (the diagnostics' view: layers unrolled, no cache; the forward pass is
  `_layer`'s). Reducing per layer keeps [L, B, H, T, T] from existing at full scale."""
  cfg, dtype = backbone.cfg, backbone.dtype
  mask = attn.structure_mask(segment_ids, block_ids, segment_ids, block_ids)
  group = cfg.num_heads // cfg.num_kv_heads
  x, out = x.astype(dtype), []
  for i in range(cfg.num_layers):
    w = {k: v[...][i] for k, v in backbone.layers.items()}
    q, k, _ = attention_inputs(x, w, cfg=cfg, dtype=dtype, positions=positions)
    scores = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, group, axis=2),
                        preferred_element_type=jnp.float32) * cfg.hd ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    out.append(reduce(jnp.where(mask, probs, 0.0)))
    x, _ = _layer(x, w, None, cfg=cfg, dtype=dtype, positions=positions, mask=mask,
                  structure=None, implementation="einsum", cache_index=None)
  return jnp.stack(out)


def attention_inputs(x, w: dict[str, Any], *, cfg: Qwen2Config, dtype, positions):
  """q [B, T, H, hd], k and v [B, T, KV, hd] of one layer (RoPE applied), from its input x."""
  b, t, _ = x.shape
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.hd
  c = lambda a: a.astype(dtype)
  y = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
  if cfg.fuse_projections:
    cat = lambda *names: c(jnp.concatenate([w[n] for n in names], axis=-1))
    qkv = y @ cat("q_kernel", "k_kernel", "v_kernel") + cat("q_bias", "k_bias", "v_bias")
    q, k, v = jnp.split(qkv, [h * hd, (h + kv) * hd], axis=-1)
  else:
    q = y @ c(w["q_kernel"]) + c(w["q_bias"])
    k = y @ c(w["k_kernel"]) + c(w["k_bias"])
    v = y @ c(w["v_kernel"]) + c(w["v_bias"])
  q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
  return attn.rope(q, positions, cfg.rope_theta), attn.rope(k, positions, cfg.rope_theta), v


def _layer(x, w: dict[str, Any], kv_cache, *, cfg: Qwen2Config, dtype, positions, mask, structure,
           implementation, cache_index):
  """One decoder layer as a pure function of that layer's weights."""
  b, t, _ = x.shape
  h, hd = cfg.num_heads, cfg.hd
  c = lambda a: a.astype(dtype)
  q, k, v = (checkpoint_name(a, "qkv") for a in
             attention_inputs(x, w, cfg=cfg, dtype=dtype, positions=positions))
  new_kv = None
  if kv_cache is not None:
    k_all = jax.lax.dynamic_update_slice(kv_cache[0], k, (0, cache_index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(kv_cache[1], v, (0, cache_index, 0, 0))
    new_kv, k, v = (k_all, v_all), k_all, v_all
  o = checkpoint_name(attn.attend(q, k, v, mask, implementation=implementation,
                                  structure=structure), "attention_out").reshape(b, t, h * hd)
  x = x + o @ c(w["o_kernel"])
  y = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
  if cfg.fuse_projections:
    gate, up = jnp.split(y @ c(jnp.concatenate([w["gate_kernel"], w["up_kernel"]], axis=-1)), 2, axis=-1)
  else:
    gate, up = y @ c(w["gate_kernel"]), y @ c(w["up_kernel"])
  y = jax.nn.silu(gate) * up
  x = x + y @ c(w["down_kernel"])
  x = constrain(x, ("batch", "length", "act_embed"))
  return x, new_kv


def text_structure(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(positions, segment_ids, block_ids) for a plain (possibly left-padded) text batch, as HF
  derives positions from the attention mask."""
  attention_mask = attention_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(attention_mask, -1) - 1, 0)
  block_ids = jnp.cumsum(jnp.ones_like(attention_mask), -1)
  return positions, attention_mask, block_ids
