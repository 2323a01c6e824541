"""HuggingFace Qwen2 directories <-> JAX backbone params, both directions, streaming.

hf-to-jax reads `config.json` and the safetensors (one file or shards with an index), checks
every tensor against the shapes the config implies (missing, unexpected and mis-shaped tensors
are refused by name), transposes torch's [out, in] Linear weights to our [in, out] kernels and
stacks the per-layer tensors into the `layers` arrays the Qwen2 module holds. The source dtype
is kept (bf16 stays bf16). Output: `params/` (orbax), `model_config.json` (Qwen2Config fields
plus a `source` block) and `tokenizer/` (the tokenizer files found beside the weights).

jax-to-hf writes `config.json` (rope_theta both at the top level and in `rope_parameters`, so
transformers 4.x and 5.x read it), safetensors (sharded with an index above --max-shard-size)
and the tokenizer files; `Qwen2ForCausalLM.from_pretrained` loads it with no missing or
unexpected keys.

Memory: tensors are read one at a time by mmap and written one at a time, so peak memory is
about the checkpoint once (the stacked arrays) plus one tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mmar_jax import trees
from mmar_jax.convert import safetensors_io as sio
from mmar_jax.dtypes import get_dtype
from mmar_jax.errors import ConversionError
from mmar_jax.files import atomic_output, read_json, save_params, write_json
from mmar_jax.models.qwen2 import Qwen2, Qwen2Config

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
# Files a Qwen2 directory carries besides the weights; copied both ways when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")

# JAX name under `layers` -> (HF name under `model.layers.{i}.`, transposed?). Order = HF's
# state-dict order, which is also the order tensors are written on export.
LAYER_MAP = {
    "q_kernel": ("self_attn.q_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_kernel": ("self_attn.k_proj.weight", True),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_kernel": ("self_attn.v_proj.weight", True),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_kernel": ("self_attn.o_proj.weight", True),
    "gate_kernel": ("mlp.gate_proj.weight", True),
    "up_kernel": ("mlp.up_proj.weight", True),
    "down_kernel": ("mlp.down_proj.weight", True),
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
}
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
CLI_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "bfloat16": "bfloat16", "float32": "float32",
               "fp16": "float16", "float16": "float16"}


class Slot(NamedTuple):
  """Where one HF tensor lives in the JAX params."""
  hf_name: str
  key: tuple[str, ...]  # path in the pure dict
  layer: int | None  # index along the stacked `layers` axis
  transpose: bool
  torch_shape: tuple[int, ...]


# -- config -----------------------------------------------------------------------------------------


def read_json_object(directory: str, name: str, hint: str = "") -> dict:
  """The JSON object in `directory`/`name`; a missing directory or file, invalid JSON or a
  non-object is a ConversionError naming it (`hint` is appended to the missing-file message)."""
  path = os.path.join(directory, name)
  if not os.path.isdir(directory):
    raise ConversionError(f"{directory}: directory not found")
  if not os.path.isfile(path):
    raise ConversionError(f"{directory} has no {name}{hint}")
  try:
    with open(path) as fh:
      raw = json.load(fh)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(raw, dict):
    raise ConversionError(f"{path} is not a JSON object")
  return raw


def read_hf_config_json(hf_dir: str) -> dict:
  return read_json_object(hf_dir, "config.json", " (not a HuggingFace model directory?)")


def qwen2_config_from_hf(raw: dict, where: str = "config.json") -> Qwen2Config:
  """Validates a HF config dict and maps it onto Qwen2Config (refusing what we do not implement)."""
  _check_architecture(raw, where)
  if raw.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{where}: hidden_act={raw['hidden_act']!r} is not supported (Qwen2 uses silu)")
  if raw.get("use_sliding_window"):
    raise ConversionError(f"{where}: use_sliding_window=true (sliding-window attention) is not supported")
  layer_types = raw.get("layer_types") or []
  other = sorted({t for t in layer_types if t != "full_attention"})
  if other:
    raise ConversionError(f"{where}: layer_types {other} are not supported (only full_attention)")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in raw]
  if missing:
    raise ConversionError(f"{where}: missing required keys {missing}")
  heads = int(raw["num_attention_heads"])
  kv = raw.get("num_key_value_heads")
  head_dim = raw.get("head_dim")
  if head_dim is not None and int(head_dim) == raw["hidden_size"] // heads:
    head_dim = None  # the default: keep configs comparable with ones that never named it
  torch_dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
  return Qwen2Config(
      vocab_size=int(raw["vocab_size"]),
      hidden_size=int(raw["hidden_size"]),
      num_layers=int(raw["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(kv) if kv is not None else heads,
      head_dim=None if head_dim is None else int(head_dim),
      intermediate_size=int(raw["intermediate_size"]),
      rope_theta=_rope_theta(raw, where),
      rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
      # transformers' Qwen2Config defaults to untied when the key is absent.
      tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
      param_dtype=_DTYPE_NAMES.get(str(torch_dtype), "float32"),
  )


def _check_architecture(raw: dict, where: str):
  archs = raw.get("architectures")
  if archs is not None and list(archs) != [ARCHITECTURE]:
    raise ConversionError(f"{where}: architectures {archs} are not supported; only {ARCHITECTURE}")
  model_type = raw.get("model_type")
  if model_type is not None and model_type != MODEL_TYPE:
    raise ConversionError(f"{where}: model_type {model_type!r} is not supported; only {MODEL_TYPE!r}")
  if archs is None and model_type is None:
    raise ConversionError(f"{where}: names neither architectures nor model_type; expected {ARCHITECTURE}")


def _rope_theta(raw: dict, where: str) -> float:
  """rope_theta from the top level (hub configs) or `rope_parameters` (transformers 5.x)."""
  params = raw.get("rope_parameters") or {}
  scaling = raw.get("rope_scaling") or {}
  for name, block in (("rope_parameters", params), ("rope_scaling", scaling)):
    rope_type = block.get("rope_type", block.get("type", "default"))
    if rope_type != "default":
      raise ConversionError(f"{where}: {name}.rope_type={rope_type!r} is not supported (only default)")
  top, nested = raw.get("rope_theta"), params.get("rope_theta")
  if top is not None and nested is not None and float(top) != float(nested):
    raise ConversionError(f"{where}: rope_theta={top} disagrees with rope_parameters.rope_theta={nested}")
  theta = nested if nested is not None else top
  return float(theta) if theta is not None else 10000.0  # transformers' default


def load_hf_config(hf_dir: str) -> Qwen2Config:
  """Qwen2Config of a HF directory (param_dtype from config.json; the tensors decide on import)."""
  return qwen2_config_from_hf(read_hf_config_json(hf_dir), os.path.join(hf_dir, "config.json"))


def hf_config_dict(cfg: Qwen2Config, dtype: str, extra: dict | None = None) -> dict:
  """config.json for a Qwen2 backbone; `extra` adds non-shape keys (token ids, max positions)."""
  out = {
      "architectures": [ARCHITECTURE],
      "model_type": MODEL_TYPE,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      # Both forms: transformers 4.x reads the top level, 5.x rope_parameters.
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "torch_dtype": dtype,
      "dtype": dtype,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": cfg.num_layers,
      "layer_types": ["full_attention"] * cfg.num_layers,
      "max_position_embeddings": 32768,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
      "bos_token_id": None,
      "eos_token_id": None,
  }
  if cfg.head_dim is not None and cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    out["head_dim"] = cfg.head_dim
  for key, value in (extra or {}).items():
    if key in out and key not in CARRIED_KEYS and out[key] != value:
      raise ConversionError(f"extra config key {key!r}={value!r} contradicts the model ({out[key]!r})")
    out[key] = value
  return out


# Keys of a source config.json that do not follow from the weights and are carried through.
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                "initializer_range", "attention_dropout", "use_cache", "max_window_layers")


def carried_config(source_config: dict | None) -> dict:
  return {k: source_config[k] for k in CARRIED_KEYS if source_config and k in source_config}


# -- layout -----------------------------------------------------------------------------------------


def abstract_params(cfg: Qwen2Config) -> dict:
  """The pure-dict structure of Qwen2's state, as ShapeDtypeStructs (nothing allocated)."""
  model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)[1].to_pure_dict()


