"""Several `mmar-jax` processes joined by `jax.distributed` on 127.0.0.1 (shared by the training
and the many-item job tests).

Workers are subprocesses with timeouts: a peer that dies makes the others abort only after JAX's
heartbeat timeout (jax_notes.md), never hang the test session.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from conftest import ROOT, subprocess_env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_cli(command: list, n: int, devices: int) -> list[subprocess.Popen]:
  """`mmar-jax COMMAND...` as processes 0..n-1 of one run, each with `devices` CPU devices."""
  address = f"127.0.0.1:{free_port()}"
  head, rest = [str(c) for c in command[:1]], [str(c) for c in command[1:]]
  if head == ["eval"]:  # a group: its subcommand comes first
    head, rest = head + rest[:1], rest[1:]
  return [subprocess.Popen([sys.executable, "-m", "mmar_jax", *head, "--cpu-devices", str(devices),
                            "--coordinator", address, "--num-processes", str(n),
                            "--process-id", str(i), *rest],
                           cwd=ROOT, env=subprocess_env(TQDM_DISABLE="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
          for i in range(n)]


def finish(procs, timeout: int = 600, check: bool = True) -> list[str]:
  """Each process's output once all have exited; any still running after `timeout` is killed
  (the test then fails: a hang is a failure)."""
  deadline = time.monotonic() + timeout
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
  finally:
    for p in procs:
      p.kill()
  if check:
    for i, (p, out) in enumerate(zip(procs, outs)):
      assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-5000:]}"
  return outs
