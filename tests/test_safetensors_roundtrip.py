"""The way back from PyTorch: `convert safetensors-to-jax` makes a training workdir from a
`jax-to-safetensors` export (convert/whole_model.py, commands/safetensors_to_jax.py).

The 20-step tiny run shared with test_checkpoint.py (`straight_run`) is exported once and imported
once per module; the tests read those, or small edited copies of the export.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers_train import assert_trees_equal, metrics, restore, steps_on_disk, straight_run, train_here


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  return straight_run(tmp_path_factory)


@pytest.fixture(scope="module")
def source_ema(straight):
  from mmar_jax.run import Run
  params, step = Run(straight).params(20, "ema", on_host=True)
  assert step == 20
  return params


@pytest.fixture(scope="module")
def exported(straight, tmp_path_factory):
  """fp32 EMA export, sharded (so the import reads an index and several files)."""
  from mmar_jax.commands.convert import workdir_to_safetensors
  out = str(tmp_path_factory.mktemp("st") / "export")
  files, _ = workdir_to_safetensors(straight, out, max_shard_size="100KB")
  assert "model.safetensors.index.json" in files
  return out


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
  """The export made a workdir again, through the command line."""
  from mmar_jax import cli
  out = str(tmp_path_factory.mktemp("st") / "workdir")
  assert cli.main(["convert", "safetensors-to-jax", "--src", exported, "--out", out]) == 0
  return out


def _tensors(directory) -> dict:
  from mmar_jax.convert import safetensors_io as sio
  return dict(sio.iter_dir(directory))


def _assert_bit_identical(a: dict, b: dict):
  assert list(a) == list(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


def _edited_export(exported, dst, edit) -> str:
  """A copy of the export as one file, after `edit(tensors, mmar_config)` changed them in place."""
  from mmar_jax.convert import safetensors_io as sio
  tensors = _tensors(exported)
  config = json.load(open(os.path.join(exported, "mmar_config.json")))
  edit(tensors, config)
  os.makedirs(dst)
  sio.save_file(os.path.join(dst, "model.safetensors"), tensors, {"format": "pt"})
  with open(os.path.join(dst, "mmar_config.json"), "w") as f:
    json.dump(config, f)
  shutil.copytree(os.path.join(exported, "tokenizer"), os.path.join(dst, "tokenizer"))
  return str(dst)


# -- (a) export -> import -> export -------------------------------------------------------------


def test_export_import_export_is_bit_identical(straight, exported, imported, tmp_path):
  """fp32: the second export equals the first bit for bit; bf16: a bf16 export read back (cast up
  to fp32, exactly) and exported as bf16 again is the same file content."""
  from mmar_jax.commands.convert import workdir_to_safetensors
  from mmar_jax.commands.safetensors_to_jax import safetensors_to_workdir
  workdir_to_safetensors(imported, str(tmp_path / "again"))
  _assert_bit_identical(_tensors(exported), _tensors(tmp_path / "again"))
  first, second = (json.load(open(os.path.join(d, "mmar_config.json")))
                   for d in (exported, tmp_path / "again"))
  assert first == second  # model, step, data position and run config carried through too

  workdir_to_safetensors(straight, str(tmp_path / "bf16"), dtype="bf16")
  assert safetensors_to_workdir(str(tmp_path / "bf16"), str(tmp_path / "bf16_run")) == (
      20, ["bfloat16"])
  workdir_to_safetensors(str(tmp_path / "bf16_run"), str(tmp_path / "bf16_again"), dtype="bf16")
  bf16 = _tensors(tmp_path / "bf16")
  assert {a.dtype.name for a in bf16.values()} == {"bfloat16"}
  _assert_bit_identical(bf16, _tensors(tmp_path / "bf16_again"))


# -- (b) the imported workdir -----------------------------------------------------------------------


def test_imported_workdir_holds_the_source_ema_as_a_fresh_run_at_its_step(straight, source_ema,
                                                                        imported):
  """params = ema = the source's EMA exactly (fp32), step 20, nothing skipped, the optimizer's
  moments and count as its init makes them, the data position the source run had; config.json
  is the source run's."""
  from mmar_jax.train.checkpoint import Checkpointer
  state, meta = restore(imported, 20)
  assert steps_on_disk(imported) == [20]
  assert_trees_equal(state["params"], source_ema)
  assert_trees_equal(state["ema"], source_ema)
  assert {a.dtype.name for a in jax.tree.leaves(state["params"])} == {"float32"}
  assert int(state["step"]) == 20 and int(state["skipped"]) == 0
  assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(state["opt_state"]))
  source = Checkpointer(straight, read_only=True)
  try:
    assert meta["data_position"] == source.restore_meta(20)["data_position"] == 20 * 8
  finally:
    source.close()
  assert json.load(open(os.path.join(imported, "config.json"))) == json.load(
      open(os.path.join(straight, "config.json")))
  assert os.path.exists(os.path.join(imported, "tokenizer", "mmar_tokenizer.json"))


# -- (c) train and sample from it ---------------------------------------------------------------------


