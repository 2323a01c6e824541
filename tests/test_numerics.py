"""bf16 numerics of eps / v / x0 (issue 8): analytic amplification, the precision contract's dtype
check (and that it can fail), the measurement machinery, the training-time monitor, and the
`diagnose numerics` command. The three-head demo run and a workdir run are slow tests."""

import copy
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, subprocess_env, tiny_config
from flax import nnx

from mmar_jax.diffusion import amplification as ampl
from mmar_jax.diffusion import schedule as sched_lib
from mmar_jax.models import diffusion_head as dh
from mmar_jax.train import numerics as nm

SMALL = dh.HeadConfig(token_channels=4, cond_dim=8, width=32, depth=2, compute_dtype="float32")


def _random_params(cfg, seed=0):
  """A head whose zero-initialised layers are random too, so its output is not exactly 0."""
  params = dh.head_params(dh.DiffusionHead(cfg, rngs=nnx.Rngs(seed)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape, a.dtype)
                                   for a, k in zip(leaves, keys)])


# -- analytic --------------------------------------------------------------------------------------

def test_amplification_values_of_method_md():
  amp = {p: ampl.amplification(p) for p in ("eps", "v", "x0")}
  assert amp["eps"][999] == pytest.approx(20291, rel=0.01)
  assert amp["x0"][0] == pytest.approx(155.6, rel=0.01)
  np.testing.assert_allclose(amp["v"], 1.0, atol=1e-12, rtol=0)
  s = sched_lib.base_schedule()
  np.testing.assert_allclose(amp["eps"], 1 / s.alpha, rtol=1e-12)
  np.testing.assert_allclose(amp["x0"], 1 / s.sigma, rtol=1e-12)
  for a in amp.values():  # Cauchy-Schwarz: v is the minimum
    assert a.dtype == np.float64 and np.all(a >= amp["v"] - 1e-12)


def test_predicted_step_error_orders_as_the_argument():
  t, eps = ampl.predicted_step_error("eps")
  _, v = ampl.predicted_step_error("v")
  _, x0 = ampl.predicted_step_error("x0")
  assert len(t) == ampl.SAMPLE_STEPS and t[0] == 0 and t[-1] == 999
  assert np.all(v <= eps * (1 + 1e-9)) and np.all(v <= x0 * (1 + 1e-9))
  assert eps[-1] / v[-1] == pytest.approx(ampl.amplification("eps")[999], rel=1e-9)


# -- the precision contract ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(learn_sigma=True, n_positions=4,
                                                      scan_layers=False, prediction="eps")])
def test_precision_check_passes_for_bf16(cfg):
  summary = nm.check_precision(cfg)
  assert summary["dot_operand_dtypes"] == ["bfloat16"] and summary["head_output"] == "bfloat16"
  assert summary["loss"] == ["float32"] and summary["reduction_dtypes"] == ["float32"]
  # input_proj, 2 time-MLP, cond_embed, 3 per block (a scan body counts once), 2 final
  assert summary["dot_general"] == 6 + 3 * (1 if cfg.scan_layers else cfg.depth)


def test_precision_check_catches_a_secret_fp32_upcast(monkeypatch):
  """A head that claims bf16 but multiplies in fp32 and rounds the result to bf16: its output
  dtype is right (the forward's own assert passes), only the jaxpr scan can see it."""
  def fp32_linear(p, x, dtype):
    y = jnp.dot(x.astype(jnp.float32), p["kernel"].astype(jnp.float32)) + p["bias"]
    return y.astype(dtype)

  monkeypatch.setattr(dh, "_linear", fp32_linear)
  cfg = SMALL.replace(compute_dtype="bfloat16")
  out = jax.eval_shape(lambda p: dh.forward(p, cfg, jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32),
                                            jnp.zeros((2, 8))), dh.abstract_params(cfg))
  assert out.dtype == jnp.bfloat16  # looks like bf16 from outside
  with pytest.raises(AssertionError, match="silent fp32 upcast"):
    nm.check_precision(SMALL)


