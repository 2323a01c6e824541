"""Fused (flash-style) attention for MMAR's structure: a Pallas kernel for TPU (Mosaic).

The mask is never materialised: each [block_q, block_k] tile derives it from the per-token ids
(attention.py's rule: key j is visible to query i iff seg[j] == seg[i] != 0 and
block[j] <= block[i]), so causal text, bidirectional image blocks, packed samples and padding
need no static mask. jax's own TPU kernels (flash_attention, splash) take a causal flag or a
static mask; MMAR's varies per row (where the image sits, how long the caption is), hence a
kernel of our own.

Forward: online softmax over key blocks with fp32 statistics and accumulator. Backward: the
FlashAttention-2 recurrences in two kernels (dK/dV walking query blocks, dQ walking key blocks),
recomputing probabilities from the saved log-sum-exp. Tiles no query of which can see any key
(judged per block from the ids' ranges) skip their matmuls, and their K/V (or Q) fetch is
clamped to a live block so the pipeline does not copy them either.

GQA as `attention.attend`: query head h reads kv head h // (H / KV). A padding query (no
visible key) gives zeros and zero gradients. Under a mesh the kernel runs per shard inside
`shard_map` (a Mosaic call is not partitioned by XLA): batch as the 'batch' rule says, heads
over 'tensor' when both H and KV divide it.

`interpret=True` runs the same kernel through Pallas' interpreter (CPU tests); the TPU build is
checked by compiling for a TPU topology (tests/test_attention_kernel.py). GPU: use
`attention = "cudnn"` (jax.nn.dot_product_attention); this kernel is Mosaic-only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from mmar_jax.parallel.sharding import spec_for

# Finite stand-ins for -inf / +inf: exp() of their differences is exactly 0 and never NaN.
_NEG = -1e30
_BIG_SEG = 2 ** 30
# The log-sum-exp is stored [B, H, _LSE_ROWS, T] (the row repeated), so its tiles are native
# (8, 128) TPU tiles rather than a [.., T, 1] column that pads to 128 lanes in HBM.
_LSE_ROWS = 8
_LANES = 128


# -- which tiles can hold a visible pair -----------------------------------------------------------

def _block_stats(seg, blk, block: int, *, query: bool):
  """Per block of `block` tokens: [B, n, 3] int32 (block id bound, min and max non-zero segment).
  Queries keep the largest block id (what they may see up to), keys the smallest."""
  b, length = seg.shape
  seg = seg.reshape(b, length // block, block)
  blk = blk.reshape(b, length // block, block)
  real = seg != 0
  bound = blk.max(-1) if query else blk.min(-1)
  seg_min = jnp.where(real, seg, _BIG_SEG).min(-1)
  seg_max = jnp.where(real, seg, -1).max(-1)
  return jnp.stack([bound, seg_min, seg_max], -1).astype(jnp.int32)


def _live_table(qstat, kstat):
  """bool [B, nq, nk]: may the tile hold a visible pair (a conservative test on the ranges)."""
  q, k = qstat[:, :, None, :], kstat[:, None, :, :]
  return ((k[..., 0] <= q[..., 0]) & (k[..., 1] <= q[..., 2]) & (q[..., 1] <= k[..., 2]))


def _live_range(live, axis: int):
  """[B, n] int32 first and last live index along `axis` (0, 0 where none is live): fetches of
  dead tiles are clamped into this range, so a skipped tile costs no copy."""
  n = live.shape[axis]
  idx = jnp.arange(n, dtype=jnp.int32).reshape([-1 if a == axis else 1 for a in range(3)])
  first = jnp.where(live, idx, n).min(axis)
  last = jnp.where(live, idx, -1).max(axis)
  any_live = last >= 0
  return jnp.where(any_live, first, 0).astype(jnp.int32), jnp.where(any_live, last, 0).astype(jnp.int32)


# Grid indices are non-negative: lax.div / lax.rem (truncating) are exact here, and unlike
# Python's // and % they lower to Mosaic without asking which TPU it is.
def _is_live(qstat_ref, kstat_ref, b, qi, ki, nq: int, nk: int):
  qo, ko = (b * nq + qi) * 3, (b * nk + ki) * 3
  return ((kstat_ref[ko] <= qstat_ref[qo]) & (kstat_ref[ko + 1] <= qstat_ref[qo + 2])
          & (qstat_ref[qo + 1] <= kstat_ref[ko + 2]))


# -- tile math shared by the kernels ---------------------------------------------------------------

def _tile_mask(q_seg, q_blk, k_seg, k_blk):
  """bool [bq, bk] from ids [bq, 1] (queries) and [1, bk] (keys)."""
  return (q_seg == k_seg) & (k_seg != 0) & (k_blk <= q_blk)


def _scores(q, k, scale):
  """fp32 q k^T * scale for tiles q [bq, hd], k [bk, hd]."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return s * scale


