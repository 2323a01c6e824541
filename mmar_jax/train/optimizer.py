"""AdamW with MMAR's parameter groups (method.md §6).

* Two learning rates: `lr_backbone` for the (pretrained) LLM, `lr` for the new modules (ViT,
  projector, head). The `<boi>`/`<eoi>` rows of the embedding (and of an untied LM head) are new
  too: the learning rate is a per-row array there, so those two rows train at `lr` even when the
  rest of the backbone is frozen.
* Weight decay except biases, norms and the diffusion head: a parameter is decayed when its
  logical axes (ignoring the stacked 'layers' axis) have rank >= 2 and it is outside the head.
* Frozen modules get no optimizer state and no updates (`optax.multi_transform` + set_to_zero).
* Gradient clipping by global norm, then Adam's moments, then decoupled weight decay, then the
  per-parameter learning rates times the shared schedule (linear warmup, constant or cosine).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mmar_jax.parallel.sharding import logical_names, map_variables

MODULES = ("backbone", "vit", "projector", "head", "image_tokenizer")


def schedule(train_cfg, total_steps: int):
  """Multiplier in [0, 1] of the base learning rates at each step."""
  warm = max(int(train_cfg.warmup_steps), 0)
  if train_cfg.schedule == "constant":
    after = optax.constant_schedule(1.0)
  elif train_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(1.0, max(total_steps - warm, 1))
  else:
    raise ValueError(f"unknown train.schedule {train_cfg.schedule!r}; use constant or cosine")
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(1.0 / warm, 1.0, warm), after], [warm])


def frozen_modules(train_cfg) -> set[str]:
  names = {n.strip() for n in str(train_cfg.freeze).split(",") if n.strip()}
  unknown = names - set(MODULES)
  if unknown:
    raise ValueError(f"train.freeze names unknown modules {sorted(unknown)}; choose from {MODULES}")
  return names


def param_labels(abstract_state, train_cfg) -> dict:
  """'train' or 'frozen' per leaf. The image tokenizer (VAE) is never trained by this loss."""
  frozen = frozen_modules(train_cfg) | {"image_tokenizer"}

  def label(path, _):
    # A frozen backbone still trains its <boi>/<eoi> rows (a per-row learning rate of 0 elsewhere).
    if path[0] == "backbone" and "backbone" in frozen and path[1] in ("embed_tokens", "lm_head"):
      return "train"
    return "frozen" if path[0] in frozen else "train"

  return map_variables(label, abstract_state)


def decay_mask(abstract_state) -> dict:
  def decayed(path, var):
    matrix = len([a for a in logical_names(var) if a != "layers"]) >= 2
    return bool(matrix and path[0] != "head")
  return map_variables(decayed, abstract_state)


def learning_rates(abstract_state, train_cfg, special_ids: tuple[int, ...]) -> dict:
  """Base learning rate per leaf: a scalar, or a [V, 1] / [1, V] per-row array for the embedding
  and an untied LM head, where the special-token rows take the new modules' rate."""
  frozen = frozen_modules(train_cfg)
  lr_new, lr_bb = float(train_cfg.lr), float(train_cfg.lr_backbone)
  if "backbone" in frozen:
    lr_bb = 0.0

  def lr(path, var):
    if path[0] != "backbone":
      return jnp.asarray(lr_new, jnp.float32)
    if path[1] in ("embed_tokens", "lm_head"):
      vocab_axis = 0 if path[1] == "embed_tokens" else 1
      rows = jnp.full((var.get_value().shape[vocab_axis],), lr_bb, jnp.float32).at[jnp.asarray(special_ids)].set(lr_new)
      return rows[:, None] if vocab_axis == 0 else rows[None, :]
    return jnp.asarray(lr_bb, jnp.float32)

  return map_variables(lr, abstract_state)


class ScaleByTreeState(NamedTuple):
  count: jax.Array


def scale_by_lr_tree(lrs, sched) -> optax.GradientTransformation:
  """updates * -(lr_leaf * schedule(step)); lr_leaf may be a per-row array."""

  def init(params):
    del params
    return ScaleByTreeState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    m = sched(state.count)
    updates = jax.tree.map(lambda u, lr: (-(lr * m) * u).astype(u.dtype), updates, lrs)
    return updates, ScaleByTreeState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def make_optimizer(abstract_state, train_cfg, total_steps: int, special_ids: tuple[int, ...]):
  """(optax transformation over the pure param dict, learning-rate schedule multiplier)."""
  sched = schedule(train_cfg, total_steps)
  labels = param_labels(abstract_state, train_cfg)
  # multi_transform hands the inner transform a tree whose frozen leaves are MaskedNodes.
  decay = decay_mask(abstract_state)
  lrs = learning_rates(abstract_state, train_cfg, special_ids)
  inner = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip else optax.identity(),
      optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-8),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=_masked_like(decay, labels)),
      scale_by_lr_tree(_masked_like(lrs, labels), sched),
  )
  tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
  return tx, sched


def _masked_like(tree, labels):
  """Drops the frozen leaves so the tree matches what multi_transform passes to 'train'."""
  return jax.tree.map(lambda l, x: x if l == "train" else optax.MaskedNode(), labels, tree)


def ema_decay(step, train_cfg):
  """method.md §6: EMA 0.9999, with a warm-up min(0.9999, (1 + s) / (10 + s)) by default."""
  d = jnp.asarray(train_cfg.ema_decay, jnp.float32)
  if train_cfg.ema_warmup:
    s = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
  return d