def hf_layout(cfg: Qwen2Config) -> list[Slot]:
  """Every HF tensor of this config and where it goes, in HF's state-dict order."""
  abstract = abstract_params(cfg)
  slots = [Slot(EMBED, ("embed_tokens",), None, False, tuple(abstract["embed_tokens"].shape))]
  for i in range(cfg.num_layers):
    for key, (suffix, transpose) in LAYER_MAP.items():
      shape = tuple(abstract["layers"][key].shape[1:])
      slots.append(Slot(f"model.layers.{i}.{suffix}", ("layers", key), i, transpose,
                        shape[::-1] if transpose else shape))
  slots.append(Slot(NORM, ("final_norm",), None, False, tuple(abstract["final_norm"].shape)))
  if not cfg.tie_word_embeddings:
    slots.append(Slot(LM_HEAD, ("lm_head",), None, True, tuple(abstract["lm_head"].shape)[::-1]))
  return slots


def _first(names, n=5) -> str:
  names = sorted(names)
  return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


# -- hf -> jax --------------------------------------------------------------------------------------


def _is_ignorable(name: str) -> bool:
  # Old torch checkpoints saved RoPE's frequency buffer; it is derived from the config.
  return name.endswith("rotary_emb.inv_freq")


def _check_tensors(ckpt: sio.CheckpointDir, slots: list[Slot], cfg: Qwen2Config) -> np.dtype:
  """Refuses missing, unexpected, mis-shaped and mixed-dtype tensors by name; returns the dtype."""
  where = ckpt.directory
  specs = ckpt.specs()
  expected = {s.hf_name: s for s in slots}
  missing = set(expected) - set(specs)
  if missing:
    raise ConversionError(f"{where}: missing tensors: {_first(missing)}")
  extra = {n for n in specs if n not in expected and not _is_ignorable(n)}
  if cfg.tie_word_embeddings and LM_HEAD in extra:
    extra.discard(LM_HEAD)  # some tied checkpoints store a copy; checked equal after reading
    if specs[LM_HEAD].shape != specs[EMBED].shape:
      raise ConversionError(f"{where}: {LM_HEAD} has shape {list(specs[LM_HEAD].shape)} but the "
                            f"embeddings are tied ({list(specs[EMBED].shape)})")
  if extra:
    raise ConversionError(f"{where}: unexpected tensors (not part of {ARCHITECTURE} with this "
                          f"config.json): {_first(extra)}")
  for name, slot in expected.items():
    if specs[name].shape != slot.torch_shape:
      raise ConversionError(f"{where}: tensor {name} has shape {list(specs[name].shape)}, expected "
                            f"{list(slot.torch_shape)} from config.json")
  dtypes = {specs[n].dtype for n in expected}
  if len(dtypes) > 1:
    by_dtype = {str(d): [n for n in expected if specs[n].dtype == d][0] for d in dtypes}
    raise ConversionError(f"{where}: mixed tensor dtypes are not supported ({by_dtype})")
  dtype = dtypes.pop()
  if dtype.name not in _DTYPE_NAMES:
    raise ConversionError(f"{where}: tensor dtype {dtype} is not a float type we load "
                          f"({sorted(_DTYPE_NAMES)}); e.g. {EMBED}")
  return dtype


