"""`mmar-jax bench`: each benchmark runs and prints one JSON line with its keys."""

import json
import re

import jax
import jax.numpy as jnp
import pytest

from mmar_jax import cli
from mmar_jax.commands.bench import profile_top

KEYS = {"median_step_s", "compile_s", "tokens_per_s", "images_per_s", "mfu", "peak_bytes", "device"}


@pytest.mark.parametrize("what", ["train", "generate", "caption", "convert"])
def test_bench_prints_its_keys(what, capsys):
  extra = ["--config.eval.ar_steps=4", "--config.eval.diffusion_steps=5"] if what == "generate" else []
  rc = cli.main(["bench", what, "--config", "configs/tiny.py", "--steps", "2",
                 "--config.mesh=1,-1,1", *extra])
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert rc == 0 and len(lines) == 1
  result = json.loads(lines[0])
  assert KEYS <= set(result), KEYS - set(result)
  assert result["median_step_s"] > 0 and result["bench"] == what
  if what == "train":
    assert result["tokens_per_s"] > 0 and result["flops_per_step"] > 0
    assert result["mfu"] is None  # CPU: no known peak unless --config.peak_flops


def test_bench_train_mfu_with_a_given_peak(capsys):
  rc = cli.main(["bench", "train", "--config", "configs/tiny.py", "--steps", "1",
                 "--config.mesh=1,-1,1", "--config.peak_flops=1e12"])
  result = json.loads([l for l in capsys.readouterr().out.splitlines() if l.startswith("{")][0])
  assert rc == 0 and 0 < result["mfu"] < 1


def test_profile_names_the_compiled_programs_operations():
  """`bench train --profile`'s table: every operation it names is an instruction of the
  compiled program (read from its HLO), ranked by time, with shares of the summed op time."""
  fn = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) + jnp.cumsum(x, 0)[-1])
  x = jnp.ones((256, 256))
  hlo_names = set(re.findall(r"%?([\w.\-]+) = ", fn.lower(x).compile().as_text()))
  report = profile_top(lambda: fn(x), calls=2, top=5)
  ops = report["ops"]
  assert ops and report["total_ms"] > 0
  assert {op["name"] for op in ops} <= hlo_names, ({op["name"] for op in ops}, hlo_names)
  assert [op["ms_per_step"] for op in ops] == sorted((op["ms_per_step"] for op in ops), reverse=True)
  assert 0 < sum(op["share"] for op in ops) <= 1 + 1e-9


TINY_BENCH = ["--config.model.backbone.vocab_size=512", "--config.model.backbone.hidden_size=32",
              "--config.model.backbone.num_layers=1", "--config.model.backbone.num_heads=2",
              "--config.model.backbone.num_kv_heads=1", "--config.model.backbone.intermediate_size=64",
              "--config.model.vit.width=32", "--config.model.vit.layers=1", "--config.model.vit.heads=2",
              "--config.model.head.width=32", "--config.model.head.depth=1",
              "--config.model.max_text_len=8", "--config.model.image.size=4", "--config.train.batch_size=2"]


def test_bench_torch_train_prints_the_train_keys(capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  rc = cli.main(["bench", "torch-train", "--config", "configs/bench.py", "--steps", "2", "--threads", "1",
                 *TINY_BENCH])
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert rc == 0 and len(lines) == 1
  result = json.loads(lines[0])
  assert KEYS <= set(result), KEYS - set(result)
  assert result["framework"] == "torch" and result["device"].startswith("cpu (torch ")
  assert result["median_step_s"] > 0 and result["tokens_per_s"] > 0 and result["mfu"] is None
  assert result["flops_per_step"] > 0 and result["peak_bytes"] > 0 and result["compile_s"] == 0
  assert result["loss"] == result["loss"] and abs(result["loss"]) < float("inf")  # finite
