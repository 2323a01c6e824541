"""Training at scale: sharding, the jitted step on several meshes, skipped steps, FLOPs, init."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mmar_jax.data.pipeline import global_batch
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.train import flops as flops_lib
from mmar_jax.train.step import build, init_state, make_train_step


def _run(mcfg, batcher, mesh_shape, steps=10, config=None, devices=None):
  config = config or tiny_config()
  tr = build(config, mcfg, make_mesh(mesh_shape, devices=devices))
  state = init_state(tr)
  step = make_train_step(tr)
  losses = []
  for s in range(steps):
    state, m = step(state, global_batch(batcher, s, tr.batch_sharding))
    losses.append(float(m["loss"]))
  return np.asarray(losses), state, tr


@pytest.fixture(scope="module")
def one_device_run(tiny_mcfg, demo_batcher):
  return _run(tiny_mcfg, demo_batcher, "1,1,1", devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", ["1,8,1", pytest.param("2,2,2", marks=pytest.mark.slow),
                                  pytest.param("4,1,2", marks=pytest.mark.slow)])
def test_same_losses_on_every_mesh(tiny_mcfg, demo_batcher, one_device_run, mesh):
  losses, state, _ = _run(tiny_mcfg, demo_batcher, mesh)
  np.testing.assert_allclose(losses, one_device_run[0], atol=1e-5, rtol=0)
  assert losses[-1] < losses[0]  # it trains
  ref = one_device_run[1]["params"]["head"]["final_layer"]["linear"]["kernel"]
  np.testing.assert_allclose(state["params"]["head"]["final_layer"]["linear"]["kernel"], ref, atol=1e-5)


def test_no_leaf_fully_replicated_under_fsdp(tiny_mcfg):
  """With fsdp = 8, a parameter, EMA or optimizer-state leaf may be replicated only when none of
  its dimensions is divisible by 8; the stacked `layers` axis is never split."""
  from mmar_jax.train.step import abstract_train_state
  tr = build(tiny_config(), tiny_mcfg, make_mesh("1,8,1"))
  target = abstract_train_state(tr)
  leaves = [(jax.tree_util.keystr(p), l) for p, l in jax.tree_util.tree_leaves_with_path(target)
            if l.ndim > 0]
  bad = [(name, leaf.shape) for name, leaf in leaves
         if all(s is None for s in leaf.sharding.spec) and any(d % 8 == 0 for d in leaf.shape)]
  assert len(leaves) > 50 and not bad, bad
  for name, leaf in leaves:
    if "['layers']" in name or "res_blocks" in name or "blocks" in name:
      assert leaf.sharding.spec[0] is None if len(leaf.sharding.spec) else True, name
  q = target["params"]["backbone"]["layers"]["q_kernel"]
  assert len(q.sharding.spec) == q.ndim and q.sharding.spec[0] is None
  assert "fsdp" in str(q.sharding.spec)


def test_nonfinite_step_is_skipped_and_training_continues(tiny_mcfg, demo_batcher):
  tr = build(tiny_config(), tiny_mcfg, make_mesh("1,1,1", devices=jax.devices()[:1]))
  state = init_state(tr)
  step = make_train_step(tr)
  state, _ = step(state, global_batch(demo_batcher, 0, tr.batch_sharding))
  before = jax.tree.map(np.asarray, state["params"])
  bad = demo_batcher.local_batch(1)
  bad["image"][0, 0, 0, 0] = np.nan  # a corrupt pixel: every gradient becomes NaN
  state, m = step(state, jax.device_put(bad, tr.batch_sharding))
  assert int(m["skipped_steps"]) == 1 and not np.isfinite(float(m["grad_norm"]))
  assert int(state["step"]) == 2  # a skipped step still counts
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state["params"]))
  state, m = step(state, global_batch(demo_batcher, 2, tr.batch_sharding))
  assert int(m["skipped_steps"]) == 1 and np.isfinite(float(m["loss"]))
  changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), state["params"]["head"], before["head"])
  assert any(jax.tree.leaves(changed))
  # A batch with more generation samples than the head's static rows (loss.head_rows) is not
  # applied either, and says how many did not fit.
  before = jax.tree.map(np.asarray, state["params"])
  crowded = demo_batcher.local_batch(3)
  crowded["kind"][:] = 0
  state, m = step(state, jax.device_put(crowded, tr.batch_sharding))
  assert int(m["head_rows_dropped"]) == 3 and int(m["skipped_steps"]) == 2  # 8 of capacity 5
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state["params"]))


def test_analytic_flops_match_cost_analysis(bytes_tokenizer, demo_batcher):
  """Unrolled layers (cost analysis counts a scan body once). The analytic count has only the
  matmuls; XLA also counts elementwise work (norms, softmax, activations, Adam), so it is higher by
  a few percent; the window below is what that accounts for at these tiny widths."""
  from mmar_jax.models.mmar import model_config
  # Several vocabulary tiles: without scan_layers the tiled cross-entropy unrolls them too, so
  # every tile is counted (a scan would count one).
  config = tiny_config(("model.scan_layers", "false"), ("loss.vocab_tiles", "4"))
  mcfg = model_config(config, bytes_tokenizer)
  tr = build(config, mcfg, make_mesh("1,1,1", devices=jax.devices()[:1]))
  step = make_train_step(tr)
  from mmar_jax.train.step import abstract_train_state
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=tr.batch_sharding),
                       demo_batcher.local_batch(0))
  with jax.set_mesh(tr.mesh):
    compiled = step.jitted.lower(abstract_train_state(tr), batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"])
  analytic = flops_lib.train_step_flops(mcfg, config)
  ratio = xla / analytic
  print(f"analytic {analytic:.4g} FLOPs, XLA {xla:.4g}, ratio {ratio:.3f}")
  assert 0.95 <= ratio <= 1.25, ratio


def test_converted_hf_backbone_loads_through_init(tmp_path, bytes_tokenizer):
  """init.backbone from an hf-to-jax output: inside the model, over the original vocabulary's
  columns, the logits equal the HF model's on a text-only batch."""
  import torch
  from helpers_hf import tiny_hf
  from mmar_jax.convert.hf import hf_to_jax
  from mmar_jax.models.mmar import model_config
  from mmar_jax.models.qwen2 import text_structure
  hf_dir = tiny_hf("tied_mqa", "float32", False)
  out = str(tmp_path / "jax")
  hf_to_jax(hf_dir, out)
  import json
  hf_cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  config = tiny_config(
      ("init.backbone", out), ("model.backbone.vocab_size", str(hf_cfg["vocab_size"])),
      ("model.backbone.hidden_size", str(hf_cfg["hidden_size"])),
      ("model.backbone.num_layers", str(hf_cfg["num_hidden_layers"])),
      ("model.backbone.num_heads", str(hf_cfg["num_attention_heads"])),
      ("model.backbone.num_kv_heads", str(hf_cfg["num_key_value_heads"])),
      ("model.backbone.intermediate_size", str(hf_cfg["intermediate_size"])),
      ("model.backbone.rope_theta", str(float(hf_cfg.get("rope_theta") or hf_cfg["rope_parameters"]["rope_theta"]))),
      ("model.backbone.tie_word_embeddings", "true"))
  mcfg = model_config(config, bytes_tokenizer)
  assert mcfg.backbone.vocab_size > hf_cfg["vocab_size"]  # 256 rows grown by <boi>, <eoi>
  tr = build(config, mcfg, make_mesh("1,8,1"))
  from mmar_jax.train.init_from import apply
  state = apply(config, tr, init_state(tr))
  model = tr.model(jax.device_get(state["params"]))
  ids = np.random.default_rng(0).integers(0, hf_cfg["vocab_size"], (2, 48))
  mask = np.ones_like(ids)
  pos, seg, blk = text_structure(jnp.asarray(mask))
  h, _ = model.backbone(model.backbone.embed(jnp.asarray(ids)), pos, seg, blk)
  ours = np.asarray(model.backbone.logits(h))[..., :hf_cfg["vocab_size"]]
  from transformers import Qwen2ForCausalLM
  ref_model = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_check_finite_switch_stops_at_a_nonfinite_loss(tiny_mcfg, demo_batcher):
  """train.check_finite: chex checks inside the jitted step (chexify) raise on a NaN loss."""
  tr = build(tiny_config(("train.check_finite", "true")), tiny_mcfg,
             make_mesh("1,1,1", devices=jax.devices()[:1]))
  step = make_train_step(tr)
  state, _ = step(init_state(tr), global_batch(demo_batcher, 0, tr.batch_sharding))
  bad = demo_batcher.local_batch(1)
  bad["image"][0, 0, 0, 0] = np.nan
  with pytest.raises(Exception, match="finite"):
    step(state, jax.device_put(bad, tr.batch_sharding))


def test_train_logs_the_bf16_error_of_the_head_when_asked(tmp_path):
  """train.precision_every: the run's metrics carry the head's bf16-vs-fp32 error per bucket."""
  import json
  from mmar_jax.train.loop import train
  config = tiny_config(("steps", "2"), ("train.log_every", "1"), ("train.precision_every", "2"),
                       ("train.checkpoint_every", "0"))
  train(config, str(tmp_path), progress=False)
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2]
  probed = records[-1]
  keys = [k for k in probed if k.startswith("bf16/")]
  assert keys and all(np.isfinite(probed[k]) for k in keys if "rows" not in k)
  assert not any(k.startswith("bf16/") for k in records[0])


def test_fused_projections_are_refused_with_a_tensor_axis(tiny_mcfg):
  fused = dataclasses.replace(tiny_mcfg, backbone=tiny_mcfg.backbone.replace(fuse_projections=True))
  with pytest.raises(ValueError, match="fuse_projections"):
    build(tiny_config(), fused, make_mesh("1,4,2"))