def params_from_hf_dir(hf_dir: str, progress: bool = False) -> tuple[Qwen2Config, dict]:
  """(Qwen2Config, pure dict of numpy arrays) of a HF Qwen2 directory, in the stored dtype."""
  cfg = load_hf_config(hf_dir)
  slots = hf_layout(cfg)
  with sio.CheckpointDir(hf_dir) as ckpt:
    dtype = _check_tensors(ckpt, slots, cfg)
    cfg = cfg.replace(param_dtype=_DTYPE_NAMES[dtype.name])
    abstract = trees.flatten(abstract_params(cfg))
    # The stacked arrays are the only full-size allocation: each tensor is copied into its slot.
    flat = {path: np.empty(a.shape, dtype) for path, a in abstract.items()}
    by_name = {s.hf_name: s for s in slots}
    bar = _progress(len(slots), "reading", progress)
    for name in ckpt.keys():
      slot = by_name.get(name)
      if slot is None:
        continue
      tensor = ckpt.get(name, copy=False)  # copied straight from the mapped file into its slot
      target = flat[slot.key] if slot.layer is None else flat[slot.key][slot.layer]
      target[...] = tensor.T if slot.transpose else tensor
      del tensor
      ckpt.release(name)
      bar.update(1)
    bar.close()
    if cfg.tie_word_embeddings and LM_HEAD in ckpt:
      if not np.array_equal(ckpt.get(LM_HEAD).view(np.uint8), flat[("embed_tokens",)].view(np.uint8)):
        raise ConversionError(f"{hf_dir}: {LM_HEAD} differs from {EMBED} but config.json says "
                              "tie_word_embeddings=true")
  return cfg, trees.unflatten(flat)


