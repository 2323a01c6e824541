"""Text decoding with the Qwen2 backbone's KV cache (greedy; the caption command builds on it)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mmar_jax.models.qwen2 import text_structure


def greedy_decode(model, prompt_ids, max_new: int, attention_mask=None, eos_id: int | None = None,
                  pad_id: int = 0) -> jax.Array:
  """Greedy continuation of a (left-padded) prompt batch: int32 [B, max_new] (or [max_new] for a
  1-D prompt). After a row emits `eos_id`, it is filled with `pad_id`; the loop stops early once
  every row is done.
  """
  ids = jnp.asarray(prompt_ids, jnp.int32)
  squeeze = ids.ndim == 1
  ids = ids[None] if squeeze else ids
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  mask = mask[None] if mask.ndim == 1 else mask
  graphdef, state = nnx.split(model)
  out = _greedy(graphdef, state, ids, mask, max_new=int(max_new), eos_id=eos_id, pad_id=int(pad_id))
  return out[0] if squeeze else out


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "eos_id", "pad_id"))
def _greedy(graphdef, state, ids, mask, *, max_new, eos_id, pad_id):
  model = nnx.merge(graphdef, state)
  b, t = ids.shape
  cache = model.init_cache(b, t + max_new)
  positions, segments, blocks = text_structure(mask)
  hidden, cache = model(model.embed(ids), positions, segments, blocks, cache, 0)
  first = jnp.argmax(model.logits(hidden[:, -1]), -1).astype(jnp.int32)
  out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
  done = (first == eos_id) if eos_id is not None else jnp.zeros((b,), bool)
  last_pos = positions[:, -1]

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    # Feed the token produced at step i-1: it occupies cache slot t+i-1, one text block of its own.
    i, token, cache, out, done = carry
    pos = (last_pos + i)[:, None]
    seg = jnp.ones((b, 1), jnp.int32)
    blk = jnp.full((b, 1), t + i, jnp.int32)
    hidden, cache = model(model.embed(token[:, None]), pos, seg, blk, cache, t + i - 1)
    nxt = jnp.argmax(model.logits(hidden[:, -1]), -1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    out = out.at[:, i].set(nxt)
    if eos_id is not None:
      done = done | (nxt == eos_id)
    return i + 1, nxt, cache, out, done

  init = (jnp.asarray(1, jnp.int32), first, cache, out, done)
  return jax.lax.while_loop(cond, body, init)[3]
