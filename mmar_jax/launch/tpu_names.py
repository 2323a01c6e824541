"""What a Cloud TPU accelerator type such as `v5p-64` means: chips, hosts, JAX devices.

Facts from the Cloud TPU docs (checked Nov 2026; see docs/jax_notes.md, "TPU names"):
  * v4-N and v5p-N count TensorCores, two per chip, and JAX sees one device per chip (megacore):
    v5p-64 is 32 chips. Every host (TPU VM) drives 4 chips, so v5p-64 runs on 8 hosts.
  * v5e is spelled `v5litepod-N`, v6e `v6e-N`; N counts chips, on slices of 1 to 256 chips in the
    2D shapes 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16. Up to 8 chips sit on one host
    (v5litepod-8: one VM with 8 chips); larger slices use VMs of 4 chips (v5litepod-256: 64).
JAX sees one process per host, so hosts is also `jax.process_count()` of one slice.
"""

from __future__ import annotations

import dataclasses
import math
import re


class LaunchError(ValueError):
  """A launcher argument that cannot work, with what to change."""


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # as spelled in accelerator types
  counts_cores: bool  # N counts TensorCores (2 per chip) rather than chips
  topology: str  # the prefix of libtpu topology names ("v5e:4x4")
  runtime_version: str  # default TPU VM software version
  max_chips: int
  sizes: tuple[int, ...] = ()  # the only chip counts offered, when the list is short


GENERATIONS = {
    "v4": Generation("v4", True, "v4", "tpu-ubuntu2204-base", 4096),
    "v5p": Generation("v5p", True, "v5p", "v2-alpha-tpuv5", 8960),
    "v5litepod": Generation("v5litepod", False, "v5e", "v2-alpha-tpuv5-lite", 256,
                            (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": Generation("v6e", False, "v6e", "v2-alpha-tpuv6e", 256,
                      (1, 4, 8, 16, 32, 64, 128, 256)),
}
ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}  # common misspellings, named in errors

CHIPS_PER_HOST = 4  # multi-host slices of every generation here
SINGLE_HOST_MAX = {"v4": 4, "v5p": 4, "v5litepod": 8, "v6e": 8}


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str
  generation: Generation
  chips: int  # = JAX devices
  hosts: int  # = TPU VMs = JAX processes

  def describe(self) -> str:
    chips = "chip" if self.chips == 1 else "chips"
    host = "host" if self.hosts == 1 else "hosts"
    return f"{self.accelerator_type} ({self.chips} {chips} on {self.hosts} {host})"


def parse_accelerator_type(text: str) -> Slice:
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text.strip())
  if not m:
    raise LaunchError(f"accelerator type {text!r}: expected GENERATION-SIZE such as v5p-64, "
                      f"v5litepod-256, v6e-16 or v4-32")
  name, size = m.group(1), int(m.group(2))
  if name in ALIASES:
    raise LaunchError(f"accelerator type {text!r}: Cloud TPU spells it "
                      f"{ALIASES[name]}-{size}")
  if name not in GENERATIONS:
    raise LaunchError(f"accelerator type {text!r}: unknown generation {name!r}; "
                      f"known: {', '.join(GENERATIONS)}")
  gen = GENERATIONS[name]
  return Slice(text.strip(), gen, *_chips_and_hosts(gen, size, text))


def _chips_and_hosts(gen: Generation, size: int, text: str) -> tuple[int, int]:
  if gen.counts_cores:
    if size % 2:
      raise LaunchError(f"{text}: {gen.name} sizes count TensorCores, two per chip; "
                        f"{size} is odd")
    chips = size // 2
    if chips < CHIPS_PER_HOST or chips % CHIPS_PER_HOST:
      raise LaunchError(f"{text}: {gen.name} slices come in whole hosts of 4 chips "
                        f"({gen.name}-8, {gen.name}-16, ...); {size} cores is {chips} chips")
  else:
    chips = size
    if chips not in gen.sizes:
      raise LaunchError(f"{text}: {gen.name} slices have "
                        f"{', '.join(map(str, gen.sizes))} chips")
  if chips > gen.max_chips:
    raise LaunchError(f"{text}: a {gen.name} slice has at most {gen.max_chips} chips")
  hosts = 1 if chips <= SINGLE_HOST_MAX[gen.name] else chips // CHIPS_PER_HOST
  return chips, hosts


def topology_dims(s: Slice) -> tuple[int, ...]:
  """The default physical shape of a slice: 2D for v5e/v6e, 3D tori for v4/v5p (doubling the
  shortest axis, as Cloud TPU's default shapes do: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
  chips = s.chips
  if chips & (chips - 1):
    raise LaunchError(f"{s.accelerator_type}: no default topology for {chips} chips; "
                      f"pass the libtpu name instead, e.g. {s.generation.topology}:2x2x3")
  if not s.generation.counts_cores:
    a = 2 ** (int(math.log2(chips)) // 2)
    return (a, chips // a)
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    small = min(dims)
    i = max(j for j, d in enumerate(dims) if d == small)
    dims[i] *= 2
  return tuple(dims)


def topology_name(s: Slice) -> str:
  return f"{s.generation.topology}:{'x'.join(map(str, topology_dims(s)))}"


def topology_kwargs(s: Slice) -> dict:
  """Extra arguments of `jax.experimental.topologies.get_topology_desc` for this slice (found by
  trying libtpu 0.0.42: v4 needs 'megacore' to see one device per chip; single-host v5e/v6e
  slices need their own host bounds)."""
  kwargs = {}
  if s.generation.counts_cores:
    kwargs["chip_config_name"] = "megacore"
  elif s.hosts == 1:
    dims = topology_dims(s)
    kwargs["chips_per_host_bounds"] = (*dims, 1)
  return kwargs
