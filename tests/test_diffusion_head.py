"""The diffusion head (MAR's SimpleMLPAdaLN) and its MAR-layout converters (method.md §3)."""

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from mmar_jax.convert import mar_head
from mmar_jax.errors import ConversionError
from mmar_jax.models import diffusion_head as dh

C, D, W, DEPTH, N = 16, 24, 32, 2, 5  # token channels, condition, width, res blocks, tokens
PREFIX = "diffloss.net."


# -- an independent PyTorch SimpleMLPAdaLN, written from method.md §3 (MAR's key names) ------------

def _torch_head_module(learn_sigma: bool):
  import torch
  from torch import nn

  class TimeEmbed(nn.Module):
    def __init__(self):
      super().__init__()
      self.mlp = nn.Sequential(nn.Linear(256, W), nn.SiLU(), nn.Linear(W, W))

    def forward(self, t):
      k = torch.arange(128, dtype=torch.float32)
      args = t[:, None].float() * torch.exp(-math.log(10000) * k / 128)[None]
      return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.in_ln = nn.LayerNorm(W, eps=1e-6)
      self.mlp = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
      self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(W, 3 * W))

    def forward(self, x, y):
      shift, scale, gate = self.adaLN_modulation(y).chunk(3, -1)
      return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)

  class Final(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm_final = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
      self.linear = nn.Linear(W, 2 * C if learn_sigma else C)
      self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))

    def forward(self, x, y):
      shift, scale = self.adaLN_modulation(y).chunk(2, -1)
      return self.linear(self.norm_final(x) * (1 + scale) + shift)

  class Head(nn.Module):
    def __init__(self):
      super().__init__()
      self.time_embed = TimeEmbed()
      self.cond_embed = nn.Linear(D, W)
      self.input_proj = nn.Linear(C, W)
      self.res_blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
      self.final_layer = Final()

    def forward(self, x, t, c):
      y = self.time_embed(t) + self.cond_embed(c)
      x = self.input_proj(x)
      for block in self.res_blocks:
        x = block(x, y)
      return self.final_layer(x, y)

  torch.manual_seed(0)
  head = Head()
  with torch.no_grad():  # random, non-zero everywhere (MAR's init zeroes the output layers)
    for name, p in head.named_parameters():
      if "in_ln" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      else:  # unit-scale activations, as in a trained head
        p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1))
  return head


@pytest.fixture(scope="module")
def torch_head():
  return _torch_head_module(learn_sigma=True)


@pytest.fixture(scope="module")
def mar_state_dict(torch_head):
  """MAR layout: the head under diffloss.net., beside some other MAR model keys."""
  sd = {PREFIX + k: v.detach().numpy().copy() for k, v in torch_head.state_dict().items()}
  rng = np.random.default_rng(0)
  sd["z_proj.weight"] = rng.normal(size=(8, 4)).astype(np.float32)
  sd["encoder_pos_embed_learned"] = rng.normal(size=(1, 4, 8)).astype(np.float32)
  return sd


def _head_only(sd):
  return {k: v for k, v in sd.items() if k.startswith(PREFIX)}


# -- the head --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(N, C)).astype(np.float32)
  z = rng.normal(size=(N, D)).astype(np.float32)
  t = np.array([0, 1, 250, 998, 999], np.int32)
  return x, t, z


def _cfg(**kw):
  """The one head shape of this file: tests that share it share compiled programs."""
  return dh.HeadConfig(token_channels=C, cond_dim=D, width=W, depth=DEPTH, learn_sigma=True,
                       prediction="eps", compute_dtype="float32", **kw)


forward = jax.jit(dh.forward, static_argnums=1)


