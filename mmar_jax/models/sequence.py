"""Sequence assembly for the three sample kinds, mixed in one padded batch (method.md §1.6-1.7).

  kind 0  [text] <boi> [img] <eoi>          P(I|T)
  kind 1  <boi> [img] <eoi> [text]          P(T|I)
  kind 2  <boi> [img] <eoi>                 P(I)   (also a [text][img] sample whose caption was
                                                    dropped for guidance: its text is empty)

This module owns every layout of the model's sequence: the training batch (`layout`), the
sampler's left-padded `[text] <boi>` prefix and the image block after it (`generation_prefix`,
`image_block`), and the captioner's `<boi> [img] <eoi> [question]` prefix (`caption_prefix`). All
of them take block ids and RoPE positions from one rule, `block_and_position`.

Every training sample is laid out in the same slot space -- Lt text slots, <boi>, N image slots, <eoi> --
and a per-sample permutation of S = Lt + N + 2 slots places them in sequence order, unused text
slots last (padding). One gather builds the batch; everything is static-shaped.

Attention structure comes out as per-token ids (attention.py): segment id 1 for real tokens and 0
for padding; one block per text token, <boi> and <eoi>, one shared block for the image.
RoPE positions: the image block shares one position (DEFAULT) or gets one per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TEXT_TO_IMAGE, IMAGE_TO_TEXT, IMAGE_ONLY = 0, 1, 2
IMAGE_TOKEN = -1  # token id placeholder at image positions


def block_and_position(index: jax.Array, image_start: jax.Array, n: int, per_token: bool):
  """Block id and RoPE position of the token at unpadded sequence index `index` of a sequence
  whose N image tokens start at `image_start` (method.md §1.7): one block per text, <boi> and
  <eoi> token, one shared block for the image; the positions are the block ids, or with per-token
  positions the index itself."""
  block = jnp.where(index < image_start, index,
                    jnp.where(index < image_start + n, image_start, index - n + 1))
  return block, (index if per_token else block)


def layout(kind: jax.Array, text_len: jax.Array, max_text: int, num_image: int,
           per_token_positions: bool = False) -> dict:
  """Per-sample sequence layout.

  kind, text_len: int [B]. Returns (all [B, S], S = max_text + num_image + 2):
    order      slot index at each sequence position (slots: text 0..Lt-1, boi Lt,
               image Lt+1..Lt+N, eoi Lt+N+1)
    positions, segment_ids, block_ids
    image_pos  int [B, N]: sequence position of each image token
  """
  b = kind.shape[0]
  lt, n = max_text, num_image
  s = lt + n + 2
  text_len = jnp.where(kind == IMAGE_ONLY, 0, text_len).astype(jnp.int32)
  text_first = (kind == TEXT_TO_IMAGE)[:, None]
  j = jnp.arange(lt)[None, :]
  t = text_len[:, None]
  real_text = j < t
  # Sequence index of each slot.
  text_seq = jnp.where(text_first, j, n + 2 + j)
  text_seq = jnp.where(real_text, text_seq, t + n + 2 + (j - t))  # padding at the tail
  boi_seq = jnp.where(text_first, t, 0)
  img_seq = boi_seq + 1 + jnp.arange(n)[None, :]
  eoi_seq = boi_seq + n + 1
  slot_seq = jnp.concatenate([text_seq, boi_seq, img_seq, eoi_seq], axis=1)  # [B, S]
  order = jnp.zeros((b, s), jnp.int32).at[jnp.arange(b)[:, None], slot_seq].set(
      jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))

  blocks, positions = block_and_position(slot_seq, boi_seq + 1, n, per_token_positions)
  seg = jnp.concatenate([real_text, jnp.ones((b, n + 2), bool)], axis=1).astype(jnp.int32)
  gather = lambda x: jnp.take_along_axis(x, order, axis=1)
  return dict(order=order, positions=gather(positions), segment_ids=gather(seg),
              block_ids=gather(blocks), image_pos=img_seq, text_len=text_len)


# -- the samplers' prefixes: left-padded, so every row's prefix ends at the same cache slot --------

def generation_prefix(text: jax.Array, text_len: jax.Array, boi_id: int, pad_id: int):
  """Left-padded `[text] <boi>` over Lt + 1 slots: (ids, positions, segment_ids, block_ids)."""
  _, lt = text.shape
  t = text_len.astype(jnp.int32)[:, None]
  j = jnp.arange(lt + 1)[None, :] - (lt - t)  # index in the unpadded sequence; < 0 is padding
  real = j >= 0
  src = jnp.clip(j, 0, lt - 1)
  ids = jnp.where(j == t, boi_id, jnp.take_along_axis(text, jnp.broadcast_to(src, j.shape), axis=1))
  ids = jnp.where(real, ids, pad_id).astype(jnp.int32)
  blocks, positions = block_and_position(jnp.maximum(j, 0), t + 1, 0, False)
  return ids, positions.astype(jnp.int32), real.astype(jnp.int32), blocks.astype(jnp.int32)


def image_block(text_len: jax.Array, n: int, per_token: bool):
  """(positions, segment_ids, block_ids) [R, N] of the image block after `[text] <boi>`."""
  start = text_len.astype(jnp.int32)[:, None] + 1
  blocks, positions = block_and_position(start + jnp.arange(n)[None, :], start, n, per_token)
  return positions, jnp.ones_like(blocks), blocks


def caption_prefix(question: jax.Array, question_len: jax.Array, n: int, boi_id: int, eoi_id: int,
                   pad_id: int, per_token: bool):
  """Left-padded `<boi> [img] <eoi> [question]` over Q + N + 2 slots: (ids, positions,
  segment_ids, block_ids, image_slot [B, N]); the layout of kind 1."""
  q = question.shape[1]
  s = q + n + 2
  ql = question_len.astype(jnp.int32)[:, None]
  j = jnp.arange(s)[None, :] - (q - ql)  # index in the unpadded sequence; < 0 is padding
  real = j >= 0
  txt = j - (n + 2)  # index in the question
  text_ids = (jnp.take_along_axis(question, jnp.clip(txt, 0, q - 1), axis=1) if q else
              jnp.zeros_like(j))
  ids = jnp.where(txt >= 0, text_ids, IMAGE_TOKEN)
  ids = jnp.where(j == 0, boi_id, jnp.where(j == n + 1, eoi_id, ids))
  ids = jnp.where(real, ids, pad_id)
  blocks, positions = block_and_position(jnp.maximum(j, 0), 1, n, per_token)
  image_slot = (q - ql) + 1 + jnp.arange(n)[None, :]
  as32 = lambda a: a.astype(jnp.int32)
  return as32(ids), as32(positions), as32(real), as32(blocks), image_slot


def token_ids(text: jax.Array, lay: dict, boi_id: int, eoi_id: int, pad_id: int) -> jax.Array:
  """Token id at each sequence position (IMAGE_TOKEN at image positions, pad at padding)."""
  b, lt = text.shape
  n = lay["image_pos"].shape[1]
  real = jnp.arange(lt)[None, :] < lay["text_len"][:, None]
  slots = jnp.concatenate([
      jnp.where(real, text, pad_id), jnp.full((b, 1), boi_id),
      jnp.full((b, n), IMAGE_TOKEN), jnp.full((b, 1), eoi_id)], axis=1).astype(jnp.int32)
  return jnp.take_along_axis(slots, lay["order"], axis=1)


def text_targets(ids: jax.Array, segment_ids: jax.Array, boi_id: int):
  """Next-token targets: position p predicts ids[p+1] when that is a text token or <eoi> of the
  same sample (not <boi>, not an image token, not padding). Returns (targets, weights) [B, S]."""
  nxt = jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], IMAGE_TOKEN)], axis=1)
  nxt_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  weight = (nxt_seg != 0) & (segment_ids != 0) & (nxt != IMAGE_TOKEN) & (nxt != boi_id)
  return jnp.where(weight, nxt, 0), weight.astype(jnp.float32)



def cut_image_context(block_ids: jax.Array, image_pos: jax.Array, masked: jax.Array) -> jax.Array:
  """Block ids under which no masked image token attends to a visible one (the context
  diagnostic's cut): the visible tokens move to a block of their own right after the image's,
  and every later block moves up by one, so attention among everything else is unchanged."""
  b = block_ids.shape[0]
  image_block = jnp.take_along_axis(block_ids, image_pos[:, :1], axis=1)  # [B, 1]
  later = block_ids > image_block
  out = jnp.where(later, block_ids + 1, block_ids)
  visible_pos = jnp.where(masked, block_ids.shape[1], image_pos)  # out of range: dropped
  return out.at[jnp.arange(b)[:, None], visible_pos].set(image_block + 1, mode="drop")


def place_image(x: jax.Array, image_embeds: jax.Array, image_pos: jax.Array) -> jax.Array:
  """Writes image embeddings [B, N, D] at their sequence positions in x [B, S, D]."""
  b = x.shape[0]
  return x.at[jnp.arange(b)[:, None], image_pos].set(image_embeds.astype(x.dtype))


def gather_image(h: jax.Array, image_pos: jax.Array) -> jax.Array:
  """Hidden states at the image positions: [B, S, D] -> [B, N, D] (no shift, method.md §1.8)."""
  return jnp.take_along_axis(h, image_pos[..., None], axis=1)