def _lse_column(lse_ref):
  """The stored [_LSE_ROWS, bq] log-sum-exp tile as a [bq, 1] column."""
  return jnp.transpose(lse_ref[...])[:, :1]


# -- forward ---------------------------------------------------------------------------------------

def _fwd_kernel(qstat_ref, kstat_ref, _klo, _khi, q_seg, q_blk, k_seg, k_blk, q_ref, k_ref, v_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, nq, nk):
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_is_live(qstat_ref, kstat_ref, b, qi, ki, nq, nk))
  def _step():
    mask = _tile_mask(q_seg[...], q_blk[...], k_seg[...], k_blk[...])
    s = jnp.where(mask, _scores(q_ref[...], k_ref[...], scale), _NEG)
    m_prev = m_sc[...]                                      # [bq, lanes], lanes all equal
    m_new = jnp.maximum(m_prev, s.max(-1, keepdims=True))
    # A fully masked row keeps m = _NEG; p is zeroed by the mask, not by exp underflow.
    p = jnp.where(mask, jnp.exp(s - m_new[:, :1]), 0.0)
    corr = jnp.exp(m_prev - m_new)
    l_sc[...] = corr * l_sc[...] + p.sum(-1, keepdims=True)
    m_sc[...] = m_new
    pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_sc[...] = corr[:, :1] * acc_sc[...] + pv

  @pl.when(ki == nk - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_sc[...] * inv[:, :1]).astype(o_ref.dtype)
    # Rows that saw nothing get +inf-like lse: exp(s - lse) is 0 in the backward.
    lse = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -_NEG)
    lse_ref[...] = jnp.transpose(lse)[:_LSE_ROWS]


# -- backward --------------------------------------------------------------------------------------

def _probs_and_dscores(q, k, v, do, o, lse, mask, scale):
  """The recomputed probabilities p and the score gradient ds (both fp32 [bq, bk])."""
  p = jnp.where(mask, jnp.exp(_scores(q, k, scale) - lse), 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1, keepdims=True)
  return p, p * (dp - delta)


