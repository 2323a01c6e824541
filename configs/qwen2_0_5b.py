"""MMAR-0.5B: Qwen2-0.5B backbone, KL-16 VAE (256 tokens of 16 channels per 256x256 image).

The two-stage recipe (method.md §5-6) as variants:
  qwen2_0_5b.py:stage1  mask ratio in [0.7, 1] (MAR's truncated normal), large medium-quality data
  qwen2_0_5b.py:stage2  mask ratio uniform on [0, 1], small high-quality data; set init from stage 1
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


def stage(c, arg):
  if arg in (None, "", "stage1"):
    c.loss.mask_ratio = "stage1"
  elif arg == "stage2":
    c.loss.mask_ratio = "stage2"
  else:
    raise ValueError(f"unknown variant {arg!r}: use stage1 or stage2")


def get_config(arg=None):
  c = base_config()
  qwen2_backbone(c, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                 tied=True)
  full_scale(c)
  c.steps = 200_000
  c.train.batch_size = 256
  stage(c, arg)
  return c