def test_precision_check_catches_an_fp32_loss():
  summary = dict(nm.precision_summary(SMALL), reduction_dtypes=["bfloat16"])
  with pytest.raises(AssertionError, match="reduction_dtypes"):
    nm.assert_precision(summary)


# -- checks of a result ----------------------------------------------------------------------------

def _bucket(step, x0=2e-3, sample=2e-3, head=3e-3, se=1e-5, n=4096):
  vals = dict(ddim_step_rel_rms=step, x0_rel_rms=x0, sample_rel_rms=sample, head_rel_rms=head,
              n_tokens=n)
  return dict(vals, stderr={k: se for k in nm.METRICS})


@pytest.fixture(scope="module")
def good_result():
  summary = nm.precision_summary(SMALL)
  errs = {"eps": (1e-1, 2e-4, 7e-4), "v": (4e-5, 1e-4, 7.8e-4), "x0": (4e-5, 7e-5, 8.7e-4)}
  return {p: {"amplification": ampl.amplification(p).tolist(), "precision": summary,
              "buckets": {b: _bucket(e) for b, e in zip(nm.BUCKETS, errs[p])}}
          for p in ("eps", "v", "x0")}


def test_check_numerics_passes_and_fails(good_result):
  nm.check_numerics(good_result)
  bad = copy.deepcopy(good_result)
  bad["v"]["buckets"]["t>=900"]["ddim_step_rel_rms"] = 0.2  # v worse than eps at high noise
  with pytest.raises(AssertionError, match="v vs eps"):
    nm.check_numerics(bad)
  bad = copy.deepcopy(good_result)
  bad["v"]["buckets"]["t<=100"]["sample_rel_rms"] = 3e-3  # v worse than x0 at low noise
  with pytest.raises(AssertionError, match="v vs x0"):
    nm.check_numerics(bad)
  within_noise = copy.deepcopy(good_result)
  within_noise["v"]["buckets"]["t<=100"]["ddim_step_rel_rms"] = 8.7e-4 + 2e-5  # < 3 sigma
  nm.check_numerics(within_noise)
  bad = copy.deepcopy(good_result)
  bad["x0"]["buckets"]["t<=100"]["head_rel_rms"] = 0.0  # "bf16" that was fp32
  with pytest.raises(AssertionError, match="not computed in bf16"):
    nm.check_numerics(bad)
  bad = copy.deepcopy(good_result)
  bad["eps"]["buckets"]["t>=900"]["x0_rel_rms"] = float("nan")
  with pytest.raises(AssertionError):
    nm.check_numerics(bad)
  bad = copy.deepcopy(good_result)
  bad["v"]["amplification"][500] = 1.5
  with pytest.raises(AssertionError):
    nm.check_numerics(bad)


def test_ordering_is_skipped_with_one_head(good_result):
  one = copy.deepcopy(good_result)
  one["eps"]["buckets"] = one["x0"]["buckets"] = None
  one["v"]["buckets"]["t>=900"]["ddim_step_rel_rms"] = 1.0  # nothing to compare it with
  nm.check_numerics(one)
  assert nm.ordering_status(one).startswith("skipped: only v measured")
  assert nm.ordering_report(one) == []


# -- measurement on a (random) head ----------------------------------------------------------------

def test_measure_head_small():
  cfg = SMALL.replace(prediction="x0")
  params = _random_params(cfg)
  x0 = jax.random.normal(jax.random.key(0), (64, 4))
  z = jax.random.normal(jax.random.key(1), (64, 8))
  inputs = nm.bucket_inputs(jax.random.key(2), "t<=100", x0, z, n=256)
  kept = sched_lib.respaced_timesteps(ampl.SAMPLE_STEPS)
  assert set(np.asarray(inputs["t"]).tolist()) <= set(kept[kept <= 100].tolist())
  res = nm.measure_bucket(params, cfg, inputs, with_sample=True)
  assert res["n_tokens"] == 256
  for m in nm.METRICS:
    assert np.isfinite(res[m]) and np.isfinite(res["stderr"][m])
  # a bf16 head is about bf16's roundoff away from the fp32 one, not 0 and not O(1)
  assert nm.MIN_BF16_ERROR < res["head_rel_rms"] < 0.05
  assert len(res["ddim_step_by_t"]["t"]) == len(res["ddim_step_by_t"]["rel_rms"]) > 1


