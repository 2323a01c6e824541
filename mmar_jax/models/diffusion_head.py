"""MAR's diffusion head (SimpleMLPAdaLN): an MLP that denoises one token x given its condition z.

  h = input_proj(x);  y = time_embed(t) + cond_embed(z)
  depth x ResBlock:   (shift, scale, gate) = adaLN(SiLU(y))
                      h += gate * MLP(LN(h) (1 + scale) + shift)
  final layer:        (shift, scale) = adaLN(SiLU(y));  out = Linear(LN(h) (1 + scale) + shift)

The res blocks are stored stacked (leading `layers` axis) and walked with `lax.scan` or an
unrolled loop (`scan_layers`); the parameters are the same either way. The forward pass is a pure
function of a nested dict of arrays (`forward`), which the NNX module, the samplers and the
converters all use. Precision (method.md §4): with compute_dtype bf16 every matmul and the output
are bf16; LayerNorm statistics and the sinusoidal time features are fp32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax.diffusion.parameterization import PREDICTIONS
from mmar_jax.dtypes import get_dtype
from mmar_jax.models.layers import (LayerNorm, Linear, layer_norm, normal_002, param,
                                    scan_or_unroll, zeros)

FREQUENCY_DIM = 256  # size of the sinusoidal timestep features (MAR's frequency_embedding_size)
MAX_PERIOD = 10000
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  token_channels: int = 16
  cond_dim: int = 896
  width: int = 1024
  depth: int = 6
  learn_sigma: bool = False  # True: 2C outputs, the second half MAR's learned-range variance
  prediction: str = "v"  # what the output means: v (MMAR), eps (MAR), x0
  n_positions: int = 0  # > 0: MAR's learned position embedding [n_positions, cond_dim] added to z
  # Execution switches (not part of the checkpoint's shapes).
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  scan_layers: bool = True


  def __post_init__(self):
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"unknown prediction {self.prediction!r}; use one of {PREDICTIONS}")
    for name in ("token_channels", "cond_dim", "width", "depth"):
      if getattr(self, name) < 1:
        raise ValueError(f"HeadConfig.{name} must be positive, got {getattr(self, name)}")
    get_dtype(self.compute_dtype), get_dtype(self.param_dtype)

  @property
  def out_channels(self) -> int:
    return 2 * self.token_channels if self.learn_sigma else self.token_channels

  def replace(self, **kw) -> "HeadConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "HeadConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown HeadConfig keys: {unknown}")
    return cls(**d)


class DiffusionHead(nnx.Module):
  """Parameter layout (pure dict; MAR names in convert/mar_head.py):
  input_proj, cond_embed, time_embed.{mlp_in, mlp_out}: {kernel [in, out], bias};
  res_blocks.{in_ln: {scale, bias}, mlp_in, mlp_out, adaLN}: stacked [depth, ...];
  final_layer.{adaLN, linear}; pos_embed [n_positions, cond_dim] when n_positions > 0.
  """

  def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, d, w, n = cfg.token_channels, cfg.cond_dim, cfg.width, cfg.depth
    pd = get_dtype(cfg.param_dtype)
    # Megatron-style names: each MLP pair splits its hidden width over 'tensor' once; the
    # residual stream (width) stays unsplit and the FSDP fallback shards whatever is left.
    lin = lambda *a, **k: Linear(*a, rngs=rngs, param_dtype=pd, **k)
    self.input_proj = lin(c, w, ("channels", None))
    # MAR draws both time-MLP weights from N(0, 0.02) instead of xavier.
    self.time_embed = nnx.Dict(
        mlp_in=lin(FREQUENCY_DIM, w, (None, "head_width"), kernel_init=normal_002),
        mlp_out=lin(w, w, ("head_width", None), kernel_init=normal_002))
    self.cond_embed = lin(d, w, ("embed", None))
    # adaLN outputs and the final linear start at zero: every block starts as the identity and
    # the head outputs exactly 0.
    self.res_blocks = nnx.Dict(
        in_ln=LayerNorm(w, eps=LN_EPS, axis_name=None, stack=n, param_dtype=pd, rngs=rngs),
        mlp_in=lin(w, w, (None, "head_width"), stack=n),
        mlp_out=lin(w, w, ("head_width", None), stack=n),
        adaLN=lin(w, 3 * w, (None, "head_width"), kernel_init=zeros, stack=n))
    self.final_layer = nnx.Dict(
        adaLN=lin(w, 2 * w, (None, "head_width"), kernel_init=zeros),
        linear=lin(w, cfg.out_channels, (None, "channels"), kernel_init=zeros))
    # MAR initialises its diffusion position embedding with N(0, 0.02).
    self.pos_embed = (param(rngs, normal_002, (cfg.n_positions, d), (None, "embed"), pd)
                      if cfg.n_positions else None)

  def __call__(self, x: jax.Array, t: jax.Array, z: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
    return forward(head_params(self), self.cfg, x, t, z, positions)


def head_params(head: DiffusionHead) -> dict:
  """The module's parameters as a nested dict of arrays (the layout `forward` reads)."""
  return nnx.state(head, nnx.Param).to_pure_dict()