def _progress(total: int, desc: str, enabled: bool):
  return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def model_config_dict(cfg: Qwen2Config, source: dict | None = None) -> dict:
  d = cfg.to_dict()
  if source is not None:
    d["source"] = source
  return d


def read_model_config(ckpt_dir: str) -> tuple[Qwen2Config, dict]:
  """(Qwen2Config, source block) of an hf-to-jax output directory."""
  try:
    d = read_json(ckpt_dir, MODEL_CONFIG)
  except FileNotFoundError:
    raise ConversionError(f"{ckpt_dir} has no {MODEL_CONFIG} (not an hf-to-jax output?)") from None
  source = d.pop("source", {}) or {}
  try:
    return Qwen2Config.from_dict(d), source
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{os.path.join(ckpt_dir, MODEL_CONFIG)}: {e}") from None


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    path = os.path.join(src, name)
    if os.path.isfile(path):
      os.makedirs(dst, exist_ok=True)
      shutil.copyfile(path, os.path.join(dst, name))
      copied.append(name)
  return copied


def hf_to_jax(hf_dir: str, out: str, overwrite: bool = False, progress: bool = False) -> Qwen2Config:
  """Converts a HF Qwen2 directory into `out/{params/, model_config.json, tokenizer/}`."""
  raw = read_hf_config_json(hf_dir)
  with atomic_output(out, overwrite) as tmp:
    cfg, params = params_from_hf_dir(hf_dir, progress=progress)
    # Orbax holds a second copy of numpy leaves while writing (measured on Qwen2-0.5B: 2.9 GB
    # peak vs 2.1 GB); device_put on the CPU aliases the numpy buffer, and jax leaves save leaner.
    params = jax.tree.map(jax.device_put, params)
    save_params(tmp, params)
    del params
    source = {"format": "huggingface", "architecture": ARCHITECTURE,
              "torch_dtype": raw.get("dtype") or raw.get("torch_dtype"), "hf_config": raw}
    write_json(tmp, MODEL_CONFIG, model_config_dict(cfg, source))
    copy_tokenizer_files(hf_dir, os.path.join(tmp, TOKENIZER_DIR))
  return cfg


# -- jax -> hf --------------------------------------------------------------------------------------


def _check_params(flat: dict[tuple, Any], cfg: Qwen2Config):
  expected = trees.flatten(abstract_params(cfg))
  name = lambda p: "/".join(p)
  missing = set(expected) - set(flat)
  if missing:
    raise ConversionError(f"params are missing {_first(map(name, missing))} for this model config")
  extra = set(flat) - set(expected)
  if extra:
    raise ConversionError(f"params hold entries this model config does not have: {_first(map(name, extra))}")
  for path, a in expected.items():
    if tuple(flat[path].shape) != tuple(a.shape):
      raise ConversionError(f"param {name(path)} has shape {list(flat[path].shape)}, expected "
                            f"{list(a.shape)} from the model config")


def _to_numpy(x) -> np.ndarray:
  # jax arrays on the CPU come back without a copy; sharded ones are gathered once per leaf.
  return np.asarray(x)


def _resolve_dtype(dtype, flat) -> np.dtype:
  if dtype is None:
    return np.dtype(flat[("embed_tokens",)].dtype)
  name = CLI_DTYPES.get(str(dtype), dtype)
  try:
    return np.dtype(get_dtype(name))
  except (ValueError, TypeError):
    raise ConversionError(f"unknown output dtype {dtype!r}; use bf16 or fp32") from None


