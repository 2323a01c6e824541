"""Text decoding with the Qwen2 backbone's KV cache: plain Qwen2 greedy continuation
(`greedy_decode`) and MMAR captioning / VQA (`caption_tokens`, `caption_images`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax.data.text_tokenizer import encode_questions
from mmar_jax.models import sequence
from mmar_jax.models.qwen2 import text_structure
from mmar_jax.sample.image import model_config_of, split_model, typed_key


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
  positions, segments, blocks = text_structure(mask)
  cache = model.init_cache(b, t + max_new)
  hidden, cache = model(model.embed(ids), positions, segments, blocks, cache, 0)
  choose = lambda h, i: jnp.argmax(model.logits(h), -1).astype(jnp.int32)
  return decode(model, hidden, cache, positions, blocks, choose, max_new=max_new,
                eos_id=eos_id, pad_id=pad_id)[0]


def decode(backbone, hidden, cache, positions, blocks, choose, *, max_new: int, eos_id, pad_id):
  """The KV-cached decoding loop after a prefix pass over P cache slots (`hidden` [B, P, d], the
  prefix's `positions` / `blocks` [B, P]): (ids int32 [B, max_new], backbone passes: the prefix's
  and one per further token). `choose(h [B, d], i)` picks token i from a hidden state. Token i - 1
  goes into cache slot P + i - 1 as a text block of its own, one position after the last; a row
  that emitted `eos_id` (None: never) is then filled with `pad_id`, and the loop stops once every
  row is done."""
  b, p = positions.shape
  first = choose(hidden[:, -1], 0)
  out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
  finished = lambda tok: (tok == eos_id) if eos_id is not None else jnp.zeros((b,), bool)
  last_pos, last_blk = positions[:, -1:], blocks[:, -1:]

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, token, cache, out, done, passes = carry
    h, cache = backbone(backbone.embed(token[:, None]), last_pos + i, jnp.ones((b, 1), jnp.int32),
                        last_blk + i, cache=cache, cache_index=p + i - 1)
    nxt = jnp.where(done, pad_id, choose(h[:, -1], i))
    out = out.at[:, i].set(nxt)
    return i + 1, nxt, cache, out, done | finished(nxt), passes + 1

  init = (jnp.asarray(1, jnp.int32), first, cache, out, finished(first), jnp.asarray(1, jnp.int32))
  _, _, _, out, _, passes = jax.lax.while_loop(cond, body, init)
  return out, passes


# -- captioning and VQA: <boi> [img] <eoi> [question] -> text --------------------------------------
#
# The image is encoded once (the tokenizer's posterior mean, the EmbeddingViT with nothing
# masked) and, with the question, fills the KV cache in one prefix pass; every generated token is
# then one single-token pass. Rows are LEFT-padded (padding: segment id 0) so that questions of
# different lengths end at the same cache slot; positions and block ids are those of the training
# layout of kind 1 (`sequence.caption_prefix`).


def select_tokens(logits: jax.Array, keys: jax.Array | None, top_p=None, vocab: int | None = None):
  """The next token of each row from fp32 logits [B, V]: argmax (keys None), or nucleus sampling
  with one key per row. Ids >= `vocab` (the model's <boi>/<eoi> and spare rows, which are not
  text) are never chosen."""
  logits = logits.astype(jnp.float32)
  if vocab is not None and vocab < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
  if keys is None:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  return jax.vmap(lambda k, lg: _top_p_one(k, lg, top_p))(keys, logits).astype(jnp.int32)


def _top_p_one(key, logits, top_p):
  """Samples among the smallest set of most likely tokens whose mass reaches top_p (the most
  likely token is always kept, so top_p -> 0 is greedy)."""
  order = jnp.argsort(-logits)  # stable: ties keep id order, so the draw is reproducible
  probs = jax.nn.softmax(logits)[order]
  keep_sorted = (jnp.cumsum(probs) - probs) < top_p
  keep_sorted = keep_sorted.at[0].set(True)
  keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
  return jax.random.categorical(key, jnp.where(keep, logits, -jnp.inf))


def row_keys(key, b: int):
  """One key per row of a batch: fold_in(key, row)."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b))