def abstract_params(cfg: HeadConfig) -> dict:
  """Nested dict of ShapeDtypeStruct, without allocating or initialising anything."""
  state = nnx.state(nnx.eval_shape(lambda: DiffusionHead(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.to_pure_dict())


def head_from_params(cfg: HeadConfig, params: dict) -> DiffusionHead:
  """A DiffusionHead holding `params` (e.g. a converter's output)."""
  head = nnx.eval_shape(lambda: DiffusionHead(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(head)
  state.replace_by_pure_dict(params)
  return nnx.merge(graphdef, state)


# -- the forward pass (pure) -----------------------------------------------------------------------

def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_DIM) -> jax.Array:
  """fp32 [N, dim]: [cos, sin] of the raw integer timestep times exp(-ln(10000) k / (dim/2))."""
  half = dim // 2
  # The exponent rounded to fp32 as MAR's torch code rounds it, then a correctly rounded exp on
  # the host: the frequencies then match MAR's (126 of 128 exactly, the rest within one ulp) and
  # do not depend on a backend's exp; a one-ulp change is visible at t ~ 1000.
  k = np.arange(half, dtype=np.float32)
  exponent = (np.float32(-math.log(MAX_PERIOD)) * k) / np.float32(half)
  freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _linear(p: dict, x, dtype):
  return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


def res_block(h, w: dict, ys, dtype):
  """One adaLN residual block on the residual stream h; ys = SiLU(y), shared by every adaLN."""
  shift, scale, gate = jnp.split(_linear(w["adaLN"], ys, dtype), 3, axis=-1)
  u = modulate(layer_norm(h, w["in_ln"]["scale"], w["in_ln"]["bias"], LN_EPS), shift, scale)
  u = _linear(w["mlp_out"], jax.nn.silu(_linear(w["mlp_in"], u, dtype)), dtype)
  return h + gate * u


def forward(params: dict, cfg: HeadConfig, x: jax.Array, t: jax.Array, z: jax.Array,
            positions: jax.Array | None = None) -> jax.Array:
  """Head output [N, out_channels] in compute dtype for tokens x [N, C] at integer timesteps
  t [N] (or a scalar) under conditions z [N, D]; `positions` [N] index the optional learned
  position embedding."""
  dtype = get_dtype(cfg.compute_dtype)
  if cfg.n_positions:
    if positions is None:
      raise ValueError("this head has a learned position embedding: pass positions")
    z = z.astype(jnp.float32) + jnp.take(params["pos_embed"], positions, axis=0).astype(jnp.float32)
  t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
  h = _linear(params["input_proj"], x, dtype)
  te = params["time_embed"]
  t_emb = _linear(te["mlp_out"], jax.nn.silu(_linear(te["mlp_in"], timestep_embedding(t), dtype)),
                  dtype)
  y = t_emb + _linear(params["cond_embed"], z, dtype)
  ys = jax.nn.silu(y)
  blocks = params["res_blocks"]
  h, _ = scan_or_unroll(lambda h, w: (res_block(h, w, ys, dtype), None), h, blocks,
                        cfg.scan_layers)
  fl = params["final_layer"]
  shift, scale = jnp.split(_linear(fl["adaLN"], ys, dtype), 2, axis=-1)
  out = _linear(fl["linear"], modulate(layer_norm(h, None, None, LN_EPS), shift, scale), dtype)
  # The precision contract: a silent upcast (e.g. an fp32 bias promoting the sum) fails here.
  assert out.dtype == dtype, (out.dtype, dtype)
  return out
