"""`mmar-jax bench train|generate|caption|convert`: one JSON line of throughput numbers.

Timings are medians over timed steps after warm-up; `compile_s` is the ahead-of-time compile of
the measured program; `mfu` is the analytic FLOP count of the step as computed (train/flops.py;
`full_flops_per_step`: the same step with the LM head and the diffusion head on every position and
row) over the device's dense bf16 peak (null where unknown, e.g. CPU, unless `--config.peak_flops` is given).
"""

from __future__ import annotations

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


def bench_train(config, steps: int = 10, warmup: int = 3) -> dict:
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
      full_flops_per_step=flops_lib.train_step_flops(mcfg, config, full=True),
      xla_flops_per_step=float(cost.get("flops", float("nan"))) if cost else None,
      loss=float(metrics["loss"]), steps=steps, batch_size=b,
      compute_dtype=mcfg.backbone.compute_dtype, device=jax.devices()[0].device_kind,
      backend=jax.default_backend(), device_count=jax.device_count())


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
  result = runners[args.what](config, steps=args.steps)
  print(json.dumps(result, sort_keys=True))
  return 0

