"""MAR's diffusion head (SimpleMLPAdaLN, keys `diffloss.net.*`) <-> our DiffusionHead params.

MAR -> JAX (`convert mar-head`): reads the state dict under --key of a MAR training checkpoint
(or a flat .safetensors), takes every `diffloss.net.` key (the `diffloss.` part may be absent),
ignores and counts the rest, and refuses unknown `diffloss.net.` keys, missing keys and wrong
shapes by name. Sizes come from the tensors: width, depth, condition size, and learned variance
(2C output channels). MAR's top-level `diffusion_pos_embed_learned` [1, n, D] (added to z before
the head) is taken too when present, as the head's optional position embedding. The prediction
type is not in the tensors: --prediction, else the safetensors metadata key `prediction`, else
eps (MAR heads predict eps).

JAX -> MAR (`convert jax-to-mar-head`): MAR's key layout with the `diffloss.net.` prefix, the
prediction in the metadata. A v- or x0-head is refused without --force: MAR's sampler would
silently read its output as eps.
"""

from __future__ import annotations

import re

import numpy as np

from mmar_jax import trees
from mmar_jax.convert import safetensors_io
from mmar_jax.errors import ConversionError
from mmar_jax.models.diffusion_head import HeadConfig, abstract_params

PREFIXES = ("diffloss.net.", "net.")
OUT_PREFIX = "diffloss.net."
POS_EMBED_KEY = "diffusion_pos_embed_learned"

# MAR name -> (our path, is_kernel). `{j}` names a res block (stacked on the leading axis).
TOP_LEVEL = {
    "input_proj": ("input_proj",),
    "cond_embed": ("cond_embed",),
    "time_embed.mlp.0": ("time_embed", "mlp_in"),
    "time_embed.mlp.2": ("time_embed", "mlp_out"),
    "final_layer.adaLN_modulation.1": ("final_layer", "adaLN"),
    "final_layer.linear": ("final_layer", "linear"),
}
PER_BLOCK = {
    "mlp.0": "mlp_in",
    "mlp.2": "mlp_out",
    "adaLN_modulation.1": "adaLN",
}
_BLOCK_RE = re.compile(r"res_blocks\.(\d+)\.(.+)")


def head_keys(state_dict: dict) -> tuple[dict, list[str]]:
  """({name without prefix: array}, ignored keys). Refuses two different prefixes at once."""
  head, ignored, seen = {}, [], set()
  for key, value in state_dict.items():
    for prefix in PREFIXES:
      if key.startswith(prefix):
        head[key[len(prefix):]] = value
        seen.add(prefix)
        break
    else:
      if key != POS_EMBED_KEY:
        ignored.append(key)
  if len(seen) > 1:
    raise ConversionError(f"state dict mixes key prefixes {sorted(seen)}; expected one head")
  if not head:
    raise ConversionError("no diffusion-head keys (diffloss.net.*) in the state dict")
  return head, ignored


def _expected_names(depth: int) -> list[str]:
  names = [f"{m}.{p}" for m in TOP_LEVEL for p in ("weight", "bias")]
  for j in range(depth):
    names += [f"res_blocks.{j}.in_ln.{p}" for p in ("weight", "bias")]
    names += [f"res_blocks.{j}.{m}.{p}" for m in PER_BLOCK for p in ("weight", "bias")]
  return names


def _require(head: dict, name: str) -> np.ndarray:
  if name not in head:
    raise ConversionError(f"missing key {OUT_PREFIX}{name}")
  return np.asarray(head[name])


def _dtype_name(a: np.ndarray) -> str:
  return np.dtype(a.dtype).name


def infer_config(head: dict, prediction: str = "eps", n_positions: int = 0) -> HeadConfig:
  """HeadConfig from the tensors' shapes (head keys without prefix)."""
  w_in = _require(head, "input_proj.weight")
  w_cond = _require(head, "cond_embed.weight")
  w_out = _require(head, "final_layer.linear.weight")
  if w_in.ndim != 2 or w_cond.ndim != 2 or w_out.ndim != 2:
    raise ConversionError("input_proj / cond_embed / final_layer.linear weights must be 2-D")
  width, channels = w_in.shape
  if w_out.shape[0] not in (channels, 2 * channels):
    raise ConversionError(
        f"{OUT_PREFIX}final_layer.linear.weight has {w_out.shape[0]} outputs; expected {channels} "
        f"(fixed variance) or {2 * channels} (learned variance) for {channels} token channels")
  blocks = {int(m.group(1)) for m in map(_BLOCK_RE.match, head) if m}
  depth = max(blocks) + 1 if blocks else 0
  if depth == 0:
    raise ConversionError(f"missing key {OUT_PREFIX}res_blocks.0.in_ln.weight (no res blocks)")
  return HeadConfig(token_channels=int(channels), cond_dim=int(w_cond.shape[1]), width=int(width),
                    depth=depth, learn_sigma=bool(w_out.shape[0] == 2 * channels),
                    prediction=prediction, n_positions=n_positions, compute_dtype="bfloat16",
                    param_dtype=_dtype_name(w_in))


