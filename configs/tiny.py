"""A tiny MMAR for tests and smoke runs: widths of 64, two layers everywhere, 16x16 images as
16 patch tokens. Variants: `tiny.py:stage2` (mask ratio uniform on [0, 1]), `tiny.py:fp32`."""

from mmar_jax.defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.steps = 20
  c.mesh = "1,-1,1"
  c.model.compute_dtype = "float32"
  c.model.head.compute_dtype = "float32"
  c.model.head.width = 64
  c.model.max_text_len = 40  # the longest demo caption is 39 bytes + EOS
  c.model.head.depth = 2
  # Tests build models straight from this config, without a run that estimated token statistics.
  c.model.image.norm = "fixed"
  c.loss.diffusion_batch_mul = 2
  c.train.batch_size = 8
  c.train.lr = 1e-3
  c.train.lr_backbone = 1e-3
  c.train.warmup_steps = 2
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.data.random_flip = False  # the demo's captions name left and right
  if arg == "stage2":
    c.loss.mask_ratio = "stage2"
  elif arg == "bf16":
    c.model.compute_dtype = "bfloat16"
    c.model.head.compute_dtype = "bfloat16"
  elif arg not in (None, "", "stage1", "fp32"):
    raise ValueError(f"unknown tiny variant {arg!r}")
  return c
