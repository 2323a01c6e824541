"""`eval understanding`: open answers by normalised exact match, multiple choice by the model's
log-likelihood of each choice, checked against the PyTorch MMAR's teacher-forced likelihood."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers_train import straight_run
from mmar_jax.commands import understanding as U


def test_normalise_and_answer_keys():
  assert U.normalise("  The Red, square!  ") == "red square"
  r = dict(choices=["a red square", "a blue cross"], line=1)
  assert [U.answer_index(dict(r, answer=a), "f") for a in ("A blue cross.", 1, "a", "B")] == [1, 1, 0, 1]
  with pytest.raises(ValueError, match="f:1: answer 'green' is none of the choices"):
    U.answer_index(dict(r, answer="green"), "f")


def _benchmark(tmp_path):
  from PIL import Image

  from mmar_jax.data.shapes import ShapesSpec, render
  Image.fromarray(render("red", "square", "top left", ShapesSpec())).save(tmp_path / "a.png")
  Image.fromarray(render("blue", "cross", "center", ShapesSpec())).save(tmp_path / "b.png")
  (tmp_path / "broken.png").write_bytes(b"no picture")
  records = [
      dict(image="a.png", choices=["a red square at the top left", "a blue cross in the center", "red"],
           answer="A"),
      dict(image="b.png", question="what?", choices=["a red square", "a blue cross"], answer=1),
      dict(image="b.png", answer="a blue cross in the center"),
      dict(image="broken.png", answer="x"),
  ]
  path = tmp_path / "bench.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_scores_against_the_pytorch_likelihood(tmp_path_factory, tmp_path):
  import torch

  from mmar_jax.commands.convert import workdir_to_safetensors
  from mmar_jax.pytorch import MMAR as TorchMMAR
  from mmar_jax.run import Run
  wd = straight_run(tmp_path_factory)
  run = Run(wd)
  params, _ = run.params(None, "ema")
  model = run.model(params)
  records = U.read_records(_benchmark(tmp_path))
  result, _ = U.score(run, model, records, str(tmp_path / "u.json"), batch_size=4)
  assert json.loads((tmp_path / "u.json").read_text()) == json.loads(json.dumps(result))
  s = result["summary"]
  assert (s["records"], s["scored"], s["unreadable"]) == (4, 3, 1) and "broken.png" in s["unreadable_files"][0]
  assert s["multiple_choice"]["n"] == 2 and s["multiple_choice"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  preds = result["predictions"]
  assert "error" in preds[3] and isinstance(preds[2]["prediction"], str)

  # The PyTorch model's teacher-forced log-likelihood of each choice (and EOS).
  workdir_to_safetensors(wd, str(tmp_path / "export"))
  tm = TorchMMAR.from_pretrained(str(tmp_path / "export"))
  n = run.model_cfg.num_image_tokens
  for rec, r in zip(preds[:2], records[:2]):
    text, lens, starts, spans = U.choice_rows(run.tokenizer, r["question"], r["choices"],
                                              run.model_cfg.max_text_len, "test")
    from mmar_jax.sample.io import load_image
    image = torch.from_numpy(np.stack([load_image(r["image"], 16)] * len(lens)))
    with torch.no_grad():
      tokens = tm.encode_images(image)[0]
      prep = dict(tokens=tokens, masked=torch.zeros(len(lens), n, dtype=torch.bool),
                  kind=torch.ones(len(lens), dtype=torch.long), text=torch.from_numpy(text).long(),
                  text_len=torch.from_numpy(lens).long())
      hidden, _, _ = tm(prep)
      logp = torch.log_softmax(tm.backbone.lm_head(hidden[:, n + 1:n + 1 + text.shape[1]]), -1)
    want = [float(sum(logp[k, j, text[k, j]] for j in range(starts[k], starts[k] + spans[k])))
            for k in range(len(lens))]
    np.testing.assert_allclose(rec["log_likelihoods"], want, rtol=1e-4, atol=1e-4)
    assert rec["correct"] == (int(np.argmax(want)) == r["answer_index"])


def test_the_command_writes_predictions_and_summary(tmp_path_factory, tmp_path, capsys):
  from mmar_jax import cli
  wd = straight_run(tmp_path_factory)
  data = _benchmark(tmp_path)
  out = tmp_path / "u.json"
  capsys.readouterr()
  assert cli.main(["eval", "understanding", "--workdir", wd, "--data", data, "--out", str(out),
                   "--batch-size", "4"]) == 0
  line = json.loads(capsys.readouterr().out.splitlines()[-1])
  written = json.loads(out.read_text())
  assert line["records"] == 4 and written["summary"]["scored"] == 3 and len(written["predictions"]) == 4
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image": "a.png", "choices": ["x", "y"], "answer": "z"}\n')
  assert cli.main(["eval", "understanding", "--workdir", wd, "--data", str(bad)]) == 2
  assert "answer 'z' is none of the choices" in capsys.readouterr().err


def _multiple_choice_file(directory, reps: int = 4) -> str:
  """Held-out demo pictures, each with its caption and three captions that change one attribute."""
  from PIL import Image

  from mmar_jax.data import shapes
  spec = shapes.ShapesSpec()
  rng = np.random.default_rng(0)
  lines = []
  for c, s, p in spec.heldout_combinations():
    colour, shape, position = spec.names((c, s, p))
    other = lambda names, i: names[(names.index(i) + 1 + rng.integers(len(names) - 1)) % len(names)]
    choices = [shapes.caption(colour, shape, position),
               shapes.caption(other(spec.colours, colour), shape, position),
               shapes.caption(colour, other(spec.shapes, shape), position),
               shapes.caption(colour, shape, other(spec.positions, position))]
    order = rng.permutation(4)
    for r in range(reps):
      name = f"{c}_{s}_{p}_{r}.png"
      Image.fromarray(shapes.render(colour, shape, position, spec, rng=rng)).save(os.path.join(directory, name))
      lines.append(dict(image=name, choices=[choices[i] for i in order], answer=int(np.argmax(order == 0))))
  path = os.path.join(directory, "mc.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps(l) + "\n" for l in lines))
  return path


@pytest.mark.slow  # trains the demo model twice (minutes)
def test_multiple_choice_above_chance_trained_and_at_chance_random(tmp_path, capsys):
  import subprocess
  import sys

  from conftest import ROOT, subprocess_env
  from mmar_jax import cli
  data = _multiple_choice_file(str(tmp_path))
  runs = {"trained": ["--config.steps=600"],
          "random": ["--config.steps=1", "--config.train.lr=0", "--config.train.lr_backbone=0"]}
  acc = {}
  for name, extra in runs.items():
    wd = str(tmp_path / name)
    # One CPU device, as the demo runs on a laptop (its mesh is 1,1,1; the session has 8).
    subprocess.run([sys.executable, "-m", "mmar_jax", "train", "--cpu-devices", "1", "--config",
                    os.path.join(ROOT, "configs/demo.py"),
                    "--workdir", wd, "--config.eval.at_end=false", *extra], cwd=ROOT,
                   env=subprocess_env(TQDM_DISABLE="1"), check=True, capture_output=True, timeout=1800)
    capsys.readouterr()
    assert cli.main(["eval", "understanding", "--workdir", wd, "--data", data]) == 0
    acc[name] = json.loads(capsys.readouterr().out.splitlines()[-1])["multiple_choice"]["accuracy"]
  print(acc)
  assert acc["trained"] > 0.6 and abs(acc["random"] - 0.25) < 0.15, acc
