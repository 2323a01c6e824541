"""LM-head cross-entropy with vocabulary tiling.

The text loss needs a logsumexp over the whole vocabulary, and the plain way to get it,
`log_softmax(hidden @ w)`, materialises [rows, vocab] fp32 logits: at Qwen2's vocabulary of
151,936 that is 4.6 GiB for 8k rows, and autodiff keeps them (and a softmax of the same size) for
the backward pass. Here the vocabulary is walked in tiles with `lax.scan` instead: the forward
keeps a streaming logsumexp and picks the target logit out of the tile that holds it, and the
backward recomputes each tile's logits from (hidden, w), so the largest activation is
[rows, vocab / num_tiles]. The price is one extra LM-head matmul in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def tiled_cross_entropy(hidden: jax.Array, w: jax.Array, targets: jax.Array, *, num_tiles: int,
                        compute_dtype, unroll: bool = False) -> jax.Array:
  """Per-row cross-entropy fp32 [R]: logsumexp(logits) - logits[target], never forming logits.

  The logits are those of `Qwen2.logits`: `jnp.dot(hidden.astype(compute_dtype),
  w.astype(compute_dtype), preferred_element_type=jnp.float32)`, with hidden [R, D], the LM-head
  kernel w [D, V] (embed.T for tied embeddings) and int targets [R] in [0, V). num_tiles need not
  divide V. Gradients come back in hidden's and w's dtypes; targets get none. `unroll`: the tiles
  as straight-line code rather than a loop (same values; XLA's cost analysis, which counts a
  loop's body once, then sees every tile).
  """
  if hidden.ndim != 2 or w.ndim != 2 or hidden.shape[1] != w.shape[0]:
    raise ValueError(f"need hidden [R, D] and w [D, V]; got {hidden.shape} and {w.shape}")
  if targets.shape != hidden.shape[:1]:
    raise ValueError(f"targets {targets.shape} do not match hidden rows {hidden.shape[:1]}")
  if int(num_tiles) < 1:
    raise ValueError(f"num_tiles must be >= 1, got {num_tiles}")
  return _tiled_ce(hidden, w, targets.astype(jnp.int32), int(num_tiles), jnp.dtype(compute_dtype),
                   bool(unroll))


def _tiling(vocab: int, num_tiles: int) -> tuple[int, int]:
  """(tile width, number of tiles actually walked)."""
  tile = -(-vocab // min(num_tiles, vocab))
  # ceil(V / tile) can be below num_tiles (V=10, 6 tiles -> width 2, 5 tiles); walking the extra
  # ones would give tiles with no column of their own and an all -inf running max.
  return tile, -(-vocab // tile)


def _tile_logits(h_c, w, targets, i, tile, compute_dtype):
  """Tile i's fp32 logits [R, tile] and where it sits in the vocabulary.

  Rather than padding w to a multiple of the tile (a copy of the whole kernel, and of its
  gradient), the last tile's start is clamped to V - tile, so it overlaps the previous one; the
  columns it shares are masked out (`own`) and counted only by the tile that owns them. That
  wastes exactly the columns padding would.
  """
  vocab = w.shape[1]
  first = i * tile
  start = jnp.minimum(first, vocab - tile)
  # Cast per tile: a compute-dtype copy of the whole kernel would be another [D, V] array.
  w_t = jax.lax.dynamic_slice_in_dim(w, start, tile, axis=1).astype(compute_dtype)
  logits = jnp.dot(h_c, w_t, preferred_element_type=jnp.float32)
  cols = start + jnp.arange(tile)
  own = cols >= first
  is_target = (cols[None, :] == targets[:, None]) & own[None, :]
  return logits, w_t, start, own, is_target


def _forward(hidden, w, targets, num_tiles, compute_dtype, unroll):
  tile, n = _tiling(w.shape[1], num_tiles)
  h_c = hidden.astype(compute_dtype)
  rows = hidden.shape[0]

  def step(carry, i):
    run_max, run_sum, target_logit = carry
    logits, _, _, own, is_target = _tile_logits(h_c, w, targets, i, tile, compute_dtype)
    logits = jnp.where(own[None, :], logits, -jnp.inf)
    # Online logsumexp: rescale the running sum to the new max so exp never overflows.
    new_max = jnp.maximum(run_max, logits.max(axis=1))
    run_sum = (run_sum * jnp.exp(run_max - new_max) +
               jnp.exp(logits - new_max[:, None]).sum(axis=1))
    # Exactly one tile owns each target column, so this sum adds the target logit once.
    target_logit = target_logit + jnp.where(is_target, logits, 0.0).sum(axis=1)
    return (new_max, run_sum, target_logit), None

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  (run_max, run_sum, target_logit), _ = jax.lax.scan(step, init, jnp.arange(n), unroll=unroll)
  lse = run_max + jnp.log(run_sum)
  return lse - target_logit, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tiled_ce(hidden, w, targets, num_tiles, compute_dtype, unroll):
  return _forward(hidden, w, targets, num_tiles, compute_dtype, unroll)[0]


def _tiled_ce_fwd(hidden, w, targets, num_tiles, compute_dtype, unroll):
  loss, lse = _forward(hidden, w, targets, num_tiles, compute_dtype, unroll)
  # Only [R]-sized lse beyond the inputs: the tiles' logits are recomputed in the backward.
  return loss, (hidden, w, targets, lse)


def _tiled_ce_bwd(num_tiles, compute_dtype, unroll, res, g):
  hidden, w, targets, lse = res
  tile, n = _tiling(w.shape[1], num_tiles)
  h_c = hidden.astype(compute_dtype)
  g = g.astype(jnp.float32)

  def step(carry, i):
    d_hidden, d_w = carry
    logits, w_t, start, own, is_target = _tile_logits(h_c, w, targets, i, tile, compute_dtype)
    probs = jnp.exp(logits - lse[:, None])
    d_logits = jnp.where(own[None, :], (probs - is_target) * g[:, None], 0.0)
    # The matmuls take the compute dtype like the forward's (bf16 runs at MXU/tensor-core rate);
    # their fp32 results are what is accumulated across tiles.
    d_logits = d_logits.astype(compute_dtype)
    d_hidden = d_hidden + jnp.dot(d_logits, w_t.T, preferred_element_type=jnp.float32)
    d_w_t = jnp.dot(h_c.T, d_logits, preferred_element_type=jnp.float32).astype(d_w.dtype)
    # The clamped last tile must not overwrite columns the previous tile already wrote.
    old = jax.lax.dynamic_slice_in_dim(d_w, start, tile, axis=1)
    d_w = jax.lax.dynamic_update_slice_in_dim(d_w, jnp.where(own[None, :], d_w_t, old), start,
                                              axis=1)
    return (d_hidden, d_w), None

  init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
  (d_hidden, d_w), _ = jax.lax.scan(step, init, jnp.arange(n), unroll=unroll)
  return d_hidden.astype(hidden.dtype), d_w, None


_tiled_ce.defvjp(_tiled_ce_fwd, _tiled_ce_bwd)
