"""`mmar-jax bench torch-train`: a PyTorch eager reference of the `bench train` step.

The same model at the same shapes (read from the same config), the same batch and the same
analytic FLOPs per step, written as a PyTorch user would write it, so the JAX step can be timed
against it on the same machine:

* the decoder is `transformers.Qwen2ForCausalLM` (random init, SDPA attention) run once on the
  whole `[text] <boi> [img] <eoi>` sequence, with the image block's structure (causal across
  blocks, bidirectional inside the image, one shared RoPE position by default) as a 4D boolean
  mask and explicit position ids; logits on every position, as a PyTorch user writes it
  (`gather=True`, `--gather`: on the text-target positions only, as the JAX step computes them);
* EmbeddingViT (in_proj, mask token substituted, then the learned position embedding added,
  pre-LN blocks with `F.scaled_dot_product_attention`, final LayerNorm) and the VisProjector
  (Linear, SiLU, Linear);
* MAR's SimpleMLPAdaLN diffusion head with v-prediction (or eps / x0) on every image token,
  `diffusion_batch_mul` draws per token (z is repeated, the backbone runs once), the loss
  weighted by the mask (random order, MAR's stage-1 ratio);
* AdamW (two learning rates: backbone and new modules; no weight decay on biases, norms and the
  head) after clipping by the global norm; no EMA.

fp32 on CPU. It does not reproduce JAX's numbers (other init, other random streams); the FLOPs per
step are the same. Left out on purpose: the per-row learning rate of the <boi>/<eoi> embedding
rows (the whole embedding trains at the backbone's rate) and rematerialisation (the JAX bench
config asks for full remat; a PyTorch user would not checkpoint a model this small). Options the
bench batch does not exercise (caption dropout, a VAE tokenizer, frozen modules, gradient
accumulation, a learned-variance head, the image-embedding conditioning switches) are refused
rather than silently measured differently.

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


def _check_supported(config, mcfg) -> None:
  m, im = config.model, config.model.image
  problems = []
  if im.kind != "patchify":
    problems.append(f"model.image.kind={im.kind!r} (only patchify: the bench feeds synthetic latents)")
  if float(config.loss.caption_drop):
    problems.append("loss.caption_drop > 0 (the bench's batch keeps every caption)")
  if int(config.train.grad_accum) != 1:
    problems.append("train.grad_accum != 1")
  if str(config.train.freeze).strip():
    problems.append("train.freeze")
  if m.head.learn_sigma:
    problems.append("model.head.learn_sigma")
  if mcfg.head.prediction not in ("v", "eps", "x0"):
    problems.append(f"model.head.prediction={mcfg.head.prediction!r}")
  if problems:
    raise ValueError("bench torch-train does not implement: " + "; ".join(problems))


def _modules():
  """The torch modules (defined here so that importing this file does not import torch)."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  def xavier_linear(d_in, d_out):
    lin = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin

  class ViTBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio, eps):
      super().__init__()
      self.heads = heads
      self.ln1 = nn.LayerNorm(width, eps=eps)
      self.qkv = xavier_linear(width, 3 * width)
      self.proj = xavier_linear(width, width)
      self.ln2 = nn.LayerNorm(width, eps=eps)
      self.fc1 = xavier_linear(width, int(width * mlp_ratio))
      self.fc2 = xavier_linear(int(width * mlp_ratio), width)

    def forward(self, x):
      b, n, w = x.shape
      q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
      o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
      x = x + self.proj(o)
      return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

  class EmbeddingViT(nn.Module):
    def __init__(self, cfg):
      super().__init__()
      w = cfg.width
      self.in_proj = xavier_linear(cfg.token_channels, w)
      self.mask_token = nn.Parameter(torch.randn(w) * 0.02)
      self.pos_embed = nn.Parameter(torch.randn(cfg.num_tokens, w) * 0.02)
      self.blocks = nn.ModuleList(ViTBlock(w, cfg.heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.layers))
      self.norm = nn.LayerNorm(w, eps=cfg.eps)

    def forward(self, tokens, masked):
      h = torch.where(masked[..., None], self.mask_token, self.in_proj(tokens)) + self.pos_embed
      for block in self.blocks:
        h = block(h)
      return self.norm(h)

  class AdaLNBlock(nn.Module):
    def __init__(self, w):
      super().__init__()
      self.in_ln = nn.LayerNorm(w, eps=1e-6)
      self.mlp = nn.Sequential(xavier_linear(w, w), nn.SiLU(), xavier_linear(w, w))
      self.adaLN = nn.Linear(w, 3 * w)
      nn.init.zeros_(self.adaLN.weight)
      nn.init.zeros_(self.adaLN.bias)

    def forward(self, h, ys):
      shift, scale, gate = self.adaLN(ys).chunk(3, dim=-1)
      return h + gate * self.mlp(self.in_ln(h) * (1 + scale) + shift)

  class DiffusionHead(nn.Module):
    """MAR's SimpleMLPAdaLN (the SiLU of the condition computed once for every adaLN)."""

    def __init__(self, cfg):
      super().__init__()
      c, d, w = cfg.token_channels, cfg.cond_dim, cfg.width
      self.input_proj = xavier_linear(c, w)
      self.time_mlp = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
      for lin in (self.time_mlp[0], self.time_mlp[2]):
        nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(lin.bias)
      self.cond_embed = xavier_linear(d, w)
      self.blocks = nn.ModuleList(AdaLNBlock(w) for _ in range(cfg.depth))
      self.final_norm = nn.LayerNorm(w, eps=1e-6, elementwise_affine=False)
      self.final_adaLN = nn.Linear(w, 2 * w)
      self.final_linear = nn.Linear(w, cfg.out_channels)
      for lin in (self.final_adaLN, self.final_linear):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
      half = 128
      self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half),
                           persistent=False)
      self.pos_embed = nn.Parameter(torch.randn(cfg.n_positions, d) * 0.02) if cfg.n_positions else None

    def forward(self, x, t, z, positions=None):
      if self.pos_embed is not None:
        z = z + self.pos_embed[positions]
      args = t.to(torch.float32)[:, None] * self.freqs
      y = self.time_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)) + self.cond_embed(z)
      ys = F.silu(y)
      h = self.input_proj(x)
      for block in self.blocks:
        h = block(h, ys)
      shift, scale = self.final_adaLN(ys).chunk(2, dim=-1)
      return self.final_linear(self.final_norm(h) * (1 + scale) + shift)

  return EmbeddingViT, DiffusionHead


