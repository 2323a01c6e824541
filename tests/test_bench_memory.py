"""`mmar-jax bench memory`: per-device bytes from an ahead-of-time compile, against the analytic
breakdown. Compiles are slow on CPU (the tiny step ~15-35 s cold, 0.5B ~2 min), so the default run
checks the analytic side and the refusals; the reports themselves are slow tests."""

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, subprocess_env, tiny_config
from mmar_jax.errors import ConfigError
from mmar_jax.commands import bench_memory as memory

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
KEYS = {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "analytic", "estimate"}
ANALYTIC = {"params", "grads", "opt_state", "ema", "activations"}


@functools.lru_cache(maxsize=None)  # building a trainer costs about a second; tests share them
def _trainer(mesh: str):
  from mmar_jax.models.mmar import model_config
  from mmar_jax.parallel.mesh import make_mesh
  from mmar_jax.train.step import abstract_train_state, build
  cfg = tiny_config(("mesh", mesh))
  mcfg = model_config(cfg, memory.text_tokenizer(cfg))
  tr = build(cfg, mcfg, make_mesh(cfg.mesh, cfg.mesh_dcn))
  return cfg, mcfg, tr, abstract_train_state(tr)


def _global_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_state_bytes_are_per_device(cpu_devices):
  """FSDP over 8 devices: each holds about an eighth of the state."""
  _, _, _, state = _trainer("1,8,1")
  full = _global_bytes(state["params"])
  assert full / 8 <= memory.shard_bytes(state["params"]) <= full / 8 * 1.02
  assert memory.shard_bytes(state["ema"]) == memory.shard_bytes(state["params"])
  # Adam's two moments per trained parameter, plus a few counters.
  assert 2 <= _global_bytes(state["opt_state"]) / full < 2.01


def test_analytic_activations_follow_remat_and_batch(cpu_devices):
  cfg, mcfg, tr, _ = _trainer("1,8,1")
  cfg = cfg.copy_and_resolve_references()
  cfg.loss.head_rows = "all"  # the generation share of 8 and 16 samples rounds differently
  base = memory.activation_bytes(mcfg, cfg, tr.mesh)
  cfg.train.batch_size *= 2
  doubled = memory.activation_bytes(mcfg, cfg, tr.mesh)["total"]
  assert doubled == pytest.approx(2 * base["total"], rel=1e-6)
  per_layer = {p: memory._layer_bytes(1000, 896, 14, 2, 64, 4864, 386, 1, 2, p)
               for p in ("full", "attention", "dots_no_batch", "dots", "none")}
  assert (per_layer["full"] < per_layer["attention"] < per_layer["dots_no_batch"] < per_layer["dots"]
          < per_layer["none"])


@pytest.mark.parametrize("config", ["configs/qwen2_0_5b.py", "configs/qwen2_7b.py"])
def test_stage2_compiles_the_stage1_program(config):
  """The README's recipe table compiles stage 1 only: stage 2 changes nothing but how the step
  draws its mask ratio (a traced scalar), so no shape, remat policy, mesh or batch differs."""
  from mmar_jax.config import load_file
  flat = lambda c: dict(_flatten(c.to_dict()))
  one, two = flat(load_file(os.path.join(ROOT, config + ":stage1"))), flat(
      load_file(os.path.join(ROOT, config + ":stage2")))
  assert {k for k in one.keys() | two.keys() if one.get(k) != two.get(k)} == {"loss.mask_ratio"}


@pytest.mark.parametrize("config, layout", [("qwen2_7b", ("none", "flash")),
                                            ("qwen2_0_5b", ("dots_no_batch", "flash"))])
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_v5p_variant_changes_remat_and_attention_only(config, layout, stage):
  """<config>:<stage>_v5p is the README's v5p layout: the same run with the remat policy and
  attention the compiled table chose, nothing else; an unknown layout is refused by name."""
  from mmar_jax.config import load_file
  base = dict(_flatten(load_file(os.path.join(ROOT, f"configs/{config}.py:{stage}")).to_dict()))
  v5p = dict(_flatten(load_file(os.path.join(ROOT, f"configs/{config}.py:{stage}_v5p")).to_dict()))
  assert (v5p["model.remat"], v5p["model.attention"]) == layout
  chosen = {k for k, v in zip(("model.remat", "model.attention"), layout) if base[k] != v}
  assert chosen and {k for k in base if base[k] != v5p[k]} == chosen
  with pytest.raises(ValueError, match="stage1_v5p"):
    load_file(os.path.join(ROOT, f"configs/{config}.py:stage1_v6"))


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def test_abstract_batch_is_what_the_pipeline_makes(cpu_devices):
  cfg, mcfg, tr, _ = _trainer("1,8,1")
  batch = memory.abstract_batch(cfg, mcfg, tr.batch_sharding)
  assert {k: v.shape for k, v in batch.items()} == dict(
      image=(8, 16, 16, 3), text=(8, mcfg.max_text_len), text_len=(8,), kind=(8,), index=(8,))


