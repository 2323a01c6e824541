"""The `convert` group's command bodies, both ways; `convert/` holds the mappings they call.

In: `hf-to-jax --hf DIR`, `mar-vae --src FILE`, `mar-head --src FILE` write a converter output
directory (params/ + *_config.json). Out: `jax-to-hf / jax-to-mar-vae / jax-to-mar-head --ckpt DIR`
read such a directory, or `--workdir DIR [--step N] [--params ema|raw]` a training run:
`workdir_params` restores a checkpoint's params (EMA by default) or just one module of them
(`backbone`, `head`, `image_tokenizer`: orbax reads only that subtree) onto the host, with the
model config the run stored. Each export has one body; only where its params come from differs.
Messages go to stderr (stdout stays free for a caller's pipe).

jax-to-hf keeps the model's whole vocabulary (the <boi>/<eoi> rows are in the embedding) and
records their ids (method.md §1.6) in config.json (`boi_token_id`, `eoi_token_id`, and an
`mmar` block); a HuggingFace tokenizer gets `<boi>`/`<eoi>` as added special tokens at those ids
when they are the next ids after its own (the usual case: the first spare rows), and the ids in
`tokenizer_config.json` otherwise.

jax-to-safetensors writes the whole model for users who bring their own PyTorch code,
`model.safetensors` (sharded with `model.safetensors.index.json` above --max-shard-size) and
`mmar_config.json` (the model config, the token ids, the step and data position, the naming
rules, and the run's whole training config as `run_config`, from which `convert
safetensors-to-jax` rebuilds a training workdir), plus the text tokenizer under `tokenizer/`. The
names, all in PyTorch layout, and the table that maps them both ways are convert/whole_model.py's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import numpy as np
from etils import epath

from mmar_jax.convert import hf, mar_head, mar_vae
from mmar_jax.convert import safetensors_io as sio
from mmar_jax.convert.common import load_state_dict
from mmar_jax.convert.hf import CLI_DTYPES
from mmar_jax.convert.mar_head import jax_to_mar_head
from mmar_jax.convert.mar_vae import jax_to_mar_vae
from mmar_jax.convert.whole_model import CONFIG_FILE as SAFETENSORS_CONFIG
from mmar_jax.convert.whole_model import FORMAT, NAMING, tensors_from_params, vae_config
from mmar_jax.data.text_tokenizer import HFTokenizer, load_text_tokenizer
from mmar_jax.diffusion.parameterization import PREDICTIONS
from mmar_jax.dtypes import get_dtype
from mmar_jax.errors import ConversionError
from mmar_jax.files import atomic_output, load_params, read_json, save_params, write_json
from mmar_jax.models.diffusion_head import HeadConfig
from mmar_jax.run import Run
from mmar_jax.train.checkpoint import Checkpointer


def add_args(p, kind: str):
  """The flags of `convert KIND`."""
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  if kind in ("hf-to-jax",):
    p.add_argument("--hf", required=True, help="HuggingFace Qwen2 directory")
    p.add_argument("--out", required=True)
  elif kind in ("mar-vae", "mar-head"):
    p.add_argument("--src", required=True, help="MAR checkpoint (.ckpt/.pth) or .safetensors")
    p.add_argument("--out", required=True)
    if kind == "mar-head":
      p.add_argument("--key", default="model_ema", choices=("model_ema", "model"),
                     help="state dict inside a MAR training checkpoint")
      p.add_argument("--prediction", default=None, choices=("eps", "v", "x0"),
                     help="override the prediction type (default: file metadata, else eps)")
  else:  # jax-to-*
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a converter output directory (params/ + *_config.json)")
    src.add_argument("--workdir", help="a training workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--params", default="ema", choices=("ema", "raw"))
    p.add_argument("--out", required=True)
    if kind in ("jax-to-hf", "jax-to-safetensors"):
      p.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                     help="output dtype (default: the stored one)")
      p.add_argument("--max-shard-size", default="5GB")
    if kind == "jax-to-mar-head":
      p.add_argument("--force", action="store_true",
                     help="write a v- or x0-head although MAR's sampler reads heads as eps")


# -- a workdir's params -----------------------------------------------------------------------------


def workdir_params(workdir: str, step: int | None = None, which: str = "ema",
                   module: str | None = None) -> tuple[dict, object, int]:
  """(params as host numpy arrays, MMARConfig, step): the whole model, or one top-level module."""
  run = Run(workdir)
  params, step = run.params(step, which, module=module, on_host=True)
  return params, run.model_cfg, step


def _say(msg: str):
  print(msg, file=sys.stderr, flush=True)


def _ckpt_only_step(args):
  if getattr(args, "step", None) is not None:
    raise ConversionError("--step applies to --workdir only; a --ckpt directory holds one set of "
                          "params")


def _safetensors_out(out: str):
  if not out.endswith(".safetensors"):
    raise ConversionError(f"--out {out}: expected a .safetensors file name")


# -- into JAX ---------------------------------------------------------------------------------------


def cli_hf_to_jax(args) -> int:
  _say(f"converting {args.hf} -> {args.out}")
  cfg = hf.hf_to_jax(args.hf, args.out, overwrite=args.overwrite, progress=True)
  _say(f"hf-to-jax: {hf.param_count(cfg) / 1e6:.1f}M params ({cfg.param_dtype}), "
       f"{cfg.num_layers} layers, {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings "
       f"-> {args.out}")
  return 0


def cli_mar_vae(args) -> int:
  """`convert mar-vae --src FILE --out DIR`: writes DIR/params/ and DIR/vae_config.json."""
  sd = load_state_dict(args.src)
  skipped = mar_vae.ignored_keys(sd)
  cfg, params = mar_vae.mar_vae_to_jax(sd)
  with atomic_output(args.out, overwrite=args.overwrite) as tmp:
    save_params(tmp, params)
    write_json(tmp, mar_vae.CONFIG_FILE, cfg.to_dict())
  _say(f"mar-vae: {len(sd) - len(skipped)} tensors ({mar_vae.describe(cfg)}) -> {args.out}; "
       f"ignored {len(skipped)} keys outside "
       f"{'/'.join(p.rstrip('.') for p in mar_vae.PREFIXES)}"
       + (f" (e.g. {skipped[0]})" if skipped else ""))
  return 0


def cli_mar_head(args) -> int:
  """`convert mar-head --src FILE --out DIR`: the prediction type from --prediction, else the
  file's metadata, else eps (MAR's)."""
  is_st = args.src.endswith(".safetensors")
  state_dict = load_state_dict(args.src, None if is_st else args.key)
  prediction, source = args.prediction, "--prediction"
  if prediction is None:
    prediction = mar_head.read_prediction_metadata(args.src) if is_st else None
    source = "file metadata"
    if prediction is None:
      prediction, source = "eps", "default (MAR heads predict eps)"
  if prediction not in PREDICTIONS:
    raise ConversionError(f"{args.src}: prediction {prediction!r} in metadata; expected one of "
                          f"{PREDICTIONS}")
  cfg, params = mar_head.mar_head_to_jax(state_dict, prediction)
  _, ignored = mar_head.head_keys(state_dict)
  with atomic_output(args.out, overwrite=args.overwrite) as tmp:
    save_params(tmp, params)
    write_json(tmp, "head_config.json", cfg.to_dict())
  _say(f"mar-head: width {cfg.width}, depth {cfg.depth}, condition {cfg.cond_dim}, "
       f"{cfg.out_channels} output channels "
       f"({'learned' if cfg.learn_sigma else 'fixed'} variance), "
       f"prediction {prediction} [{source}]"
       + (f", position embedding [{cfg.n_positions}, {cfg.cond_dim}]" if cfg.n_positions else "")
       + f"; ignored {len(ignored)} non-head keys -> {args.out}")
  return 0


# -- jax-to-hf ------------------------------------------------------------------------------------


def special_tokens_config(mcfg) -> dict:
  return {"boi_token_id": mcfg.boi_id, "eoi_token_id": mcfg.eoi_id,
          "mmar": {"boi_token_id": mcfg.boi_id, "eoi_token_id": mcfg.eoi_id,
                   "text_vocab_size": mcfg.text_vocab, "image_tokens": mcfg.num_image_tokens}}


def tokenizer_with_special_tokens(tokenizer_dir: str, mcfg, staging: str) -> str | None:
  """A copy of the run's HuggingFace tokenizer with <boi>/<eoi> at the model's ids (method.md
  §1.6); None for the bytes tokenizer (no HuggingFace files to write)."""
  tok = load_text_tokenizer(tokenizer_dir)
  if not isinstance(tok, HFTokenizer):
    return None
  hf = tok.tokenizer
  if (mcfg.boi_id, mcfg.eoi_id) == (len(hf), len(hf) + 1):
    hf.add_tokens(["<boi>", "<eoi>"], special_tokens=True)  # the same call in transformers 4 and 5
    got = hf.convert_tokens_to_ids(["<boi>", "<eoi>"])
    if list(got) != [mcfg.boi_id, mcfg.eoi_id]:
      raise ConversionError(f"<boi>/<eoi> landed at ids {got}, the model uses "
                            f"{[mcfg.boi_id, mcfg.eoi_id]}")
  hf.save_pretrained(staging)
  cfg_path = os.path.join(staging, "tokenizer_config.json")
  cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
  cfg.update(boi_token_id=mcfg.boi_id, eoi_token_id=mcfg.eoi_id)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  return staging


def workdir_to_hf(workdir: str, out: str, *, step=None, which="ema", dtype=None,
                  max_shard_size="5GB", overwrite=False) -> tuple[list[str], int]:
  if os.path.exists(out) and not overwrite:
    raise ConversionError(f"output {os.path.abspath(out)} exists; pass --overwrite to replace it")
  params, mcfg, step = workdir_params(workdir, step, which, "backbone")
  with tempfile.TemporaryDirectory(prefix="mmar-tokenizer-") as staging:
    tok_dir = epath.Path(workdir) / "tokenizer"
    tok = tokenizer_with_special_tokens(str(tok_dir), mcfg, staging) if tok_dir.is_dir() else None
    files = hf.jax_to_hf(params, mcfg.backbone, out, dtype=dtype, max_shard_size=max_shard_size,
                         tokenizer_dir=tok, overwrite=overwrite,
                         extra_config=special_tokens_config(mcfg), progress=True)
  return files, step


def ckpt_to_hf(ckpt: str, out: str, *, dtype=None, max_shard_size="5GB",
               overwrite=False) -> list[str]:
  """A `hf-to-jax` output (or any params/ + model_config.json directory) back to HuggingFace."""
  cfg, source = hf.read_model_config(ckpt)
  tok = os.path.join(ckpt, hf.TOKENIZER_DIR)
  return hf.jax_to_hf(load_params(ckpt), cfg, out, dtype=dtype, max_shard_size=max_shard_size,
                      tokenizer_dir=tok if os.path.isdir(tok) else None, overwrite=overwrite,
                      extra_config=hf.carried_config(source.get("hf_config")), progress=True)


def cli_jax_to_hf(args) -> int:
  options = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
  if args.workdir:
    files, step = workdir_to_hf(args.workdir, args.out, step=args.step, which=args.params,
                                **options)
    what = f"{args.params} params of step {step}"
  else:
    _ckpt_only_step(args)
    files, what = ckpt_to_hf(args.ckpt, args.out, **options), args.ckpt
  _say(f"jax-to-hf: {what} -> {args.out}: {', '.join(files)}")
  return 0


# -- jax-to-mar-vae / jax-to-mar-head -------------------------------------------------------------


def workdir_vae_tensors(workdir, step=None, which="ema") -> tuple[dict, int]:
  """MAR-layout VAE tensors of a run whose image tokenizer is a VAE. The VAE is frozen, so EMA
  and raw agree; either is accepted."""
  params, mcfg, step = workdir_params(workdir, step, which, "image_tokenizer")
  if mcfg.image.get("kind") != "vae" or "vae" not in params:
    raise ConversionError(f"the run in {workdir} has no VAE (model.image.kind is "
                          f"{mcfg.image.get('kind')!r})")
  return jax_to_mar_vae(vae_config(mcfg), params["vae"]), step


def ckpt_vae_tensors(ckpt: str) -> dict:
  """MAR-layout VAE tensors of a `convert mar-vae` output (fp32 as stored)."""
  try:
    cfg = read_json(ckpt, mar_vae.CONFIG_FILE)
    params = load_params(ckpt)
  except FileNotFoundError as e:
    raise ConversionError(f"--ckpt {ckpt}: not a `convert mar-vae` output ({e})") from e
  return jax_to_mar_vae(cfg, jax.tree.map(np.asarray, params))


def cli_jax_to_mar_vae(args) -> int:
  _safetensors_out(args.out)
  if args.workdir:
    tensors, step = workdir_vae_tensors(args.workdir, args.step, args.params)
    what = f" of step {step}"
  else:
    _ckpt_only_step(args)
    tensors, what = ckpt_vae_tensors(args.ckpt), ""
  with atomic_output(args.out, overwrite=args.overwrite, is_dir=False) as tmp:
    sio.save_file(tmp, tensors, {"format": "pt"})
  _say(f"jax-to-mar-vae: {len(tensors)} tensors{what} -> {args.out}")
  return 0


def _head_config(args) -> HeadConfig:
  """The head's config, read before its params: a refused export reads no weights."""
  if args.workdir:
    return Run(args.workdir).model_cfg.head
  try:
    return HeadConfig.from_dict(read_json(args.ckpt, "head_config.json"))
  except ValueError as e:
    raise ConversionError(f"{args.ckpt}/head_config.json: {e}") from e


