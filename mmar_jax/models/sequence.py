"""Sequence assembly for the three sample kinds, mixed in one padded batch (method.md §1.6-1.7).

  kind 0  [text] <boi> [img] <eoi>          P(I|T)
  kind 1  <boi> [img] <eoi> [text]          P(T|I)
  kind 2  <boi> [img] <eoi>                 P(I)   (also a [text][img] sample whose caption was
                                                    dropped for guidance: its text is empty)

Every sample is laid out in the same slot space -- Lt text slots, <boi>, N image slots, <eoi> --
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

  # Block ids and positions in slot space; an image counts as one step (or N with per-token).
  boi_blk = jnp.where(text_first, t, 0)
  text_blk = jnp.where(text_first, j, 3 + j)
  img_blk = jnp.broadcast_to(boi_blk + 1, (b, n))
  eoi_blk = boi_blk + 2
  blocks = jnp.concatenate([text_blk, boi_blk, img_blk, eoi_blk], axis=1)
  if per_token_positions:
    img_pos = boi_blk + 1 + jnp.arange(n)[None, :]
    eoi_pos = boi_blk + n + 1
    text_pos = jnp.where(text_first, j, n + 2 + j)
    positions = jnp.concatenate([text_pos, boi_blk, img_pos, eoi_pos], axis=1)
  else:
    positions = blocks
  seg = jnp.concatenate([real_text, jnp.ones((b, n + 2), bool)], axis=1).astype(jnp.int32)
  gather = lambda x: jnp.take_along_axis(x, order, axis=1)
  return dict(order=order, positions=gather(positions), segment_ids=gather(seg),
              block_ids=gather(blocks), image_pos=img_seq, text_len=text_len)


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
