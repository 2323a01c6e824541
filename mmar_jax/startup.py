"""What must happen before JAX is imported: XLA reads its flags once, when it starts.

`mmar-jax` calls `configure(argv)` first and imports the command modules (and with them JAX)
after it, so the flags a command line asks for reach XLA: `--cpu-devices N` simulates N CPU
devices, `repro` gets deterministic GPU kernels and 8 simulated CPU devices (harmless where an
accelerator is present), and the persistent compilation cache is on unless MMAR_JAX_CACHE=off.
Nothing here imports JAX.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

DEFAULT_CACHE = os.path.expanduser("~/.cache/mmar_jax/xla")


def cpu_devices(argv: Sequence[str]) -> int | None:
  """`--cpu-devices N` (or `=N`) from a command line, before the parser exists; `repro`'s default
  is 8 (its mesh and determinism checks need several devices)."""
  for i, arg in enumerate(argv):
    if arg == "--cpu-devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if arg.startswith("--cpu-devices="):
      return int(arg.partition("=")[2])
  return 8 if argv[:1] == ["repro"] else None


def _set_flag(flags: str, name: str, value) -> str:
  return " ".join(re.sub(rf"--{name}=\S+", "", flags).split() + [f"--{name}={value}"])


def configure(argv: Sequence[str]) -> list[str]:
  """Sets XLA_FLAGS and the compilation cache for this command line; returns notes for the user."""
  notes = []
  flags = os.environ.get("XLA_FLAGS", "")
  try:
    devices = cpu_devices(argv)
  except ValueError:
    devices = None  # the parser names the bad value
  if devices:
    flags = _set_flag(flags, "xla_force_host_platform_device_count", devices)
  if argv[:1] == ["repro"] and "xla_gpu_deterministic_ops" not in flags:
    flags = _set_flag(flags, "xla_gpu_deterministic_ops", "true")
    notes.append("set --xla_gpu_deterministic_ops=true (GPU runs are deterministic only with it)")
  os.environ["XLA_FLAGS"] = flags
  cache = os.environ.get("MMAR_JAX_CACHE", DEFAULT_CACHE)
  if cache and cache != "off":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return notes


def log_to_console(quiet: Sequence[str] = ("absl", "orbax", "jax._src")) -> None:
  """A command's INFO messages on stderr, one plain line each; the `quiet` libraries' only from
  WARNING up. `logging.basicConfig` would do nothing here: orbax's import (through absl) has
  already given the root logger a handler. So the root logger is adjusted in place, and a
  handler someone else added (pytest's capture) stays."""
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  console = [h for h in root.handlers if type(h) is logging.StreamHandler]
  if not console:
    console = [logging.StreamHandler()]
    root.addHandler(console[0])
  for handler in console:
    handler.setFormatter(logging.Formatter("%(message)s"))
  for name in quiet:
    logging.getLogger(name).setLevel(logging.WARNING)
