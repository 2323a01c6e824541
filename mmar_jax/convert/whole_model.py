"""The whole MMAR model under PyTorch-style names, both ways: the table behind `convert
jax-to-safetensors` (params -> tensors) and `convert safetensors-to-jax` (tensors -> params).

Names, all in PyTorch layout (Linear weights [out, in], conv weights [out, in, kh, kw], one tensor
per layer):
  backbone.*         HuggingFace Qwen2 names: backbone.model.embed_tokens.weight,
                     backbone.model.layers.{i}.self_attn.q_proj.weight, ..., backbone.lm_head.weight
  vae.*              MAR's KL-16 names (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*)
  diffloss.net.*     MAR's diffusion head names (and diffusion_pos_embed_learned when present)
  vit.*, projector.* our module paths with the stacked `blocks` axis split into `blocks.{i}.`;
                     a leaf `X_kernel` / `kernel` becomes `X.weight` / `weight` [out, in], `X_bias`
                     `X.bias`, `X_scale` / `scale` (norm gains) `X.weight` / `weight`; other leaves
                     (mask_token, pos_embed) keep their name and shape.

One table serves both directions. `layout(mcfg)` lists every backbone, ViT and projector tensor as
a `Slot` (name, path in the params, index on the stacked `layers`/`blocks` axis, transposed?,
PyTorch shape): the export reads the params through it, the import writes them through it. The
head and the VAE go through their MAR converters (mar_head.py, mar_vae.py), whose own tables
already work both ways. What an import expects (`tensor_specs`) is the export applied to
zero-stride placeholders, so what is read back is by construction what was written.

The import refuses, by name: a missing or an unexpected tensor, a wrong shape, a dtype that does
not cast exactly to the param dtype (float32, bfloat16 and float16 do; float64 would round), and a
recorded model config that differs from the run's. Params come back in the run's param dtype
(fp32): a bf16 export is read back bit for bit and upcast, which is exact.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from mmar_jax import config as config_lib
from mmar_jax import trees
from mmar_jax.convert import hf
from mmar_jax.convert.mar_head import OUT_PREFIX as HEAD_PREFIX
from mmar_jax.convert.mar_head import POS_EMBED_KEY, jax_to_mar_head, mar_head_to_jax
from mmar_jax.convert.mar_vae import jax_to_mar_vae, mar_vae_to_jax
from mmar_jax.errors import ConversionError
from mmar_jax.files import read_json
from mmar_jax.models.mmar import MMAR
from mmar_jax.models.vae import VAEConfig

FORMAT = "mmar_jax.safetensors/1"
CONFIG_FILE = "mmar_config.json"
VAE_PREFIX = "vae."
GENERIC = ("vit", "projector")  # modules without an external layout: named by their paths
STACKED = ("blocks",)
# Stored dtypes that cast to fp32 without rounding.
EXACT_DTYPES = ("float32", "bfloat16", "float16")
# The naming rules, as mmar_config.json records them for PyTorch users.
NAMING = {"backbone.": "HuggingFace Qwen2 names, PyTorch layout",
          "vae.": "MAR KL-16 VAE names, PyTorch layout",
          "diffloss.net.": "MAR diffusion head names (diffusion_pos_embed_learned too)",
          "vit., projector.": "module paths; blocks.{i}. per layer; X_kernel -> X.weight [out, in], "
                              "X_bias -> X.bias, X_scale -> X.weight"}

Producer = Callable[[], np.ndarray]
Slot = hf.Slot  # hf_name is the whole-model name here, key the path from the params' root


# -- the table ----------------------------------------------------------------------------------------


def abstract_params(mcfg) -> dict:
  """ShapeDtypeStructs in the layout of `nnx.state(MMAR(mcfg), nnx.Param).to_pure_dict()`."""
  return _map(_layout(mcfg)[0], lambda s, _: s)  # a copy: the cached tree stays as it was


def _abstract(mcfg) -> dict:
  return nnx.state(nnx.eval_shape(lambda: MMAR(mcfg, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()


def vae_config(mcfg):
  """The run's VAEConfig: model.image.vae over the vae_config.json of model.image.path, if set."""
  fields = dict(mcfg.image.get("vae") or {})
  if mcfg.image.get("path"):
    fields = dict(read_json(mcfg.image["path"], "vae_config.json"), **fields)
  return VAEConfig.from_dict(fields)


def _torch_leaf(name: str) -> tuple[str, bool]:
  """Our leaf name -> (PyTorch-style name, transpose?), the rules in the module docstring."""
  m = re.fullmatch(r"(?:(.+)_)?(kernel|bias|scale)", name)
  if not m:
    return name, False
  stem, kind = m.groups()
  leaf = {"kernel": "weight", "bias": "bias", "scale": "weight"}[kind]
  return (f"{stem}.{leaf}" if stem else leaf), kind == "kernel"


