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
    if kind == "jax-to-hf":
      p.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                     help="output dtype (default: the stored one)")
      p.add_argument("--max-shard-size", default="5GB")
    if kind == "jax-to-mar-head":
      p.add_argument("--force", action="store_true",
                     help="write a v- or x0-head although MAR's sampler reads heads as eps")


def _train_args(p):
  p.add_argument("--config", default=None, help="config file[:variant]")
  p.add_argument("--workdir", required=True)


def _hf_parity_args(p):
  p.add_argument("--hf", default=None, help="HuggingFace Qwen2 directory (default: a tiny random one)")
  p.add_argument("--prompt-ids", default=None, help=".npy int array [seq]")
  p.add_argument("--dump-logits", default=None, help="write the JAX logits [seq, vocab] float32 here")
  p.add_argument("--atol", type=float, default=1e-4)
  p.add_argument("--max-kl", type=float, default=1e-6)
  p.add_argument("--min-argmax", type=float, default=0.999,
                 help="least fraction of positions whose argmax agrees")
  p.add_argument("--seq-len", type=int, default=576)


def _sample_args(p, kind: str):
  from mmar_jax.sample import cli as sample_cli  # light: imports nothing heavy at module level
  (sample_cli.add_generate_args if kind == "generate" else sample_cli.add_caption_args)(p)


# name -> (target, add_arguments, help)
COMMANDS = {
    "train": ("mmar_jax.train.loop:cli_train", _train_args, "train, or resume when --workdir has checkpoints"),
    "generate": ("mmar_jax.sample.cli:cli_generate", lambda p: _sample_args(p, "generate"),
                 "text to image (no --prompt: unconditional)"),
    "caption": ("mmar_jax.sample.cli:cli_caption", lambda p: _sample_args(p, "caption"),
                "image to text (also answers --question)"),
}
CONVERT = {
    name: (target, lambda p, name=name: _convert_args(p, name), help_)
    for name, target, help_ in (
        ("hf-to-jax", "mmar_jax.convert.hf:cli_hf_to_jax", "HuggingFace Qwen2 directory -> JAX params"),
        ("jax-to-hf", "mmar_jax.convert.hf:cli_jax_to_hf", "JAX backbone -> HuggingFace Qwen2 directory"),
        ("mar-vae", "mmar_jax.convert.mar_vae:cli_mar_vae", "MAR KL-16 VAE -> JAX"),
        ("jax-to-mar-vae", "mmar_jax.convert.mar_vae:cli_jax_to_mar_vae", "JAX VAE -> MAR layout safetensors"),
        ("mar-head", "mmar_jax.convert.mar_head:cli_mar_head", "MAR diffusion head -> JAX"),
        ("jax-to-mar-head", "mmar_jax.convert.mar_head:cli_jax_to_mar_head",
         "JAX head -> MAR layout safetensors"),
    )
}
REPRO = {
    "hf-parity": ("mmar_jax.repro.hf_parity:cli_hf_parity", _hf_parity_args,
                  "JAX backbone vs the PyTorch model of a HuggingFace directory"),
}


def _bench_args(p):
  p.add_argument("--config", default="configs/bench.py", help="config file[:variant]")
  p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")


BENCH = {
    what: ("mmar_jax.bench:cli_bench", lambda p, what=what: (_bench_args(p), p.set_defaults(what=what)),
           help_)
    for what, help_ in (("train", "train-step time, tokens/s, MFU, peak memory"),)
}

# group -> (help, {name -> (target, add_arguments, help)}); a group's subcommand is `args.<group>`.
GROUPS = {
    "convert": ("weights across frameworks", CONVERT),
    "repro": ("reproducibility checks", REPRO),
    "bench": ("throughput and memory benchmarks, one JSON line", BENCH),
}


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
    gsub = sub.add_parser(group, help=group_help).add_subparsers(dest=group, required=True)
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
  from mmar_jax.config import ConfigError, split_override_args
  from mmar_jax.convert.common import ConversionError

  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv, overrides = split_override_args(argv)
  except ConfigError as e:
    print(f"mmar-jax: error: {e}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(argv)
  if getattr(args, "mesh", None):
    overrides.append(("mesh", args.mesh))
  args.config_overrides = overrides
  setup_jax_environment(args.cpu_devices)
  module_name, func_name = args.target.split(":")
  import importlib
  func = getattr(importlib.import_module(module_name), func_name)
  try:
    return int(func(args) or 0)
  except (ConfigError, ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"mmar-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
