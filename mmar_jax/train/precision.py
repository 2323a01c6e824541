"""The training-time precision monitor (`train.precision_every`): every so many steps, the bf16 vs
fp32 error of the head on the rows of the step just taken (models/head_precision.py)."""

from __future__ import annotations

import jax

from mmar_jax.models.head_precision import head_precision_metrics
from mmar_jax.models.mmar import prepare_step
from mmar_jax.parallel import sharding


def make_precision_probe(tr):
  """A jitted (state, batch) -> `head_precision_metrics` of the raw params, on the draws of the
  step that produced `state` (those of step state.step - 1, as `make_train_step` made them)."""
  cfg = tr.config

  def probe(state, batch):
    model = tr.model(state["params"])
    prep = prepare_step(model, batch, cfg.seed, state["step"] - 1, cfg.loss)
    hidden, _, lay = model.forward(prep)
    return head_precision_metrics(state["params"]["head"], tr.model_cfg.head,
                                  **model.head_rows(prep, hidden, lay))

  jitted = jax.jit(probe, in_shardings=(tr.state_shardings, tr.batch_sharding))

  def run(state, batch):
    with jax.set_mesh(tr.mesh), sharding.use_rules(cfg.sharding_rules):
      return jitted(state, batch)

  return run
