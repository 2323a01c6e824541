"""`mmar-jax bench train|generate|caption|convert`: one JSON line of throughput numbers.

Timings are medians over timed steps after warm-up; `compile_s` is the ahead-of-time compile of
the measured program; `mfu` is the analytic FLOP count of the step as computed (train/flops.py;
`full_flops_per_step`: the same step with the LM head and the diffusion head on every position and
row) over the device's dense bf16 peak (null where unknown, e.g. CPU, unless `--config.peak_flops` is given).
`bench train --profile N` also traces two more steps with jax's profiler and reports the N
operations (GPU kernels, TPU ops; XLA's CPU thunks on CPU) that took the most device time.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import resource
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from mmar_jax import config as config_lib
from mmar_jax.convert import hf
from mmar_jax.convert.hf import make_tiny_hf_checkpoint
from mmar_jax.data import token_stats
from mmar_jax.data.pipeline import kind_counts
from mmar_jax.data.text_tokenizer import load_text_tokenizer
from mmar_jax.files import load_params
from mmar_jax.models.mmar import MMAR, model_config
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.sample.image import generate_tokens
from mmar_jax.sample.text import caption_tokens
from mmar_jax.train import flops as flops_lib
from mmar_jax.train.metrics import peak_flops
from mmar_jax.train.step import abstract_train_state, build, init_state, make_train_step


def synthetic_batch(mcfg, config, seed: int = 0) -> dict:
  """Full-length captions and random image tokens (no pixels), the kinds in the fixed counts
  of `data.mix` as every real batch has them (all `[text][img]` with configs/bench.py)."""
  b = config.train.batch_size
  rng = np.random.default_rng(seed)
  im = config.model.image
  return dict(
      image=rng.normal(size=(b, im.size, im.size, im.channels)).astype(np.float32),
      text=rng.integers(0, 256, (b, mcfg.max_text_len)).astype(np.int32),
      text_len=np.full((b,), mcfg.max_text_len, np.int32),
      kind=np.repeat(np.arange(3, dtype=np.int32), kind_counts(config.data.mix, b)),
      index=np.arange(b, dtype=np.int32))


def _peak_bytes(compiled) -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def profile_top(run, calls: int = 2, top: int = 15) -> dict:
  """Traces `calls` calls of `run` and returns the `top` operations by summed duration: events of
  the device planes (one per accelerator), or on CPU of XLA's own threads. Shares are of the
  summed time of all such events (streams overlap, so the sum can exceed wall time)."""
  out = tempfile.mkdtemp()
  try:
    with jax.profiler.trace(out):
      for _ in range(calls):
        jax.block_until_ready(run())
    (path,) = glob.glob(os.path.join(out, "**", "*.xplane.pb"), recursive=True)
    planes = list(jax.profiler.ProfileData.from_file(path).planes)
  finally:
    shutil.rmtree(out, ignore_errors=True)
  device = [p for p in planes if p.name.startswith("/device:")]
  if device:  # per-op lines where the profiler derives them (TPU, newer GPU), else the streams
    lines = [line for p in device for line in p.lines]
    ops = [line for line in lines if line.name == "XLA Ops"]
    lines = ops or [line for line in lines if line.name.startswith("Stream")] or lines
  else:  # XLA:CPU: its worker threads, without the executor's own bookkeeping events
    lines = [line for p in planes if p.name == "/host:CPU" for line in p.lines
             if line.name.startswith("tf_XLA")]
  total, count = collections.Counter(), collections.Counter()
  for line in lines:
    for e in line.events:
      if e.duration_ns > 0 and (device or "::" not in e.name):
        total[e.name] += e.duration_ns
        count[e.name] += 1
  whole = sum(total.values()) or 1.0
  return dict(
      source="device: " + ", ".join(sorted({line.name for line in lines}))[:200] if device
      else "XLA:CPU threads", calls=calls, total_ms=whole / 1e6 / calls,
      ops=[dict(name=name[:160], ms_per_step=ns / 1e6 / calls, share=ns / whole, count=count[name] // calls)
           for name, ns in total.most_common(top)])


def bench_train(config, steps: int = 10, warmup: int = 3, profile: int = 0) -> dict:
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
  if profile:
    def run():
      nonlocal state
      state, m = compiled(state, batch)
      return m["loss"]
    profiled = profile_top(run, top=profile)
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
      full_flops_per_step=flops_lib.train_step_flops(mcfg, config, full=True),
      xla_flops_per_step=float(cost.get("flops", float("nan"))) if cost else None,
      loss=float(metrics["loss"]), steps=steps, batch_size=b,
      compute_dtype=mcfg.backbone.compute_dtype, device=jax.devices()[0].device_kind,
      backend=jax.default_backend(), device_count=jax.device_count(),
      **(dict(profile=profiled) if profile else {}))


def _model(config, seed: int = 0):
  mcfg = model_config(config, load_text_tokenizer(config.text_tokenizer))
  return mcfg, MMAR(mcfg, rngs=nnx.Rngs(seed))


def _timed(fn, steps: int, warmup: int = 1) -> tuple[float, float]:
  """(first call incl. compile, median of the timed calls) in seconds."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  times = []
  for i in range(warmup - 1 + steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    if i >= warmup - 1:
      times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def bench_generate(config, steps: int = 3) -> dict:
  """Masked-AR text-to-image with guidance: a batch of `train.batch_size` captions,
  `eval.ar_steps` image steps, `eval.diffusion_steps` DDPM steps."""
  mcfg, model = _model(config)
  b = config.train.batch_size
  batch = synthetic_batch(mcfg, config)
  run = lambda: generate_tokens(model, batch["text"], batch["text_len"], jax.random.key(0),
                                ar_steps=config.eval.ar_steps, diffusion_steps=config.eval.diffusion_steps,
                                cfg=config.eval.cfg)[0]
  first, med = _timed(run, steps)
  return dict(bench="generate", median_step_s=med, compile_s=first - med, images_per_s=b / med,
              tokens_per_s=b * mcfg.num_image_tokens / med, mfu=None, peak_bytes=_device_peak(),
              ar_steps=config.eval.ar_steps, diffusion_steps=config.eval.diffusion_steps,
              batch_size=b, device=jax.devices()[0].device_kind, backend=jax.default_backend())


def bench_caption(config, steps: int = 3) -> dict:
  """Greedy captioning of a batch: the image encoded once, `model.max_text_len` tokens decoded
  with the KV cache (EOS is ignored by forcing an impossible EOS id, so every row runs fully)."""
  mcfg, model = _model(config)
  b = config.train.batch_size
  im = config.model.image
  images = np.random.default_rng(0).uniform(-1, 1, (b, im.size, im.size, im.channels)).astype(np.float32)
  question = np.zeros((b, 1), np.int32)
  n = mcfg.max_text_len
  run = lambda: caption_tokens(model, images, question, np.zeros((b,), np.int32), max_tokens=n,
                               eos_id=-1)[0]
  first, med = _timed(run, steps)
  return dict(bench="caption", median_step_s=med, compile_s=first - med, images_per_s=b / med,
              tokens_per_s=b * n / med, mfu=None, peak_bytes=_device_peak(), max_tokens=n,
              batch_size=b, device=jax.devices()[0].device_kind, backend=jax.default_backend())


def bench_convert(config, steps: int = 1) -> dict:
  """hf-to-jax then jax-to-hf of a random checkpoint of the config's backbone shape (bf16)."""
  b = config.model.backbone
  tmp = tempfile.mkdtemp()
  try:
    src = os.path.join(tmp, "hf")
    make_tiny_hf_checkpoint(src, vocab_size=b.vocab_size, hidden_size=b.hidden_size,
                            num_layers=b.num_layers, num_heads=b.num_heads, num_kv_heads=b.num_kv_heads,
                            intermediate_size=b.intermediate_size, tie_word_embeddings=b.tie_word_embeddings,
                            dtype="bfloat16")
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    to_jax, to_hf = [], []
    for _ in range(steps):
      t = time.perf_counter()
      hf.hf_to_jax(src, os.path.join(tmp, "jax"), overwrite=True)
      to_jax.append(time.perf_counter() - t)
      t = time.perf_counter()
      params = load_params(os.path.join(tmp, "jax"))
      cfg, _ = hf.read_model_config(os.path.join(tmp, "jax"))
      hf.jax_to_hf(params, cfg, os.path.join(tmp, "back"), overwrite=True)
      to_hf.append(time.perf_counter() - t)
      del params
    med = statistics.median([a + b for a, b in zip(to_jax, to_hf)])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dict(bench="convert", median_step_s=med, hf_to_jax_s=statistics.median(to_jax),
              jax_to_hf_s=statistics.median(to_hf), compile_s=0.0, tokens_per_s=None,
              images_per_s=None, mfu=None, checkpoint_bytes=size,
              peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              device=jax.devices()[0].device_kind, backend=jax.default_backend())


def _device_peak() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def cli_bench(args) -> int:
  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, args.config_overrides)
  token_stats.shapes_only(config)
  runners = {"train": bench_train, "generate": bench_generate, "caption": bench_caption,
             "convert": bench_convert}
  extra = dict(profile=args.profile) if args.what == "train" else {}
  result = runners[args.what](config, steps=args.steps, **extra)
  print(json.dumps(result, sort_keys=True))
  return 0

