"""A tiny MMAR overfits 4 fixed image-caption pairs: both losses fall at least 5x."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.train.step import build, init_state, make_train_step


def _overfit(mcfg, batcher, steps):
  config = tiny_config(("loss.caption_drop", "0.0"), ("train.lr", "3e-3"), ("train.lr_backbone", "3e-3"),
                       ("train.warmup_steps", "10"), ("train.ema_decay", "0.0"))
  tr = build(config, mcfg, make_mesh("1,1,1", devices=jax.devices()[:1]))
  state = init_state(tr)
  step = make_train_step(tr)
  # 4 pairs, each as [text][img] and as [img][text]: 8 examples, the same batch every step.
  base = batcher.local_batch(0)
  batch = {k: np.concatenate([v[:4], v[:4]]) for k, v in base.items()}
  batch["kind"] = np.asarray([0] * 4 + [1] * 4, np.int32)
  batch["index"] = np.arange(8, dtype=np.int32)
  batch = jax.device_put(batch, tr.batch_sharding)
  history = []
  for _ in range(steps):
    state, m = step(state, batch)
    history.append((float(m["loss_text"]), float(m["loss_image"])))
  return np.asarray(history)


def _check(history, factor=5.0):
  first = history[:3].mean(0)
  last = history[-10:].mean(0)  # t is drawn afresh each step: average the diffusion loss
  print("text", first[0], "->", last[0], "image", first[1], "->", last[1])
  assert last[0] * factor <= first[0], (first, last)
  assert last[1] * factor <= first[1], (first, last)


def test_tiny_model_overfits_four_pairs(tiny_mcfg, demo_batcher):
  _check(_overfit(tiny_mcfg, demo_batcher, 250))


@pytest.mark.slow
def test_tiny_model_overfits_four_pairs_long(tiny_mcfg, demo_batcher):
  _check(_overfit(tiny_mcfg, demo_batcher, 1000), factor=20.0)