def _dkv_kernel(qstat_ref, kstat_ref, _qlo, _qhi, q_seg, q_blk, k_seg, k_blk, q_ref, k_ref, v_ref,
                o_ref, do_ref, lse_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, nq, nk, steps):
  b, ki, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  qi = jax.lax.rem(j, nq)

  @pl.when(j == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_is_live(qstat_ref, kstat_ref, b, qi, ki, nq, nk))
  def _step():
    mask = _tile_mask(q_seg[...], q_blk[...], k_seg[...], k_blk[...])
    q, do = q_ref[...], do_ref[...]
    p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, o_ref[...], _lse_column(lse_ref),
                               mask, scale)
    tn = (((0,), (0,)), ((), ()))  # contract the query axis: p^T do, ds^T q
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=jnp.float32)
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                      preferred_element_type=jnp.float32) * scale

  @pl.when(j == steps - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(qstat_ref, kstat_ref, _klo, _khi, q_seg, q_blk, k_seg, k_blk, q_ref, k_ref, v_ref,
               o_ref, do_ref, lse_ref, dq_ref, dq_sc, *, scale, nq, nk):
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(_is_live(qstat_ref, kstat_ref, b, qi, ki, nq, nk))
  def _step():
    mask = _tile_mask(q_seg[...], q_blk[...], k_seg[...], k_blk[...])
    k = k_ref[...]
    _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], o_ref[...],
                               _lse_column(lse_ref), mask, scale)
    dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32) * scale

  @pl.when(ki == nk - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


# -- the pallas calls ------------------------------------------------------------------------------

class _Opts(NamedTuple):
  """Static kernel options (hashable: a non-differentiable custom_vjp argument)."""
  block_q: int
  block_k: int
  interpret: bool


def _structure(ids, opts):
  """Scalar-prefetch operands: flattened block stats and the live ranges in both directions."""
  q_seg, q_blk, k_seg, k_blk = ids
  qstat = _block_stats(q_seg, q_blk, opts.block_q, query=True)
  kstat = _block_stats(k_seg, k_blk, opts.block_k, query=False)
  live = _live_table(qstat, kstat)
  k_lo, k_hi = _live_range(live, axis=2)  # per query block
  q_lo, q_hi = _live_range(live, axis=1)  # per key block
  flat = lambda x: x.reshape(-1)
  return flat(qstat), flat(kstat), (flat(k_lo), flat(k_hi)), (flat(q_lo), flat(q_hi))


def _id_specs(bq, bk, q_index, k_index):
  """BlockSpecs of the ids: queries as [B, T, 1] columns, keys as [B, 1, S] rows."""
  col = pl.BlockSpec((None, bq, 1), lambda *a: (a[0], q_index(*a), 0))
  row = pl.BlockSpec((None, 1, bk), lambda *a: (a[0], 0, k_index(*a)))
  return [col, col, row, row]


def _id_operands(ids):
  q_seg, q_blk, k_seg, k_blk = (x.astype(jnp.int32) for x in ids)
  return q_seg[:, :, None], q_blk[:, :, None], k_seg[:, None, :], k_blk[:, None, :]


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _cost(q, k, matmuls: int, operands) -> pl.CostEstimate:
  """What XLA's cost analysis should count for a kernel (it sees a Mosaic call as free): `matmuls`
  [T, S] x hd products per query head, dense (skipped tiles not subtracted), one exp per score."""
  b, h, t, hd = q.shape
  pairs = b * h * t * k.shape[2]
  return pl.CostEstimate(flops=2 * matmuls * pairs * hd, transcendentals=pairs,
                         bytes_accessed=sum(x.size * x.dtype.itemsize for x in operands))


def _forward(q, k, v, ids, opts, scale):
  """q [B, H, T, hd], k/v [B, KV, S, hd] -> (o [B, H, T, hd], lse [B, H, _LSE_ROWS, T])."""
  b, h, t, hd = q.shape
  kvh, s = k.shape[1], k.shape[2]
  g, bq, bk = h // kvh, opts.block_q, opts.block_k
  nq, nk = t // bq, s // bk
  qstat, kstat, (k_lo, k_hi), _ = _structure(ids, opts)

  def kv_block(bi, hi, qi, ki, qs, ks, lo, hi_):
    return jnp.clip(ki, lo[bi * nq + qi], hi_[bi * nq + qi])

  qmap = lambda bi, hi, qi, ki, *_: (bi, hi, qi, 0)
  kvmap = lambda bi, hi, qi, ki, *r: (bi, jax.lax.div(hi, g), kv_block(bi, hi, qi, ki, *r), 0)
  in_specs = _id_specs(bq, bk, lambda bi, hi, qi, ki, *_: qi,
                       lambda bi, hi, qi, ki, *r: kv_block(bi, hi, qi, ki, *r))
  in_specs += [pl.BlockSpec((None, None, bq, hd), qmap), pl.BlockSpec((None, None, bk, hd), kvmap),
               pl.BlockSpec((None, None, bk, hd), kvmap)]
  out_specs = [pl.BlockSpec((None, None, bq, hd), qmap),
               pl.BlockSpec((None, None, _LSE_ROWS, bq), lambda bi, hi, qi, ki, *_: (bi, hi, 0, qi))]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(b, h, nq, nk), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                      pltpu.VMEM((bq, hd), jnp.float32)])
  kernel = functools.partial(_fwd_kernel, scale=scale, nq=nq, nk=nk)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, _LSE_ROWS, t), jnp.float32)],
      compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=opts.interpret, cost_estimate=_cost(q, k, 2, (q, k, v, q)),
  )(qstat, kstat, k_lo, k_hi, *_id_operands(ids), q, k, v)


