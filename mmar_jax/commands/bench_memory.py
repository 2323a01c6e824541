"""`mmar-jax bench memory`: the train step's memory per device, from an ahead-of-time compile.

    mmar-jax bench memory --config configs/qwen2_7b.py --mesh 1,8,1 --cpu-devices 8
    mmar-jax bench memory --config configs/qwen2_7b.py --mesh 1,32,1 --topology v5p-64

Nothing real is allocated: the step is lowered against ShapeDtypeStructs (the state's and the
batch's) and compiled, and XLA's memory analysis gives the per-device bytes of arguments,
outputs and temporaries. With `--topology` and libtpu installed, the compile targets that TPU
topology through compile-only devices (MaxText's train_compile approach), so a laptop can check
that a config fits a v5p-64 before asking for one. Otherwise the compile is for the (simulated)
CPU devices, and the numbers are a CPU estimate: XLA:CPU schedules and fuses differently, so
temporaries differ, while arguments and outputs match the TPU's exactly.

With a TPU topology the report also has "cost": FLOPs, bytes accessed, roofline time, the MFU
bound and the largest fusions, from the compiler (bench_cost.py; an estimate, never a timing).

One JSON line: argument_bytes, output_bytes, temp_bytes, alias_bytes (donated state: counted in
arguments and outputs but stored once), total_bytes = argument + output - alias + temp, and an
analytic breakdown per device (state leaves from their shard shapes; activations from a formula,
see `activation_bytes`), labelled "estimate": "tpu:<type>" or "cpu".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from mmar_jax import config as config_lib
from mmar_jax.commands import bench_cost
from mmar_jax.data import token_stats
from mmar_jax.data.text_tokenizer import load_text_tokenizer
from mmar_jax.launch.tpu_names import (LaunchError, parse_accelerator_type, topology_kwargs,
                                       topology_name)
from mmar_jax.models.mmar import model_config
from mmar_jax.parallel import sharding
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.train.flops import train_step_flops
from mmar_jax.train.step import abstract_train_state, build, loss_rows, make_train_step

# Qwen2's tokenizer (len 151646; <|endoftext|> pads, <|im_end|> ends), for configs whose tokenizer
# directory is not on this machine: only the ids matter for shapes.
QWEN2_TEXT = dict(vocab_size=151646, pad_id=151643, eos_id=151645)


@dataclasses.dataclass(frozen=True)
class ShapeOnlyTokenizer:
  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: None = None
  kind: str = "shape-only"


def text_tokenizer(config):
  """The config's tokenizer if it loads here, else Qwen2's ids (memory does not depend on the
  tokenizer beyond its size, which here never changes the embedding's rows)."""
  try:
    return load_text_tokenizer(config.text_tokenizer)
  except (OSError, ValueError):
    return ShapeOnlyTokenizer(**QWEN2_TEXT)


# -- target devices --------------------------------------------------------------------------------

def target_devices(topology: str | None, num_slices: int) -> tuple[list, str]:
  """(devices to compile for, the estimate's label)."""
  if topology is None:
    return jax.devices(), jax.default_backend()
  if importlib.util.find_spec("libtpu") is None:
    raise config_lib.ConfigError(
        f"--topology {topology} compiles for a real TPU and needs libtpu: pip install "
        f"'jax[tpu]==0.10.2' (or drop --topology for a CPU estimate with --cpu-devices N)")
  name, kwargs = _topology(topology)
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  # Compile only: never open this machine's own TPU chips (a training run on this TPU VM may
  # hold them), and skip libtpu's exclusive lock, which it otherwise takes even to compile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  jax.config.update("jax_platforms", "cpu")
  try:
    devices = topologies.get_topology_desc(name, "tpu", **kwargs).devices
  except jax.errors.JaxRuntimeError as e:
    raise config_lib.ConfigError(f"--topology {topology}: libtpu could not describe {name}: "
                                 f"{e}") from None
  return list(devices), f"tpu:{topology}"


def _topology(text: str) -> tuple[str, dict]:
  """An accelerator type (v5p-64) or a libtpu topology name (v5p:2x4x4) -> (name, kwargs)."""
  if ":" in text:
    return text, ({"chip_config_name": "megacore"} if text.startswith(("v4:", "v5p:")) else {})
  try:
    tpu = parse_accelerator_type(text)
    return topology_name(tpu), topology_kwargs(tpu)
  except LaunchError as e:
    raise config_lib.ConfigError(f"--topology: {e}") from None


# -- the compile -----------------------------------------------------------------------------------

def abstract_batch(config, mcfg, sharding) -> dict:
  """What `global_batch` produces, as shapes (see data/pipeline.py)."""
  b, size = int(config.train.batch_size), int(mcfg.image["size"])
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return dict(image=s((b, size, size, 3), jnp.float32), text=s((b, mcfg.max_text_len), jnp.int32),
              text_len=s((b,), jnp.int32), kind=s((b,), jnp.int32), index=s((b,), jnp.int32))


def compile_step(config, devices, compiler_options=None):
  """(trainer, abstract state, abstract batch, compiled step) without allocating the state."""
  mcfg = model_config(config, text_tokenizer(config))
  mesh = make_mesh(config.mesh, config.mesh_dcn, devices)
  tr = build(config, mcfg, mesh)
  state = abstract_train_state(tr)
  batch = abstract_batch(config, mcfg, tr.batch_sharding)
  with jax.set_mesh(mesh), sharding.use_rules(config.sharding_rules):
    compiled = make_train_step(tr).jitted.lower(state, batch).compile(compiler_options)
  return tr, state, batch, compiled


# -- the analytic side -----------------------------------------------------------------------------

def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in leaves))


