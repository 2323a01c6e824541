"""The Qwen2 backbone against transformers: fp32 logits, greedy decoding with the KV cache, and
the PartitionSpecs of its stacked parameters on an 8-device mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers_hf as H
from mmar_jax.models.qwen2 import REMAT_POLICIES, Qwen2, Qwen2Config
from mmar_jax.parallel.sharding import param_specs
from mmar_jax.repro.hf_parity import compare_logits, jax_logits, torch_logits

SEQ, PAD = 520, 37  # one prompt of 520 tokens and a row left-padded by 37 in the same batch


@pytest.mark.parametrize("name", ["base", "tied_mqa", "odd_heads"])
def test_fp32_logits_match_transformers(name):
  hf_dir = H.tiny_hf(name)
  ids, mask = H.left_padded_batch(256, SEQ, PAD)
  ref = torch_logits(H.torch_model(hf_dir), ids, mask)
  got = jax_logits(H.jax_model(hf_dir), ids, mask)
  assert got.shape == ref.shape == (2, SEQ, 256)
  np.testing.assert_array_less(np.abs(got[0] - ref[0]).max(), 1e-4)
  np.testing.assert_array_less(np.abs(got[1, PAD:] - ref[1, PAD:]).max(), 1e-4)
  stats = compare_logits(ref[1, PAD:], got[1, PAD:])
  assert stats["argmax_agree"] == 1.0 and stats["mean_kl"] < 1e-9, stats


def test_greedy_decode_matches_generate():
  import torch

  from mmar_jax.sample.text import greedy_decode
  hf_dir = H.tiny_hf("peaked")
  ids, mask = H.left_padded_batch(256, 16, 5, seed=1)
  tm = H.torch_model(hf_dir)
  tm.generation_config.eos_token_id = None  # decode exactly 32 tokens, as greedy_decode does
  tm.generation_config.pad_token_id = 0
  out = tm.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True)
  ref = out.sequences[:, 16:].numpy()
  # The comparison means something only if no step is a near-tie.
  top2 = torch.stack(out.scores, 1).topk(2, -1).values
  assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-3
  got = np.asarray(greedy_decode(H.jax_model(hf_dir), ids, 32, attention_mask=mask))
  assert got.shape == (2, 32)
  np.testing.assert_array_equal(got, ref)


def test_stacked_param_specs_on_8_devices(cpu_devices):
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  cfg = Qwen2Config(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, tie_word_embeddings=False)
  state = nnx.state(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
  specs = param_specs(state, mesh)
  values = state.to_pure_dict()
  for key, spec in specs["layers"].items():
    shape = values["layers"][key].shape
    assert len(spec) == len(shape), (key, spec, shape)
    assert spec[0] is None, f"layers axis of {key} is sharded: {spec}"
    assert "fsdp" in jax.tree.leaves(tuple(spec)), f"{key} {shape} is not sharded: {spec}"
  for key in ("embed_tokens", "lm_head", "final_norm"):
    assert "fsdp" in jax.tree.leaves(tuple(specs[key])), (key, specs[key])
  # The specs place real arrays: every device holds 1/8 of a stacked kernel.
  sharding = jax.sharding.NamedSharding(mesh, specs["layers"]["gate_kernel"])
  arr = jax.device_put(np.zeros(values["layers"]["gate_kernel"].shape, np.float32), sharding)
  assert {s.data.shape for s in arr.addressable_shards} == {(2, 64 // 8, 128)}


def test_fused_attention_path_matches_ours():
  """The `jax.nn.dot_product_attention` path (cuDNN on GPU) agrees with our attention, GQA and
  padding rows included; checked here with its XLA implementation."""
  import jax
  import jax.numpy as jnp
  from mmar_jax.models import attention as attn
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 12, 4, 16))
  k = jax.random.normal(kk, (2, 12, 2, 16))
  v = jax.random.normal(kv, (2, 12, 2, 16))
  seg = jnp.asarray([[1] * 12, [0] * 3 + [1] * 9])
  blk = jnp.broadcast_to(jnp.asarray([0, 1, 2, 3, 4, 4, 4, 4, 5, 6, 7, 8]), (2, 12))
  mask = attn.structure_mask(seg, blk, seg, blk)
  ours = attn.attend(q, k, v, mask)
  fused = attn.attend(q, k, v, mask, implementation="xla")
  assert np.abs(np.asarray(ours) - np.asarray(fused)).max() < 1e-5
  assert np.all(np.asarray(fused)[1, :3] == 0)  # padding queries: zeros, not NaN


def test_fused_projections_compute_the_same_layer():
  """model.fuse_projections concatenates q/k/v and gate/up inside the step: same outputs, same
  parameters (the checkpoint layout does not change)."""
  cfg = Qwen2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, compute_dtype="float32", scan_layers=True)
  plain = Qwen2(cfg, rngs=nnx.Rngs(0))
  fused = Qwen2(cfg.replace(fuse_projections=True), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 64)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  seg = jnp.ones((2, 7), jnp.int32)
  a, _ = plain(plain.embed(ids), pos, seg, pos)
  b, _ = fused(fused.embed(ids), pos, seg, pos)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert jax.tree.structure(nnx.state(plain)) == jax.tree.structure(nnx.state(fused))


REMAT_CFG = Qwen2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=48, compute_dtype="float32")


def _remat_loss(remat, scan=True):
  """(loss of the backbone's output against fixed weights, its state, its args) for a policy."""
  graph, state = nnx.split(Qwen2(REMAT_CFG.replace(remat=remat, scan_layers=scan), rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (2, 9, 32))
  proj = jax.random.normal(jax.random.key(2), (2, 9, 32))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  seg = jnp.asarray([[1] * 9, [0] * 2 + [1] * 7])  # a left-padded row
  blk = jnp.asarray([[1, 2, 3, 3, 3, 3, 4, 5, 6]] * 2)  # an image block inside text

  def loss(state, x):
    return (nnx.merge(graph, state)(x, pos, seg, blk)[0] * proj).sum()
  return loss, state, x


@functools.lru_cache(maxsize=1)
def _unrematerialised_grads():
  loss, state, x = _remat_loss("none")
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)


# The default run checks the policy added here and the one the 7B recipe uses; jax's own dot
# policies (compiles of their own) run with -m slow.
@pytest.mark.parametrize("policy", [p if p in ("attention", "full") else pytest.param(p, marks=pytest.mark.slow)
                                    for p in sorted(REMAT_POLICIES)])
def test_remat_policies_give_the_unrematerialised_gradient(policy):
  """Every policy only changes what the backward pass recomputes: gradients (parameters and
  input) equal the plain autodiff of the same function with nothing rematerialised."""
  ref = _unrematerialised_grads()  # computed once for all policies
  loss, state, x = _remat_loss(policy)
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_attention_remat_saves_the_attention_block_only(capsys):
  """remat=attention keeps q, k, v and the attention output of each layer (and the layer input)
  for the backward pass, and no MLP matmul output: what jax reports it saves, per layer."""
  loss, state, x = _remat_loss("attention", scan=False)
  jax.ad_checkpoint.print_saved_residuals(loss, state, x)
  saved = capsys.readouterr().out.splitlines()
  named = [line.split(" named ")[1].split()[0] for line in saved if " named " in line]
  assert sorted(named) == sorted(["'qkv'"] * 3 * 2 + ["'attention_out'"] * 2)
  assert not any("dot_general" in line for line in saved), saved
