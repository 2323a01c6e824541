"""The base config every `configs/*.py` starts from: it declares every key a command may override.

Keys whose default is "unset" are ml-collections placeholders (a None default could not be
overridden from the command line).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mmar_jax.parallel.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 1000
  c.mesh = "1,-1,1"  # data, fsdp, tensor; -1 = all remaining devices
  c.mesh_dcn = "1,1,1"  # the same across slices (data parallel over DCN)
  c.peak_flops = config_dict.placeholder(float)  # per-device dense peak, for MFU on unknown devices
  c.text_tokenizer = "bytes"  # 'bytes' or a local HuggingFace tokenizer directory
  c.sharding_rules = DEFAULT_RULES

  c.model = m = ml_collections.ConfigDict()
  m.backbone = b = ml_collections.ConfigDict()
  b.vocab_size = 512
  b.hidden_size = 64
  b.num_layers = 2
  b.num_heads = 4
  b.num_kv_heads = 2
  b.head_dim = 0  # 0: hidden_size // num_heads
  b.intermediate_size = 128
  b.rope_theta = 1e4
  b.rms_norm_eps = 1e-6
  b.tie_word_embeddings = True
  m.compute_dtype = "bfloat16"  # bf16 compute over fp32 master weights
  m.scan_layers = True
  m.remat = "none"
  m.fuse_projections = False  # one q/k/v and one gate/up matmul per layer (not with tensor parallelism)
  m.attention = "einsum"  # einsum (ours) | cudnn (fused, GPU) | xla (jax.nn reference) | flash (Pallas, TPU) | flash_interpret

  m.image = im = ml_collections.ConfigDict()
  im.size = 16  # pixels (256 at full scale)
  im.kind = "patchify"  # the image tokenizer: patchify | vae
  im.patch_size = 4  # pixels per token side (patchify) or latent pixels per token side (vae)
  im.channels = 3  # pixel channels (patchify); synthetic latents use 16
  im.scale = config_dict.placeholder(float)  # token scale; unset: 1 (patchify), 0.2325 (MAR's KL-16)
  im.vae = v = ml_collections.ConfigDict()
  v.ch = 128
  v.ch_mult = (1, 1, 2, 2, 4)
  v.embed_dim = 16
  # Token normalisation (image_tokenizer.token_norm). data: per-channel (token - mean) / std, the
  # statistics estimated from `data.norm_samples` records when a run starts and stored below;
  # fixed: the tokenizer's scalar `scale` only (MAR's 0.2325 for KL-16: 1/std of ImageNet latents,
  # the same idea for one VAE and one data set). The diffusion schedule assumes unit-variance
  # tokens; the demo's raw-pixel tokens have mean -0.95, std 0.29. Measured on the demo (2500
  # steps, seed 0, the split ViT): data vs fixed took held-out generation 0.65 -> 0.875 and
  # understanding 0.91 -> 1.00 (88 drawings; unconditional validity 0.16 -> 0.14, no change).
  im.norm = "data"
  im.token_shift = ()
  im.token_scale = ()
  im.positions = "shared"  # shared: the image block has one RoPE position; per_token

  m.vit = vit = ml_collections.ConfigDict()
  vit.width = 64
  vit.layers = 2
  vit.heads = 4
  vit.mlp_ratio = 4.0
  vit.pos_init = "normal"  # normal (N(0, 0.02), MAR) | sincos (2D grid, MAE; the demo uses it)
  # visible: MAR's encoder/decoder split (a masked slot attends only to itself in the ViT, so the
  # LLM must fill it from the drawn tokens) | all: the ViT also sees the mask tokens. With 'all'
  # the demo's LLM took nothing from the drawn tokens (cutting its masked->visible attention
  # raised the unconditional masked loss by 3%; the ViT did all of it) and drew 4x4 tiles that
  # disagree (held-out generation 0.00-0.23). With 'visible' the cut raises it by 174% and
  # generation is 0.875 (with norm=data; diagnose context, issue 24's note).
  vit.attend = "visible"

  m.head = h = ml_collections.ConfigDict()
  h.width = 128
  h.depth = 3
  h.prediction = "v"  # v | eps | x0
  h.learn_sigma = False
  h.pos_embed = False  # MAR's learned position embedding added to z before the head
  h.compute_dtype = "bfloat16"

  m.max_text_len = 32  # text tokens per sample, EOS included

  c.loss = ml_collections.ConfigDict()
  c.loss.image_weight = 1.0
  c.loss.text_weight = 1.0
  c.loss.diffusion_batch_mul = 4
  c.loss.caption_drop = 0.1
  # Weight of the text targets of [text][img] samples in L_txt. 0: the caption is a condition,
  # not a target (the seeds write the sequence as P(I|T); method.md §1.9); 1: the joint P(T, I).
  c.loss.t2i_text_weight = 0.0
  c.loss.mask_ratio = "stage1"  # stage1: truncnorm on [0.7, 1]; stage2: uniform on [0, 1]
  # Compute only where the loss is (the same losses and gradients as "all", the reference):
  # targets: the LM head on each sample's text-target positions only (max_text_len + 1 rows);
  c.loss.text_rows = "targets"  # targets | all
  # the cross-entropy walks the vocabulary in this many tiles (0: one [rows, vocab] logits array);
  c.loss.vocab_tiles = 8
  # generation: the diffusion head on the rows of [text][img] and [img] samples only (their count
  # per batch is fixed by data.mix, data/pipeline.py), not on understanding samples.
  c.loss.head_rows = "generation"  # generation | all

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 8  # global
  t.grad_accum = 1
  t.lr = 1e-4  # new modules (ViT, projector, head, <boi>/<eoi> rows)
  t.lr_backbone = 1e-5  # the (pretrained) LLM
  t.warmup_steps = 100
  t.schedule = "constant"  # constant | cosine
  t.weight_decay = 0.02
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 3.0
  t.ema_decay = 0.9999
  t.ema_warmup = True
  t.freeze = ""  # comma list of top-level modules: backbone, vit, projector, head, image_tokenizer
  t.log_every = 10
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  t.check_finite = False  # chex finiteness checks inside the step (slow: host sync)
  t.precision_every = 0  # > 0: every N steps log the head's bf16-vs-fp32 error by timestep bucket

  c.data = d = ml_collections.ConfigDict()
  d.source = "demo"
  d.mix = "0.45,0.45,0.1"  # fractions of [text][img] P(I|T), [img][text] P(T|I), [img] P(I)
  d.image_key = "image"
  d.caption_key = "caption"
  d.long_caption = "truncate"  # truncate | skip
  d.random_flip = True  # MAR's augmentation (off for data whose captions name left and right)
  d.max_bad_fraction = 0.5  # more unusable examples than this (after 200 read) stops the run
  d.norm_samples = 512  # records read to estimate the token statistics (model.image.norm=data)
  d.threads = 0  # background threads building batches (grain); 0: in the training loop
  d.prefetch = 2  # batches built ahead when threads > 0
  d.tfds = ml_collections.ConfigDict()  # data.source = "tfds": a prepared array_record dataset
  d.tfds.name = config_dict.placeholder(str)
  d.tfds.split = "train"
  d.tfds.data_dir = config_dict.placeholder(str)

  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = False  # run `mmar-jax eval` when training finishes (the demo does)
  c.eval.cfg = 3.0
  c.eval.cfg_schedule = "linear"  # MAR's linear ramp over the AR steps, or constant
  c.eval.ar_steps = 16
  c.eval.diffusion_steps = 100
  c.eval.draws_per_prompt = 4  # drawings per held-out caption (the demo has 22: 88 drawings)
  c.eval.num_unconditional = 64
  c.eval.temperature = 1.0

  c.init = ml_collections.ConfigDict()
  c.init.backbone = config_dict.placeholder(str)
  c.init.vae = config_dict.placeholder(str)
  c.init.head = config_dict.placeholder(str)
  return c
