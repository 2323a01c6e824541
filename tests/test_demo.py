"""The README's main job, shortened: the demo config trains a few steps and evaluates itself end
to end (numbers are not asserted here; the full run's are in the notes)."""

import json
import os
import subprocess
import sys

from conftest import ROOT, subprocess_env


def _mmar(*args):
  """The README's command in its own process, on one CPU device as on a laptop."""
  env = subprocess_env()
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
  return subprocess.run([sys.executable, "-m", "mmar_jax", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_demo_trains_and_evaluates_end_to_end(tmp_path):
  wd = str(tmp_path / "demo")
  run = _mmar("train", "--config", "configs/demo.py", "--workdir", wd, "--config.steps=2",
              "--config.train.batch_size=8", "--config.train.log_every=1",
              "--config.eval.num_unconditional=2", "--config.eval.draws_per_prompt=1",
              "--config.eval.ar_steps=2",
              "--config.eval.diffusion_steps=3")
  out = run.stdout
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.load(open(tmp_path / "demo" / "eval" / "report.json"))
  for part in ("understanding", "generation", "chance"):
    assert set(report[part]) == {"colour", "shape", "position", "all_three"}
    assert all(0.0 <= v <= 1.0 for v in report[part].values())
  assert 0.0 <= report["unconditional_valid"] <= 1.0
  assert report["step"] == 2 and report["params"] == "ema" and report["sampling"]["ar_steps"] == 2
  assert report["draws_per_prompt"] == 1 and report["num_unconditional"] == 2
  # The new run estimated its token statistics from the demo data and stored them.
  image = json.load(open(tmp_path / "demo" / "config.json"))["model"]["image"]
  assert image["norm"] == "data" and len(image["token_scale"]) == len(image["token_shift"]) == 48
  for png in ("generated.png", "captions.png", "unconditional.png", "loss.png"):
    assert (tmp_path / "demo" / "eval" / png).stat().st_size > 0
  assert "report:" in out and "pictures:" in out
  # A finished run re-launched exits at once and does not evaluate again.
  again = _mmar("train", "--workdir", wd)
  assert again.returncode == 0 and "evaluating" not in again.stdout
  assert os.path.exists(os.path.join(wd, "checkpoints", "2"))
