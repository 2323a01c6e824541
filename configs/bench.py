"""A fixed benchmark shape that stays stable across versions (`mmar-jax bench train`).

64 text tokens (with cross-entropy) + one image of 64 synthetic 16-channel latent tokens (an 8x8
grid through a 1x1 patchify: no VAE, no pixels), `[text][img]` samples; a Qwen2-shaped backbone
(hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 704, vocab 4096); EmbeddingViT 2 layers,
width 128, 4 heads; diffusion head depth 3, width 256, v-prediction, diffusion_batch_mul 4; stage-1
masking; batch 8; AdamW with clipping, no EMA. fp32 compute on CPU, bf16 elsewhere (decided at
run time by `bench`). `tokens_per_s` counts 128 tokens per sample.

Variant `bench.py:qwen2_0_5b`: the same recipe at Qwen2-0.5B shape for GPU/TPU (256 text + 256
image tokens per sample, a batch meant to fill one accelerator).
"""

from mmar_jax.defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.steps = 10
  c.mesh = "1,-1,1"
  b = c.model.backbone
  b.vocab_size, b.hidden_size, b.num_layers, b.num_heads, b.num_kv_heads = 4096, 256, 4, 4, 2
  b.intermediate_size = 704
  im = c.model.image
  im.kind, im.size, im.patch_size, im.channels, im.scale = "patchify", 8, 1, 16, 1.0
  im.norm = "fixed"  # synthetic latents: no data to estimate token statistics from
  c.model.vit.width, c.model.vit.layers, c.model.vit.heads = 128, 2, 4
  c.model.head.width, c.model.head.depth, c.model.head.prediction = 256, 3, "v"
  c.model.max_text_len = 64
  c.model.compute_dtype = "auto"  # fp32 on CPU, bf16 on accelerators (resolved by bench)
  # Chosen by measurement (2-core CPU, alternating runs): full remat 4-6% faster than none and
  # 28% less peak memory (334 vs 465 MB); dots_no_batch in between on memory, no faster.
  c.model.remat = "full"
  # Measured (alternating runs, quiet 2-core CPU): 0.2715 vs 0.2800 s per step (-3%). The mesh
  # has no tensor axis, so the concatenated kernels cost no communication.
  c.model.fuse_projections = True
  c.model.head.compute_dtype = "auto"
  c.loss.diffusion_batch_mul = 4
  c.loss.mask_ratio = "stage1"
  c.loss.caption_drop = 0.0
  c.data.mix = "1,0,0"  # the synthetic batch is all [text][img]: every sample is a generation one
  # The LM head on text targets only (loss.text_rows default); at vocab 4096 an untiled
  # cross-entropy measured faster on CPU (0.53 vs 0.60 s/step with one tile).
  c.loss.vocab_tiles = 0
  c.train.batch_size = 8
  c.train.ema_decay = 0.0  # "no EMA": the EMA tree is still carried, at decay 0 it is a copy
  c.train.warmup_steps = 0
  c.text_tokenizer = "bytes"
  if arg == "qwen2_0_5b":
    b.vocab_size, b.hidden_size, b.num_layers, b.num_heads, b.num_kv_heads = 151936, 896, 24, 14, 2
    b.intermediate_size, b.rope_theta = 4864, 1e6
    im.size = 16  # 16x16 grid of 16-channel latents: 256 image tokens
    c.model.max_text_len = 256
    c.model.vit.width, c.model.vit.layers, c.model.vit.heads = 768, 12, 12
    c.model.head.width, c.model.head.depth = 1024, 6
    c.train.batch_size = 32
    c.loss.vocab_tiles = 8  # 151,936 rows: tiled, so no [rows, vocab] fp32 array exists
  elif arg not in (None, ""):
    raise ValueError(f"unknown bench variant {arg!r}; use qwen2_0_5b")
  return c