def _generic_slots(tree: dict, key: tuple, names: tuple, layer: int | None = None) -> list[Slot]:
  slots = []
  for k, node in tree.items():
    if isinstance(node, dict):
      if k in STACKED and layer is None:
        depth = next(trees.leaves(node)).shape[0]
        for i in range(depth):
          slots += _generic_slots(node, key + (k,), names + (f"{k}.{i}",), i)
      else:
        slots += _generic_slots(node, key + (k,), names + (k,), layer)
      continue
    name, transpose = _torch_leaf(k)
    shape = tuple(node.shape[1:] if layer is not None else node.shape)
    slots.append(Slot(".".join(names + (name,)), key + (k,), layer, transpose,
                      shape[::-1] if transpose else shape))
  return slots


@functools.lru_cache(maxsize=4)
def _layout(mcfg) -> tuple[dict, tuple[Slot, ...]]:
  abstract = _abstract(mcfg)
  slots = [s._replace(hf_name=f"backbone.{s.hf_name}", key=("backbone",) + s.key)
           for s in hf.hf_layout(mcfg.backbone)]
  for module in GENERIC:
    slots += _generic_slots(abstract[module], (module,), (module,))
  return abstract, tuple(slots)


def layout(mcfg) -> list[Slot]:
  """Every backbone, ViT and projector tensor of the model, in export order."""
  return list(_layout(mcfg)[1])


def _producers(params: dict, mcfg, slots) -> dict[str, Producer]:
  out: dict[str, Producer] = {}
  for slot in slots:
    def produce(slot=slot):
      a = np.asarray(trees.at(params, slot.key, ConversionError))
      a = a if slot.layer is None else a[slot.layer]
      return a.T if slot.transpose else a
    out[slot.hf_name] = produce
  # The head and the VAE are small beside the backbone: converted at once by their own tables.
  for name, a in jax_to_mar_head(mcfg.head, params["head"]).items():
    out[name] = lambda a=a: a
  if "vae" in params.get("image_tokenizer", {}):
    for name, a in jax_to_mar_vae(vae_config(mcfg), params["image_tokenizer"]["vae"]).items():
      out[f"{VAE_PREFIX}{name}"] = lambda a=a: a
  return out


@functools.lru_cache(maxsize=4)
def _specs(mcfg) -> tuple[tuple[str, tuple[int, ...]], ...]:
  abstract, slots = _layout(mcfg)
  # Zero-stride stand-ins: slicing and transposing them allocates nothing.
  placeholders = _map(abstract, lambda s, _: np.broadcast_to(np.zeros((), s.dtype), s.shape))
  specs = tuple((name, tuple(f().shape)) for name, f in _producers(placeholders, mcfg, slots).items())
  counted = sum(int(np.prod(s.shape)) for s in trees.leaves(abstract))
  written = sum(int(np.prod(shape)) for _, shape in specs)
  if counted != written:  # every parameter named exactly once
    raise ConversionError(f"the naming table covers {written} of the model's {counted} parameters")
  return specs


def tensor_specs(mcfg) -> dict[str, tuple[int, ...]]:
  """{name: PyTorch-layout shape} of every tensor of the model, in export order."""
  return dict(_specs(mcfg))


def _map(tree: dict, fn, path: tuple = ()) -> dict:
  """`fn(leaf, path of str keys)` over a nested dict, keeping its keys (int list indices too)."""
  return {k: _map(v, fn, path + (str(k),)) if isinstance(v, dict) else fn(v, path + (str(k),))
          for k, v in tree.items()}


def _str_flat(tree: dict) -> dict[tuple, object]:
  return {tuple(map(str, p)): v for p, v in trees.flatten(tree).items()}


def _check_params(params: dict, abstract: dict):
  want, got = _str_flat(abstract), _str_flat(params)
  name = lambda p: "/".join(p)
  missing, extra = set(want) - set(got), set(got) - set(want)
  if missing:
    raise ConversionError(f"params are missing {hf._first(map(name, missing))} for this model config")
  if extra:
    raise ConversionError(f"params hold entries this model config does not have: "
                          f"{hf._first(map(name, extra))}")
  for p, s in want.items():
    if tuple(np.shape(got[p])) != tuple(s.shape):
      raise ConversionError(f"param {name(p)} has shape {list(np.shape(got[p]))}, expected "
                            f"{list(s.shape)} from the model config")


# -- params -> tensors --------------------------------------------------------------------------------


def tensors_from_params(params: dict, mcfg) -> dict[str, Producer]:
  """{name: producer of a numpy array in PyTorch layout}, in export order, for every parameter.
  Backbone, ViT and projector tensors are sliced and transposed only when produced, so a writer
  that streams holds about one tensor beside the params."""
  abstract, slots = _layout(mcfg)
  _check_params(params, abstract)
  return _producers(params, mcfg, slots)


# -- tensors -> params --------------------------------------------------------------------------------


def check_tensors(specs: Mapping[str, object], mcfg):
  """Refuses, by name, missing, unexpected, mis-shaped and inexactly-typed tensors; `specs` maps
  each name to anything with `.shape` and `.dtype` (a safetensors header: nothing is read)."""
  expected = tensor_specs(mcfg)
  _check_names(specs, expected)
  for name, spec in specs.items():
    _check_tensor(name, spec.shape, spec.dtype, expected)


