"""Compute only where the loss is: the LM head on text-target positions with a vocabulary-tiled
cross-entropy, the diffusion head on the generation samples' rows. The reference is the full
computation (every position through the LM head's logits, every row through the head), kept as
`loss.text_rows=all`, `loss.vocab_tiles=0`, `loss.head_rows=all`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from mmar_jax.data.pipeline import Batcher, generation_samples, kind_counts
from mmar_jax.models import sequence
from mmar_jax.models.mmar import MMAR, combine, model_config

MIX = "0.45,0.45,0.1"
FULL = dict(target_rows=None, vocab_tiles=0, head_samples=None)


@pytest.fixture(scope="module")
def case(bytes_tokenizer, demo_batcher):
  """A learned-variance fp32 tiny MMAR with every weight perturbed (a fresh head outputs exactly
  0, which would hide its gradients), and a prepared batch with all three kinds, padding, a
  dropped caption and diffusion_batch_mul 2."""
  config = tiny_config(("model.head.learn_sigma", "true"), ("data.mix", MIX))
  mcfg = model_config(config, bytes_tokenizer)
  graphdef, params = nnx.split(MMAR(mcfg, rngs=nnx.Rngs(0)))
  params = params.to_pure_dict()
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys)])
  batch = jax.tree.map(jnp.asarray, demo_batcher.local_batch(0))
  model = nnx.merge(graphdef, params)
  prep = model.prepare(batch, jax.random.key(11), jnp.float32(0.6), 0.5, 2)
  counts = {k: prep.pop(k) for k in ("text_count", "image_count")}
  kind, text_len = np.asarray(prep["kind"]), np.asarray(prep["text_len"])
  assert set(kind.tolist()) == {0, 1, 2}
  assert ((kind == sequence.TEXT_TO_IMAGE) & (text_len == 0)).any(), "no dropped caption"
  assert (text_len[kind != sequence.IMAGE_ONLY] < mcfg.max_text_len).all()  # padding
  compact = dict(target_rows=mcfg.max_text_len + 1, vocab_tiles=3,
                 head_samples=generation_samples(MIX, len(kind)))
  return graphdef, params, prep, counts, mcfg, compact


def _loss_and_grads(graphdef, rows):
  def f(params, prep, counts):
    sums = nnx.merge(graphdef, params).loss_sums(prep, **rows)
    loss, parts = combine(sums, counts, 1.0, 1.0)
    return loss, (parts, sums["dropped"])
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _compare(ref, got):
  (_, (ref_parts, _)), ref_grads = ref
  (_, (parts, dropped)), grads = got
  assert int(dropped) == 0
  for k in ("loss_text", "loss_image"):
    a, b = float(parts[k]), float(ref_parts[k])
    assert b > 0 and abs(a - b) / b < 1e-6, (k, a, b)
  worst = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    r = np.asarray(ref_grads_at(ref_grads, path))
    scale = np.max(np.abs(r))
    if scale == 0:  # frozen or unused leaves (the patchify tokenizer has none)
      assert np.max(np.abs(np.asarray(g))) == 0
      continue
    worst[jax.tree_util.keystr(path)] = float(np.max(np.abs(np.asarray(g) - r)) / scale)
  assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
  return worst


def ref_grads_at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_compact_loss_equals_the_full_computation(case):
  graphdef, params, prep, counts, mcfg, compact = case
  ref = _loss_and_grads(graphdef, FULL)(params, prep, counts)
  got = _loss_and_grads(graphdef, compact)(params, prep, counts)
  worst = _compare(ref, got)
  print(f"{len(worst)} leaves, worst relative gradient difference {max(worst.values()):.2e}")
  assert any("head" in k for k in worst) and any("embed_tokens" in k for k in worst)


@pytest.mark.slow  # three more compiles of the step's loss
@pytest.mark.parametrize("switch", ["target_rows", "vocab_tiles", "head_samples"])
def test_each_switch_alone_equals_the_full_computation(case, switch):
  graphdef, params, prep, counts, mcfg, compact = case
  ref = _loss_and_grads(graphdef, FULL)(params, prep, counts)
  _compare(ref, _loss_and_grads(graphdef, dict(FULL, **{switch: compact[switch]}))(
      params, prep, counts))


@pytest.mark.slow  # by default: one device here, and test_train's meshes
def test_compact_loss_on_a_mesh_of_8(case, cpu_devices):
  """The same prepared batch, sharded over 8 devices (data axis), against one device's full
  computation."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mmar_jax.parallel import sharding
  from mmar_jax.parallel.mesh import make_mesh
  graphdef, params, prep, counts, mcfg, compact = case
  ref = _loss_and_grads(graphdef, FULL)(params, prep, counts)
  mesh = make_mesh("8,1,1", devices=cpu_devices)
  rules = tiny_config().sharding_rules
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    placed = jax.device_put(prep, rows)
    got = _loss_and_grads(graphdef, compact)(params, placed, counts)
  _compare(ref, got)


def test_a_batch_with_more_generation_samples_reports_them(case):
  """Capacity below the batch's generation samples: the overflow is counted, never silent."""
  graphdef, params, prep, counts, mcfg, compact = case
  small = dict(compact, head_samples=compact["head_samples"] - 2)
  (_, (_, dropped)), _ = _loss_and_grads(graphdef, small)(params, prep, counts)
  assert int(dropped) == 2


def test_kind_counts_are_fixed_per_batch(bytes_tokenizer):
  from mmar_jax.data.shapes import ShapesDataset, ShapesSpec
  assert kind_counts("0.45,0.45,0.1", 8) == (4, 3, 1)  # 3.6, 3.6, 0.8 by largest remainder
  assert kind_counts("1,0,0", 5) == (5, 0, 0)
  assert sum(kind_counts("0.3,0.3,0.4", 7)) == 7
  src = ShapesDataset(ShapesSpec(image_size=16))
  b = Batcher(src, bytes_tokenizer, batch_size=8, max_text_len=40, seed=3, mix=MIX)
  kinds = [tuple(np.bincount(b.local_batch(s)["kind"], minlength=3)) for s in range(6)]
  assert set(kinds) == {(4, 3, 1)}
  orders = {tuple(b.local_batch(s)["kind"]) for s in range(6)}
  assert len(orders) > 1  # placed by a permutation per batch, not always the same slots
  # A resume point that is not a multiple of the batch (the batch size changed): still fixed.
  b.resume(10, 13)
  assert {tuple(np.bincount(b.local_batch(s)["kind"], minlength=3)) for s in (10, 11)} == {(4, 3, 1)}


def test_a_replaced_bad_record_keeps_its_slot_kind(bytes_tokenizer):
  from mmar_jax.data.shapes import ShapesDataset, ShapesSpec

  class Holes:
    def __init__(self, base):
      self.base = base

    def __len__(self):
      return len(self.base)

    def __getitem__(self, i):
      if i % 3 == 0:
        raise OSError("unreadable")
      return self.base[i]

  src = Holes(ShapesDataset(ShapesSpec(image_size=16)))
  b = Batcher(src, bytes_tokenizer, batch_size=8, max_text_len=40, seed=3, mix=MIX)
  batch = b.local_batch(0)
  assert b.counters.skipped > 0
  assert tuple(np.bincount(batch["kind"], minlength=3)) == (4, 3, 1)
  assert [int(k) for k in batch["kind"]] == [b.kind(i) for i in range(8)]
