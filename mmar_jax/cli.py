"""`mmar-jax`: the command line's parser and dispatch.

Imported by `mmar_jax.__main__` after `startup.configure` has given XLA its flags, so the command
modules (and JAX) are imported here at the top. Each subcommand is
`name -> (function, add_arguments, help)`; the function takes the parsed arguments (plus
`args.config_overrides`) and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys

from mmar_jax.commands import (bench, bench_memory, bench_torch, convert, diagnose,
                               diagnose_context, evaluate, fid, prepare_data, safetensors_to_jax,
                               sample, train, understanding)
from mmar_jax.config import split_override_args
from mmar_jax.errors import ConfigError, ConversionError, InputError
from mmar_jax.parallel.distributed import add_arguments as _distributed_args
from mmar_jax.repro import cli as repro_cli


def _train_args(p):
  p.add_argument("--config", default=None, help="config file[:variant]")
  p.add_argument("--workdir", required=True)
  _distributed_args(p)


def _eval_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", default="ema", choices=("ema", "raw"))


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
    "train": (train.cli_train, _train_args, "train, or resume when --workdir has checkpoints"),
    "prepare-data": (prepare_data.cli_prepare_data, prepare_data.add_args,
                     "images + captions -> encoded latents in ArrayRecord shards (data.source latents:DIR)"),
    "repro": (repro_cli.cli_repro, repro_cli.add_args,
              "reproducibility checks: a pass/fail table, non-zero exit on failure"),
    "generate": (sample.cli_generate, sample.add_generate_args,
                 "text to image (no --prompt: unconditional)"),
    "caption": (sample.cli_caption, sample.add_caption_args,
                "image to text (also answers --question)"),
}
CONVERT = {
    name: (target, lambda p, name=name: convert.add_args(p, name), help_)
    for name, target, help_ in (
        ("hf-to-jax", convert.cli_hf_to_jax, "HuggingFace Qwen2 directory -> JAX params"),
        ("jax-to-hf", convert.cli_jax_to_hf, "JAX backbone -> HuggingFace Qwen2 directory"),
        ("mar-vae", convert.cli_mar_vae, "MAR KL-16 VAE -> JAX"),
        ("jax-to-mar-vae", convert.cli_jax_to_mar_vae, "JAX VAE -> MAR layout safetensors"),
        ("mar-head", convert.cli_mar_head, "MAR diffusion head -> JAX"),
        ("jax-to-mar-head", convert.cli_jax_to_mar_head,
         "JAX head -> MAR layout safetensors"),
        ("jax-to-safetensors", convert.cli_jax_to_safetensors,
         "a training workdir's whole model -> safetensors under documented names + mmar_config.json"),
    )
}
CONVERT["safetensors-to-jax"] = (
    safetensors_to_jax.cli_safetensors_to_jax, safetensors_to_jax.add_args,
    "a jax-to-safetensors output (edited in PyTorch) -> a new training workdir that train resumes")


def _bench_args(p):
  p.add_argument("--config", default="configs/bench.py", help="config file[:variant]")
  p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")


def _bench_train_args(p):
  _bench_args(p)
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="trace two more steps; report the N operations that took most time")


def _bench_torch_args(p):
  _bench_args(p)
  p.add_argument("--compile", action="store_true", help="wrap forward + loss in torch.compile")
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU core)")
  p.add_argument("--gather", action="store_true",
                 help="the LM head on the text-target positions only (as the JAX step)")


BENCH = {
    what: (bench.cli_bench, lambda p, what=what: (_bench_args(p), p.set_defaults(what=what)),
           help_)
    for what, help_ in (("train", "train-step time, tokens/s, MFU, peak memory"),
                        ("generate", "text-to-image images/s (masked AR with guidance)"),
                        ("caption", "image-to-text tokens/s (KV-cached decoding)"),
                        ("convert", "hf-to-jax + jax-to-hf time of a random checkpoint"))
}
BENCH["train"] = (bench.cli_bench, lambda p: (_bench_train_args(p), p.set_defaults(what="train")),
                  BENCH["train"][2])
BENCH["torch-train"] = (bench_torch.cli_bench_torch, _bench_torch_args,
                        "the same train step in PyTorch eager (CPU reference), same keys")
BENCH["memory"] = (bench_memory.cli_bench_memory, _bench_memory_args,
                   "the train step's memory per device from an ahead-of-time compile")


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
    "demo": (evaluate.cli_eval, _eval_args,
             "the demo's held-out evaluation: understanding and generation accuracy, pictures "
             "(the default: `eval --workdir DIR`)"),
    "fid": (fid.cli_fid, fid.add_args,
            "FID of an image folder against a folder or .npz statistics (pytorch-fid's Inception)"),
    "understanding": (understanding.cli_eval_understanding, _understanding_args,
                      "a benchmark JSONL: open answers by exact match, multiple choice by likelihood"),
}

DIAGNOSE = {
    "numerics": (diagnose.cli_numerics, _numerics_args,
                 "bf16 error of eps / v / x0 parameterisations: table, numerics.json, plot"),
    "context": (diagnose_context.cli_context, _context_args,
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
  parser = argparse.ArgumentParser(
      prog="mmar-jax", description="MMAR in JAX: train, sample, convert, evaluate, reproduce")
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


def main(argv=None) -> int:
  """Parses and runs one command; XLA's flags must already be set (`mmar_jax.__main__`)."""
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
  try:
    return int(args.target(args) or 0)
  except (ConfigError, ConversionError, InputError, FileNotFoundError, FileExistsError) as e:
    print(f"mmar-jax: error: {e}", file=sys.stderr)
    return 2
