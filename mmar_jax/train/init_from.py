"""Starting points from the config: `init.backbone`, `init.vae`, `init.head`.

Each is loaded on the host, upcast to the fp32 master dtype, checked against the model's shapes
(a mismatch names the tensor) and placed straight into the state's shardings. The backbone's
vocabulary may be smaller than the model's: the model's extra rows (<boi>/<eoi>, method.md §1.6)
keep their fresh initialisation.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mmar_jax import trees
from mmar_jax.convert import hf
from mmar_jax.errors import ConversionError
from mmar_jax.files import load_params, read_json
from mmar_jax.models.qwen2 import Qwen2Config


def merge_into(state: dict, module: str, loaded: dict, source: str, grow_rows=("embed_tokens",),
               grow_cols=("lm_head",)) -> dict:
  """Replaces state['params'][module] and state['ema'][module] leaves by `loaded` (a nested dict
  of host arrays with the same structure)."""
  target = state["params"][module]
  # Orbax restores list indices as strings: compare paths as strings, write with the model's keys.
  key = lambda path: tuple(map(str, path))
  wanted = {key(p): (p, v) for p, v in trees.flatten(target).items()}
  got = {key(p): v for p, v in trees.flatten(loaded).items()}
  missing = sorted(".".join(k) for k in set(wanted) - set(got))
  extra = sorted(".".join(k) for k in set(got) - set(wanted))
  if missing or extra:
    raise ConversionError(f"{source}: parameters do not match the model's {module}: "
                          f"missing {missing[:5]}, unexpected {extra[:5]}")
  for skey, (path, cur) in wanted.items():
    name = f"{module}.{'.'.join(skey)}"
    new = np.asarray(got[skey]).astype(np.float32)
    if new.shape != cur.shape:
      grown = _grow(path, new, cur, grow_rows, grow_cols)
      if grown is None:
        raise ConversionError(f"{source}: {name} has shape {new.shape}, the model needs {cur.shape}")
      new = grown
    trees.set_at(state["params"][module], path, jax.device_put(new, cur.sharding))
    trees.set_at(state["ema"][module], path, jax.device_put(new, cur.sharding))
  return state


def _grow(path, new, cur, grow_rows, grow_cols):
  """A smaller vocabulary: keep the model's own init for the added rows (columns for a head)."""
  cur_host = np.asarray(jax.device_get(cur)).astype(np.float32)
  if path[-1] in grow_rows and new.shape[1:] == cur.shape[1:] and new.shape[0] < cur.shape[0]:
    cur_host[:new.shape[0]] = new
    return cur_host
  if path[-1] in grow_cols and new.shape[:1] == cur.shape[:1] and new.shape[1] < cur.shape[1]:
    cur_host[:, :new.shape[1]] = new
    return cur_host
  return None


def load_backbone(path: str):
  """(Qwen2Config, params) from an `hf-to-jax` output or a HuggingFace directory."""
  if os.path.exists(os.path.join(path, "model_config.json")):
    stored = read_json(path, "model_config.json")
    names = set(Qwen2Config.__dataclass_fields__)
    cfg = Qwen2Config(**{k: v for k, v in stored.items() if k in names})
    return cfg, jax.device_get(load_params(path))
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.params_from_hf_dir(path)
  raise FileNotFoundError(f"init.backbone {path}: neither an hf-to-jax output (model_config.json) "
                          "nor a HuggingFace directory (config.json)")


def apply(config, tr, state: dict) -> dict:
  init = config.init
  mcfg = tr.model_cfg
  if init.backbone:
    cfg, params = load_backbone(init.backbone)
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "tie_word_embeddings"):
      if getattr(cfg, key) != getattr(mcfg.backbone, key):
        raise ConversionError(f"init.backbone {init.backbone}: {key} is {getattr(cfg, key)}, "
                              f"the config says {getattr(mcfg.backbone, key)}")
    if cfg.vocab_size > mcfg.backbone.vocab_size:
      raise ConversionError(f"init.backbone {init.backbone}: vocab_size {cfg.vocab_size} exceeds "
                            f"the model's {mcfg.backbone.vocab_size}")
    state = merge_into(state, "backbone", params, f"init.backbone {init.backbone}")
  if init.vae:
    if "vae" not in state["params"].get("image_tokenizer", {}):
      raise ConversionError("init.vae is set but model.image.kind is not 'vae'")
    vae = jax.device_get(load_params(init.vae))
    state = merge_into(state, "image_tokenizer", {"vae": vae}, f"init.vae {init.vae}")
  if init.head:
    stored = read_json(init.head, "head_config.json")
    if stored.get("prediction") != mcfg.head.prediction:
      raise ConversionError(f"init.head {init.head} predicts {stored.get('prediction')!r}, the config "
                            f"model.head.prediction is {mcfg.head.prediction!r}")
    state = merge_into(state, "head", jax.device_get(load_params(init.head)), f"init.head {init.head}")
  return state

