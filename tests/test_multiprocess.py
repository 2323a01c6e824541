"""Several processes with `jax.distributed` on 127.0.0.1 (4 CPU devices each, an 8-device global
mesh) train like one process with 8 devices; checkpoints cross between the two.

Workers are subprocesses with timeouts: a peer that dies makes the other abort only after JAX's
heartbeat timeout (jax_notes.md), never hang the test session.
"""

import signal
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from helpers_procs import finish, free_port
from helpers_train import copy_run, losses, metrics, steps_on_disk, straight_run, train_cmd, train_env


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  return straight_run(tmp_path_factory)


def start_workers(workdir, *overrides, n: int = 2, devices: int = 4) -> list[subprocess.Popen]:
  address = f"127.0.0.1:{free_port()}"
  procs = []
  for i in range(n):
    cmd = train_cmd(workdir, *overrides, cpu_devices=devices) + [
        "--coordinator", address, "--num-processes", str(n), "--process-id", str(i)]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


WORKER = """
import sys
import numpy as np
from mmar_jax import startup
startup.configure(["--cpu-devices", "4"])
from mmar_jax.parallel import distributed
workdir, address, pid, out = sys.argv[1:5]
distributed.maybe_initialize(distributed.with_flags(address, 2, int(pid)))
import jax
from mmar_jax.data.pipeline import global_batch, make_batcher
from mmar_jax.train.checkpoint import Checkpointer
from mmar_jax.data.sources import make_source
from mmar_jax.train.workdir import resolve_config, setup
from mmar_jax.train.step import abstract_train_state
assert jax.process_count() == 2 and jax.device_count() == 8
config = resolve_config(workdir, None, [])
tokenizer, mcfg, tr = setup(config, workdir)
batcher = make_batcher(config, make_source(config), tokenizer, mcfg.max_text_len)
found = {}
def keep(name, array):
  for shard in array.addressable_shards:
    where = ",".join(f"{i.start}:{i.stop}" for i in shard.index)
    found[f"{name}@{where}"] = np.asarray(shard.data)
for step in (0, 13):
  for key, array in global_batch(batcher, step, tr.batch_sharding).items():
    keep(f"batch/{step}/{key}", array)
distributed.barrier("restore")
ckpt = Checkpointer(workdir, read_only=True)
state, meta = ckpt.restore(20, abstract_train_state(tr))
ckpt.close()
for path, leaf in jax.tree_util.tree_leaves_with_path(state):
  keep("state/" + jax.tree_util.keystr(path), leaf)
np.savez(out, **found)
"""


def _slice(array, where: str):
  index = tuple(slice(*(int(x) if x != "None" else None for x in part.split(":")))
                for part in where.split(",") if part)
  return np.asarray(array)[index]


def test_two_processes_build_the_batches_and_restore_the_checkpoint(straight, demo_batcher, tmp_path):
  """Each of two processes builds its rows of the one-process global batches, and restores its
  shards of a checkpoint the one-process run wrote, equal to what one process has."""
  import sys

  import jax

  from helpers_train import restore
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, straight, address, str(i),
                             str(tmp_path / f"p{i}.npz")], cwd=ROOT, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  finish(procs, timeout=300)
  state, _ = restore(straight, 20)
  leaves = {"state/" + jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(state)}
  batches = {s: demo_batcher.local_batch(s) for s in (0, 13)}
  covered = {}
  for i in range(2):
    with np.load(tmp_path / f"p{i}.npz") as got:
      for key in got.files:
        name, where = key.split("@")
        if name.startswith("batch/"):
          _, step, field = name.split("/")
          want = batches[int(step)][field]
        else:
          want = leaves[name]
        np.testing.assert_array_equal(got[key], _slice(want, where), err_msg=key)
        covered.setdefault(name, set()).add(i)
  assert all(v == {0, 1} for v in covered.values())  # both processes hold part of everything
  assert len([n for n in covered if n.startswith("state/")]) == len(leaves)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_processes(straight, tmp_path):
  """Step 10 of the one-process run, resumed by two processes of 4 devices: steps 11..20 have
  the one-process losses (within 1e-5), and the two write a checkpoint that restores."""
  wd = copy_run(straight, tmp_path / "run", keep_steps=[10])
  outs = finish(start_workers(wd, "--config.steps=20"))
  assert "step 11/20" in outs[0] and "step 11/20" not in outs[1]  # process 0 logs
  ref, got = losses(straight), losses(wd)
  assert sorted(got) == list(range(11, 21))
  np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], atol=1e-5, rtol=0)
  assert steps_on_disk(wd) == [10, 20]


@pytest.mark.slow
def test_two_processes_train_like_one(straight, tmp_path):
  """From scratch: two processes x 4 devices give the losses of one process x 8 devices."""
  wd = str(tmp_path / "run")
  finish(start_workers(wd, "--config.steps=10"))
  ref, got = losses(straight), losses(wd)
  assert sorted(got) == list(range(1, 11))
  np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_preemption_in_two_processes_saves_one_step(straight, tmp_path):
  """SIGTERM to both workers: they agree on a step through the preemption sync point, both save
  it and exit 0."""
  wd = copy_run(straight, tmp_path / "run", keep_steps=[10])
  procs = start_workers(wd, "--config.steps=100000")
  first = procs[0]
  out0 = []
  for line in first.stdout:
    out0.append(line)
    if line.startswith("step 11/"):
      break
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = finish(procs)
  saved = steps_on_disk(wd)
  assert len(saved) == 2 and saved[0] == 10 and 11 <= saved[1] < 100000, saved
  assert f"saved step {saved[1]}" in "".join(out0) + outs[0]
  assert metrics(wd)[-1]["step"] <= saved[1]