def _layer_bytes(tokens: float, d: int, heads: int, kv: int, hd: int, mlp: int, length: int,
                 t: int, c: int, policy: str) -> float:
  """Bytes a transformer layer keeps for its backward pass, for `tokens` tokens of one device.
  Counted per token: `none` keeps every intermediate (norms, q/k/v, attention output, the MLP's
  gate/up/product, residuals) and the fp32 attention scores and probabilities; `dots` the matmul
  outputs and the scores; `dots_no_batch` the matmul outputs against weights (q/k/v, o, gate, up,
  down) and the layer input; `attention` q, k, v, the attention output and the layer input;
  `full` the layer input only. Heads and the MLP split over tensor."""
  qkv = (heads + 2 * kv) * hd / t
  scores = 2 * 4 * heads / t * length  # two fp32 [heads, length] rows per token
  per_token = {
      "none": c * (6 * d + qkv + heads * hd / t + 4 * mlp / t) + scores,
      "dots": c * (3 * d + qkv + heads * hd / t + 2 * mlp / t) + scores / 2,
      "dots_no_batch": c * (3 * d + qkv + 2 * mlp / t),
      "attention": c * (d + qkv + heads * hd / t),
      "full": c * d,
  }[policy]
  return tokens * per_token


def activation_bytes(mcfg, config, mesh) -> dict:
  """A formula for what the step keeps between forward and backward, per device, by part:
  backbone layers (by remat policy, plus one layer rebuilt during the backward pass when
  rematerialising), the LM head's fp32 logits (logits, log-softmax and their gradient) on the rows
  and vocabulary tile the step computes at once (`loss.text_rows`, `loss.vocab_tiles`), the ViT,
  the diffusion head (the rows of `loss.head_rows`, x diffusion_batch_mul) and, before all that,
  the VAE encoding
  the batch's pixels (a transient: the step's peak is the larger of the two)."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  t = sizes.get("tensor", 1)
  shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
  b = config.train.batch_size / shards / config.train.grad_accum  # one micro-batch's examples
  bb, vit, head = mcfg.backbone, mcfg.vit, mcfg.head
  c = jnp.dtype(bb.compute_dtype).itemsize
  seq, n = mcfg.seq_len, mcfg.num_image_tokens
  policy = bb.remat
  layer = dict(d=bb.hidden_size, heads=bb.num_heads, kv=bb.num_kv_heads, hd=bb.hd,
               mlp=bb.intermediate_size, length=seq, t=t, c=c)
  backbone = bb.num_layers * _layer_bytes(b * seq, policy=policy, **layer)
  if policy != "none":
    backbone += _layer_bytes(b * seq, policy="none", **layer)
  rows = loss_rows(config, mcfg)
  text_rows = b * (rows["target_rows"] or seq)
  # fp32 logits, their softmax and gradient: of one vocabulary tile at a time when tiled.
  lm_head = 3 * 4 * text_rows * math.ceil(bb.vocab_size / max(rows["vocab_tiles"], 1)) / t
  vit_hd = vit.width // vit.heads
  vit_bytes = vit.layers * _layer_bytes(b * n, d=vit.width, heads=vit.heads, kv=vit.heads,
                                        hd=vit_hd, mlp=int(vit.mlp_ratio * vit.width), length=n,
                                        t=t, c=c, policy="none")
  head_share = (1.0 if rows["head_samples"] is None else
                rows["head_samples"] * config.train.grad_accum / config.train.batch_size)
  head_rows = b * head_share * n * config.loss.diffusion_batch_mul
  head_bytes = head_rows * head.depth * 8 * head.width / t * jnp.dtype(head.compute_dtype).itemsize
  parts = dict(backbone=backbone, lm_head=lm_head, vit=vit_bytes, head=head_bytes)
  parts["vae_encode"] = _vae_transient(mcfg, b)
  parts["total"] = max(parts["vae_encode"], backbone + lm_head + vit_bytes + head_bytes)
  return {k: int(v) for k, v in parts.items()}


def _vae_transient(mcfg, b: float) -> float:
  """The VAE encoder's widest level: about four fp32 feature maps at full resolution."""
  image = mcfg.image
  if image["kind"] != "vae":
    return 0.0
  size, vae = image["size"], image["vae"]
  return 4 * b * size * size * vae["ch"] * vae["ch_mult"][0] * 4