def cli_jax_to_mar_head(args) -> int:
  _safetensors_out(args.out)
  cfg = _head_config(args)
  if cfg.prediction != "eps" and not args.force:
    raise ConversionError(
        f"this head predicts {cfg.prediction!r}; MAR's sampler reads a head's output as eps, so "
        f"it would sample garbage. Pass --force to write it anyway (the metadata keeps "
        f"prediction={cfg.prediction})")
  if args.workdir:
    params, _, step = workdir_params(args.workdir, args.step, args.params, "head")
    what = f" of step {step}"
  else:
    _ckpt_only_step(args)
    params, what = load_params(args.ckpt), ""
  tensors = jax_to_mar_head(cfg, params)
  with atomic_output(args.out, overwrite=args.overwrite, is_dir=False) as tmp:
    sio.save_file(tmp, tensors, {"prediction": cfg.prediction})
  _say(f"jax-to-mar-head: {len(tensors)} tensors{what}, prediction {cfg.prediction} -> {args.out}")
  return 0


# -- jax-to-safetensors -----------------------------------------------------------------------------


def workdir_to_safetensors(workdir: str, out: str, *, step=None, which="ema", dtype=None,
                           max_shard_size="5GB", overwrite=False) -> tuple[list[str], int]:
  if os.path.exists(out) and not overwrite:
    raise ConversionError(f"output {os.path.abspath(out)} exists; pass --overwrite to replace it")
  params, mcfg, step = workdir_params(workdir, step, which)
  producers = tensors_from_params(params, mcfg)
  cast = None if dtype is None else np.dtype(get_dtype(CLI_DTYPES[dtype]))
  specs = []
  for name, f in producers.items():
    a = f()
    specs.append((name, sio.TensorSpec(cast if cast is not None else a.dtype, tuple(a.shape))))

  def produce(name):
    a = producers[name]()
    return np.ascontiguousarray(a.astype(cast, copy=False) if cast is not None else a)

  config = {"format": FORMAT, "model": mcfg.to_dict(), "step": step, "params": which,
            **special_tokens_config(mcfg), "naming": NAMING,
            # The way back (`convert safetensors-to-jax`) rebuilds a training workdir from these.
            "run_config": json.loads((epath.Path(workdir) / "config.json").read_text()),
            "data_position": _data_position(workdir, step)}
  with atomic_output(out, overwrite) as tmp:
    files = sio.write_sharded(tmp, specs, produce, max_shard_size, metadata={"format": "pt"})
    with open(os.path.join(tmp, SAFETENSORS_CONFIG), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
    files.append(SAFETENSORS_CONFIG)
    tok = epath.Path(workdir) / "tokenizer"
    if tok.is_dir():
      _copy_tree(tok, epath.Path(tmp) / "tokenizer")
      files.append("tokenizer/")
  return files, step


def _data_position(workdir, step: int) -> int | None:
  """The global example index the step after `step` reads (the checkpoint's meta)."""
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    position = ckpt.restore_meta(step).get("data_position")
  finally:
    ckpt.close()
  return None if position is None else int(position)


def _copy_tree(src, dst):
  """epath copy (the workdir may be on gs://)."""
  dst.mkdir(parents=True, exist_ok=True)
  for p in src.iterdir():
    if p.is_dir():
      _copy_tree(p, dst / p.name)
    else:
      p.copy(dst / p.name)


def cli_jax_to_safetensors(args) -> int:
  if not args.workdir:
    raise ConversionError("jax-to-safetensors exports a training run: pass --workdir DIR")
  files, step = workdir_to_safetensors(args.workdir, args.out, step=args.step, which=args.params,
                                       dtype=args.dtype, max_shard_size=args.max_shard_size,
                                       overwrite=args.overwrite)
  _say(f"jax-to-safetensors: {args.params} params of step {step} -> {args.out}: {', '.join(files)}")
  return 0
