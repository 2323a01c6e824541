"""`mmar-jax repro [CHECK ...] [--config CFG] [--workdir DIR] [--json OUT]`: a pass/fail table."""

from __future__ import annotations

import json
import sys

from etils import epath

from mmar_jax import config as config_lib
from mmar_jax.repro import checks

CHECK_NAMES = ("determinism", "resume", "mesh", "hf-parity", "roundtrip", "numerics", "golden",
               "torch-parity")


def add_args(p):
  p.add_argument("checks", nargs="*", metavar="CHECK",
                 help=f"any of {', '.join(CHECK_NAMES)} (default: all)")
  p.add_argument("--config", default=None, help="config for the train-based checks (default: tiny)")
  p.add_argument("--workdir", default=None, help="check against this training run")
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--full", action="store_true", help="numerics: train the three heads (minutes)")
  p.add_argument("--write", action="store_true", help="golden: record this platform's reference")
  p.add_argument("--hf", default=None, help="hf-parity: a HuggingFace Qwen2 directory")
  p.add_argument("--prompt-ids", default=None, help="hf-parity: .npy int array [seq]")
  p.add_argument("--dump-logits", default=None, help="hf-parity: write the JAX logits here")
  p.add_argument("--atol", type=float, default=1e-4, help="hf-parity: max abs logit difference")
  p.add_argument("--max-kl", type=float, default=1e-6)
  p.add_argument("--min-argmax", type=float, default=0.999)
  p.add_argument("--seq-len", type=int, default=576)


def run(args) -> list:
  names = args.checks or list(CHECK_NAMES)
  unknown = [n for n in names if n not in CHECK_NAMES]
  if unknown:
    raise config_lib.ConfigError(f"unknown repro check(s) {unknown}; choose from {CHECK_NAMES}")
  config = None
  if args.config:
    config = config_lib.apply_overrides(config_lib.load_file(args.config), args.config_overrides)
  results = []
  for name in names:
    print(f"[repro] {name} ...", file=sys.stderr, flush=True)
    if name == "determinism":
      r = checks.check_determinism(config, workdir=args.workdir)
    elif name == "resume":
      r = checks.check_resume(config, workdir=args.workdir)
    elif name == "mesh":
      r = checks.check_mesh(config, workdir=args.workdir)
    elif name == "hf-parity":
      r = checks.check_hf_parity(hf_dir=args.hf, atol=args.atol, max_kl=args.max_kl,
                                 min_argmax=args.min_argmax, seq_len=args.seq_len,
                                 prompt_ids=args.prompt_ids, dump_logits=args.dump_logits)
    elif name == "roundtrip":
      r = checks.check_roundtrip()
    elif name == "torch-parity":
      r = checks.check_torch_parity(config, workdir=args.workdir)
    elif name == "numerics":
      r = checks.check_numerics(full=args.full, workdir=args.workdir)
    else:
      r = checks.check_golden(write=args.write)
    results.append(r)
  return results


def table(results) -> str:
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.3g}"
    return str(v)
  rows = [("check", "status", "value", "tolerance", "detail")]
  rows += [(r.name, r.status.upper(), fmt(r.value), fmt(r.tolerance), r.detail) for r in results]
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def cli_repro(args) -> int:
  results = run(args)
  print(table(results))
  if args.json:
    epath.Path(args.json).write_text(json.dumps({"checks": [r.to_dict() for r in results]}, indent=2) + "\n")
  return 1 if any(r.status == "fail" for r in results) else 0
