"""The whole MMAR in PyTorch (mmar_jax/pytorch): the same numbers as the JAX model on the same
weights and draws (`repro torch-parity`), a check that fails when either side is broken, and
`from_pretrained` on a real `convert jax-to-safetensors` export of a trained run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers_train import straight_run  # noqa: E402
from mmar_jax.errors import ConversionError  # noqa: E402
from mmar_jax.repro import checks, torch_parity  # noqa: E402


@pytest.fixture(scope="module")
def reference():
  """The JAX side of the check on a tiny random learned-variance model, computed once."""
  return torch_parity.reference()


def test_torch_parity_passes(reference):
  r = torch_parity.compare(reference)
  assert r["passed"], r
  assert r["captions_equal"] and r["tokens"] < 1e-4
  assert all(reference["grad_norms"][k] > 0 for k in ("backbone", "vit", "projector", "head"))
  result = checks.check_torch_parity(reference=reference)
  assert result.status == "pass" and result.value <= 1.0, result


@pytest.mark.parametrize("perturb", ["position", "kernel"])
def test_torch_parity_fails_when_broken(reference, perturb):
  """A shifted RoPE position of the image block (training layout) or a transposed ViT kernel."""
  r = torch_parity.compare(reference, perturb)
  assert not r["passed"] and r["logits"] > 1e-3 and r["losses"] > 1e-5, r
  if perturb == "kernel":  # the ViT runs in sampling too
    assert r["tokens"] > 1e-4 and not r["captions_equal"], r


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  from mmar_jax.commands.convert import workdir_to_safetensors
  run = straight_run(tmp_path_factory)
  out = str(tmp_path_factory.mktemp("torch") / "export")
  workdir_to_safetensors(run, out, max_shard_size="200KB")
  return run, out


def test_from_pretrained_loads_every_tensor_and_the_tokenizer(export):
  from mmar_jax.convert import safetensors_io as sio
  from mmar_jax.pytorch import MMAR
  run, out = export
  model = MMAR.from_pretrained(out)
  with sio.CheckpointDir(out) as ckpt:
    stored = {k: ckpt.get(k) for k in ckpt.keys()}
  state = model.state_dict()
  assert set(stored) <= set(state)
  for name, a in stored.items():
    np.testing.assert_array_equal(state[name].numpy(), a, err_msg=name)
  images = model.generate(["a red circle at the top left", None], ar_steps=2, diffusion_steps=5, seed=1)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  captions = model.caption(images, max_tokens=8)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def _edited(out, tmp_path, edit):
  """A copy of the export with `edit(tensors, config)` applied (one single-file shard)."""
  from mmar_jax.convert import safetensors_io as sio
  dst = tmp_path / "edited"
  dst.mkdir()
  shutil.copytree(os.path.join(out, "tokenizer"), dst / "tokenizer")
  tensors = dict(sio.iter_dir(out))
  config = json.load(open(os.path.join(out, "mmar_config.json")))
  edit(tensors, config)
  sio.save_file(str(dst / "model.safetensors"), tensors, {"format": "pt"})
  json.dump(config, open(dst / "mmar_config.json", "w"))
  return str(dst)


@pytest.mark.parametrize("case,match", [
    ("missing", "missing tensor vit.blocks.0.qkv.weight"),
    ("extra", "unexpected tensor vit.blocks.9.qkv.weight"),
    ("shape", "tensor projector.fc1.weight has shape"),
    ("config", "tensor vit.pos_embed has shape"),
    ("format", "format"),
])
def test_from_pretrained_refuses_by_name(export, tmp_path, case, match):
  from mmar_jax.pytorch import MMAR
  _, out = export

  def edit(tensors, config):
    if case == "missing":
      del tensors["vit.blocks.0.qkv.weight"]
    elif case == "extra":
      tensors["vit.blocks.9.qkv.weight"] = tensors["vit.blocks.0.qkv.weight"]
    elif case == "shape":
      tensors["projector.fc1.weight"] = tensors["projector.fc1.weight"][:, :-1].copy()
    elif case == "config":
      config["model"]["vit"]["num_tokens"] += 1
    else:
      config["format"] = "something/else"
  with pytest.raises(ConversionError, match=match):
    MMAR.from_pretrained(_edited(out, tmp_path, edit))


def test_mar_vae_state_dict_loads_as_it_is():
  """MAR's KL-16 layout (the independent LDM reference of test_vae.py, MAR's key names) loads into
  the package's AutoencoderKL with `convert mar-vae`'s config inference and no renaming, and
  encodes and decodes the same."""
  from test_vae import _torch_vae

  from mmar_jax.convert.mar_vae import infer_config
  from mmar_jax.pytorch.vae import AutoencoderKL
  ref = _torch_vae(32)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  ours = AutoencoderKL(infer_config(sd).to_dict()).eval()
  ours.load_state_dict(ref.state_dict(), strict=True)
  x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
  with torch.no_grad():
    for a, b in zip(ours.encode(x), ref.encode(x)):
      torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    z = ref.encode(x)[0]
    torch.testing.assert_close(ours.decode(z), ref.decode(z), rtol=1e-5, atol=1e-5)


def test_vae_config_inference_tells_embed_dim_from_z_channels():
  from mmar_jax.convert.mar_vae import infer_config
  from mmar_jax.models.vae import VAEConfig
  from mmar_jax.pytorch.vae import AutoencoderKL
  cfg = VAEConfig(ch=32, ch_mult=(1, 2), embed_dim=8, z_channels=4)
  sd = {k: v.numpy() for k, v in AutoencoderKL(cfg.to_dict()).state_dict().items()}
  got = infer_config(sd)
  assert (got.embed_dim, got.z_channels) == (8, 4)


def test_a_change_made_in_pytorch_comes_back_into_a_run(export, tmp_path):
  """from_pretrained -> edit one weight -> save_pretrained -> `convert safetensors-to-jax`: the new
  workdir's params hold the edit at its place (the ViT fc1 kernel is [in, out] in JAX) and
  nothing else changed."""
  import jax

  from mmar_jax.commands.safetensors_to_jax import safetensors_to_workdir
  from mmar_jax.pytorch import MMAR
  from mmar_jax.run import Run
  run, out = export
  model = MMAR.from_pretrained(out)
  with torch.no_grad():
    model.vit.blocks[1].fc1.weight[0, 1] += 1.0
  model.save_pretrained(str(tmp_path / "edited"))
  with pytest.raises(FileExistsError):
    model.save_pretrained(str(tmp_path / "edited"))
  safetensors_to_workdir(str(tmp_path / "edited"), str(tmp_path / "back"))
  before, step = Run(run).params(None, "ema", on_host=True)
  after, step_back = Run(str(tmp_path / "back")).params(None, "ema", on_host=True)
  assert step_back == step
  delta = np.asarray(after["vit"]["blocks"]["fc1_kernel"]) - np.asarray(before["vit"]["blocks"]["fc1_kernel"])
  assert delta[1, 1, 0] == pytest.approx(1.0) and np.count_nonzero(delta) == 1
  rest = lambda p: [a for path, a in jax.tree_util.tree_leaves_with_path(p) if "fc1_kernel" not in str(path)]
  for a, b in zip(rest(after), rest(before)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # trains the demo model (a few minutes)
def test_torch_parity_on_a_trained_demo_sized_run(tmp_path):
  """`repro torch-parity --workdir` on the demo config's model after 300 steps of training."""
  import subprocess
  import sys

  from conftest import ROOT, subprocess_env
  wd = str(tmp_path / "demo")
  subprocess.run([sys.executable, "-m", "mmar_jax", "train", "--config", os.path.join(ROOT, "configs/demo.py"),
                  "--workdir", wd, "--config.steps=300", "--config.eval.at_end=false"],
                 cwd=ROOT, env=subprocess_env(TQDM_DISABLE="1"), check=True, capture_output=True, timeout=1800)
  result = checks.check_torch_parity(workdir=wd)
  print(result)
  assert result.status == "pass", result
