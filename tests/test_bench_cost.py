"""bench_cost.py: the chip table's lookup, the roofline arithmetic and the HLO fusion reader (on a
program XLA:CPU really compiled). The TPU compile itself is test_bench_memory's slow test."""

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from mmar_jax.commands import bench_cost


@pytest.mark.parametrize("topology, gen", [("v5p-64", "v5p"), ("v5p:2x4x4", "v5p"),
                                           ("v6e-16", "v6e"), ("v5litepod-8", "v5litepod"),
                                           ("v5e:4x4", "v5litepod"), ("v4-8", "v4")])
def test_chip_for_topologies(topology, gen):
  assert bench_cost.chip_for(topology)[0] == gen
  assert bench_cost.chip_for("v9x-8") is None


def test_roofline_is_the_slower_of_compute_and_memory():
  chip = dict(peak_flops=100.0, hbm_bandwidth=10.0, hbm_bytes=1.0)
  r = bench_cost.roofline(flops=1000.0, nbytes=50.0, model_flops=600.0, chip=chip)
  assert (r["compute_s"], r["memory_s"], r["roofline_s"], r["bound"]) == (10.0, 5.0, 10.0, "compute")
  assert r["mfu_bound"] == pytest.approx(0.6)  # 600 model FLOPs in 10 s of a 100 FLOP/s chip
  assert bench_cost.roofline(1000.0, 500.0, 600.0, chip)["bound"] == "memory"


def test_largest_fusions_read_from_compiled_hlo():
  f = jax.jit(lambda x, y: (jnp.tanh(x) * 2 + 1, jnp.exp(y) - 3))
  hlo = f.lower(jnp.zeros((64, 32), jnp.float32), jnp.zeros((8,), jnp.bfloat16)).compile().as_text()
  fusions = bench_cost.largest_fusions(hlo)
  assert fusions and fusions[0]["output_bytes"] == 64 * 32 * 4
  assert all(a["output_bytes"] >= b["output_bytes"] for a, b in zip(fusions, fusions[1:]))


@pytest.mark.slow  # three CPU compiles of the whole tiny step: minutes on a shared 2-core machine
def test_step_cost_counts_every_layer(cpu_devices):
  """The extrapolated cost (unrolled 1- and 2-layer steps, the difference x L - 1) equals what XLA
  counts on the same step compiled with all its layers unrolled, the exact count, here on 8 CPU
  devices with a rematerialised 3-layer backbone (recomputation included)."""
  from mmar_jax.commands.bench_memory import compile_step
  from mmar_jax.data import token_stats
  config = tiny_config(("mesh", "1,8,1"), ("model.backbone.num_layers", "3"),
                       ("model.remat", "attention"), ("model.scan_layers", "False"))
  token_stats.shapes_only(config)
  exact_flops, exact_bytes = bench_cost.compiled_cost(compile_step(config, cpu_devices)[3])
  est = bench_cost.layer_extrapolated_cost(config, cpu_devices, compile_step)
  assert est["flops"] == pytest.approx(exact_flops, rel=0.01)
  assert est["bytes_accessed"] == pytest.approx(exact_bytes, rel=0.03)