def test_rel_rms_and_its_standard_error():
  rng = np.random.default_rng(0)
  exact = rng.normal(size=(4096, 8))
  approx = exact + 1e-3 * rng.normal(size=exact.shape)
  value, se = nm.rel_rms(approx, exact)
  assert value == pytest.approx(1e-3, rel=0.03) and 0 < se < 1e-4
  assert nm.rel_rms(exact, exact) == (0.0, 0.0)


# -- training-time monitor -------------------------------------------------------------------------

def test_head_precision_metrics_by_bucket():
  cfg = SMALL.replace(prediction="v")
  params = _random_params(cfg)
  m = 96
  t = jnp.asarray(np.repeat([950, 500, 50], m // 3), jnp.int32)
  x0 = jax.random.normal(jax.random.key(0), (m, 4))
  z = jax.random.normal(jax.random.key(1), (m, 8))
  noise = jax.random.normal(jax.random.key(2), (m, 4))
  mask = jnp.ones((m,)).at[:m // 3].set(0.0)  # the high-noise rows are unmasked: ignored
  out = jax.jit(lambda p, *a: nm.head_precision_metrics(p, cfg, *a))(params, x0, z, t, noise, mask)
  out = jax.device_get(out)
  assert set(out) == {f"bf16/{k}_{b}" for k in ("head_rel_rms", "loss_rel_err", "rows")
                      for b in ("high", "mid", "low")}
  assert out["bf16/rows_high"] == 0 and out["bf16/head_rel_rms_high"] == 0
  assert out["bf16/rows_mid"] == out["bf16/rows_low"] == m // 3
  for b in ("mid", "low"):
    assert nm.MIN_BF16_ERROR < out[f"bf16/head_rel_rms_{b}"] < 0.05
    assert 0 <= out[f"bf16/loss_rel_err_{b}"] < 0.05


@pytest.mark.slow  # compiles the tiny MMAR's forward: ~30 s on a cold cache
def test_precision_probe_on_the_tiny_model(tiny_mcfg, demo_batcher):
  """The monitor the train loop calls every `precision_every` steps, on the tiny MMAR."""
  from mmar_jax.data.pipeline import global_batch
  from mmar_jax.parallel.mesh import make_mesh
  from mmar_jax.train.step import build, init_state
  tr = build(tiny_config(), tiny_mcfg, make_mesh("1,1,1", devices=jax.devices()[:1]))
  state = init_state(tr)
  # A fresh head outputs exactly 0 (zero-initialised final layer): give it some weights.
  head = state["params"]["head"]
  state["params"]["head"] = jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), head)
  state["step"] = state["step"] + 1
  out = jax.device_get(nm.make_precision_probe(tr)(state, global_batch(demo_batcher, 0,
                                                                        tr.batch_sharding)))
  rows = sum(out[f"bf16/rows_{b}"] for b in ("high", "mid", "low"))
  assert rows > 0 and all(np.isfinite(v) for v in out.values())
  for b in ("high", "mid", "low"):
    if out[f"bf16/rows_{b}"] > 0:
      assert nm.MIN_BF16_ERROR < out[f"bf16/head_rel_rms_{b}"] < 0.1


# -- the command -----------------------------------------------------------------------------------

def test_diagnose_numerics_fast_cli(tmp_path):
  out = tmp_path / "numerics"
  cmd = [sys.executable, "-m", "mmar_jax", "diagnose", "numerics", "--fast", "--out", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2.029e+04" in proc.stdout and "checks: passed" in proc.stdout
  data = json.loads((out / "numerics.json").read_text())
  assert set(data) == {"eps", "v", "x0"}
  for p, entry in data.items():
    assert len(entry["amplification"]) == 1000 and entry["buckets"] is None
    nm.assert_precision(entry["precision"])
  assert data["eps"]["amplification"][999] == pytest.approx(20291, rel=0.01)
  assert (out / "numerics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  meta = json.loads((out / "numerics_meta.json").read_text())
  assert meta["mode"] == "fast" and meta["check"] == "passed" and "skipped" in meta["ordering"]
  nm.check_numerics(data)


def test_existing_outputs_are_refused(tmp_path):
  from mmar_jax.commands import diagnose
  (tmp_path / "numerics.json").write_text("{}")
  with pytest.raises(FileExistsError, match="--overwrite"):
    diagnose.run_numerics(fast=True, out=tmp_path)
  assert (tmp_path / "numerics.json").read_text() == "{}"
  diagnose.run_numerics(fast=True, out=tmp_path, overwrite=True)
  assert set(json.loads((tmp_path / "numerics.json").read_text())) == {"eps", "v", "x0"}


def test_fast_workdir_checks_the_runs_head_config(tmp_path, tiny_mcfg):
  """--fast --workdir reads only model_config.json: the dtype check runs on the run's head."""
  from mmar_jax.commands import diagnose
  cfg = tiny_mcfg.to_dict()
  cfg["head"]["prediction"] = "eps"
  (tmp_path / "model_config.json").write_text(json.dumps(cfg))
  result = diagnose.run_numerics(workdir=str(tmp_path), fast=True)
  assert result["meta"]["mode"] == "fast" and result["meta"]["check"] == "passed"
  head = tiny_mcfg.head
  expected = 6 + 3 * (1 if head.scan_layers else head.depth)
  assert all(result[p]["precision"]["dot_general"] == expected for p in ("eps", "v", "x0"))
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    diagnose.run_numerics(workdir=str(tmp_path / "missing"), fast=True)


# -- slow: trained heads ---------------------------------------------------------------------------

@pytest.mark.slow
def test_three_trained_demo_heads_follow_the_theory(tmp_path):
  from mmar_jax.commands import diagnose
  result = diagnose.run_numerics(out=tmp_path)
  nm.check_numerics(result)
  assert result["meta"]["check"] == "passed"
  b = {p: result[p]["buckets"] for p in ("eps", "v", "x0")}
  for metric in ("ddim_step_rel_rms", "sample_rel_rms"):
    assert b["v"]["t>=900"][metric] <= b["eps"]["t>=900"][metric]
    assert b["v"]["t<=100"][metric] <= b["x0"]["t<=100"][metric]
  # eps at high noise is off by orders of magnitude, as 1/alpha_t predicts
  assert b["eps"]["t>=900"]["ddim_step_rel_rms"] > 100 * b["v"]["t>=900"]["ddim_step_rel_rms"]
  for p in b:
    for bucket in b[p].values():
      assert bucket["n_tokens"] >= nm.MIN_TOKENS
  data = json.loads((tmp_path / "numerics.json").read_text())
  assert data["v"]["buckets"]["t>=900"]["ddim_step_rel_rms"] == pytest.approx(
      b["v"]["t>=900"]["ddim_step_rel_rms"])


@pytest.mark.slow
def test_workdir_run_measures_its_own_head(tmp_path):
  from mmar_jax.commands import diagnose
  from mmar_jax.train.loop import train
  workdir = tmp_path / "run"
  config = tiny_config(("steps", "10"), ("model.head.prediction", "eps"))
  train(config, str(workdir), progress=False)
  result = diagnose.run_numerics(workdir=str(workdir), out=tmp_path / "out")
  assert result["eps"]["buckets"] is not None
  assert result["v"]["buckets"] is None and result["x0"]["buckets"] is None
  assert result["meta"]["ordering"].startswith("skipped: only eps measured")
  assert result["meta"]["run"]["step"] == 10
  nm.check_numerics(result)
