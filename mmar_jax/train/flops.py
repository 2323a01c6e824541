"""Analytic matmul FLOPs of a train step (2 m n k per matmul; backward = 2 x forward).

Counted: every dense projection, attention scores and weighted sums, the LM head, the ViT, the
projector and the diffusion head, on the rows the step computes them on (`loss.text_rows`,
`loss.head_rows`; a vocabulary-tiled cross-entropy recomputes the LM head in its backward pass,
4 x forward), or with `full=True` on every position and row (the reference computation). Not counted:
norms, activations, softmax, RoPE, the optimizer and elementwise work -- XLA's cost analysis
counts those too, which is why the comparison in the tests allows a few percent.
"""

from __future__ import annotations

from mmar_jax.train.step import loss_rows


def backbone_forward(cfg, seq: int, with_lm_head: bool = True) -> float:
  d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.hd, cfg.intermediate_size
  per_layer = (2 * seq * d * (h + 2 * kv) * hd  # q, k, v
               + 2 * seq * h * hd * d  # o
               + 3 * 2 * seq * d * f  # gate, up, down
               + 2 * 2 * seq * seq * h * hd)  # scores, weighted sum
  return cfg.num_layers * per_layer + (2 * seq * d * cfg.vocab_size if with_lm_head else 0)


def vit_forward(cfg, d_llm: int) -> float:
  n, w, c = cfg.num_tokens, cfg.width, cfg.token_channels
  hidden = int(w * cfg.mlp_ratio)
  per_layer = 2 * n * w * 3 * w + 2 * n * w * w + 2 * 2 * n * w * hidden + 2 * 2 * n * n * w
  projector = 2 * n * w * d_llm + 2 * n * d_llm * d_llm
  return 2 * n * c * w + cfg.layers * per_layer + projector


def head_forward(cfg, rows: int) -> float:
  w, c = cfg.width, cfg.token_channels
  out = c * (2 if cfg.learn_sigma else 1)
  time_embed = 2 * rows * 256 * w + 2 * rows * w * w
  blocks = cfg.depth * (2 * rows * w * 3 * w + 2 * 2 * rows * w * w)
  final = 2 * rows * w * 2 * w + 2 * rows * w * out
  return 2 * rows * c * w + time_embed + 2 * rows * cfg.cond_dim * w + blocks + final


def train_step_flops(mcfg, config, full: bool = False) -> float:
  """Per global batch: forward + backward (3 x forward)."""
  b = config.train.batch_size
  mul = config.loss.diffusion_batch_mul
  bb, n = mcfg.backbone, mcfg.num_image_tokens
  rows = dict(target_rows=None, vocab_tiles=0, head_samples=None) if full else loss_rows(config, mcfg)
  text_rows = b * (rows["target_rows"] or mcfg.seq_len)
  lm_head = 2 * text_rows * bb.hidden_size * bb.vocab_size * (4 if rows["vocab_tiles"] else 3)
  accum = int(config.train.grad_accum)
  head_samples = b if rows["head_samples"] is None else rows["head_samples"] * accum
  per_sample = (backbone_forward(bb, mcfg.seq_len, with_lm_head=False)
                + vit_forward(mcfg.vit, bb.hidden_size))
  return 3.0 * (b * per_sample + head_forward(mcfg.head, head_samples * n * mul)) + lm_head
