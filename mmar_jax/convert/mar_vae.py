"""MAR's KL-16 VAE (`kl16.ckpt`, LDM AutoencoderKL) <-> JAX params, both directions.

The JAX module tree uses MAR's names (models/vae.py), so the name table is only the leaf:
  conv  `<path>.weight` [O, I, kh, kw]  <->  `<path>.kernel` [kh, kw, I, O]
  norm  `<path>.weight` [C]             <->  `<path>.scale`
  any   `<path>.bias`                   <->  `<path>.bias`
The architecture (ch, ch_mult, levels, blocks, attention levels, embed_dim) is read from the
tensor shapes; then every key the architecture needs must be present with its shape, and an
unknown key under encoder./decoder./quant_conv./post_quant_conv. is refused by name. Keys
elsewhere (MAR's `loss.*` discriminator and LPIPS weights, ...) are ignored and counted.
"""

from __future__ import annotations

import re

import numpy as np
from flax.nnx import traversals

from mmar_jax.errors import ConversionError
from mmar_jax.models.vae import VAEConfig, param_paths

PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
CONFIG_FILE = "vae_config.json"


def _is_vae_key(name: str) -> bool:
  return name.startswith(PREFIXES)


def ignored_keys(state_dict: dict) -> list[str]:
  """Keys outside the VAE's prefixes (discriminator, LPIPS, ...), which conversion skips."""
  return sorted(k for k in state_dict if not _is_vae_key(k))


# -- names ------------------------------------------------------------------------------------------


def _torch_name(path: tuple[str, ...]) -> str:
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
  return ".".join(path[:-1] + (leaf,))


def _to_jax(path, value: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if path[-1] == "kernel" else value


def _to_torch(path, value: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if path[-1] == "kernel" else value


# -- architecture from shapes -----------------------------------------------------------------------


def _shape(sd: dict, name: str) -> tuple[int, ...]:
  if name not in sd:
    raise ConversionError(f"MAR VAE checkpoint: missing key {name}")
  return tuple(sd[name].shape)


def _indices(sd: dict, pattern: str) -> list[int]:
  """Sorted distinct integers captured by `pattern` (one group) over the keys."""
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def infer_config(sd: dict):
  """VAEConfig from the tensor shapes of a MAR/LDM AutoencoderKL state dict."""
  ch, in_channels = _shape(sd, "encoder.conv_in.weight")[:2]
  levels = _indices(sd, r"encoder\.down\.(\d+)\.")
  if not levels:
    raise ConversionError("MAR VAE checkpoint: no encoder.down.* keys")
  ch_mult = []
  for i in range(levels[-1] + 1):
    width = _shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0]
    if width % ch:
      raise ConversionError(f"encoder.down.{i}.block.0.conv1.weight: width {width} is not a "
                            f"multiple of ch {ch}")
    ch_mult.append(width // ch)
  num_res_blocks = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
  z2 = _shape(sd, "encoder.conv_out.weight")[0]
  if z2 % 2:
    raise ConversionError(f"encoder.conv_out.weight: {z2} output channels; a KL VAE (double_z) "
                          "has 2 * z_channels")
  return VAEConfig(
      ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
      embed_dim=_shape(sd, "post_quant_conv.weight")[1], z_channels=z2 // 2,  # [z, embed, 1, 1]
      in_channels=in_channels, out_ch=_shape(sd, "decoder.conv_out.weight")[0],
      attn_levels=tuple(_indices(sd, r"encoder\.down\.(\d+)\.attn\.")),
      dec_attn_levels=tuple(_indices(sd, r"decoder\.up\.(\d+)\.attn\.")))


# -- both directions --------------------------------------------------------------------------------


def mar_vae_to_jax(state_dict: dict) -> tuple:
  """MAR state dict {name: array} -> (VAEConfig, nested params dict with string keys).

  Arrays keep their dtype. Missing, unknown (inside the VAE's prefixes) or mis-shaped keys raise
  ConversionError naming them; keys outside those prefixes are ignored (see `ignored_keys`).
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items() if _is_vae_key(k)}
  try:
    cfg = infer_config(sd)
    expected = param_paths(cfg)
  except ValueError as e:  # e.g. a width that GroupNorm(32) cannot split
    raise ConversionError(f"MAR VAE checkpoint: {e}") from e
  names = {_torch_name(p): p for p in expected}
  missing = sorted(set(names) - set(sd))
  if missing:
    raise ConversionError(f"MAR VAE checkpoint: missing key {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  unknown = sorted(set(sd) - set(names))
  if unknown:
    raise ConversionError(f"MAR VAE checkpoint: unknown key {unknown[0]}"
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
  params: dict = {}
  for name, path in names.items():
    value = _to_jax(path, sd[name])
    if value.shape != tuple(expected[path].shape):
      raise ConversionError(f"{name}: shape {sd[name].shape} does not fit the architecture "
                            f"inferred from the checkpoint ({describe(cfg)})")
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return cfg, params


def jax_to_mar_vae(cfg, params: dict) -> dict[str, np.ndarray]:
  """(VAEConfig or its dict, nested params: converter output or `to_pure_dict()`) -> MAR state dict."""
  cfg = cfg if isinstance(cfg, VAEConfig) else VAEConfig.from_dict(cfg)
  flat = {tuple(str(p) for p in k): v for k, v in traversals.flatten_mapping(params).items()}
  expected = param_paths(cfg)
  for path in expected:
    if path not in flat:
      raise ConversionError(f"JAX VAE params: missing {'.'.join(path)}")
  extra = sorted(".".join(p) for p in set(flat) - set(expected))
  if extra:
    raise ConversionError(f"JAX VAE params: unknown {extra[0]}")
  out = {}
  for path in expected:
    value = np.asarray(flat[path])
    if value.shape != tuple(expected[path].shape):
      raise ConversionError(f"JAX VAE params: {'.'.join(path)} has shape {value.shape}, "
                            f"expected {tuple(expected[path].shape)}")
    out[_torch_name(path)] = _to_torch(path, value)
  return out


def describe(cfg) -> str:
  return (f"ch={cfg.ch}, ch_mult={cfg.ch_mult}, num_res_blocks={cfg.num_res_blocks}, "
          f"embed_dim={cfg.embed_dim}, z_channels={cfg.z_channels}")