def bench_torch_train(config, steps: int = 10, warmup: int = 3, compile: bool = False,
                      threads: int | None = None, gather: bool = False) -> dict:
  """One JSON-able dict with `bench train`'s keys; `threads` defaults to every CPU core."""
  import torch
  import torch.nn.functional as F
  import transformers
  from transformers import Qwen2Config as HFQwen2Config, Qwen2ForCausalLM

  from mmar_jax.commands.bench import synthetic_batch
  from mmar_jax.data.text_tokenizer import load_text_tokenizer
  from mmar_jax.diffusion import schedule as sched_lib
  from mmar_jax.models.mmar import model_config
  from mmar_jax.train import flops as flops_lib
  from mmar_jax.train.optimizer import schedule

  config = config.copy_and_resolve_references()
  config.model.compute_dtype = "float32"  # the reference runs fp32 (as the JAX bench on CPU)
  config.model.head.compute_dtype = "float32"
  mcfg = model_config(config, load_text_tokenizer(config.text_tokenizer))
  _check_supported(config, mcfg)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  torch.manual_seed(int(config.seed))
  EmbeddingViT, DiffusionHead = _modules()

  bb, lt, n, c = mcfg.backbone, mcfg.max_text_len, mcfg.num_image_tokens, mcfg.vit.token_channels
  b, mul = int(config.train.batch_size), int(config.loss.diffusion_batch_mul)
  seq = mcfg.seq_len
  hf_kw = dict(head_dim=bb.head_dim) if bb.head_dim else {}
  hf_cfg = HFQwen2Config(
      vocab_size=bb.vocab_size, hidden_size=bb.hidden_size, intermediate_size=bb.intermediate_size,
      num_hidden_layers=bb.num_layers, num_attention_heads=bb.num_heads,
      num_key_value_heads=bb.num_kv_heads, rope_theta=bb.rope_theta, rms_norm_eps=bb.rms_norm_eps,
      tie_word_embeddings=bb.tie_word_embeddings, max_position_embeddings=max(seq, 2048),
      use_cache=False, attn_implementation="sdpa", **hf_kw)
  llm = Qwen2ForCausalLM(hf_cfg)
  vit = EmbeddingViT(mcfg.vit)
  projector = torch.nn.Sequential(torch.nn.Linear(mcfg.vit.width, bb.hidden_size), torch.nn.SiLU(),
                                  torch.nn.Linear(bb.hidden_size, bb.hidden_size))
  head = DiffusionHead(mcfg.head)
  modules = dict(backbone=llm, vit=vit, projector=projector, head=head)
  for mod in modules.values():
    mod.train()

  tr = config.train
  groups = []
  for name, mod in modules.items():
    lr = float(tr.lr_backbone if name == "backbone" else tr.lr)
    seen = {}
    for p in mod.parameters():  # parameters() dedups the tied embedding / LM head
      seen.setdefault(p.ndim >= 2 and name != "head", []).append(p)
    for decay, params in seen.items():
      groups.append(dict(params=params, lr=lr, weight_decay=float(tr.weight_decay) if decay else 0.0))
  all_params = [p for g in groups for p in g["params"]]
  opt_kw = dict(betas=(float(tr.b1), float(tr.b2)), eps=1e-8)
  try:
    opt = torch.optim.AdamW(groups, fused=True, **opt_kw)
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, foreach=True, **opt_kw)
  jax_sched = schedule(tr, int(config.steps))  # the JAX step's multiplier, evaluated per step
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(jax_sched(step)))

  # The bench's batch, prefetched once: kind 0, full-length captions, random image latents.
  batch = synthetic_batch(mcfg, config)
  assert (batch["kind"] == 0).all() and (batch["text_len"] == lt).all()
  images = torch.from_numpy(batch["image"])
  text = torch.from_numpy(batch["text"]).long()
  p, scale = int(config.model.image.patch_size), float(config.model.image.scale or 1.0)

  # The `[text] <boi> [img] <eoi>` layout (the same for every sample of this batch): block ids
  # (text tokens, <boi> and <eoi> one block each, the image one block), RoPE positions, the
  # attention mask (key block <= query block) and the text targets (-100: no loss).
  block = torch.cat([torch.arange(lt + 1), torch.full((n,), lt + 1), torch.tensor([lt + 2])])
  if config.model.image.positions == "per_token":
    positions = torch.arange(seq)
  else:
    positions = block
  positions = positions[None].expand(b, seq)
  attn_mask = (block[None, :] <= block[:, None])[None, None].expand(b, 1, seq, seq)
  specials = torch.tensor([[mcfg.boi_id], [mcfg.eoi_id]]).T.expand(b, 2)
  targets = torch.full((b, seq), -100, dtype=torch.long)
  targets[:, :lt - 1] = text[:, 1:]  # text predicts text (not <boi>)
  targets[:, lt + n] = mcfg.eoi_id  # the last image position predicts <eoi>
  text_rows, hidden_vocab = targets != -100, mcfg.backbone.vocab_size
  alpha_t = torch.tensor(sched_lib.base_schedule().alpha, dtype=torch.float32)
  sigma_t = torch.tensor(sched_lib.base_schedule().sigma, dtype=torch.float32)
  head_positions = torch.arange(n).repeat(b * mul) if mcfg.head.n_positions else None
  pred_kind = mcfg.head.prediction
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
    masked = rank < math.ceil(n * ratio)
    t = torch.randint(0, sched_lib.NUM_TIMESTEPS, (mul * b * n,))
    noise = torch.randn(mul * b * n, c)
    return masked, t, noise

  def loss_fn(images, masked, t, noise):
    hgt, wid = images.shape[1:3]
    tokens = (images.reshape(b, hgt // p, p, wid // p, p, -1).permute(0, 1, 3, 5, 2, 4)
              .reshape(b, n, c)) * scale
    img = projector(vit(tokens, masked))
    emb = llm.model.embed_tokens(torch.cat([text, specials], dim=1))
    x = torch.cat([emb[:, :lt + 1], img, emb[:, lt + 1:]], dim=1)
    hidden = llm.model(inputs_embeds=x, attention_mask=attn_mask, position_ids=positions,
                       use_cache=False).last_hidden_state
    if gather:  # the LM head on the text-target positions only, as the JAX step computes it
      logits, tgt = llm.lm_head(hidden[text_rows]), targets[text_rows]
    else:
      logits, tgt = llm.lm_head(hidden).reshape(-1, hidden_vocab), targets.reshape(-1)
    loss_text = F.cross_entropy(logits, tgt, ignore_index=-100)
    z = hidden[:, lt + 1:lt + 1 + n].reshape(b * n, -1).repeat(mul, 1)
    x0 = tokens.reshape(b * n, c).repeat(mul, 1)
    weights = masked.reshape(b * n).repeat(mul).to(torch.float32)
    alpha, sigma = alpha_t[t][:, None], sigma_t[t][:, None]
    x_t = alpha * x0 + sigma * noise
    out = head(x_t, t, z, head_positions)
    target = {"v": lambda: alpha * noise - sigma * x0, "eps": lambda: noise, "x0": lambda: x0}[pred_kind]()
    per_token = (target - out).square().mean(-1)
    loss_image = (per_token * weights).sum() / weights.sum().clamp_min(1.0)
    return image_weight * loss_image + text_weight * loss_text

  if compile:
    loss_fn = torch.compile(loss_fn)

  def train_step():
    masked, t, noise = draws()
    loss = loss_fn(images, masked, t, noise)
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
  from mmar_jax import config as config_lib
  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, args.config_overrides)
  result = bench_torch_train(config, steps=args.steps, compile=args.compile, threads=args.threads,
                             gather=args.gather)
  print(json.dumps(result, sort_keys=True))
  return 0