def _backward(q, k, v, o, lse, do, ids, opts, scale):
  b, h, t, hd = q.shape
  kvh, s = k.shape[1], k.shape[2]
  g, bq, bk = h // kvh, opts.block_q, opts.block_k
  nq, nk = t // bq, s // bk
  qstat, kstat, (k_lo, k_hi), (q_lo, q_hi) = _structure(ids, opts)
  operands = (*_id_operands(ids), q, k, v, o, do, lse)

  # dK, dV: grid (B, KV, key block, G * query block); the last axis walks every query head of
  # the group and every query block, accumulating into one kv head's tile.
  def q_block(bi, ki, j, lo, hi_):
    return jnp.clip(jax.lax.rem(j, nq), lo[bi * nk + ki], hi_[bi * nk + ki])

  qmap = lambda bi, hk, ki, j, qs, ks, lo, hi_: (bi, hk * g + jax.lax.div(j, nq), q_block(bi, ki, j, lo, hi_), 0)
  kmap = lambda bi, hk, ki, j, *_: (bi, hk, ki, 0)
  lmap = lambda bi, hk, ki, j, qs, ks, lo, hi_: (bi, hk * g + jax.lax.div(j, nq), 0, q_block(bi, ki, j, lo, hi_))
  qtile, ktile = pl.BlockSpec((None, None, bq, hd), qmap), pl.BlockSpec((None, None, bk, hd), kmap)
  in_specs = _id_specs(bq, bk, lambda bi, hk, ki, j, qs, ks, lo, hi_: q_block(bi, ki, j, lo, hi_),
                       lambda bi, hk, ki, j, *_: ki)
  in_specs += [qtile, ktile, ktile, qtile, qtile,
               pl.BlockSpec((None, None, _LSE_ROWS, bq), lmap)]
  steps = g * nq
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, nq=nq, nk=nk, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, kvh, nk, steps), in_specs=in_specs,
          out_specs=[ktile, ktile],
          scratch_shapes=[pltpu.VMEM((bk, hd), jnp.float32), pltpu.VMEM((bk, hd), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=opts.interpret, cost_estimate=_cost(q, k, 4, (q, k, v, o, do, k, v)),
  )(qstat, kstat, q_lo, q_hi, *operands)

  # dQ: grid (B, H, query block, key block) as the forward.
  def kv_block(bi, qi, ki, lo, hi_):
    return jnp.clip(ki, lo[bi * nq + qi], hi_[bi * nq + qi])

  qmap = lambda bi, hi, qi, ki, *_: (bi, hi, qi, 0)
  kvmap = lambda bi, hi, qi, ki, qs, ks, lo, hi_: (bi, jax.lax.div(hi, g), kv_block(bi, qi, ki, lo, hi_), 0)
  qtile, ktile = pl.BlockSpec((None, None, bq, hd), qmap), pl.BlockSpec((None, None, bk, hd), kvmap)
  in_specs = _id_specs(bq, bk, lambda bi, hi, qi, ki, *_: qi,
                       lambda bi, hi, qi, ki, qs, ks, lo, hi_: kv_block(bi, qi, ki, lo, hi_))
  in_specs += [qtile, ktile, ktile, qtile, qtile,
               pl.BlockSpec((None, None, _LSE_ROWS, bq), lambda bi, hi, qi, ki, *_: (bi, hi, 0, qi))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, h, nq, nk), in_specs=in_specs, out_specs=qtile,
          scratch_shapes=[pltpu.VMEM((bq, hd), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=opts.interpret, cost_estimate=_cost(q, k, 3, (q, k, v, o, do, q)),
  )(qstat, kstat, k_lo, k_hi, *operands)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, ids, opts, scale):
  return _forward(q, k, v, ids, opts, scale)[0]


def _flash_fwd(q, k, v, ids, opts, scale):
  o, lse = _forward(q, k, v, ids, opts, scale)
  return o, (q, k, v, o, lse, ids)


def _flash_bwd(opts, scale, res, do):
  q, k, v, o, lse, ids = res
  dq, dk, dv = _backward(q, k, v, o, lse, do, ids, opts, scale)
  # Integer ids have float0 cotangents.
  zeros = tuple(np.zeros(x.shape, jax.dtypes.float0) for x in ids)
  return dq, dk, dv, zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- the entry point -------------------------------------------------------------------------------

def _pad_to(x, multiple: int, axis: int):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)  # ids pad with 0: padding, never attended


