"""The README's main job, shortened: the demo config trains a few steps and evaluates itself end
to end (numbers are not asserted here; the full run's are in the notes)."""

import json

from mmar_jax import cli


def test_demo_trains_and_evaluates_end_to_end(tmp_path, capsys):
  wd = str(tmp_path / "demo")
  rc = cli.main(["train", "--config", "configs/demo.py", "--workdir", wd, "--config.steps=2",
                 "--config.mesh=1,-1,1", "--config.train.batch_size=8", "--config.train.log_every=1",
                 "--config.eval.num_unconditional=2", "--config.eval.ar_steps=2",
                 "--config.eval.diffusion_steps=3"])
  out = capsys.readouterr().out
  assert rc == 0, out
  report = json.load(open(tmp_path / "demo" / "eval" / "report.json"))
  for part in ("understanding", "generation", "chance"):
    assert set(report[part]) == {"colour", "shape", "position", "all_three"}
    assert all(0.0 <= v <= 1.0 for v in report[part].values())
  assert 0.0 <= report["unconditional_valid"] <= 1.0
  assert report["step"] == 2 and report["params"] == "ema" and report["sampling"]["ar_steps"] == 2
  for png in ("generated.png", "captions.png", "unconditional.png", "loss.png"):
    assert (tmp_path / "demo" / "eval" / png).stat().st_size > 0
  assert "report:" in out and "pictures:" in out
  # A finished run re-launched exits at once and does not evaluate again.
  assert cli.main(["train", "--workdir", wd, "--config.mesh=1,-1,1"]) == 0
  assert "evaluating" not in capsys.readouterr().out
