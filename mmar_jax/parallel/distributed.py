"""Joining a multi-process run: `jax.distributed.initialize()` when, and only when, this process
is one of several.

Call `maybe_initialize()` first thing in a command that may run on several hosts, before any
other JAX call (JAX fixes its device list at the first one). Where the facts come from, first
match wins:
  * Command-line flags `--coordinator host:port --num-processes N --process-id I` (`mmar-jax
    train`), which `with_flags` turns into the variables below.
  * `MMAR_DISTRIBUTED=0` (or off / false / no): never join, even on a cluster.
  * `MMAR_COORDINATOR=host:port` with `MMAR_NUM_PROCESSES` and `MMAR_PROCESS_ID`: explicit, as
    `launch/slurm.sbatch` and `launch/multinode.sh` set them. Inside a SLURM step the count and
    id may come from `SLURM_NTASKS` / `SLURM_PROCID` instead.
  * Inside a SLURM step of several tasks (`srun`): JAX reads the SLURM variables itself.
  * `MMAR_DISTRIBUTED=auto` (the TPU launcher sets it on every worker): JAX finds the Cloud TPU
    slice, or slices, from the TPU VM's metadata.
  * Otherwise: one process, nothing to do.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
from orbax.checkpoint import multihost

from mmar_jax.errors import ConfigError

OFF = ("0", "off", "false", "no")


def add_arguments(p) -> None:
  """The flags that join a multi-process run, for every command that can take part in one."""
  p.add_argument("--coordinator", default=None,
                 help="host:port of process 0 in a multi-process run (default: MMAR_COORDINATOR, "
                      "or SLURM / TPU detection; see parallel/distributed.py)")
  p.add_argument("--num-processes", type=int, default=None, help="with --coordinator")
  p.add_argument("--process-id", type=int, default=None, help="with --coordinator")


def plan(environ: Mapping[str, str] | None = None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None to stay single-process.
  Pure: reads only `environ`, so the rules are testable without starting processes."""
  env = os.environ if environ is None else environ
  mode = env.get("MMAR_DISTRIBUTED", "").strip().lower()
  if mode in OFF:
    return None
  if env.get("MMAR_COORDINATOR"):
    return _explicit(env)
  if _int(env, "SLURM_NTASKS", default=1) > 1 and "SLURM_PROCID" in env:
    return {}  # JAX's SLURM cluster detection reads the node list, task count and rank
  if mode == "auto":
    return {}
  if mode:
    raise ConfigError(f"MMAR_DISTRIBUTED={env['MMAR_DISTRIBUTED']!r}: use auto or 0")
  return None


def _explicit(env: Mapping[str, str]) -> dict:
  address = env["MMAR_COORDINATOR"]
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ConfigError(f"MMAR_COORDINATOR={address!r}: expected host:port")
  count = _int(env, "MMAR_NUM_PROCESSES", fallback="SLURM_NTASKS")
  index = _int(env, "MMAR_PROCESS_ID", fallback="SLURM_PROCID")
  if count < 1 or not 0 <= index < count:
    raise ConfigError(f"MMAR_PROCESS_ID={index} is not in [0, MMAR_NUM_PROCESSES={count})")
  return dict(coordinator_address=address, num_processes=count, process_id=index)


def _int(env: Mapping[str, str], name: str, fallback: str | None = None,
         default: int | None = None) -> int:
  used, raw = name, env.get(name)
  if raw is None and fallback:
    used, raw = fallback, env.get(fallback)
  if raw is None:
    if default is not None:
      return default
    wanted = name if not fallback else f"{name} (or {fallback})"
    raise ConfigError(f"MMAR_COORDINATOR is set but {wanted} is not")
  name = used
  try:
    return int(raw)
  except ValueError:
    raise ConfigError(f"{name}={raw!r} is not an integer") from None


def with_flags(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ: Mapping[str, str] | None = None) -> dict:
  """The environment with command-line flags laid over it (flags win over variables)."""
  env = dict(os.environ if environ is None else environ)
  if coordinator:
    env["MMAR_COORDINATOR"] = coordinator
    env.pop("MMAR_DISTRIBUTED", None)  # an explicit coordinator means: join
  elif num_processes is not None or process_id is not None:
    raise ConfigError("--num-processes and --process-id need --coordinator host:port")
  if num_processes is not None:
    env["MMAR_NUM_PROCESSES"] = str(num_processes)
  if process_id is not None:
    env["MMAR_PROCESS_ID"] = str(process_id)
  return env


def maybe_initialize(environ: Mapping[str, str] | None = None) -> dict | None:
  """Joins the multi-process run described by the environment (see the module docstring).
  Returns the arguments used, or None for a single process. Safe to call twice."""
  kwargs = plan(environ)
  if kwargs is None:
    return None
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)
  return kwargs


def barrier(name: str, timeout_s: int = 3600):
  """Every process waits here until all have arrived (a no-op for one process).

  Through the coordination service, not a device collective: on CPU the first use of a
  collective gives its peers only 30 s to join (gloo), and one process's compile can lag the
  other's by more than that; so training compiles its step everywhere, then meets here."""
  if jax.process_count() == 1:
    return
  multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def join(args) -> dict | None:
  """`maybe_initialize` from a command's `--coordinator / --num-processes / --process-id`
  (absent flags: the environment). First thing in a command, before any other JAX call."""
  return maybe_initialize(with_flags(getattr(args, "coordinator", None),
                                     getattr(args, "num_processes", None),
                                     getattr(args, "process_id", None)))
