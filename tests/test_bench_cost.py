"""bench_cost.py: the chip table's lookup, the roofline arithmetic and the HLO fusion reader (on a
program XLA:CPU really compiled). The TPU compile itself is test_bench_memory's slow test."""

import jax
import jax.numpy as jnp
import pytest

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
