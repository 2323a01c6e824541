"""`mmar-jax`: the one command-line entry point.

Nothing heavy is imported at module level: `--cpu-devices` must reach XLA before JAX starts, and
each subcommand imports only what it needs (torch, transformers, tfds cost seconds).
Each subcommand is `name -> (module:function, add_arguments)`; the function takes the parsed
arguments (plus `args.config_overrides`) and returns an exit code.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def _convert_args(p: argparse.ArgumentParser, kind: str):
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


def _train_args(p):
  p.add_argument("--config", default=None, help="config file[:variant]")
  p.add_argument("--workdir", required=True)
  _distributed_args(p)


def _distributed_args(p):
  from mmar_jax.parallel.distributed import add_arguments  # light: no JAX import at module level
  add_arguments(p)


def _prepare_data_args(p):
  p.add_argument("--config", required=True, help="config file[:variant] (model.image, init.vae)")
  p.add_argument("--src", required=True,
                 help="demo | folder:PATH | jsonl:PATH | wds:GLOB | tfds[:NAME] (data.tfds.*)")
  p.add_argument("--out", required=True, help="output directory (local or gs://)")
  p.add_argument("--records-per-shard", type=int, default=10000)
  p.add_argument("--batch-size", type=int, default=64,
                 help="images per device in an encoder call (the same on every device, so the "
                      "latents do not depend on the device count)")
  p.add_argument("--threads", type=int, default=8, help="threads reading and decoding images")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out (deleted first), or restart another job's unfinished one")
  _distributed_args(p)


def _eval_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", default="ema", choices=("ema", "raw"))


def _repro_args(p):
  from mmar_jax.repro import cli as repro_cli  # light: imports nothing heavy at module level
  repro_cli.add_args(p)


def _sample_args(p, kind: str):
  from mmar_jax.commands import sample as sample_cli  # light: imports nothing heavy at module level
  (sample_cli.add_generate_args if kind == "generate" else sample_cli.add_caption_args)(p)


def _bench_memory_args(p):
  p.add_argument("--config", required=True, help="config file[:variant]")
  p.add_argument("--topology", default=None,
                 help="compile for this TPU (v5p-64, v5litepod-256, or a libtpu name such as "
                      "v5p:2x4x4); needs libtpu. Without it: the (simulated) local devices")
  p.add_argument("--no-cost", action="store_true",
                 help="with --topology: skip the cost report (FLOPs, bytes, roofline), which "
                      "takes two more compiles of 1 and 2 layers")


def _numerics_args(p):
  p.add_argument("--workdir", default=None,
                 help="measure this training run's head (default: train eps, v and x0 demo heads)")
  p.add_argument("--out", required=True, help="directory for numerics.json, numerics_meta.json, "
                 "numerics.png")
  p.add_argument("--fast", action="store_true", help="analytic figures and dtype checks only")
  p.add_argument("--step", type=int, default=None, help="checkpoint step with --workdir (default: latest)")
  p.add_argument("--params", default="ema", choices=("ema", "raw"))
  p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")


def _context_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=None, help="directory for context.json and context.png "
                 "(default: WORKDIR/diagnose/context)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", default="ema", choices=("ema", "raw"))
  p.add_argument("--batches", type=int, default=4, help="training batches measured (each at "
                 "every visible count, captioned and unconditional)")
  p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")


# name -> (target, add_arguments, help)
COMMANDS = {
    "train": ("mmar_jax.commands.train:cli_train", _train_args, "train, or resume when --workdir has checkpoints"),
    "prepare-data": ("mmar_jax.data.prepare:cli_prepare_data", _prepare_data_args,
                     "images + captions -> encoded latents in ArrayRecord shards (data.source latents:DIR)"),
    "repro": ("mmar_jax.repro.cli:cli_repro", _repro_args,
              "reproducibility checks: a pass/fail table, non-zero exit on failure"),
    "generate": ("mmar_jax.commands.sample:cli_generate", lambda p: _sample_args(p, "generate"),
                 "text to image (no --prompt: unconditional)"),
    "caption": ("mmar_jax.commands.sample:cli_caption", lambda p: _sample_args(p, "caption"),
                "image to text (also answers --question)"),
}
CONVERT = {
    name: (target, lambda p, name=name: _convert_args(p, name), help_)
    for name, target, help_ in (
        ("hf-to-jax", "mmar_jax.convert.hf:cli_hf_to_jax", "HuggingFace Qwen2 directory -> JAX params"),
        ("jax-to-hf", "mmar_jax.commands.export:cli_jax_to_hf", "JAX backbone -> HuggingFace Qwen2 directory"),
        ("mar-vae", "mmar_jax.convert.mar_vae:cli_mar_vae", "MAR KL-16 VAE -> JAX"),
        ("jax-to-mar-vae", "mmar_jax.commands.export:cli_jax_to_mar_vae", "JAX VAE -> MAR layout safetensors"),
        ("mar-head", "mmar_jax.convert.mar_head:cli_mar_head", "MAR diffusion head -> JAX"),
        ("jax-to-mar-head", "mmar_jax.commands.export:cli_jax_to_mar_head",
         "JAX head -> MAR layout safetensors"),
        ("jax-to-safetensors", "mmar_jax.commands.export:cli_jax_to_safetensors",
         "a training workdir's whole model -> safetensors under documented names + mmar_config.json"),
    )
}
CONVERT["safetensors-to-jax"] = (
    "mmar_jax.commands.safetensors_to_jax:cli_safetensors_to_jax",
    lambda p: __import__("mmar_jax.commands.safetensors_to_jax", fromlist=["add_args"]).add_args(p),
    "a jax-to-safetensors output (edited in PyTorch) -> a new training workdir that train resumes")


def _bench_args(p):
  p.add_argument("--config", default="configs/bench.py", help="config file[:variant]")
  p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")


def _bench_torch_args(p):
  _bench_args(p)
  p.add_argument("--compile", action="store_true", help="wrap forward + loss in torch.compile")
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU core)")
  p.add_argument("--gather", action="store_true",
                 help="the LM head on the text-target positions only (as the JAX step)")


BENCH = {
    what: ("mmar_jax.commands.bench:cli_bench", lambda p, what=what: (_bench_args(p), p.set_defaults(what=what)),
           help_)
    for what, help_ in (("train", "train-step time, tokens/s, MFU, peak memory"),
                        ("generate", "text-to-image images/s (masked AR with guidance)"),
                        ("caption", "image-to-text tokens/s (KV-cached decoding)"),
                        ("convert", "hf-to-jax + jax-to-hf time of a random checkpoint"))
}
BENCH["torch-train"] = ("mmar_jax.commands.bench_torch:cli_bench_torch", _bench_torch_args,
                        "the same train step in PyTorch eager (CPU reference), same keys")
BENCH["memory"] = ("mmar_jax.commands.bench_memory:cli_bench_memory", _bench_memory_args,
                   "the train step's memory per device from an ahead-of-time compile")


def _fid_args(p):
  from mmar_jax.commands import fid  # light: imports nothing heavy at module level
  fid.add_args(p)


def _understanding_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", required=True, help="JSONL: {image, question, answer} (open) or "
                 "{image, question, choices, answer} (multiple choice)")
  p.add_argument("--out", default=None, help="predictions and summary (default: WORKDIR/eval/understanding.json)")
  p.add_argument("--batch-size", type=int, default=16, help="rows (choices, open questions) per global batch")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", default="ema", choices=("ema", "raw"))
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and start over)")
  _distributed_args(p)


EVAL = {
    "demo": ("mmar_jax.commands.evaluate:cli_eval", _eval_args,
             "the demo's held-out evaluation: understanding and generation accuracy, pictures "
             "(the default: `eval --workdir DIR`)"),
    "fid": ("mmar_jax.commands.fid:cli_fid", _fid_args,
            "FID of an image folder against a folder or .npz statistics (pytorch-fid's Inception)"),
    "understanding": ("mmar_jax.commands.understanding:cli_eval_understanding", _understanding_args,
                      "a benchmark JSONL: open answers by exact match, multiple choice by likelihood"),
}

DIAGNOSE = {
    "numerics": ("mmar_jax.commands.diagnose:cli_numerics", _numerics_args,
                 "bf16 error of eps / v / x0 parameterisations: table, numerics.json, plot"),
    "context": ("mmar_jax.commands.diagnose_context:cli_context", _context_args,
                "does the image block use the drawn tokens: masked loss by visible count, with "
                "the LLM's or the ViT's context cut; attention shares; head vs nearest neighbour"),
}

# group -> (help, {name -> (target, add_arguments, help)}); a group's subcommand is `args.<group>`.
GROUPS = {
    "eval": ("evaluations: " + ", ".join(EVAL) + " (a flag right after `eval` means demo)", EVAL),
    "convert": ("weights across frameworks", CONVERT),
    "bench": ("throughput and memory benchmarks, one JSON line", BENCH),
    "diagnose": ("numerical diagnostics", DIAGNOSE),
}

# group -> the subcommand a flag right after the group's name means: `eval --workdir DIR` was a
# command of its own before `eval` grew subcommands, and still runs the demo's evaluation.
DEFAULT_SUBCOMMAND = {"eval": "demo"}


def with_default_subcommand(argv: list[str]) -> list[str]:
  if (len(argv) > 1 and argv[0] in DEFAULT_SUBCOMMAND and argv[1].startswith("-")
      and argv[1] not in ("-h", "--help")):
    return [argv[0], DEFAULT_SUBCOMMAND[argv[0]]] + argv[1:]
  return argv


def _global_args(p: argparse.ArgumentParser):
  p.add_argument("--cpu-devices", type=int, default=None, help="simulate N CPU devices")
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor (same as --config.mesh=...)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mmar-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (target, add, help_) in COMMANDS.items():
    p = sub.add_parser(name, help=help_)
    _global_args(p)
    add(p)
    p.set_defaults(target=target)
  for group, (group_help, table) in GROUPS.items():
    gsub = sub.add_parser(group, help=group_help, description=group_help).add_subparsers(
        dest=group, required=True)
    for name, (target, add, help_) in table.items():
      p = gsub.add_parser(name, help=help_)
      _global_args(p)
      add(p)
      p.set_defaults(target=target)
  return parser


def setup_jax_environment(cpu_devices: int | None):
  """Must run before JAX is imported: simulated devices and the persistent compile cache."""
  if cpu_devices:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
  import jax
  cache = os.environ.get("MMAR_JAX_CACHE", os.path.expanduser("~/.cache/mmar_jax/xla"))
  if cache and cache != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv=None) -> int:
  from mmar_jax.config import split_override_args
  from mmar_jax.errors import ConfigError, ConversionError, InputError

  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv, overrides = split_override_args(argv)
  except ConfigError as e:
    print(f"mmar-jax: error: {e}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(with_default_subcommand(argv))
  if getattr(args, "mesh", None):
    overrides.append(("mesh", args.mesh))
  args.config_overrides = overrides
  if args.command == "repro":
    from mmar_jax.repro.cli import prepare_environment
    for note in prepare_environment():
      print(f"[repro] {note}", file=sys.stderr)
    # Simulated devices only affect the CPU platform: harmless where an accelerator is present.
    args.cpu_devices = args.cpu_devices or 8
  setup_jax_environment(args.cpu_devices)
  module_name, func_name = args.target.split(":")
  import importlib
  func = getattr(importlib.import_module(module_name), func_name)
  try:
    return int(func(args) or 0)
  except (ConfigError, ConversionError, InputError, FileNotFoundError, FileExistsError) as e:
    print(f"mmar-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