def analytic(tr, state, batch, mcfg, config) -> dict:
  params = shard_bytes(state["params"])
  acts = activation_bytes(mcfg, config, tr.mesh)
  out = dict(params=params, grads=params, opt_state=shard_bytes(state["opt_state"]),
             ema=shard_bytes(state["ema"]), batch=shard_bytes(batch),
             activations=acts["total"], activation_parts=acts)
  out["total"] = sum(out[k] for k in ("params", "grads", "opt_state", "ema", "batch",
                                      "activations"))
  return out


# -- the command -----------------------------------------------------------------------------------

def memory_report(config, topology: str | None = None, cost: bool = True) -> dict:
  """The compiled step's memory; with a TPU topology also its cost (`cost=False` skips the two
  extra compiles that takes)."""
  num_slices = math.prod(config_lib.parse_mesh(config.mesh_dcn))
  devices, label = target_devices(topology, num_slices)
  t0 = time.perf_counter()
  tr, state, batch, compiled = compile_step(config, devices)
  compile_s = time.perf_counter() - t0
  # Progress on stderr (stdout is the one JSON line): the cost's compiles take minutes more.
  print(f"compiled the step for {label} in {compile_s:.0f} s", file=sys.stderr, flush=True)
  mem = compiled.memory_analysis()
  arg, out, tmp = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                   int(mem.temp_size_in_bytes))
  alias = int(mem.alias_size_in_bytes)
  shape = ",".join(str(s) for s in tr.mesh.devices.shape)
  report = dict(argument_bytes=arg, output_bytes=out, temp_bytes=tmp, alias_bytes=alias,
                total_bytes=arg + out - alias + tmp,
                analytic=analytic(tr, state, batch, tr.model_cfg, config),
                estimate=label, mesh=shape, devices=len(devices),
                batch_size=int(config.train.batch_size), compile_s=round(compile_s, 1),
                remat=str(config.model.remat), attention=str(config.model.attention))
  chip = bench_cost.chip_for(topology) if topology else None
  if chip is not None and cost:
    report["cost"] = step_cost(config, devices, tr, compiled, chip, report["total_bytes"])
  return report


def step_cost(config, devices, tr, compiled, chip, total_bytes: int) -> dict:
  """The compiler's cost of the step on this chip (bench_cost.py), per chip, an estimate."""
  gen, figures = chip
  t0 = time.perf_counter()
  cost = bench_cost.layer_extrapolated_cost(config, devices, compile_step)
  model_flops = train_step_flops(tr.model_cfg, config) / len(devices)
  out = dict(chip=gen, **figures, **cost, model_flops=model_flops,
             **bench_cost.roofline(cost["flops"], cost["bytes_accessed"], model_flops, figures),
             hbm_free=1.0 - total_bytes / figures["hbm_bytes"],
             largest_fusions=bench_cost.largest_fusions(compiled.as_text()),
             cost_compile_s=round(time.perf_counter() - t0, 1),
             estimate="compiler cost analysis and roofline; no time was measured")
  return out


def cli_bench_memory(args) -> int:
  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, args.config_overrides)
  token_stats.shapes_only(config)
  print(json.dumps(memory_report(config, args.topology, cost=not args.no_cost)), flush=True)
  return 0