@pytest.mark.parametrize("text, name, kwargs", [
    ("v5p-64", "v5p:2x4x4", {"chip_config_name": "megacore"}),
    ("v5litepod-256", "v5e:16x16", {}),
    ("v5litepod-8", "v5e:2x4", {"chips_per_host_bounds": (2, 4, 1)}),
    ("v4:2x2x4", "v4:2x2x4", {"chip_config_name": "megacore"}),
])
def test_topology_names(text, name, kwargs):
  assert memory._topology(text) == (name, kwargs)


def test_bad_topology_is_named():
  with pytest.raises(ConfigError, match="spells it v5litepod-8"):
    memory._topology("v5e-8")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_topology_without_libtpu_says_what_to_install():
  with pytest.raises(ConfigError, match=r"needs libtpu: pip install 'jax\[tpu\]==0.10.2'"):
    memory.target_devices("v5p-64", 1)


# -- reports (compiles) ----------------------------------------------------------------------------

def _report(*args, env_extra=None, timeout=900) -> dict:
  proc = subprocess.run([sys.executable, "-m", "mmar_jax", "bench", "memory", *args], cwd=ROOT,
                        env=subprocess_env(**(env_extra or {})), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout  # one JSON line
  return json.loads(lines[0])


def _check_consistent(report: dict):
  """The keys, the total's formula, and arguments = the state's shards + the batch's: the
  compiled step holds exactly the state the analytic side counts (step and skipped: 8 bytes)."""
  assert KEYS <= set(report) and ANALYTIC <= set(report["analytic"])
  a = report["analytic"]
  assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"]
                                   - report["alias_bytes"] + report["temp_bytes"])
  state = a["params"] + a["opt_state"] + a["ema"] + 8
  return a, state


@pytest.mark.slow
def test_tiny_report_on_8_cpu_devices():
  r = _report("--config", "configs/tiny.py", "--mesh", "1,8,1", "--cpu-devices", "8")
  a, state = _check_consistent(r)
  assert r["argument_bytes"] == state + a["batch"]
  assert r["alias_bytes"] >= 0.99 * state  # the donated state is updated in place
  assert (r["estimate"], r["mesh"], r["devices"]) == ("cpu", "1,8,1", 8)


@pytest.mark.slow
def test_qwen2_0_5b_report_on_8_cpu_devices():
  r = _report("--config", "configs/qwen2_0_5b.py", "--mesh", "1,8,1", "--cpu-devices", "8")
  a, state = _check_consistent(r)
  assert r["argument_bytes"] == state + a["batch"]
  assert 600e6 < a["params"] * 8 / 4 < 750e6  # Qwen2-0.5B + ViT + head + VAE, fp32
  assert r["temp_bytes"] > a["grads"]  # gradients and activations live in temporaries
  assert r["estimate"] == "cpu"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]==0.10.2')")
def test_tiny_report_for_a_tpu_topology():
  """The report for a TPU slice, with the compiler's cost: no loop is left in the cost compiles
  (neither ours nor the TPU compiler's windowed einsums), so its FLOPs, which include
  recomputation and elementwise work, are at least the analytic matmul FLOPs (train/flops.py)."""
  r = _report("--config", "configs/tiny.py", "--mesh", "1,8,1", "--topology", "v5litepod-8")
  _check_consistent(r)
  assert (r["estimate"], r["devices"]) == ("tpu:v5litepod-8", 8)
  cost = r["cost"]
  assert cost["loops_left"] == 0
  assert cost["model_flops"] <= cost["flops"] < 2 * cost["model_flops"], cost
