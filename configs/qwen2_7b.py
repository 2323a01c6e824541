"""MMAR-7B: Qwen2-7B backbone (untied LM head), otherwise as qwen2_0_5b.py.
Variants: qwen2_7b.py:stage1 (default) and qwen2_7b.py:stage2; `_v5p` after either
(qwen2_7b.py:stage1_v5p) picks the layout for v5p-64 (32 chips, 16 sequences per chip): no
rematerialisation and the fused attention kernel, 77.2 GB of a v5p chip's 95 and an MFU bound of
0.98 by the TPU compiler (README, "Recipes on real slices"). The plain variants keep remat=full:
17.6 GB per chip on v5p-64, so v6e-32 (the same per-chip program, not compiled for v6e) fits too."""

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
  _base.stage(c, arg, LAYOUTS)
  return c


# By the compiler (README table): on v5p-64 no remat with the fused kernel fits (19% of HBM free)
# and has the highest MFU bound (0.98 by the roofline).
LAYOUTS = {"v5p": ("none", "flash")}
