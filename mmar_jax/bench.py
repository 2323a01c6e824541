"""`mmar-jax bench train|generate|caption|convert`: one JSON line of throughput numbers.

Timings are medians over timed steps after warm-up; `compile_s` is the ahead-of-time compile of
the measured program; `mfu` is the analytic FLOP count (train/flops.py) over the device's dense
bf16 peak (null where unknown, e.g. CPU, unless `--config.peak_flops` is given).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np


def synthetic_batch(mcfg, config, seed: int = 0) -> dict:
  """`[text][img]` samples with a full-length caption and random image tokens (no pixels)."""
  b = config.train.batch_size
  rng = np.random.default_rng(seed)
  im = config.model.image
  return dict(
      image=rng.normal(size=(b, im.size, im.size, im.channels)).astype(np.float32),
      text=rng.integers(0, 256, (b, mcfg.max_text_len)).astype(np.int32),
      text_len=np.full((b,), mcfg.max_text_len, np.int32),
      kind=np.zeros((b,), np.int32), index=np.arange(b, dtype=np.int32))


def _peak_bytes(compiled) -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def bench_train(config, steps: int = 10, warmup: int = 3) -> dict:
  from mmar_jax.data.text_tokenizer import load_text_tokenizer
  from mmar_jax.models.mmar import model_config
  from mmar_jax.parallel.mesh import make_mesh
  from mmar_jax.train import flops as flops_lib
  from mmar_jax.train.metrics import peak_flops
  from mmar_jax.train.step import abstract_train_state, build, init_state, make_train_step

  mcfg = model_config(config, load_text_tokenizer(config.text_tokenizer))
  tr = build(config, mcfg, make_mesh(config.mesh, config.mesh_dcn))
  state = init_state(tr)
  step = make_train_step(tr)
  batch = jax.device_put(synthetic_batch(mcfg, config), tr.batch_sharding)  # prefetched once
  t0 = time.perf_counter()
  with jax.set_mesh(tr.mesh):
    compiled = step.jitted.lower(abstract_train_state(tr), batch).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - t)
  med = statistics.median(times)
  b = config.train.batch_size
  flops = flops_lib.train_step_flops(mcfg, config)
  peak = peak_flops(override=config.peak_flops)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(
      bench="train", median_step_s=med, compile_s=compile_s,
      tokens_per_s=b * (mcfg.max_text_len + mcfg.num_image_tokens) / med, images_per_s=b / med,
      mfu=(flops / med / (peak * jax.device_count())) if peak else None,
      peak_bytes=_peak_bytes(compiled), flops_per_step=flops,
      xla_flops_per_step=float(cost.get("flops", float("nan"))) if cost else None,
      loss=float(metrics["loss"]), steps=steps, batch_size=b,
      compute_dtype=mcfg.backbone.compute_dtype, device=jax.devices()[0].device_kind,
      backend=jax.default_backend(), device_count=jax.device_count())


def cli_bench(args) -> int:
  from mmar_jax import config as config_lib
  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, args.config_overrides)
  runners = {"train": bench_train}
  result = runners[args.what](config, steps=args.steps)
  print(json.dumps(result, sort_keys=True))
  return 0

