"""Workdir outputs of a run: metrics.jsonl, TensorBoard events, the console, env.json; and MFU."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys

import jax
from etils import epath

# Dense bf16 peak FLOP/s per device, keyed by a substring of `device_kind` (vendor datasheets;
# TPU figures per chip). The first match wins, so more specific names come first.
PEAK_FLOPS = (
    ("TPU v6", 918e12),  # v6e (Trillium)
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)


def peak_flops(device=None, override: float | None = None) -> float | None:
  """Per-device dense bf16 peak; None where unknown (CPU) unless `override` is given."""
  if override:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def environment() -> dict:
  """What env.json records: versions, git commit, devices, backend, XLA_FLAGS."""
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml-collections"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      versions[pkg] = None
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  dev = jax.devices()[0]
  return dict(versions=versions, python=sys.version.split()[0], platform=platform.platform(),
              git_commit=commit, backend=jax.default_backend(), device_kind=dev.device_kind,
              device_count=jax.device_count(), local_device_count=jax.local_device_count(),
              process_count=jax.process_count(), xla_flags=os.environ.get("XLA_FLAGS", ""))


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb = None
    if self.enabled:
      try:
        from tensorboardX import SummaryWriter  # lazy: only when TensorBoard logging is on
        self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
      except ImportError:  # optional on machines without tensorboardX (e.g. the GPU image)
        self.tb = None

  def write(self, record: dict):
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and v is not None:
          self.tb.add_scalar(k, v, record["step"])

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
