"""A training run's workdir as the run layer and the loop read it: the config it was trained with,
and the tokenizer / model config / mesh / trainer it implies.

Resuming (design.md): the base config is WORKDIR/config.json, then `--config CFG` if given, then
the `--config.key=value` overrides; keys that change the model's shapes must match the stored ones.
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from mmar_jax import config as config_lib
from mmar_jax.data.text_tokenizer import load_text_tokenizer
from mmar_jax.defaults import base_config
from mmar_jax.models.mmar import model_config
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.train.step import build

# Keys whose change alters parameter shapes: refused on resume.
SHAPE_KEYS = ("model.backbone.", "model.vit.", "model.head.width", "model.head.depth",
              "model.head.learn_sigma", "model.head.pos_embed", "model.image.size",
              "model.image.kind", "model.image.patch_size", "model.image.vae.", "model.max_text_len",
              # not shapes, but what the weights were trained to read and draw:
              "model.image.norm", "model.image.token_shift", "model.image.token_scale",
              "text_tokenizer")


def resolve_config(workdir, config_spec: str | None, overrides) -> ml_collections.ConfigDict:
  stored_path = epath.Path(workdir) / "config.json"
  if stored_path.exists():
    stored = json.loads(stored_path.read_text())
    cfg = base_config()
    cfg.update(_tuples(stored))
    if config_spec:
      given = config_lib.load_file(config_spec)
      if given.model.image.norm == "data" and not given.model.image.token_scale:
        # The statistics were estimated when the run started: a config file cannot know them.
        given.model.image.token_shift = cfg.model.image.token_shift
        given.model.image.token_scale = cfg.model.image.token_scale
      _check_shapes(config_lib.to_dict(cfg), config_lib.to_dict(given), f"{config_spec}")
      cfg = given
  elif config_spec:
    cfg = config_lib.load_file(config_spec)
  else:
    raise config_lib.ConfigError(f"{workdir} has no config.json: pass --config")
  before = config_lib.to_dict(cfg)
  config_lib.apply_overrides(cfg, overrides)
  if stored_path.exists():
    _check_shapes(before, config_lib.to_dict(cfg), "--config overrides")
  return cfg


def _tuples(d):
  """JSON lists back to tuples (ConfigDict fields declared as tuples refuse lists)."""
  if isinstance(d, dict):
    return {k: _tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_tuples(v) for v in d)
  return d


def _check_shapes(old: dict, new: dict, what: str):
  a, b = config_lib.flatten(old), config_lib.flatten(new)
  differ = sorted(k for k in set(a) | set(b)
                  if any(k.startswith(p) or k == p for p in SHAPE_KEYS) and a.get(k) != b.get(k))
  if differ:
    raise config_lib.ConfigError(
        f"{what} changes keys that set the model's shapes, which must match the stored run: "
        + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in differ))


def model_setup(config, workdir):
  """(text tokenizer, MMARConfig) of a run: the workdir's tokenizer copy, else the config's."""
  tok_dir = epath.Path(workdir) / "tokenizer"
  tokenizer = load_text_tokenizer(str(tok_dir) if tok_dir.exists() else config.text_tokenizer)
  return tokenizer, model_config(config, tokenizer)


def setup(config, workdir):
  """Tokenizer, model config and trainer (on the config's mesh) of a run."""
  tokenizer, mcfg = model_setup(config, workdir)
  return tokenizer, mcfg, build(config, mcfg, make_mesh(config.mesh, config.mesh_dcn))