@pytest.mark.slow  # minutes cold; by default the bit-identical round trip is checked
def test_train_resumes_and_generate_samples_from_the_imported_workdir(imported, tmp_path):
  from mmar_jax import cli
  wd = str(tmp_path / "run")
  shutil.copytree(imported, wd)
  train_here(wd, "--config.steps=22")
  records = metrics(wd)
  assert [r["step"] for r in records] == [21, 22]  # resumed at step 20, not started over
  assert all(np.isfinite(r["loss"]) for r in records)
  assert steps_on_disk(wd) == [20, 22]
  # test_sample.py's arguments: one compiled sampler serves both files.
  out = tmp_path / "x.png"
  assert cli.main(["generate", "--workdir", wd, "--prompt", "a red square at the top left",
                   "--num", "3", "--ar-steps", "4", "--diffusion-steps", "3", "--seed", "5",
                   "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- (d) an edit made in the file lands where it belongs -------------------------------------------


def test_an_edited_tensor_shows_up_at_its_place(exported, source_ema, tmp_path):
  """Asymmetric edits (row != column, layer 1 of 2) in PyTorch layout arrive transposed back, in
  that layer, and nowhere else."""
  from mmar_jax.commands.safetensors_to_jax import safetensors_to_workdir
  from mmar_jax.run import Run

  def edit(t, _):
    for name, (r, c), delta in (("backbone.model.layers.1.self_attn.q_proj.weight", (3, 5), 1.0),
                                ("vit.blocks.1.fc1.weight", (7, 2), 2.0),
                                ("diffloss.net.res_blocks.1.mlp.0.weight", (4, 1), 3.0)):
      t[name] = t[name].copy()
      t[name][r, c] += delta
  src = _edited_export(exported, tmp_path / "edited", edit)
  safetensors_to_workdir(src, str(tmp_path / "wd"))
  got, _ = Run(str(tmp_path / "wd")).params(on_host=True)
  want = jax.tree.map(np.copy, source_ema)
  want["backbone"]["layers"]["q_kernel"][1, 5, 3] += 1.0  # [layer, in, out]
  want["vit"]["blocks"]["fc1_kernel"][1, 2, 7] += 2.0
  want["head"]["res_blocks"]["mlp_in"]["kernel"][1, 1, 4] += 3.0
  assert_trees_equal(got, want)


# -- (e) what is refused -----------------------------------------------------------------------------


def _drop(name):
  return lambda t, _: t.pop(name)


def _add(name):
  return lambda t, _: t.__setitem__(name, np.zeros((3, 3), np.float32))


def _reshape(name):
  return lambda t, _: t.__setitem__(name, np.zeros(t[name].shape[0] + 1, t[name].dtype))


def _model_key(t, config):
  config["model"]["head"]["width"] += 1


@pytest.mark.parametrize("edit, named", [
    (_drop("vit.blocks.1.qkv.weight"), "vit.blocks.1.qkv.weight"),
    (_add("vit.blocks.2.qkv.weight"), "vit.blocks.2.qkv.weight"),
    (_reshape("projector.fc2.bias"), "projector.fc2.bias"),
    (_model_key, "model.head.width"),
], ids=["missing", "extra", "shape", "config"])
def test_bad_exports_are_refused_by_name_and_out_is_untouched(exported, tmp_path, capsys, edit, named):
  from mmar_jax import cli
  src = _edited_export(exported, tmp_path / "bad", edit)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  argv = ["convert", "safetensors-to-jax", "--src", src, "--out", str(out)]
  assert cli.main(argv) == 2  # an existing --out, refused before anything is read
  assert "--overwrite" in capsys.readouterr().err
  assert cli.main(argv + ["--overwrite"]) == 2
  err = capsys.readouterr().err
  assert named in err, err
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["bad", "out"]  # no temporary directory left behind


def test_the_table_maps_a_vae_an_untied_head_and_a_position_embedding_both_ways(tiny_mcfg):
  """The parts the tiny run lacks: a VAE (list indices in its params), an untied LM head and the
  head's position embedding, through params -> tensors -> params on random values."""
  from conftest import tiny_config
  from mmar_jax.convert import whole_model
  from mmar_jax.data.text_tokenizer import load_text_tokenizer
  from mmar_jax.models.mmar import model_config
  config = tiny_config(("model.image.kind", "vae"), ("model.image.patch_size", "1"),
                       ("model.image.vae.ch", "32"), ("model.image.vae.ch_mult", "(1,2)"),
                       ("model.head.pos_embed", "True"),
                       ("model.backbone.tie_word_embeddings", "False"))
  mcfg = model_config(config, load_text_tokenizer("bytes"))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                        whole_model.abstract_params(mcfg))
  tensors = {n: np.array(f()) for n, f in whole_model.tensors_from_params(params, mcfg).items()}
  assert {"backbone.lm_head.weight", "diffusion_pos_embed_learned",
          "vae.encoder.down.1.block.0.conv1.weight"} <= set(tensors)
  assert tensors["vae.encoder.conv_in.weight"].shape == (32, 3, 3, 3)  # [out, in, kh, kw]
  back = whole_model.params_from_tensors(tensors.__getitem__, tensors, mcfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert_trees_equal(back, params)
  # The model config recorded for another run is refused, naming what differs.
  from mmar_jax.errors import ConversionError
  with pytest.raises(ConversionError, match="model.image.kind"):
    whole_model.check_model_config(mcfg.to_dict(), tiny_mcfg)
