"""`mmar-jax repro`: every check passes on a sound setup and fails when its invariant is broken."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from mmar_jax.repro import checks


ONE_DEVICE = tiny_config(("mesh", "1,1,1"))  # the check is per mesh: one keeps it cheap


@pytest.mark.slow  # minutes cold; by default determinism is checked by repro golden's and generate's byte tests
def test_determinism_passes_and_fails_with_another_seed():
  assert checks.check_determinism(ONE_DEVICE, steps=2).status == "pass"
  bad = checks.check_determinism(ONE_DEVICE, steps=2, seed_b=1)
  assert bad.status == "fail" and bad.value > 0


@pytest.mark.slow  # minutes cold; by default test_checkpoint's resume test checks resuming
def test_resume_passes_and_fails_when_a_batch_is_skipped():
  assert checks.check_resume(ONE_DEVICE, steps=4).status == "pass"
  assert checks.check_resume(ONE_DEVICE, steps=4, skip_batch=True).status == "fail"


@pytest.mark.slow  # four 8-device programs; once hung the default run after other tests (see notes)
def test_mesh_passes_and_fails_with_draws_keyed_by_device():
  ok = checks.check_mesh(steps=2)
  assert ok.status == "pass", ok
  bad = checks.check_mesh(steps=2, key_by_device=True)
  assert bad.status == "fail" and bad.value > bad.tolerance


def test_hf_parity_fails_on_a_perturbed_weight():
  def nudge(params):
    params["final_norm"] = params["final_norm"] * 1.01
    return params
  assert checks.check_hf_parity(seq_len=520).status == "pass"
  assert checks.check_hf_parity(seq_len=520, perturb=nudge).status == "fail"


@pytest.mark.parametrize("part", [None, "hf", "vae", "head"])
def test_roundtrip_bit_for_bit_and_fails_on_a_perturbed_weight(part):
  r = checks.check_roundtrip(perturb=part)
  assert r.status == ("pass" if part is None else "fail"), r


def test_numerics_fails_on_an_fp32_head_claiming_bf16(monkeypatch):
  assert checks.check_numerics().status == "pass"
  from mmar_jax.models import diffusion_head as dh
  real = dh._linear

  def fp32_linear(p, x, dtype):
    return real(p, x.astype(np.float32), np.float32).astype(dtype)

  monkeypatch.setattr(dh, "_linear", fp32_linear)
  bad = checks.check_numerics()
  assert bad.status == "fail" and "fp32" in bad.detail


def test_golden_write_compare_and_off_by_one_step(tmp_path):
  path = str(tmp_path / "golden.json")
  losses = checks.golden_losses(steps=4)
  assert checks.check_golden(path=path, losses=losses).status == "skip"  # no reference yet
  assert checks.check_golden(write=True, path=path, losses=losses).status == "pass"
  assert checks.check_golden(path=path, losses=losses).status == "pass"
  store = json.load(open(path))
  key = checks.golden_key()
  store[key] = store[key][1:] + [store[key][-1]]  # the reference shifted by one step
  json.dump(store, open(path, "w"))
  assert checks.check_golden(path=path, losses=losses).status == "fail"


def test_repro_command_table_and_json(tmp_path, capsys):
  from mmar_jax import cli
  out = str(tmp_path / "r.json")
  rc = cli.main(["repro", "roundtrip", "numerics", "--json", out])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert "roundtrip" in text and "PASS" in text
  data = json.load(open(out))
  assert [c["name"] for c in data["checks"]] == ["roundtrip", "numerics"]
  assert all(set(c) == {"name", "status", "value", "tolerance", "detail"} for c in data["checks"])