def caption_ids(graphdef, state, images, question, question_len, keys, top_p, eos_id, pad_id, *,
                max_tokens, sample):
  """The captioning program (traced inside a caller's jit): ids [B, max_tokens] and stats. Token
  i of row b is drawn with fold_in(keys[b], i), so it depends on the row's own key only, not on
  the batch the row is decoded in."""
  model = nnx.merge(graphdef, state)
  mc = model.cfg
  b = images.shape[0]
  n = mc.num_image_tokens
  emb = model.embed_image(model.encode_tokens(images), jnp.zeros((b, n), bool))
  ids, pos, seg, blk, image_slot = sequence.caption_prefix(
      question, question_len, n, mc.boi_id, mc.eoi_id, mc.pad_id,
      mc.image["positions"] == "per_token")
  x = model.backbone.embed(jnp.maximum(ids, 0))
  x = x.at[jnp.arange(b)[:, None], image_slot].set(emb.astype(x.dtype))
  p = ids.shape[1]
  cache = model.backbone.init_cache(b, p + max_tokens)
  hidden, cache = model.backbone(x, pos, seg, blk, cache=cache, cache_index=0)
  token_keys = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
  choose = lambda h, i: select_tokens(model.backbone.logits(h), token_keys(i) if sample else None,
                                      top_p, mc.text_vocab)
  out, passes = decode(model.backbone, hidden, cache, pos, blk, choose, max_new=max_tokens,
                       eos_id=eos_id, pad_id=pad_id)
  return out, dict(backbone_passes=passes, prefix_len=jnp.asarray(p, jnp.int32))


_caption = jax.jit(caption_ids, static_argnames=("graphdef", "max_tokens", "sample"))


def caption_tokens(model, images, question, question_len, key=None, *, max_tokens: int = 64,
                   top_p: float | None = None, eos_id: int | None = None,
                   pad_id: int | None = None):
  """Generated ids int32 [B, max_tokens] (pad after EOS) and stats (backbone_passes: the prefix
  pass plus one per further token, counted inside the loop). images [B, H, W, 3] in [-1, 1];
  greedy when `top_p` is None, else nucleus sampling keyed per row by (key, row, token index).
  `model`: an MMAR module or (graphdef, state)."""
  graphdef, state = split_model(model)
  mc = model_config_of((graphdef, state))
  sample = top_p is not None
  if sample and key is None:
    raise ValueError("top-p sampling needs a key")
  return _caption(graphdef, state, jnp.asarray(images, jnp.float32),
                  jnp.asarray(question, jnp.int32), jnp.asarray(question_len, jnp.int32),
                  row_keys(typed_key(key if key is not None else jax.random.key(0)),
                           images.shape[0]),
                  jnp.asarray(top_p if sample else 1.0, jnp.float32),
                  jnp.asarray(mc.eos_id if eos_id is None else eos_id, jnp.int32),
                  jnp.asarray(mc.pad_id if pad_id is None else pad_id, jnp.int32),
                  max_tokens=int(max_tokens), sample=sample)


def strip_after_eos(ids, eos_id: int) -> list[list[int]]:
  """Each row's ids before its first EOS."""
  rows = []
  for row in np.asarray(ids).tolist():
    rows.append(row[:row.index(eos_id)] if eos_id in row else row)
  return rows


def caption_images(model, images, tokenizer, key=None, *, max_tokens: int = 64,
                   top_p: float | None = None, question=None) -> list[str]:
  """Captions (or answers to `question`: one string for all images, or one per image) of images
  [B, H, W, 3] in [-1, 1] at the model's image size."""
  images = np.asarray(images, np.float32)
  q_ids, q_len = encode_questions(tokenizer, question, images.shape[0])
  ids, _ = caption_tokens(model, images, q_ids, q_len, key, max_tokens=max_tokens, top_p=top_p,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  return [tokenizer.decode(r) for r in strip_after_eos(jax.device_get(ids), tokenizer.eos_id)]
