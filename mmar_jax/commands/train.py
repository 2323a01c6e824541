"""`mmar-jax train`: join a multi-process run, resolve the config, train (train/loop.py), and on
the demo evaluate the final EMA weights (commands/evaluate.py)."""

from __future__ import annotations

import json

import jax
from etils import epath

from mmar_jax import startup
from mmar_jax.commands.evaluate import evaluate, not_applicable, print_report
from mmar_jax.parallel import distributed
from mmar_jax.train.loop import train
from mmar_jax.train.workdir import resolve_config


def cli_train(args) -> int:
  # Before any JAX computation: a multi-process run joins here (flags, else the environment).
  distributed.maybe_initialize(distributed.with_flags(
      getattr(args, "coordinator", None), getattr(args, "num_processes", None),
      getattr(args, "process_id", None)))
  startup.log_to_console()
  config = resolve_config(args.workdir, args.config, args.config_overrides)
  train(config, args.workdir)
  if config.eval.at_end and jax.process_index() == 0 and not _evaluated(args.workdir, config.steps):
    why = not_applicable(config)
    if why:  # the run trained: that is the job's result, so it still exits 0
      print(f"skipped the demo's evaluation (eval.at_end): {why}", flush=True)
    else:
      print("evaluating the EMA weights on the held-out combinations ...", flush=True)
      print_report(evaluate(args.workdir), args.workdir)
  return 0


def _evaluated(workdir, step: int) -> bool:
  """Whether eval/report.json already describes the final step (a finished run re-launched)."""
  path = epath.Path(workdir) / "eval" / "report.json"
  return path.exists() and json.loads(path.read_text()).get("step") == step
