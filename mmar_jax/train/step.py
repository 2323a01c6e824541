"""The train state and the jitted, sharded train step.

State (a plain pytree, what checkpoints hold): step (completed updates, skipped ones included),
params (fp32 master weights, pure dict, layers stacked), opt_state, ema, skipped (non-finite
steps never applied).

Randomness (design.md): the step key is fold_in(key(seed), step); the batch's mask ratio comes from
fold_in(step key, 0) and every per-example draw from fold_in(fold_in(step key, 1), global example
index), so any mesh and any number of processes see the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmar_jax.data.pipeline import generation_samples
from mmar_jax.models.mmar import MMAR, MMARConfig, combine, prepare_step
from mmar_jax.parallel import sharding
from mmar_jax.train import optimizer as opt


@dataclasses.dataclass
class Trainer:
  config: ml_collections.ConfigDict
  model_cfg: MMARConfig
  mesh: Mesh
  graphdef: Any
  abstract_state: Any  # nnx.State of abstract params (with logical-axis metadata)
  tx: optax.GradientTransformation
  sched: Callable
  state_shardings: dict

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(("data", "fsdp")))

  def model(self, params) -> MMAR:
    return nnx.merge(self.graphdef, params)


def build(config: ml_collections.ConfigDict, model_cfg: MMARConfig, mesh: Mesh) -> Trainer:
  if model_cfg.backbone.fuse_projections and mesh.shape.get("tensor", 1) > 1:
    raise ValueError(f"model.fuse_projections with a tensor-parallel mesh {dict(mesh.shape)}: the "
                     "fused matmul would gather the head-sharded kernels; turn one of them off")
  abstract = nnx.eval_shape(lambda: MMAR(model_cfg, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_state = nnx.split(abstract)
  rules = config.sharding_rules
  pspecs = sharding.param_specs(abstract_state, mesh, rules)
  special = (model_cfg.boi_id, model_cfg.eoi_id)
  tx, sched = opt.make_optimizer(abstract_state, config.train, config.steps, special)
  abstract_params = abstract_state.to_pure_dict()
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Frozen leaves have no optimizer state (MaskedNode): keep them as they are.
  opt_specs = optax.tree_map_params(
      tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s, abstract_opt, pspecs,
      transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))
  specs = dict(step=P(), skipped=P(), params=pspecs, ema=pspecs, opt_state=opt_specs)
  return Trainer(config=config, model_cfg=model_cfg, mesh=mesh, graphdef=graphdef,
                 abstract_state=abstract_state, tx=tx, sched=sched,
                 state_shardings=sharding.named(mesh, specs))


def init_state(tr: Trainer) -> dict:
  """Initialises the state directly into its shardings: no device ever holds the full model."""

  def init():
    params = nnx.split(MMAR(tr.model_cfg, rngs=nnx.Rngs(tr.config.seed)))[1].to_pure_dict()
    return dict(step=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32), params=params,
                ema=params, opt_state=tr.tx.init(params))

  with jax.set_mesh(tr.mesh), sharding.use_rules(tr.config.sharding_rules):
    return jax.jit(init, out_shardings=tr.state_shardings)()


def abstract_train_state(tr: Trainer) -> dict:
  """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
  def init():
    params = tr.abstract_state.to_pure_dict()
    return dict(step=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32), params=params,
                ema=params, opt_state=tr.tx.init(params))
  shapes = jax.eval_shape(init)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, tr.state_shardings)