def _check_names(names: Iterable[str], expected: dict):
  names = set(names)
  missing = [n for n in expected if n not in names]
  if missing:
    raise ConversionError(f"missing tensors: {hf._first(missing)}")
  extra = names - set(expected)
  if extra:
    raise ConversionError(f"unexpected tensors (not part of this model): {hf._first(extra)}")


def _check_tensor(name: str, shape, dtype, expected: dict):
  if tuple(shape) != expected[name]:
    raise ConversionError(f"tensor {name} has shape {list(shape)}, the run's model needs "
                          f"{list(expected[name])}")
  if np.dtype(dtype).name not in EXACT_DTYPES:
    raise ConversionError(f"tensor {name} is {np.dtype(dtype).name}; stored params must be one of "
                          f"{', '.join(EXACT_DTYPES)} (these cast to float32 exactly)")


def params_from_tensors(get: Callable[[str], np.ndarray], names: Iterable[str], mcfg) -> dict:
  """The inverse of `tensors_from_params`: `get(name)` gives a tensor (PyTorch layout) and `names`
  are all there are. Returns a nested dict of numpy arrays in exactly the layout of
  `nnx.state(MMAR(mcfg), nnx.Param).to_pure_dict()`, in the model's param dtype: per-layer
  tensors restacked on the `layers` / `blocks` axis, Linear and conv weights transposed back."""
  abstract, slots = _layout(mcfg)
  expected = tensor_specs(mcfg)
  _check_names(names, expected)

  def read(name):
    a = np.asarray(get(name))
    _check_tensor(name, a.shape, a.dtype, expected)
    return a

  targets = _str_flat(abstract)
  flat: dict[tuple, np.ndarray] = {}
  for slot in slots:
    key = tuple(map(str, slot.key))
    if key not in flat:  # the stacked arrays are the only full-size allocation
      flat[key] = np.empty(targets[key].shape, targets[key].dtype)
    dst = flat[key] if slot.layer is None else flat[key][slot.layer]
    a = read(slot.hf_name)
    dst[...] = a.T if slot.transpose else a  # the cast to the param dtype happens here

  def own(tree, root):  # copies in the param dtype: what `get` gave may be a view of a mapped file
    out = {}
    for p, v in _str_flat(tree).items():
      if root + p not in targets:
        raise ConversionError(f"the converter made {'/'.join(root + p)}, which the model lacks")
      out[root + p] = np.array(v, targets[root + p].dtype)
    return out

  head_names = [n for n in expected if n.startswith(HEAD_PREFIX) or n == POS_EMBED_KEY]
  _, head = mar_head_to_jax({n: read(n) for n in head_names}, mcfg.head.prediction)
  flat.update(own(head, ("head",)))
  vae_names = [n for n in expected if n.startswith(VAE_PREFIX)]
  if vae_names:
    _, vae = mar_vae_to_jax({n[len(VAE_PREFIX):]: read(n) for n in vae_names})
    flat.update(own(vae, ("image_tokenizer", "vae")))

  def fill(target, path):
    if path not in flat:
      raise ConversionError(f"no tensor fills param {'/'.join(path)}")
    a = flat.pop(path)
    if a.shape != tuple(target.shape):
      raise ConversionError(f"param {'/'.join(path)} came out {list(a.shape)}, expected "
                            f"{list(target.shape)}")
    return a
  params = _map(abstract, fill)
  if flat:  # every tensor was placed somewhere: a name the table maps twice would land here
    raise ConversionError(f"tensors fill no param: {hf._first('/'.join(p) for p in flat)}")
  return params


def read_export_config(src: str, required: tuple[str, ...] = ("model",)) -> dict:
  """mmar_config.json of a jax-to-safetensors output (this FORMAT, with the `required` keys); what
  is wrong is a ConversionError naming the file."""
  path = os.path.join(src, CONFIG_FILE)
  cfg = hf.read_json_object(src, CONFIG_FILE, " (not a jax-to-safetensors output?)")
  if cfg.get("format") != FORMAT:
    raise ConversionError(f"{path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
  for key in required:
    if key not in cfg:
      raise ConversionError(f"{path} has no {key!r}"
                            + (": it was written before jax-to-safetensors recorded the run's "
                               "training config; export the run again" if key == "run_config" else ""))
  return cfg


def check_model_config(recorded: dict, mcfg, where: str = CONFIG_FILE):
  """Refuses a recorded model config (mmar_config.json's `model`) that differs from the model of
  the run it is imported into, naming the keys."""
  normal = lambda d: config_lib.flatten(json.loads(json.dumps(d)))  # tuples as JSON lists
  theirs, ours = normal(recorded), normal(mcfg.to_dict())
  absent = object()
  differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, absent) != ours.get(k, absent))
  if differ:
    raise ConversionError(
        f"{where}: its model config does not match the run it is imported into: "
        + ", ".join(f"model.{k} ({theirs.get(k)!r} in the file, {ours.get(k)!r} in the run)"
                    for k in differ[:8]) + (f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""))
