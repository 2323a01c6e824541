"""`mmar-jax bench torch-train`: the `bench train` step in PyTorch eager, on the package's PyTorch
MMAR (mmar_jax/pytorch: `transformers.Qwen2ForCausalLM` with SDPA, EmbeddingViT, VisProjector,
MAR's SimpleMLPAdaLN), at the same shapes (read from the same config), on the same batch, with
the same analytic FLOPs per step, so the JAX step can be timed against it on the same machine.

As a PyTorch user writes it, the LM head runs on every position and the diffusion head on every
image row (`gather=True`, `--gather`: on the text targets and the generation samples' rows only,
as the JAX step computes them). Each step draws its mask ratio and order, timesteps and noise in
torch (MAR's stage-1 or stage-2 ratio, `diffusion_batch_mul` draws per token), then AdamW (two
learning rates: backbone and new modules; no weight decay on biases, norms and the head) after
clipping by the global norm, the JAX step's LR schedule; no EMA.

fp32 on CPU. It does not reproduce JAX's numbers (other init, other random streams; `repro
torch-parity` is the check that the two models agree); the FLOPs per step are the same. Left out
on purpose: the per-row learning rate of the <boi>/<eoi> embedding rows and rematerialisation.
Options the bench batch does not exercise (caption dropout, a VAE tokenizer, frozen modules,
gradient accumulation) are refused rather than silently measured differently.

`compile=True` (`--compile`) wraps the forward+loss in `torch.compile` (needs a C++ compiler;
`compile_s` is then the first step's extra time). `threads` (`--threads`, default every core):
on a machine shared with other work, fewer threads than cores can be much faster (every
parallel op waits for all its threads). `peak_bytes` is the process's peak RSS (torch, jax and
transformers loaded), not comparable with the JAX bench's buffer-level number.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time

from mmar_jax import config as config_lib
from mmar_jax.commands.bench import synthetic_batch
from mmar_jax.data import token_stats
from mmar_jax.data.text_tokenizer import load_text_tokenizer
from mmar_jax.diffusion import schedule as sched_lib
from mmar_jax.models.mmar import model_config
from mmar_jax.train import flops as flops_lib
from mmar_jax.train.optimizer import schedule


def _check_supported(config, mcfg) -> None:
  im = config.model.image
  problems = []
  if im.kind != "patchify":
    problems.append(f"model.image.kind={im.kind!r} (only patchify: the bench feeds synthetic latents)")
  if float(config.loss.caption_drop):
    problems.append("loss.caption_drop > 0 (the bench's batch keeps every caption)")
  if int(config.train.grad_accum) != 1:
    problems.append("train.grad_accum != 1")
  if str(config.train.freeze).strip():
    problems.append("train.freeze")
  if mcfg.head.prediction not in ("v", "eps", "x0"):
    problems.append(f"model.head.prediction={mcfg.head.prediction!r}")
  if problems:
    raise ValueError("bench torch-train does not implement: " + "; ".join(problems))


def bench_torch_train(config, steps: int = 10, warmup: int = 3, compile: bool = False,
                      threads: int | None = None, gather: bool = False) -> dict:
  """One JSON-able dict with `bench train`'s keys; `threads` defaults to every CPU core."""
  import torch  # lazy: seconds to import, this path only
  import transformers  # lazy: seconds to import, this path only

  from mmar_jax.pytorch.model import MMAR, resolved_config  # lazy: imports torch
  config = config.copy_and_resolve_references()
  config.model.compute_dtype = "float32"  # the reference runs fp32 (as the JAX bench on CPU)
  config.model.head.compute_dtype = "float32"
  mcfg = model_config(config, load_text_tokenizer(config.text_tokenizer))
  _check_supported(config, mcfg)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  model = MMAR(resolved_config(mcfg.to_dict(), "the config")).init_weights(int(config.seed)).train()
  modules = dict(backbone=[model.backbone], vit=[model.vit], projector=[model.projector],
                 head=[model.diffloss] + ([model.diffusion_pos_embed_learned]
                                          if model.diffusion_pos_embed_learned is not None else []))

  tr = config.train
  groups = []
  for name, parts in modules.items():
    lr = float(tr.lr_backbone if name == "backbone" else tr.lr)
    seen = {}
    params = [p for part in parts for p in ([part] if isinstance(part, torch.nn.Parameter)
                                              else part.parameters())]  # dedups the tied LM head
    for p in params:
      seen.setdefault(p.ndim >= 2 and name != "head", []).append(p)
    for decay, ps in seen.items():
      groups.append(dict(params=ps, lr=lr, weight_decay=float(tr.weight_decay) if decay else 0.0))
  all_params = [p for g in groups for p in g["params"]]
  opt_kw = dict(betas=(float(tr.b1), float(tr.b2)), eps=1e-8)
  try:
    opt = torch.optim.AdamW(groups, fused=True, **opt_kw)
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, foreach=True, **opt_kw)
  jax_sched = schedule(tr, int(config.steps))  # the JAX step's multiplier, evaluated per step
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(jax_sched(step)))

  # The bench's batch, prefetched once: full-length captions, random pixels as patch tokens.
  batch = synthetic_batch(mcfg, config)
  lt, n, c = mcfg.max_text_len, mcfg.num_image_tokens, mcfg.vit.token_channels
  b, mul = int(config.train.batch_size), int(config.loss.diffusion_batch_mul)
  fixed = dict(kind=torch.from_numpy(batch["kind"]).long(), text=torch.from_numpy(batch["text"]).long(),
               text_len=torch.from_numpy(batch["text_len"]).long(), text_scale=torch.ones(b))
  fixed["text_scale"][fixed["kind"] == 0] = float(config.loss.t2i_text_weight)
  with torch.no_grad():
    fixed["tokens"] = model.encode_images(torch.from_numpy(batch["image"]))[0]
  generation = (fixed["kind"] != 1)[:, None]
  mask_kind = config.loss.mask_ratio
  image_weight, text_weight = float(config.loss.image_weight), float(config.loss.text_weight)

  def draws():
    """Everything random of a step: mask ratio and order, timesteps, noise."""
    if mask_kind == "stage1":
      ratio = float(torch.nn.init.trunc_normal_(torch.empty(1), 1.0, 0.25, 0.7, 1.0))
    elif mask_kind == "stage2":
      ratio = float(torch.rand(()))
    else:
      raise ValueError(f"unknown loss.mask_ratio {mask_kind!r}")
    rank = torch.rand(b, n).argsort(-1).argsort(-1)
    masked = (rank < math.ceil(n * ratio)) & generation
    t = torch.randint(0, sched_lib.NUM_TIMESTEPS, (b, n, mul))
    noise = torch.randn(b, n, mul, c)
    return masked, t, noise

  def loss_fn(masked, t, noise):
    prep = dict(fixed, masked=masked, t=t, noise=noise, text_count=text_count,
                image_count=masked.sum() * mul)
    return model.loss(prep, image_weight, text_weight, gather=gather)[0]

  with torch.no_grad():  # the text targets are the same every step
    _, lay, ids = model(dict(fixed, masked=torch.zeros(b, n, dtype=torch.bool)))
    text_count = float((model.text_targets(lay, ids)[1].float() * fixed["text_scale"][:, None]).sum())

  if compile:
    loss_fn = torch.compile(loss_fn)

  def train_step():
    masked, t, noise = draws()
    loss = loss_fn(masked, t, noise)
    loss.backward()
    if tr.grad_clip:
      torch.nn.utils.clip_grad_norm_(all_params, float(tr.grad_clip), foreach=True)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  times, first = [], None
  for i in range(max(warmup, 1) + steps):
    t0 = time.perf_counter()
    loss = train_step()
    dt = time.perf_counter() - t0
    if i == 0:
      first = dt
    if i >= max(warmup, 1):
      times.append(dt)
  med = statistics.median(times)
  flops = flops_lib.train_step_flops(mcfg, config, full=not gather)
  peak = float(config.peak_flops) if config.peak_flops else None
  version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
  return dict(
      bench="train", framework="torch", median_step_s=med,
      compile_s=(first - med) if compile else 0.0,
      tokens_per_s=b * (lt + n) / med, images_per_s=b / med,
      mfu=(flops / med / peak) if peak else None,
      peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      flops_per_step=flops, xla_flops_per_step=None, loss=float(loss), steps=steps, batch_size=b,
      compute_dtype="float32", device=f"cpu (torch {version})", backend="cpu", device_count=1,
      threads=torch.get_num_threads(), compiled=bool(compile), gathered=bool(gather),
      transformers=transformers.__version__)


def cli_bench_torch(args) -> int:
  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, args.config_overrides)
  token_stats.shapes_only(config)
  result = bench_torch_train(config, steps=args.steps, compile=args.compile, threads=args.threads,
                             gather=args.gather)
  print(json.dumps(result, sort_keys=True))
  return 0