def _split_micro(tree, accum: int):
  return jax.tree.map(lambda a: a.reshape(accum, a.shape[0] // accum, *a.shape[1:]), tree)


def loss_rows(config, model_cfg: MMARConfig) -> dict:
  """`MMAR.loss_sums`' keyword arguments from the config's `loss.text_rows`, `loss.vocab_tiles`
  and `loss.head_rows`, for one micro-batch (a micro-batch may hold all of the batch's
  generation samples, so its head capacity is the smaller of the two)."""
  lcfg = config.loss
  if lcfg.text_rows not in ("targets", "all"):
    raise ValueError(f"loss.text_rows must be targets or all, got {lcfg.text_rows!r}")
  if lcfg.head_rows not in ("generation", "all"):
    raise ValueError(f"loss.head_rows must be generation or all, got {lcfg.head_rows!r}")
  if int(lcfg.vocab_tiles) < 0:
    raise ValueError(f"loss.vocab_tiles must be >= 0, got {lcfg.vocab_tiles}")
  micro = int(config.train.batch_size) // int(config.train.grad_accum)
  head = None
  if lcfg.head_rows == "generation":
    head = min(micro, generation_samples(config.data.mix, config.train.batch_size))
  return dict(target_rows=model_cfg.max_text_len + 1 if lcfg.text_rows == "targets" else None,
              vocab_tiles=int(lcfg.vocab_tiles), head_samples=head)


def make_train_step(tr: Trainer):
  """A jitted (state, batch) -> (state, metrics); the state buffers are donated."""
  cfg = tr.config
  accum = int(cfg.train.grad_accum)
  lcfg = cfg.loss
  rows = loss_rows(cfg, tr.model_cfg)

  def step_fn(state, batch):
    step = state["step"]
    prep = prepare_step(tr.model(state["params"]), batch, cfg.seed, step, lcfg)
    counts = {k: prep.pop(k) for k in ("text_count", "image_count")}  # the batch's scalars
    ratio = prep.pop("mask_ratio")

    def micro_loss(params, micro):
      sums = tr.model(params).loss_sums(micro, **rows)
      loss, parts = combine(sums, counts, lcfg.image_weight, lcfg.text_weight)
      return loss, dict(parts, head_rows_dropped=sums["dropped"])

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if accum == 1:
      (loss, parts), grads = grad_fn(state["params"], prep)
    else:
      def body(carry, micro):
        (l, p), g = grad_fn(state["params"], micro)
        return jax.tree.map(jnp.add, carry, (l, p, g)), None
      zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros([]), {"loss_image": jnp.zeros([]),
                                                            "loss_text": jnp.zeros([]),
                                                            "head_rows_dropped": jnp.zeros(
                                                                [], jnp.int32)},
                                            state["params"]))
      (loss, parts, grads), _ = jax.lax.scan(body, zeros, _split_micro(prep, accum))
    grad_norm = optax.global_norm(grads)
    if cfg.train.check_finite:  # debugging switch: stop at the first non-finite loss (host sync)
      chex.assert_tree_all_finite((loss, parts))
    # A step whose batch had more generation samples than the head's static rows is not applied
    # (the loop then stops, naming the keys): never a gradient that silently left rows out.
    finite = jnp.isfinite(grad_norm) & (parts["head_rows_dropped"] == 0)
    updates, new_opt = tr.tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_params = keep(new_params, state["params"])
    new_opt = keep(new_opt, state["opt_state"])
    d = opt.ema_decay(step, cfg.train)
    new_ema = jax.tree.map(lambda e, p: jnp.where(finite, d * e + (1 - d) * p, e), state["ema"],
                           new_params)
    m = tr.sched(step)
    metrics = dict(loss=loss, grad_norm=grad_norm, mask_ratio=ratio,
                   lr=jnp.asarray(cfg.train.lr * m, jnp.float32),
                   lr_backbone=jnp.asarray(cfg.train.lr_backbone * m, jnp.float32),
                   skipped_steps=state["skipped"] + (~finite).astype(jnp.int32), **parts)
    new_state = dict(step=step + 1, skipped=metrics["skipped_steps"], params=new_params,
                     ema=new_ema, opt_state=new_opt)
    return new_state, metrics

  jitted = jax.jit(step_fn, in_shardings=(tr.state_shardings, tr.batch_sharding),
                   out_shardings=(tr.state_shardings, None), donate_argnums=(0,))
  checked = chex.chexify(jitted, async_check=False) if cfg.train.check_finite else jitted

  @functools.wraps(step_fn)
  def run(state, batch):
    with jax.set_mesh(tr.mesh), sharding.use_rules(cfg.sharding_rules):
      return checked(state, batch)

  run.jitted = jitted
  return run
