"""MMAR-0.5B: Qwen2-0.5B backbone, KL-16 VAE (256 tokens of 16 channels per 256x256 image).

The two-stage recipe (method.md §5-6) as variants:
  qwen2_0_5b.py:stage1  mask ratio in [0.7, 1] (MAR's truncated normal), large medium-quality data
  qwen2_0_5b.py:stage2  mask ratio uniform on [0, 1], small high-quality data; set init from stage 1
`_v5p` after either (qwen2_0_5b.py:stage1_v5p) picks the layout for v5p-8 (README, "Recipes on
real slices").
Set init.backbone to an `hf-to-jax` output (or a HuggingFace directory), init.vae to a
`convert mar-vae` output, text_tokenizer to the Qwen2 tokenizer directory, data.source to your data.
"""

from mmar_jax.defaults import base_config


def qwen2_backbone(c, *, hidden, layers, heads, kv_heads, intermediate, vocab, tied):
  b = c.model.backbone
  b.vocab_size, b.hidden_size, b.num_layers = vocab, hidden, layers
  b.num_heads, b.num_kv_heads, b.intermediate_size = heads, kv_heads, intermediate
  b.rope_theta, b.rms_norm_eps, b.tie_word_embeddings = 1e6, 1e-6, tied


def full_scale(c):
  """What MMAR's full-scale runs share: 256x256 images through MAR's KL-16, MAR-B-sized ViT,
  head depth 6 width 1024, bf16 compute, v-prediction."""
  im = c.model.image
  im.size, im.kind, im.patch_size, im.scale = 256, "vae", 1, 0.2325
  c.model.vit.width, c.model.vit.layers, c.model.vit.heads = 768, 12, 12
  c.model.head.width, c.model.head.depth = 1024, 6
  c.model.max_text_len = 128
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "dots_no_batch"
  c.loss.diffusion_batch_mul = 4
  c.train.lr, c.train.lr_backbone = 1e-4, 1e-5
  c.train.warmup_steps = 2000
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  c.data.source = "tfds"
  c.data.random_flip = True


def stage(c, arg, layouts=None):
  """`stage1` / `stage2`, optionally with a slice layout after `_` (`stage1_v5p`): the remat
  policy and attention chosen for that chip by the TPU compiler's numbers (README, "Recipes on
  real slices"); `layouts` maps a chip name to (remat, attention)."""
  name, _, layout = (arg or "").partition("_")
  layouts = layouts or {}
  choices = ["stage1", "stage2"] + [f"{s}_{l}" for s in ("stage1", "stage2") for l in layouts]
  if name not in ("", "stage1", "stage2") or (layout and layout not in layouts):
    raise ValueError(f"unknown variant {arg!r}: use {', '.join(choices)}")
  c.loss.mask_ratio = name or "stage1"
  if layout:
    c.model.remat, c.model.attention = layouts[layout]


# By the compiler (README table): v5p-8 (4 chips, 64 sequences each) fits dots_no_batch remat with
# the fused kernel; no remat does not fit there (105 GB of 95).
LAYOUTS = {"v5p": ("dots_no_batch", "flash")}


def get_config(arg=None):
  c = base_config()
  qwen2_backbone(c, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                 tied=True)
  full_scale(c)
  c.steps = 200_000
  c.train.batch_size = 256
  stage(c, arg, LAYOUTS)
  return c