def _local(q, k, v, q_seg, q_blk, k_seg, k_blk, *, block_q, block_k, interpret):
  """The kernel on one shard: [B, T, H, hd] in and out, lengths padded to the blocks."""
  t = q.shape[1]
  bq = min(block_q, _round_up(t, 8))
  bk = min(block_k, _round_up(k.shape[1], 8))
  opts = _Opts(bq, bk, interpret)
  ids = (_pad_to(q_seg, bq, 1), _pad_to(q_blk, bq, 1), _pad_to(k_seg, bk, 1), _pad_to(k_blk, bk, 1))
  heads_first = lambda x, m: jnp.swapaxes(_pad_to(x, m, 1), 1, 2)
  o = _flash(heads_first(q, bq), heads_first(k, bk), heads_first(v, bk), ids, opts,
             q.shape[-1] ** -0.5)
  return jnp.swapaxes(o, 1, 2)[:, :t]


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _shard_specs(q, k):
  """PartitionSpecs of (q-like, kv-like, ids) under the current mesh, or None without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return None
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch = spec_for(q.shape[:1], ("batch",), mesh, fsdp_fallback=False)[0]
  # Heads split only when the kv heads split alike, so head h's kv head stays on its shard.
  t = sizes.get("tensor", 1)
  heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
  return P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


def flash_attention(q, k, v, q_seg, q_blk, k_seg, k_blk, *, block_q: int = 128,
                    block_k: int = 128, interpret: bool = False) -> jax.Array:
  """Attention of q [B, T, H, hd] over k/v [B, S, KV, hd] under the structure ids (int [B, T] for
  the queries, [B, S] for the keys). Returns [B, T, H, hd] in v's dtype."""
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"flash attention: {q.shape[2]} query heads are not a multiple of "
                     f"{k.shape[2]} kv heads")
  if block_q % 8 or block_k % 8:
    raise ValueError(f"flash attention: block sizes must be multiples of 8, got {block_q}, {block_k}")
  local = functools.partial(_local, block_q=block_q, block_k=block_k, interpret=interpret)
  specs = _shard_specs(q, k)
  if specs is None:
    return local(q, k, v, q_seg, q_blk, k_seg, k_blk)
  qs, kvs, ids = specs
  return jax.shard_map(local, in_specs=(qs, kvs, kvs, ids, ids, ids, ids), out_specs=qs,
                       check_vma=False)(q, k, v, q_seg, q_blk, k_seg, k_blk)