def test_head_outputs_zero_at_init_with_mar_init(inputs):
  x, t, z = inputs
  cfg = _cfg()
  # Built under jit: one compile instead of one per eager initialiser op.
  p = jax.jit(lambda: dh.head_params(dh.DiffusionHead(cfg, rngs=nnx.Rngs(0))))()
  out = forward(p, cfg, x, t, z)
  assert out.shape == (N, 2 * C) and np.all(np.asarray(out) == 0)
  for leaf in (p["final_layer"]["linear"], p["final_layer"]["adaLN"], p["res_blocks"]["adaLN"]):
    assert not np.any(leaf["kernel"]) and not np.any(leaf["bias"])
  for name in ("mlp_in", "mlp_out"):
    assert 0.015 < float(np.std(p["time_embed"][name]["kernel"])) < 0.025  # N(0, 0.02)
  bound = math.sqrt(6 / (C + W))  # xavier-uniform
  k = np.asarray(p["input_proj"]["kernel"])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound
  assert not np.any(p["input_proj"]["bias"]) and not np.any(p["cond_embed"]["bias"])
  assert p["input_proj"]["kernel"].dtype == jnp.float32  # fp32 master weights
  ln = p["res_blocks"]["in_ln"]
  assert ln["scale"].shape == (DEPTH, W) and np.all(np.asarray(ln["scale"]) == 1)
  # Precision DEFAULT: with bf16 compute the output is bf16 (forward asserts it while tracing).
  bf16 = cfg.replace(compute_dtype="bfloat16")
  assert jax.eval_shape(lambda *a: dh.forward(a[0], bf16, *a[1:]), p, x, t, z).dtype == jnp.bfloat16


def test_head_matches_independent_pytorch(torch_head, mar_state_dict, inputs):
  import torch
  x, t, z = inputs
  cfg, params = mar_head.mar_head_to_jax(mar_state_dict)
  assert (cfg.token_channels, cfg.cond_dim, cfg.width, cfg.depth) == (C, D, W, DEPTH)
  assert cfg.learn_sigma and cfg.out_channels == 2 * C and cfg.prediction == "eps"
  with torch.no_grad():
    want = torch_head(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(z)).numpy()
  assert np.abs(want).max() > 0.5  # a real signal, not the zero-init output
  fp32 = cfg.replace(compute_dtype="float32")
  assert fp32 == _cfg()
  got = forward(params, fp32, x, t, z)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  # The unrolled loop reads the same stacked parameters.
  got_unrolled = forward(params, fp32.replace(scan_layers=False), x, t, z)
  np.testing.assert_allclose(np.asarray(got_unrolled), np.asarray(got), atol=1e-6)
  # An NNX module can hold the converted params (what the MMAR model does).
  module = dh.head_from_params(fp32, params)
  jax.tree.map(np.testing.assert_array_equal, dh.head_params(module), params)


# -- conversion ------------------------------------------------------------------------------------

def test_mar_layout_round_trips_bit_for_bit(mar_state_dict):
  head_sd = _head_only(mar_state_dict)
  for sd in (mar_state_dict,
             {k: v.astype(ml_dtypes.bfloat16) for k, v in head_sd.items()},  # bf16 stays bf16
             {k[len("diffloss."):]: v for k, v in head_sd.items()}):  # without leading diffloss.
    cfg, params = mar_head.mar_head_to_jax(sd)
    back = mar_head.jax_to_mar_head(cfg, params)
    want = {PREFIX + k.split("net.", 1)[1]: v for k, v in sd.items() if "net." in k}
    assert sorted(back) == sorted(want)
    for k in want:
      assert back[k].dtype == want[k].dtype and back[k].shape == want[k].shape, k
      np.testing.assert_array_equal(back[k].view(np.uint8), want[k].view(np.uint8), err_msg=k)
  assert mar_head.mar_head_to_jax(sd)[0].param_dtype == "float32"
  # Params line up with the module's own layout.
  cfg, params = mar_head.mar_head_to_jax(mar_state_dict)
  shapes = dh.abstract_params(cfg)
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)))