def mar_head_to_jax(state_dict: dict, prediction: str = "eps",
                    pos_embed: bool = True) -> tuple[HeadConfig, dict]:
  """MAR state dict (numpy arrays) -> (HeadConfig, pure params of DiffusionHead), bit for bit.

  `pos_embed=False` leaves out MAR's `diffusion_pos_embed_learned` even when present.
  """
  head, _ = head_keys(state_dict)
  pos = np.asarray(state_dict[POS_EMBED_KEY]) if pos_embed and POS_EMBED_KEY in state_dict else None
  if pos is not None:
    if pos.ndim == 3 and pos.shape[0] == 1:
      pos = pos[0]
    if pos.ndim != 2:
      raise ConversionError(f"{POS_EMBED_KEY} has shape {pos.shape}; expected [1, n, D]")
  cfg = infer_config(head, prediction, 0 if pos is None else int(pos.shape[0]))
  expected = _expected_names(cfg.depth)
  unknown = sorted(set(head) - set(expected))
  if unknown:
    raise ConversionError(f"unknown diffusion-head keys: {[OUT_PREFIX + k for k in unknown[:8]]}"
                          + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""))
  missing = [k for k in expected if k not in head]
  if missing:
    raise ConversionError(f"missing key {OUT_PREFIX}{missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

  shapes = abstract_params(cfg)

  def linear(mar: str, target: dict, block: int | None = None) -> dict:
    out = {}
    for ours, theirs, transpose in (("kernel", "weight", True), ("bias", "bias", False)):
      a = np.asarray(head[f"{mar}.{theirs}"])
      want = target[ours].shape[1:] if block is not None else target[ours].shape
      want_torch = tuple(reversed(want)) if transpose else tuple(want)
      if a.shape != want_torch:
        raise ConversionError(f"{OUT_PREFIX}{mar}.{theirs} has shape {a.shape}, "
                              f"expected {want_torch}")
      out[ours] = a.T if transpose else a
    return out

  params: dict = {}
  for mar, path in TOP_LEVEL.items():
    node, target = params, shapes
    for p in path[:-1]:
      node, target = node.setdefault(p, {}), target[p]
    node[path[-1]] = linear(mar, target[path[-1]])

  blocks = []
  for j in range(cfg.depth):
    b = {ours: linear(f"res_blocks.{j}.{mar}", shapes["res_blocks"][ours], j)
         for mar, ours in PER_BLOCK.items()}
    ln = {}
    for ours, theirs in (("scale", "weight"), ("bias", "bias")):
      a = np.asarray(head[f"res_blocks.{j}.in_ln.{theirs}"])
      if a.shape != (cfg.width,):
        raise ConversionError(f"{OUT_PREFIX}res_blocks.{j}.in_ln.{theirs} has shape {a.shape}, "
                              f"expected ({cfg.width},)")
      ln[ours] = a
    b["in_ln"] = ln
    blocks.append(b)
  params["res_blocks"] = {name: {leaf: np.stack([b[name][leaf] for b in blocks])
                                 for leaf in blocks[0][name]} for name in blocks[0]}
  if pos is not None:
    if pos.shape[1] != cfg.cond_dim:
      raise ConversionError(f"{POS_EMBED_KEY} has width {pos.shape[1]}; the head's condition is "
                            f"{cfg.cond_dim}")
    params["pos_embed"] = pos
  return cfg, params


def jax_to_mar_head(cfg: HeadConfig, params: dict) -> dict:
  """Pure params -> MAR state dict {`diffloss.net.<name>`: numpy array} (+ the position embedding
  under MAR's top-level name when the head has one), bit for bit."""
  get = lambda *path: np.asarray(trees.at(params, path, ConversionError))
  out = {}
  for mar, path in TOP_LEVEL.items():
    out[f"{OUT_PREFIX}{mar}.weight"] = np.ascontiguousarray(get(*path, "kernel").T)
    out[f"{OUT_PREFIX}{mar}.bias"] = get(*path, "bias")
  rb = params["res_blocks"]
  for j in range(cfg.depth):
    out[f"{OUT_PREFIX}res_blocks.{j}.in_ln.weight"] = np.asarray(rb["in_ln"]["scale"])[j]
    out[f"{OUT_PREFIX}res_blocks.{j}.in_ln.bias"] = np.asarray(rb["in_ln"]["bias"])[j]
    for mar, ours in PER_BLOCK.items():
      out[f"{OUT_PREFIX}res_blocks.{j}.{mar}.weight"] = np.ascontiguousarray(
          np.asarray(rb[ours]["kernel"])[j].T)
      out[f"{OUT_PREFIX}res_blocks.{j}.{mar}.bias"] = np.asarray(rb[ours]["bias"])[j]
  if cfg.n_positions:
    out[POS_EMBED_KEY] = get("pos_embed")[None]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- files ----------------------------------------------------------------------------------------

def read_prediction_metadata(path: str) -> str | None:
  """The `prediction` entry of a safetensors file's metadata, if any."""
  if not path.endswith(".safetensors"):
    return None
  return safetensors_io.read_metadata(path).get("prediction")
