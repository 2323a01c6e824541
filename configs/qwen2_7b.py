"""MMAR-7B: Qwen2-7B backbone (untied LM head), otherwise as qwen2_0_5b.py.
Variants: qwen2_7b.py:stage1 (default) and qwen2_7b.py:stage2; `_v5p` after either
(qwen2_7b.py:stage1_v5p) picks the layout for v5p-64 (32 chips, 16 sequences per chip): no
rematerialisation and the fused attention kernel, 77.2 GB of a v5p chip's 95 by the TPU compiler
(README, "Recipes on real slices"). The plain variants keep remat=full, which also fits v6e-32
(17.6 GB per chip)."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_mmar_qwen2_0_5b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_0_5b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
  c = _base.base_config()
  _base.qwen2_backbone(c, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                       vocab=152064, tied=False)
  _base.full_scale(c)
  c.steps = 200_000
  c.train.batch_size = 512
  c.model.remat = "full"
  stage, _, layout = (arg or "").partition("_")
  if layout == "v5p":
    c.model.remat, c.model.attention = "none", "flash"
  elif layout:
    raise ValueError(f"unknown variant {arg!r}: use stage1, stage2, stage1_v5p or stage2_v5p")
  _base.stage(c, stage)
  return c
