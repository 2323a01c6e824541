"""Weights out of a training workdir: `convert jax-to-hf / jax-to-mar-vae / jax-to-mar-head /
jax-to-safetensors --workdir DIR [--step N] [--params ema|raw] --out ...`.

One helper, `workdir_params`, restores a checkpoint's params (EMA by default) or just one module
of them (`backbone`, `head`, `image_tokenizer`, ...: orbax reads only that subtree) onto the
host, with the model config the run stored; each command hands its subtree to the converter
that already exists for `--ckpt` directories (convert/hf.py, mar_vae.py, mar_head.py), and
without --workdir the commands are exactly those converters.

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

import numpy as np
from etils import epath

from mmar_jax.convert import hf, mar_head, mar_vae
from mmar_jax.convert import safetensors_io
from mmar_jax.convert import safetensors_io as sio
from mmar_jax.convert.hf import _CLI_DTYPES
from mmar_jax.convert.mar_head import jax_to_mar_head
from mmar_jax.convert.mar_vae import jax_to_mar_vae
from mmar_jax.convert.whole_model import CONFIG_FILE as SAFETENSORS_CONFIG
from mmar_jax.convert.whole_model import FORMAT, NAMING, tensors_from_params, vae_config
from mmar_jax.data.text_tokenizer import HFTokenizer, load_text_tokenizer
from mmar_jax.dtypes import get_dtype
from mmar_jax.errors import ConversionError
from mmar_jax.files import atomic_output
from mmar_jax.run import Run
from mmar_jax.train.checkpoint import Checkpointer

# -- a workdir's params -----------------------------------------------------------------------------


def workdir_params(workdir: str, step: int | None = None, which: str = "ema",
                   module: str | None = None) -> tuple[dict, object, int]:
  """(params as host numpy arrays, MMARConfig, step): the whole model, or one top-level module."""
  run = Run(workdir)
  params, step = run.params(step, which, module=module, on_host=True)
  return params, run.model_cfg, step


def _say(msg: str):
  print(msg, file=sys.stderr, flush=True)


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


def cli_jax_to_hf(args) -> int:
  if not getattr(args, "workdir", None):
    return hf.cli_jax_to_hf(args)
  files, step = workdir_to_hf(args.workdir, args.out, step=args.step, which=args.params,
                              dtype=args.dtype, max_shard_size=args.max_shard_size,
                              overwrite=args.overwrite)
  _say(f"jax-to-hf: {args.params} params of step {step} -> {args.out}: {', '.join(files)}")
  return 0


# -- jax-to-mar-vae / jax-to-mar-head -------------------------------------------------------------


def _safetensors_out(out: str):
  if not out.endswith(".safetensors"):
    raise ConversionError(f"--out {out}: expected a .safetensors file name")


def workdir_vae_tensors(workdir, step=None, which="ema") -> tuple[dict, int]:
  """MAR-layout VAE tensors of a run whose image tokenizer is a VAE. The VAE is frozen, so EMA
  and raw agree; either is accepted."""
  params, mcfg, step = workdir_params(workdir, step, which, "image_tokenizer")
  if mcfg.image.get("kind") != "vae" or "vae" not in params:
    raise ConversionError(f"the run in {workdir} has no VAE (model.image.kind is "
                          f"{mcfg.image.get('kind')!r})")
  return jax_to_mar_vae(vae_config(mcfg), params["vae"]), step


def cli_jax_to_mar_vae(args) -> int:
  if not getattr(args, "workdir", None):
    return mar_vae.cli_jax_to_mar_vae(args)
  _safetensors_out(args.out)
  tensors, step = workdir_vae_tensors(args.workdir, args.step, args.params)
  with atomic_output(args.out, overwrite=args.overwrite, is_dir=False) as tmp:
    safetensors_io.save_file(tmp, tensors, {"format": "pt"})
  _say(f"jax-to-mar-vae: {len(tensors)} tensors of step {step} -> {args.out}")
  return 0


def workdir_head_tensors(workdir, step=None, which="ema") -> tuple[dict, object, int]:
  params, mcfg, step = workdir_params(workdir, step, which, "head")
  return jax_to_mar_head(mcfg.head, params), mcfg.head, step


def cli_jax_to_mar_head(args) -> int:
  if not getattr(args, "workdir", None):
    return mar_head.cli_jax_to_mar_head(args)
  _safetensors_out(args.out)
  mcfg = Run(args.workdir).model_cfg
  if mcfg.head.prediction != "eps" and not args.force:
    raise ConversionError(
        f"this head predicts {mcfg.head.prediction!r}; MAR's sampler reads a head's output as eps, "
        f"so it would sample garbage. Pass --force to write it anyway (the metadata keeps "
        f"prediction={mcfg.head.prediction})")
  tensors, cfg, step = workdir_head_tensors(args.workdir, args.step, args.params)
  with atomic_output(args.out, overwrite=args.overwrite, is_dir=False) as tmp:
    safetensors_io.save_file(tmp, tensors, {"prediction": cfg.prediction})
  _say(f"jax-to-mar-head: {len(tensors)} tensors of step {step}, prediction {cfg.prediction} -> "
       f"{args.out}")
  return 0


# -- jax-to-safetensors -----------------------------------------------------------------------------


def workdir_to_safetensors(workdir: str, out: str, *, step=None, which="ema", dtype=None,
                           max_shard_size="5GB", overwrite=False) -> tuple[list[str], int]:
  if os.path.exists(out) and not overwrite:
    raise ConversionError(f"output {os.path.abspath(out)} exists; pass --overwrite to replace it")
  params, mcfg, step = workdir_params(workdir, step, which)
  producers = tensors_from_params(params, mcfg)
  cast = None if dtype is None else np.dtype(get_dtype(_CLI_DTYPES[dtype]))
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
  if not getattr(args, "workdir", None):
    raise ConversionError("jax-to-safetensors exports a training run: pass --workdir DIR")
  files, step = workdir_to_safetensors(args.workdir, args.out, step=args.step, which=args.params,
                                       dtype=args.dtype, max_shard_size=args.max_shard_size,
                                       overwrite=args.overwrite)
  _say(f"jax-to-safetensors: {args.params} params of step {step} -> {args.out}: {', '.join(files)}")
  return 0
