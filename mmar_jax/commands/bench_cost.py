"""The compiled train step's cost on a TPU, from its own compiler: an estimate, not a timing.

`bench memory --topology` adds, per chip: FLOPs and HBM bytes accessed (XLA's cost analysis),
the roofline time max(FLOPs / peak, bytes / HBM bandwidth), the MFU that roofline allows (the
model's analytic FLOPs, train/flops.py, over roofline time x peak) and the ten largest fusion
outputs of the compiled program.

XLA's cost analysis counts the body of a loop once. The layers are scanned (and the step
compiled with scan would count one layer of 24), so the cost comes from two more compiles with
every loop of ours unrolled (`scan_layers = False`: layers, ViT, diffusion head, vocabulary tiles)
and the backbone cut to 1 and 2 layers: cost(L) = cost(1) + (L - 1) x (cost(2) - cost(1)), the
trip count applied to the compiler's own per-layer difference. The TPU compiler adds loops of its
own: with FSDP it overlaps a weight's all-gather with its matmul in a "windowed einsum" loop
(one chunk per trip), which hides all but one trip of those matmuls from the count (the 7B step
on v5p-64 counted 0.41 of its analytic FLOPs, 0.57 with our loops unrolled). The cost compiles
turn that rewrite off (`NO_COMPILER_LOOPS`): the matmuls are the same, done after a whole
all-gather, so FLOPs are exact and bytes are those of that form. `loops_left` reports any loop
still in the cost compiles (0 when the count is complete).
Collectives and their overlap are not modelled: the roofline is a lower bound on step time.
"""

from __future__ import annotations

import copy
import re
import sys
import time

import numpy as np

# Per chip: dense bf16 peak FLOP/s, HBM bandwidth (bytes/s) and capacity (bytes), from each
# generation's spec table in the Cloud TPU docs (checked Nov 2026).
TPU_CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOPs, 32 GiB, 1200 GBps
    "v4": dict(peak_flops=275e12, hbm_bandwidth=1200e9, hbm_bytes=32 * 2 ** 30),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs, 16 GB, 819 GBps
    "v5litepod": dict(peak_flops=197e12, hbm_bandwidth=819e9, hbm_bytes=16e9),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs, 95 GB, 2765 GBps
    "v5p": dict(peak_flops=459e12, hbm_bandwidth=2765e9, hbm_bytes=95e9),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs, 32 GB, 1638 GBps
    "v6e": dict(peak_flops=918e12, hbm_bandwidth=1638e9, hbm_bytes=32e9),
}


def chip_for(topology: str) -> tuple[str, dict] | None:
  """(generation, its figures) for an accelerator type or a libtpu topology name."""
  gen = topology.split(":")[0].split("-")[0]
  gen = {"v5e": "v5litepod"}.get(gen, gen)
  return (gen, TPU_CHIPS[gen]) if gen in TPU_CHIPS else None


def compiled_cost(compiled) -> tuple[float, float]:
  """(flops, bytes accessed) per device from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(fusion|custom-call)\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def largest_fusions(hlo_text: str, top: int = 10) -> list[dict]:
  """The `top` fusions (and custom calls, e.g. Pallas kernels) of an optimized HLO module by the
  bytes of their outputs, per execution (one inside the layer loop runs once per layer)."""
  found = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    nbytes = sum(_DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                 for dt, dims in _ARRAY.findall(m.group(2)))
    kind = re.search(r"kind=(\w+)", line) or re.search(r'custom_call_target="([\w.\-]+)"', line)
    found.append(dict(name=m.group(1), op=m.group(3), kind=kind.group(1) if kind else None,
                      output_bytes=int(nbytes), shape=m.group(2)[:120]))
  return sorted(found, key=lambda f: -f["output_bytes"])[:top]


# The TPU compiler's options that keep its windowed-einsum loops out of the cost compiles (above).
NO_COMPILER_LOOPS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                     "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def loop_count(hlo_text: str) -> int:
  return len(re.findall(r"\swhile\(", hlo_text))


def layer_extrapolated_cost(config, devices, compile_step) -> dict:
  """FLOPs and bytes of the whole step from unrolled 1- and 2-layer compiles (see above)."""
  layers = int(config.model.backbone.num_layers)
  options = NO_COMPILER_LOOPS if devices[0].platform == "tpu" else None
  costs, loops = [], []
  for n in (1, 2):
    small = copy.deepcopy(config)
    small.model.backbone.num_layers = n
    small.model.scan_layers = False
    t0 = time.perf_counter()
    compiled = compile_step(small, devices, options)[3]
    costs.append(compiled_cost(compiled))
    loops.append(loop_count(compiled.as_text()))
    # Progress on stderr (stdout is the report's one line): each compile takes minutes.
    print(f"cost: compiled the unrolled {n}-layer step in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
  (f1, b1), (f2, b2) = costs
  return dict(flops=f1 + (layers - 1) * (f2 - f1), bytes_accessed=b1 + (layers - 1) * (b2 - b1),
              loops_left=max(loops),
              method=f"unrolled 1- and 2-layer compiles, layer difference x {layers - 1}")


def roofline(flops: float, nbytes: float, model_flops: float, chip: dict) -> dict:
  compute_s = flops / chip["peak_flops"]
  memory_s = nbytes / chip["hbm_bandwidth"]
  t = max(compute_s, memory_s)
  return dict(roofline_s=t, compute_s=compute_s, memory_s=memory_s,
              bound="compute" if compute_s >= memory_s else "memory",
              mfu_bound=model_flops / (t * chip["peak_flops"]) if t else None)
