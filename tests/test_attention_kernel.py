"""The fused attention kernel (models/flash_attention.py) against the einsum reference.

On CPU the kernel runs in Pallas interpret mode, with 8-token tiles so every layout spans several
query and key tiles (live, skipped and partly masked ones). The TPU build is checked by compiling
for a TPU topology when libtpu is installed (requirements-aot.txt).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmar_jax.models import attention as attn
from mmar_jax.models.flash_attention import _block_stats, _live_table, flash_attention
from mmar_jax.parallel.mesh import make_mesh

BLOCK = 8


def structure(*rows):
  """(seg, blk) int32 [B, L] from rows of parts: ("text", n) one block per token, ("img", n) one
  shared block, ("pad", n) segment 0; ("next", 0) starts a new packed sample in the row."""
  segs, blks = [], []
  for parts in rows:
    seg, blk, s, b = [], [], 1, 0
    for kind, n in parts:
      if kind == "next":
        s, b = s + 1, 0
      elif kind == "pad":
        seg += [0] * n
        blk += [0] * n
      elif kind == "text":
        seg += [s] * n
        blk += list(range(b + 1, b + n + 1))
        b += n
      elif kind == "img":
        b += 1
        seg += [s] * n
        blk += [b] * n
    segs.append(seg)
    blks.append(blk)
  assert len({len(s) for s in segs}) == 1, "rows must have one length"
  return jnp.asarray(segs, jnp.int32), jnp.asarray(blks, jnp.int32)


LENGTH = 17  # odd, and not a multiple of the tile: the kernel pads it
LAYOUTS = {
    "text_only": [[("text", 17)], [("text", 9)]],
    "text_img": [[("text", 3), ("img", 8), ("text", 2)], [("text", 1), ("img", 8), ("text", 1)]],
    "img_text": [[("text", 1), ("img", 8), ("text", 4)], [("img", 10), ("text", 3)]],
    "two_images": [[("text", 2), ("img", 5), ("text", 3), ("img", 6), ("text", 1)],
                   [("img", 4), ("text", 2), ("img", 9), ("text", 2)]],
    "left_padding": [[("pad", 5), ("text", 2), ("img", 7), ("text", 3)],
                     [("pad", 11), ("text", 3), ("img", 3)]],
    "packed": [[("text", 4), ("img", 5), ("next", 0), ("img", 4), ("text", 4)],
               [("text", 6), ("next", 0), ("text", 5)]],
}
# Every layout's rows in one batch (right-padded to LENGTH): one compile per head layout.
ROWS = [row + [("pad", LENGTH - sum(n for _, n in row))] for rows in LAYOUTS.values() for row in rows]
HEADS = {"gqa_14_2": (14, 2), "gqa_28_4": (28, 4)}


def _inputs(seg, h, kv, hd=8, dtype=jnp.float32, seed=0):
  b, length = seg.shape
  kq, kk, kvv, kc = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, length, h, hd), dtype)
  k = jax.random.normal(kk, (b, length, kv, hd), dtype)
  v = jax.random.normal(kvv, (b, length, kv, hd), dtype)
  cot = jax.random.normal(kc, (b, length, h, hd), jnp.float32)
  return q, k, v, cot


def _einsum(q, k, v, seg, blk):
  return attn.attend(q, k, v, attn.structure_mask(seg, blk, seg, blk))


def _kernel(q, k, v, seg, blk):
  return flash_attention(q, k, v, seg, blk, seg, blk, block_q=BLOCK, block_k=BLOCK, interpret=True)


def _value_and_grads(fn, q, k, v, cot, seg, blk):
  out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, seg, blk), q, k, v)
  return out, pullback(cot.astype(out.dtype))


_ref = jax.jit(lambda *a: _value_and_grads(_einsum, *a))
_flash = jax.jit(lambda *a: _value_and_grads(_kernel, *a))


def _max_diffs(seg, blk, h, kv, dtype=jnp.float32, mesh=None):
  q, k, v, cot = _inputs(seg, h, kv, dtype=dtype)
  out_r, grads_r = _ref(q, k, v, cot, seg, blk)
  if mesh is None:
    out_k, grads_k = _flash(q, k, v, cot, seg, blk)
  else:
    with jax.set_mesh(mesh):
      out_k, grads_k = _flash(q, k, v, cot, seg, blk)
  assert np.isfinite(np.asarray(out_k, np.float32)).all()
  diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
  return diff(out_r, out_k), [diff(a, b) for a, b in zip(grads_r, grads_k)], out_k, grads_k


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_kernel_matches_einsum(heads, cpu_devices):
  """28/4 runs under a (data 1, fsdp 2, tensor 2) mesh: the kernel then runs per shard inside
  shard_map, batch split over fsdp and heads over tensor."""
  seg, blk = structure(*ROWS)
  mesh = make_mesh("1,2,2", devices=cpu_devices[:4]) if heads == "gqa_28_4" else None
  d_out, d_grads, out, grads = _max_diffs(seg, blk, *HEADS[heads], mesh=mesh)
  print(f"{heads}: max |out diff| {d_out:.2e}, max |dq, dk, dv diff| {d_grads}")
  assert d_out < 2e-5, d_out
  assert max(d_grads) < 2e-4, d_grads
  pad = np.asarray(seg) == 0
  # Padding queries: zero output and zero gradient, never NaN.
  assert not np.asarray(out)[pad].any()
  assert not np.asarray(grads[0])[pad].any()


@pytest.mark.slow  # one more interpreter compile (about 20 s on 2 cores)
def test_bf16_inputs_match_einsum_to_bf16_rounding():
  seg, blk = structure(*ROWS)
  d_out, d_grads, _, _ = _max_diffs(seg, blk, 14, 2, dtype=jnp.bfloat16)
  # bf16 probabilities: the kernel rounds exp(s - m) before normalising, einsum after.
  assert d_out < 3e-2, d_out
  assert max(d_grads) < 1e-1, d_grads


def test_skipped_tiles_hold_no_visible_pair():
  """The block-range test may keep a dead tile, never drop a live one; for causal text it is
  exact, so the upper triangle of tiles is skipped."""
  seg, blk = structure(*[row + [("pad", 24 - LENGTH)] for row in ROWS] + [[("text", 24)]])
  live = np.asarray(_live_table(_block_stats(seg, blk, BLOCK, query=True),
                                _block_stats(seg, blk, BLOCK, query=False)))
  b, n = seg.shape[0], seg.shape[1] // BLOCK
  dense = np.asarray(attn.structure_mask(seg, blk, seg, blk))[:, 0].reshape(b, n, BLOCK, n, BLOCK)
  assert not np.any(dense.any((2, 4)) & ~live)
  np.testing.assert_array_equal(live[-1], np.tril(np.ones((n, n), bool)))


def test_unknown_implementation_is_named():
  q = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="'flassh'"):
    attn.attend(q, q, q, None, implementation="flassh")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-aot.txt)")
def test_kernel_compiles_for_tpu():
  """Mosaic lowers and compiles the forward and both backward kernels for a v5p chip, at the
  0.5B backbone's head layout and MMAR's training length."""
  from jax.experimental import topologies
  devices = topologies.get_topology_desc("v5p:2x2x1", "tpu", chip_config_name="megacore").devices
  mesh = make_mesh("1,-1,1", devices=devices)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  b, length, h, kv, hd = len(devices), 400, 14, 2, 64
  shape = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=batch)
  args = (shape((b, length, h, hd), jnp.bfloat16), shape((b, length, kv, hd), jnp.bfloat16),
          shape((b, length, kv, hd), jnp.bfloat16), shape((b, length), jnp.int32),
          shape((b, length), jnp.int32))

  def loss(q, k, v, seg, blk):
    return flash_attention(q, k, v, seg, blk, seg, blk).astype(jnp.float32).sum()

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  # The forward kernel and the two backward kernels, as Mosaic custom calls.
  assert compiled.as_text().count("tpu_custom_call") >= 3


@pytest.mark.slow  # a decoder's worth of interpreter compiles: past the default run's budget
def test_qwen2_backbone_with_the_kernel():
  """`model.attention = flash_interpret` through the decoder equals einsum, left padding
  included; with a KV cache the flash names decode through einsum."""
  from flax import nnx
  from mmar_jax.models.qwen2 import Qwen2, Qwen2Config, text_structure
  cfg = Qwen2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, compute_dtype="float32")
  ref = Qwen2(cfg, rngs=nnx.Rngs(0))
  fused = Qwen2(cfg.replace(attention="flash_interpret"), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
  pos, seg, blk = text_structure(jnp.asarray([[1] * 9, [0] * 4 + [1] * 5]))
  a, _ = ref(ref.embed(ids), pos, seg, blk)
  b, _ = fused(fused.embed(ids), pos, seg, blk)
  real = np.asarray(seg, bool)
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)
  step = lambda m: m(m.embed(ids[:, :1]), pos[:, :1], seg[:, :1], blk[:, :1],
                     cache=m.init_cache(2, 4), cache_index=0)[0]
  np.testing.assert_allclose(np.asarray(step(ref)), np.asarray(step(fused)), atol=1e-6)


def _fused_vs_einsum(implementation: str):
  """Max |difference| of values and gradients from the fp32 einsum on bf16 inputs: of the named
  `jax.nn.dot_product_attention` implementation, and of the einsum path run in bf16 (the
  rounding every bf16 attention pays), over every layout and both head layouts."""
  seg, blk = structure(*[row + [("pad", 32 - sum(n for _, n in row))] for rows in LAYOUTS.values()
                         for row in rows])
  mask = attn.structure_mask(seg, blk, seg, blk)
  f32 = lambda x: x.astype(jnp.float32)
  found = {}
  for name, (h, kv) in HEADS.items():
    q, k, v, cot = _inputs(seg, h, kv, hd=64, dtype=jnp.bfloat16)
    run = lambda fn, *a: jax.jit(lambda *a: _value_and_grads(fn, *a))(*a, cot, seg, blk)
    ref = run(lambda q, k, v, s, b: attn.attend(q, k, v, mask), f32(q), f32(k), f32(v))
    diffs = {}
    for impl in ("einsum", implementation):
      out, grads = run(lambda q, k, v, s, b, impl=impl: attn.attend(q, k, v, mask, implementation=impl),
                       q, k, v)
      assert np.isfinite(np.asarray(f32(out))).all()
      assert not np.asarray(f32(out))[np.asarray(seg) == 0].any()  # padding queries: zeros
      diffs[impl] = [float(jnp.max(jnp.abs(f32(a) - f32(b)))) for a, b in zip((out, *grads),
                                                                                (ref[0], *ref[1]))]
    found[name] = diffs
  return found


def test_cudnn_matches_einsum_on_gpu():
  """`model.attention = cudnn` (what launch/gpu_bench.sh times) computes MMAR's mask: within
  twice the bf16 einsum's own error of the fp32 reference, values and dq, dk, dv."""
  if jax.default_backend() != "gpu":
    pytest.skip("cuDNN attention needs an NVIDIA GPU (CPU runs use einsum)")
  for name, diffs in _fused_vs_einsum("cudnn").items():
    print(f"{name}: max |diff| from fp32 (out, dq, dk, dv): bf16 einsum {diffs['einsum']}, "
          f"cudnn {diffs['cudnn']}")
    for fused, own in zip(diffs["cudnn"], diffs["einsum"]):
      assert fused <= 2 * own + 1e-3, diffs