def test_conversion_refuses_missing_unknown_and_misshapen_keys(mar_state_dict):
  sd = dict(mar_state_dict)
  del sd[PREFIX + "res_blocks.1.mlp.2.bias"]
  with pytest.raises(ConversionError,
                     match=r"missing key diffloss\.net\.res_blocks\.1\.mlp\.2\.bias"):
    mar_head.mar_head_to_jax(sd)
  sd = dict(mar_state_dict)
  sd[PREFIX + "res_blocks.0.extra.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(ConversionError, match=r"diffloss\.net\.res_blocks\.0\.extra\.weight"):
    mar_head.mar_head_to_jax(sd)
  sd = dict(mar_state_dict)
  sd[PREFIX + "res_blocks.1.mlp.0.weight"] = np.zeros((W, W + 1), np.float32)
  with pytest.raises(ConversionError, match=r"res_blocks\.1\.mlp\.0\.weight has shape"):
    mar_head.mar_head_to_jax(sd)


def test_cli_mar_checkpoint_round_trip_and_prediction_guard(tmp_path, mar_state_dict, capsys):
  import torch
  from safetensors.numpy import load_file

  from mmar_jax.cli import main
  from mmar_jax.files import load_params

  ema = dict(mar_state_dict)
  ema["diffusion_pos_embed_learned"] = np.random.default_rng(2).normal(size=(1, 4, D)).astype(
      np.float32)
  raw = {k: v + 1 for k, v in ema.items()}  # 'model' differs from 'model_ema'
  ckpt = str(tmp_path / "checkpoint-last.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in raw.items()},
              "model_ema": {k: torch.from_numpy(v) for k, v in ema.items()},
              "epoch": 3, "args": argparse.Namespace(diffloss_d=DEPTH, diffloss_w=W)}, ckpt)

  # MAR checkpoint -> JAX (model_ema by default), and back to MAR's layout bit for bit.
  d1, f1 = str(tmp_path / "head_eps"), str(tmp_path / "head_eps.safetensors")
  assert main(["convert", "mar-head", "--src", ckpt, "--out", d1]) == 0
  assert "ignored 2 non-head keys" in capsys.readouterr().err
  cfg = json.load(open(os.path.join(d1, "head_config.json")))
  assert cfg["prediction"] == "eps" and cfg["learn_sigma"] and cfg["n_positions"] == 4
  assert main(["convert", "jax-to-mar-head", "--ckpt", d1, "--out", f1]) == 0
  back = load_file(f1)
  want = {k: v for k, v in ema.items() if k.startswith(PREFIX) or k.startswith("diffusion_pos")}
  assert sorted(back) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)
  assert main(["convert", "mar-head", "--src", ckpt, "--out", d1]) == 2  # exists: --overwrite
  assert "--overwrite" in capsys.readouterr().err

  # --key model --prediction v; a v-head is refused by jax-to-mar-head unless --force.
  d2, f2 = str(tmp_path / "head_v"), str(tmp_path / "head_v.safetensors")
  assert main(["convert", "mar-head", "--src", ckpt, "--key", "model", "--prediction", "v",
               "--out", d2]) == 0
  params_v = load_params(d2)
  np.testing.assert_array_equal(np.asarray(params_v["input_proj"]["kernel"]),
                                raw[PREFIX + "input_proj.weight"].T)
  assert main(["convert", "jax-to-mar-head", "--ckpt", d2, "--out", f2]) == 2
  assert "--force" in capsys.readouterr().err and not os.path.exists(f2)
  assert main(["convert", "jax-to-mar-head", "--ckpt", d2, "--out", f2, "--force"]) == 0
  from mmar_jax.convert import safetensors_io
  assert safetensors_io.read_metadata(f2)["prediction"] == "v"
  # ... and converting it back reads the prediction from the metadata.
  d3 = str(tmp_path / "head_v_again")
  assert main(["convert", "mar-head", "--src", f2, "--out", d3]) == 0
  assert json.load(open(os.path.join(d3, "head_config.json")))["prediction"] == "v"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               load_params(d3), params_v)

  assert main(["convert", "jax-to-mar-head", "--workdir", str(tmp_path), "--out", f1,
               "--overwrite"]) == 2
  assert "is not a training workdir" in capsys.readouterr().err
