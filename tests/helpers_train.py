"""Running `mmar-jax train` in subprocesses and reading what it leaves behind (shared by the
checkpoint and multi-process tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT, TINY, subprocess_env

# The tiny model with every step logged and a checkpoint every 10 steps.
LOGGED = ("--config.train.log_every=1", "--config.train.checkpoint_every=10")


def train_cmd(workdir, *overrides, cpu_devices: int = 8, python_prelude: str | None = None) -> list[str]:
  """The command line of a training subprocess; `python_prelude` runs first (monkeypatches)."""
  head = [sys.executable, "-m", "mmar_jax"]
  if python_prelude:
    head = [sys.executable, "-c", python_prelude + "\nimport sys\nfrom mmar_jax.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))"]
  return head + ["train", "--cpu-devices", str(cpu_devices), "--config", os.path.join(ROOT, TINY),
                 "--workdir", str(workdir), *LOGGED, *overrides]


def train_env(**extra) -> dict:
  # No progress bar noise; the compile cache (MMAR_JAX_CACHE) is inherited from the session.
  return subprocess_env(TQDM_DISABLE="1", **extra)


def run_train(workdir, *overrides, timeout: int = 600, check: bool = True, **kw):
  proc = subprocess.run(train_cmd(workdir, *overrides, **kw), cwd=ROOT, env=train_env(),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return proc


def train_here(workdir, *overrides) -> dict:
  """The same training run inside the test process (its compiled functions and compilation
  cache are reused): a start from whatever `workdir` holds, like a new process."""
  from mmar_jax.config import apply_overrides, load_file
  from mmar_jax.train.loop import train
  from mmar_jax.train.workdir import resolve_config
  args = [tuple(o[len("--config."):].split("=", 1)) for o in (*LOGGED, *overrides)]
  if (os.path.exists(os.path.join(workdir, "config.json"))):
    config = resolve_config(str(workdir), None, args)
  else:
    config = apply_overrides(load_file(os.path.join(ROOT, TINY)), args)
  return train(config, str(workdir), progress=False)


def step_lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if line.strip().startswith("step ")]


def losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl (a later line for the same step wins: a redone step)."""
  return {rec["step"]: rec["loss"] for rec in metrics(workdir)}


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def steps_on_disk(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def copy_run(src, dst, keep_steps) -> str:
  """A copy of a workdir holding only the checkpoints in `keep_steps` (and no metrics)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"))
  for s in steps_on_disk(dst):
    if s not in keep_steps:
      shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))
  return str(dst)


def straight_run(tmp_path_factory) -> str:
  """20 steps in one process from scratch: the reference every resume test compares with. Kept
  under the session's base temp directory so the test modules that need it share one run."""
  wd = tmp_path_factory.getbasetemp() / "straight_20"
  if not (wd / "checkpoints" / "20").exists():
    if wd.exists():
      shutil.rmtree(wd)
    train_here(wd, "--config.steps=20")
  return str(wd)


def restore(workdir, step: int, mesh: str = "1,8,1", devices=None) -> tuple[dict, dict]:
  """(state as host arrays, meta) of a checkpoint, restored onto `mesh`."""
  import jax

  from mmar_jax.data.text_tokenizer import load_text_tokenizer
  from mmar_jax.models.mmar import model_config
  from mmar_jax.parallel.mesh import make_mesh
  from mmar_jax.train.checkpoint import Checkpointer
  from mmar_jax.train.workdir import resolve_config
  from mmar_jax.train.step import abstract_train_state, build
  config = resolve_config(workdir, None, [("mesh", mesh)])
  mcfg = model_config(config, load_text_tokenizer(os.path.join(workdir, "tokenizer")))
  tr = build(config, mcfg, make_mesh(mesh, devices=devices))
  target = abstract_train_state(tr)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    state, meta = ckpt.restore(step, target)
  finally:
    ckpt.close()
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
  return jax.tree.map(lambda a: jax.device_get(a), state), meta


def assert_trees_equal(a, b):
  import jax
  import numpy as np
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
