"""KL-16 VAE: parity with an independent PyTorch AutoencoderKL, conversion both ways (also through
the CLI with a real torch checkpoint), and the image-tokenizer interface.

The torch reference below is written from method.md §7 (the LDM AutoencoderKL as MAR uses it),
NCHW, with MAR's module names so its state dict has MAR's keys; it shares no code with the JAX
model.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmar_jax.errors import ConversionError  # noqa: E402
from mmar_jax.convert.mar_vae import ignored_keys, jax_to_mar_vae, mar_vae_to_jax  # noqa: E402
from mmar_jax.models import image_tokenizer as itok  # noqa: E402
from mmar_jax.models.vae import VAEConfig, param_paths, vae_from_params  # noqa: E402

# ---- the PyTorch reference (LDM AutoencoderKL, MAR's kl16 layout) ---------------------------------


def _norm(c):
  return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class TResnetBlock(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
    self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)
    self.cin, self.cout = cin, cout

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if self.cin != self.cout else x) + h


class TAttnBlock(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.norm = _norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)  # b, hw, c
    w_ = torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** (-0.5))  # b, hw_q, hw_k
    w_ = torch.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + self.proj_out(h_)


class TDownsample(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class TUpsample(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c):
  mid = nn.Module()
  mid.block_1, mid.attn_1, mid.block_2 = TResnetBlock(c, c), TAttnBlock(c), TResnetBlock(c, c)
  return mid


class TEncoder(nn.Module):

  def __init__(self, ch, ch_mult, num_res_blocks=2, z_channels=16, resolution=256, attn_res=(16,)):
    super().__init__()
    self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
    in_mult, res, n = (1,) + tuple(ch_mult), resolution, len(ch_mult)
    self.down = nn.ModuleList()
    for i in range(n):
      block, attn = nn.ModuleList(), nn.ModuleList()
      bin_, bout = ch * in_mult[i], ch * ch_mult[i]
      for _ in range(num_res_blocks):
        block.append(TResnetBlock(bin_, bout))
        bin_ = bout
        if res in attn_res:
          attn.append(TAttnBlock(bin_))
      down = nn.Module()
      down.block, down.attn = block, attn
      if i != n - 1:
        down.downsample = TDownsample(bin_)
        res //= 2
      self.down.append(down)
    self.mid = _mid(bin_)
    self.norm_out = _norm(bin_)
    self.conv_out = nn.Conv2d(bin_, 2 * z_channels, 3, 1, 1)
    self.n, self.nb = n, num_res_blocks

  def forward(self, x):
    h = self.conv_in(x)
    for i in range(self.n):
      for j in range(self.nb):
        h = self.down[i].block[j](h)
        if len(self.down[i].attn) > 0:
          h = self.down[i].attn[j](h)
      if i != self.n - 1:
        h = self.down[i].downsample(h)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    return self.conv_out(F.silu(self.norm_out(h)))


class TDecoder(nn.Module):

  def __init__(self, ch, ch_mult, num_res_blocks=2, z_channels=16):
    super().__init__()
    n = len(ch_mult)
    bin_ = ch * ch_mult[-1]
    self.conv_in = nn.Conv2d(z_channels, bin_, 3, 1, 1)
    self.mid = _mid(bin_)
    self.up = nn.ModuleList()
    for i in reversed(range(n)):
      block = nn.ModuleList()
      bout = ch * ch_mult[i]
      for _ in range(num_res_blocks + 1):
        block.append(TResnetBlock(bin_, bout))
        bin_ = bout
      up = nn.Module()
      up.block, up.attn = block, nn.ModuleList()
      if i != 0:
        up.upsample = TUpsample(bin_)
      self.up.insert(0, up)
    self.norm_out = _norm(bin_)
    self.conv_out = nn.Conv2d(bin_, 3, 3, 1, 1)
    self.n, self.nb = n, num_res_blocks

  def forward(self, z):
    h = self.conv_in(z)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    for i in reversed(range(self.n)):
      for j in range(self.nb + 1):
        h = self.up[i].block[j](h)
      if i != 0:
        h = self.up[i].upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TAutoencoderKL(nn.Module):

  def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), embed_dim=16):
    super().__init__()
    self.encoder = TEncoder(ch, ch_mult, z_channels=embed_dim)
    self.decoder = TDecoder(ch, ch_mult, z_channels=embed_dim)
    self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))


def _torch_vae(ch, seed=0):
  torch.manual_seed(seed)
  model = TAutoencoderKL(ch=ch).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".norm" in name or "norm_out" in name:  # GroupNorm affine: away from (1, 0)
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _run_parity(ch, size, batch=2):
  model = _torch_vae(ch)
  sd = _state_dict(model)
  cfg, params = mar_vae_to_jax(sd)
  assert (cfg.ch, cfg.ch_mult, cfg.embed_dim, cfg.attn_levels) == (ch, (1, 1, 2, 2, 4), 16, (4,))
  vae = vae_from_params(cfg, params)
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  z = rng.normal(size=(batch, size // 16, size // 16, 16)).astype(np.float32)
  graphdef, state = nnx.split(vae)

  @jax.jit
  def run(state, images, z):
    m = nnx.merge(graphdef, state)
    return m.encode(images) + (m.decode(z),)

  mean, logvar, dec = jax.device_get(run(state, images, z))
  with torch.no_grad():
    t_mean, t_logvar = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2))
    t_dec = model.decode(torch.from_numpy(z).permute(0, 3, 1, 2))
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  assert mean.shape == (batch, size // 16, size // 16, 16) and dec.shape == images.shape
  for name, a, b in (("mean", mean, nhwc(t_mean)), ("logvar", logvar, nhwc(t_logvar)),
                     ("decoded", dec, nhwc(t_dec))):
    assert np.abs(b).max() > 0.1, name  # a non-trivial output
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=name)


# ---- parity ----------------------------------------------------------------------------------------


def test_parity_with_torch_ch32():
  _run_parity(ch=32, size=64)


@pytest.mark.slow
def test_parity_with_torch_ch128_256px():
  _run_parity(ch=128, size=256, batch=1)


# ---- conversion ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mar_sd():
  return _state_dict(_torch_vae(32, seed=3))


def test_convert_round_trip_bit_exact(mar_sd):
  sd = dict(mar_sd, **{"loss.discriminator.main.0.weight": np.ones((2, 3), np.float32),
                       "loss.logvar": np.zeros((), np.float32)})
  assert ignored_keys(sd) == ["loss.discriminator.main.0.weight", "loss.logvar"]
  cfg, params = mar_vae_to_jax(sd)
  assert params["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 32)
  assert params["encoder"]["down"]["4"]["attn"]["1"]["norm"]["scale"].shape == (128,)
  back = jax_to_mar_vae(VAEConfig.from_dict(cfg.to_dict()), params)
  assert sorted(back) == sorted(mar_sd)
  for k, v in mar_sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    assert np.array_equal(back[k].view(np.uint32), v.view(np.uint32)), k


def test_convert_refuses_missing_and_unknown_keys(mar_sd):
  sd = dict(mar_sd)
  del sd["decoder.up.2.block.1.norm2.bias"]
  with pytest.raises(ConversionError, match=r"missing key decoder\.up\.2\.block\.1\.norm2\.bias"):
    mar_vae_to_jax(sd)
  sd = dict(mar_sd)
  del sd["encoder.conv_in.weight"]  # needed to infer the width
  with pytest.raises(ConversionError, match=r"missing key encoder\.conv_in\.weight"):
    mar_vae_to_jax(sd)
  sd = dict(mar_sd, **{"decoder.mid.attn_1.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ConversionError, match=r"unknown key decoder\.mid\.attn_1\.extra\.weight"):
    mar_vae_to_jax(sd)
  sd = dict(mar_sd, **{"post_quant_conv.bias": np.zeros(7, np.float32)})
  with pytest.raises(ConversionError, match=r"post_quant_conv\.bias: shape"):
    mar_vae_to_jax(sd)


def test_cli_round_trip_from_torch_ckpt(mar_sd, tmp_path):
  from safetensors.numpy import load_file

  from mmar_jax.cli import main
  src = tmp_path / "kl16.ckpt"
  model = {k: torch.from_numpy(v) for k, v in mar_sd.items()}
  model["loss.discriminator.main.0.weight"] = torch.ones(4, 3, 4, 4)
  torch.save({"model": model, "args": argparse.Namespace(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))}, src)
  out, st = tmp_path / "vae", tmp_path / "kl16.safetensors"
  assert main(["convert", "mar-vae", "--src", str(src), "--out", str(out)]) == 0
  assert (out / "vae_config.json").exists() and (out / "params").is_dir()
  assert main(["convert", "mar-vae", "--src", str(src), "--out", str(out)]) == 2  # exists
  assert main(["convert", "jax-to-mar-vae", "--ckpt", str(out), "--out", str(st)]) == 0
  back = load_file(str(st))
  assert sorted(back) == sorted(mar_sd)
  for k, v in mar_sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  assert main(["convert", "jax-to-mar-vae", "--workdir", str(tmp_path), "--out", str(st),
               "--overwrite"]) == 2
  # The converted directory is what a VAE tokenizer loads.
  tok = itok.make_image_tokenizer({"kind": "vae", "path": str(out), "patch_size": 1})
  assert tok.vae.cfg.ch == 32 and tok.token_channels == 16 and tok.num_tokens(256) == 256
  assert itok.token_spec({"kind": "vae", "path": str(out), "patch_size": 2}) == (32, 64)
  with pytest.raises(ValueError, match="ch"):
    itok.make_image_tokenizer({"kind": "vae", "path": str(out), "vae": {"ch": 64}})


# ---- tokenizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,scale", [(4, 1.0), (2, 0.5)])
def test_patchify_tokenizer_round_trip_exact(p, scale):
  cfg = {"kind": "patchify", "patch_size": p, "scale": scale}
  tok = itok.make_image_tokenizer(cfg)
  assert itok.token_spec(cfg) == (tok.stride, tok.token_channels) == (p, 3 * p * p)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  mean, logvar = tok.encode(jnp.asarray(images))
  assert logvar is None and mean.shape == (2, tok.num_tokens((16, 24)), 3 * p * p)
  assert tok.grid((16, 24)) == (16 // p, 24 // p) and tok.token_channels == 3 * p * p
  # Token 1 is the second patch of the first row; channel order (c, i, j) as MAR's patchify.
  np.testing.assert_array_equal(np.asarray(mean[0, 1]),
                                images[0, :p, p:2 * p, :].transpose(2, 0, 1).reshape(-1) * scale)
  assert tok.sample(mean, logvar, jax.random.key(0)) is mean
  back = tok.tokens_to_images(mean, grid=tok.grid((16, 24)))
  np.testing.assert_array_equal(np.asarray(back), images)
  with pytest.raises(ValueError, match="square"):
    tok.tokens_to_images(mean)


def test_vae_tokenizer_scaling_and_patches():
  # A small VAE (two levels) keeps the compile short; the tokenizer logic is size-independent.
  # Weights from numpy (not the random initialisers, whose many small compiles cost seconds).
  vae_cfg = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1}
  scale = 0.25
  tok_cfg = {"kind": "vae", "patch_size": 2, "scale": scale, "vae": vae_cfg}
  abstract = nnx.eval_shape(lambda: itok.make_image_tokenizer(tok_cfg))
  assert isinstance(abstract, itok.VAETokenizer) and abstract.vae.cfg.ch_mult == (1, 2)
  assert itok.token_spec(tok_cfg) == (abstract.stride, abstract.token_channels) == (4, 64)
  cfg = VAEConfig.from_dict(vae_cfg)
  rng = np.random.default_rng(2)
  params = {}
  for path, shape in param_paths(cfg).items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    fan_in = np.prod(shape.shape[:-1]) if path[-1] == "kernel" else 1
    node[path[-1]] = (rng.normal(size=shape.shape) / np.sqrt(fan_in)).astype(np.float32)
  tok = itok.VAETokenizer(cfg, patch_size=2, scale=scale, vae=vae_from_params(cfg, params))
  assert tok.stride == 4 and tok.token_channels == 64 and tok.grid((16, 8)) == (4, 2)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  graphdef, state = nnx.split(tok)

  @jax.jit
  def run(state, images, key):
    t = nnx.merge(graphdef, state)
    mean, logvar = t.encode(images)
    z_mean, z_logvar = t.vae.encode(images)
    sample = t.sample(mean, logvar, key)
    return (mean, logvar, z_mean, z_logvar, sample, t.tokens_to_images(mean),
            t.vae.decode(z_mean), jax.random.normal(key, mean.shape))

  mean, logvar, z_mean, z_logvar, sample, dec, z_dec, noise = run(state, images, jax.random.key(1))
  assert mean.shape == (2, 16, 64)
  np.testing.assert_allclose(mean, itok.patchify(z_mean, 2) * scale, rtol=1e-6)
  np.testing.assert_allclose(logvar, itok.patchify(z_logvar, 2) + 2 * np.log(scale), rtol=1e-6)
  # The token posterior sample is the scaled latent posterior sample (same noise).
  z_sample = itok.patchify(z_mean + jnp.exp(0.5 * z_logvar) * itok.unpatchify(noise, 2, (4, 4)), 2)
  np.testing.assert_allclose(sample, z_sample * scale, rtol=1e-5, atol=1e-6)
  # Decoding tokens divides the scale back out and undoes the patch grouping.
  np.testing.assert_allclose(dec, z_dec, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(itok.unpatchify(itok.patchify(z_mean, 2), 2, (4, 4)), z_mean)


def test_center_crop_arr():
  from PIL import Image

  from mmar_jax.data.preprocess import center_crop_arr, to_model_range
  arr = np.zeros((100, 300, 3), np.uint8)
  arr[:, 140:160] = 255  # a bright band in the middle survives the centre crop
  out = center_crop_arr(Image.fromarray(arr), 32)
  assert out.size == (32, 32)
  x = to_model_range(out)
  assert x.shape == (32, 32, 3) and x.min() >= -1 and x.max() <= 1
  assert x[:, 16].mean() > 0.5 and x[:, 0].mean() < -0.9


def test_vae_params_carry_logical_axes(cpu_devices):
  from jax.sharding import PartitionSpec as P

  from mmar_jax.parallel.sharding import spec_for
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  from mmar_jax.models import vae as vae_lib
  # The config the conversion tests infer, so the cached abstract model is reused.
  abstract = nnx.merge(*vae_lib._abstract(VAEConfig(ch=32, attn_levels=(4,))))

  def spec(var):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.get_value().ndim
    return spec_for(var.get_value().shape, names, mesh)

  conv = abstract.encoder.down[4].block[0].conv1.kernel
  assert conv.get_metadata()["out_sharding"] == ("conv_kh", "conv_kw", "conv_in", "conv_out")
  assert spec(conv) == P(None, None, None, "fsdp")
  assert spec(abstract.decoder.conv_out.kernel) == P(None, None, "fsdp", None)  # 3 outputs
  assert spec(abstract.encoder.norm_out.scale) == P("fsdp")  # FSDP fallback
