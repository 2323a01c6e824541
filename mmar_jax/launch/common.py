"""What the launchers share: the run's config and its mesh checked against the machines, and the
shell script a launcher prints (`--dry-run`) or runs. Printing and running the same text is what
makes `--dry-run` exact."""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mmar_jax import config as config_lib
from mmar_jax.launch.tpu_names import LaunchError

REPO = Path(__file__).resolve().parents[2]


def q(value) -> str:
  return shlex.quote(str(value))


# The commands a launcher runs on every process of a run: training, and the many-item jobs that
# spread over the processes (their flags follow `--`; see split_command).
JOBS = ("prepare-data", "generate", "caption", "eval")


def split_command(argv) -> tuple[list[str], list[str] | None]:
  """(launcher arguments, the job after `--` or None for training). A job brings its own flags
  (its --workdir, --mesh, ...), so the launcher's training flags do not go with it."""
  argv = list(argv)
  if "--" not in argv:
    return argv, None
  cut = argv.index("--")
  job = argv[cut + 1:]
  if not job or job[0] not in JOBS:
    raise LaunchError(f"after `--` give the command every process runs, one of {', '.join(JOBS)} "
                      f"(got {' '.join(job) or 'nothing'}); train takes the launcher's own "
                      f"--config and --workdir, without `--`")
  return argv[:cut], job


def job_name(command: list[str]) -> str:
  """`train`, `prepare-data`, `eval fid`: a command as a log line names it."""
  return " ".join(command[:2 if command[0] == "eval" else 1])


def check_job_flags(args, job, flags=("config", "workdir", "mesh", "mesh_dcn")):
  """A job's flags belong after `--`; training's launcher flags with a job are a mistake."""
  given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f, None)]
  if job is None:
    missing = [f"--{f}" for f in ("config", "workdir") if not getattr(args, f, None)]
    if missing:
      raise LaunchError(f"training needs {' and '.join(missing)} (or give a job after `--`)")
  elif given:
    raise LaunchError(f"{', '.join(given)}: with a job after `--`, give its flags there "
                      f"(mmar-jax {job[0]} {' '.join(given)} ...)")


def split_overrides(argv):
  """(other arguments, [(key, value)]) for `--config.key=value` pass-through."""
  try:
    return config_lib.split_override_args(list(argv))
  except config_lib.ConfigError as e:
    raise LaunchError(str(e)) from None


def load_run_config(spec: str, overrides, mesh: str | None = None, mesh_dcn: str | None = None):
  """The config the workers will run, with the same overrides: checks happen on what runs."""
  overrides = list(overrides)
  if mesh:
    overrides.append(("mesh", mesh))
  if mesh_dcn:
    overrides.append(("mesh_dcn", mesh_dcn))
  try:
    cfg = config_lib.load_file(spec)
    config_lib.apply_overrides(cfg, overrides)
    config_lib.parse_mesh(cfg.mesh)
    config_lib.parse_mesh(cfg.mesh_dcn)
  except config_lib.ConfigError as e:
    raise LaunchError(str(e)) from None
  return cfg


def resolve_axes(text, total: int, key: str, where: str, unit: str = "devices") -> tuple[int, ...]:
  """Sizes of `key` (one -1 allowed) for `total` devices (or slices) of `where`, or an error
  that names both."""
  shape = list(config_lib.parse_mesh(text))
  shown = ",".join(map(str, shape))
  if shape.count(-1) > 1:
    raise LaunchError(f"{key} {shown}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape):
    raise LaunchError(f"{key} {shown}: sizes must be positive (or -1)")
  if -1 in shape:
    if total % known:
      raise LaunchError(f"{key} {shown} does not fit {where}: {total} {unit} are not a multiple "
                        f"of {known}")
    shape[shape.index(-1)] = total // known
  if math.prod(shape) != total:
    raise LaunchError(f"{key} {shown} needs {math.prod(shape)} {unit}, but {where} has {total}: "
                      f"data x fsdp x tensor must multiply to {total}")
  return tuple(shape)


def check_batch(cfg, ici, dcn, processes: int):
  """The global batch splits over data x fsdp (within and across slices) and over processes."""
  batch = int(cfg.train.batch_size)
  shards = ici[0] * dcn[0] * ici[1] * dcn[1]
  if batch % shards:
    raise LaunchError(f"train.batch_size {batch} does not split over data x fsdp = {shards} "
                      f"devices; pick a multiple of {shards}")
  if batch % processes:
    raise LaunchError(f"train.batch_size {batch} does not split over {processes} processes")


def config_for_workers(spec: str, repo: Path = REPO) -> str:
  """The config path as seen from the repository root, where the workers run."""
  path, sep, variant = spec.partition(":")
  full = Path(path).resolve()
  if not full.is_file():
    raise LaunchError(f"config file not found: {path}")
  try:
    rel = full.relative_to(repo)
  except ValueError:
    raise LaunchError(f"config {path} is outside the repository {repo}: the workers get a copy "
                      f"of the repository only, so put the config under configs/") from None
  return f"{rel}{sep}{variant}"


def override_args(overrides) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides]


class Script:
  """A bash script built line by line: printed by --dry-run, run by bash otherwise."""

  def __init__(self, title: str):
    self.lines = [f"# {title}", "set -euo pipefail"]

  def comment(self, text: str):
    self.lines.append(f"# {text}")

  def add(self, *lines: str):
    self.lines.extend(lines)

  def text(self) -> str:
    return "\n".join(self.lines) + "\n"

  def run(self) -> int:
    sys.stdout.flush()
    return subprocess.run(["bash", "-c", self.text()], env=dict(os.environ)).returncode


def finish(script: Script, dry_run: bool) -> int:
  if dry_run:
    sys.stdout.write(script.text())
    return 0
  return script.run()


def main_guard(fn, argv) -> int:
  """Runs a launcher's main: a LaunchError is a usage error (exit 2) with a clear message."""
  try:
    return fn(argv)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