def jax_to_hf(params: dict, model_cfg: Qwen2Config, out: str, dtype=None, max_shard_size="5GB",
              tokenizer_dir: str | None = None, overwrite: bool = False, extra_config: dict | None = None,
              progress: bool = False) -> list[str]:
  """Writes a HF Qwen2 directory from a pure dict of backbone params (numpy or jax arrays).

  `dtype` None keeps the stored dtype; "bf16"/"fp32" cast tensor by tensor while writing.
  Returns the files written.
  """
  if os.path.exists(out) and not overwrite:  # before any work; atomic_output checks again
    raise ConversionError(f"output {os.path.abspath(out)} exists; pass --overwrite to replace it")
  if hasattr(params, "to_pure_dict"):
    params = params.to_pure_dict()
  flat = {p: _to_numpy(v) for p, v in trees.flatten(params).items()}
  _check_params(flat, model_cfg)
  out_dtype = _resolve_dtype(dtype, flat)
  dtype_name = _DTYPE_NAMES.get(out_dtype.name)
  if dtype_name is None:
    raise ConversionError(f"output dtype {out_dtype} is not one transformers loads; use bf16 or fp32")
  slots = hf_layout(model_cfg)
  by_name = {s.hf_name: s for s in slots}
  config = hf_config_dict(model_cfg, dtype_name, extra_config)
  bar = _progress(len(slots), "writing", progress)

  def produce(name: str) -> np.ndarray:
    slot = by_name[name]
    a = flat[slot.key] if slot.layer is None else flat[slot.key][slot.layer]
    a = np.ascontiguousarray((a.T if slot.transpose else a).astype(out_dtype, copy=False))
    bar.update(1)
    return a

  specs = [(s.hf_name, sio.TensorSpec(out_dtype, s.torch_shape)) for s in slots]
  with atomic_output(out, overwrite) as tmp:
    # transformers refuses safetensors whose metadata lacks a known "format".
    files = sio.write_sharded(tmp, specs, produce, max_shard_size, metadata={"format": "pt"})
    bar.close()
    write_json(tmp, "config.json", config)
    files.append("config.json")
    if tokenizer_dir is not None:
      files += copy_tokenizer_files(tokenizer_dir, tmp)
  return files


# -- command line -----------------------------------------------------------------------------------


def param_count(cfg: Qwen2Config) -> int:
  return sum(int(np.prod(a.shape)) for a in trees.flatten(abstract_params(cfg)).values())


def qwen2_from_params(cfg: Qwen2Config, params: dict):
  """A Qwen2 module holding `params` (a pure dict; cast to cfg.param_dtype), built abstractly so
  no random init is paid for."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
  flat = trees.flatten(params.to_pure_dict() if hasattr(params, "to_pure_dict") else params)
  _check_params(flat, cfg)
  dtype = get_dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(state, trees.unflatten({p: jnp.asarray(v, dtype) for p, v in flat.items()}))
  return nnx.merge(graphdef, state)


# -- a random checkpoint (tests, benchmarks, the repro checks) ------------------------------------


def make_tiny_hf_checkpoint(out: str, *, vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                            num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                            intermediate_size: int = 128, rope_theta: float = 1e4,
                            tie_word_embeddings: bool = False, dtype: str = "float32", seed: int = 0,
                            init_std: float = 0.02, max_shard_size: str | None = None,
                            rms_norm_eps: float = 1e-6) -> str:
  """A random `Qwen2ForCausalLM` saved with `save_pretrained` (real HF layout, offline).

  Biases and norm weights are randomised too (HF initialises them to 0 / 1), so a converter
  that dropped or swapped them would show up in the logits.
  """
  import torch  # lazy: seconds to import, this path only
  from transformers import Qwen2Config as HFConfig  # lazy: seconds to import, this path only
  from transformers import Qwen2ForCausalLM  # lazy: seconds to import, this path only
  from transformers.utils import logging as hf_logging  # lazy: seconds to import, this path only
  hf_logging.disable_progress_bar()
  torch.manual_seed(seed)
  kw = dict(head_dim=head_dim) if head_dim is not None else {}
  hc = HFConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                intermediate_size=intermediate_size, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
                tie_word_embeddings=tie_word_embeddings, initializer_range=init_std, **kw)
  model = Qwen2ForCausalLM(hc).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, init_std)
      elif "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model = model.to(getattr(torch, dtype))
  kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
  model.save_pretrained(out, **kwargs)
  return out
