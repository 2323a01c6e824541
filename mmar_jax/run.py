"""A training run opened from its workdir: the one way sampling, evaluation, export, diagnostics
and the repro checks load a run.

`Run(workdir)` resolves the stored config (WORKDIR/config.json, then any `--config.key=value`
overrides, shape keys refused as on resume), the workdir's tokenizer and the model config; the
trainer (mesh, shardings, graphdef) is built on first use, so an export that only reads weights
onto the host needs no mesh. `params()` restores a checkpoint's EMA or raw params (or one module
of them: orbax then reads only that subtree).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import jax
import numpy as np
from etils import epath
from flax import nnx

from mmar_jax.errors import ConversionError
from mmar_jax.models.mmar import MMAR
from mmar_jax.parallel import sharding
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.train.checkpoint import restore_params
from mmar_jax.train.step import build
from mmar_jax.train.workdir import model_setup, resolve_config


class Run:

  def __init__(self, workdir, overrides=()):
    wd = epath.Path(workdir)
    if not wd.is_dir():
      raise FileNotFoundError(f"workdir not found: {workdir}")
    if not (wd / "config.json").exists():
      raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json)")
    # Orbax reports through absl at WARNING that a read-only restore is read-only: not news.
    logging.getLogger("absl").setLevel(logging.ERROR)
    self.workdir = str(workdir)
    self.config = resolve_config(workdir, None, list(overrides))
    self.tokenizer, self.model_cfg = model_setup(self.config, workdir)

  @functools.cached_property
  def trainer(self):
    """The run's Trainer on the config's mesh (graphdef, shardings, optimizer)."""
    return build(self.config, self.model_cfg, make_mesh(self.config.mesh, self.config.mesh_dcn))

  def abstract_params(self, on_host: bool = False) -> dict:
    """ShapeDtypeStructs of the params: sharded over the run's mesh, or on this host's first CPU
    device (nothing allocated either way)."""
    if on_host:
      shapes = nnx.split(nnx.eval_shape(lambda: MMAR(self.model_cfg, rngs=nnx.Rngs(0))))[1]
      device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
      return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes.to_pure_dict())
    tr = self.trainer
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        jax.eval_shape(lambda: tr.abstract_state.to_pure_dict()),
                        tr.state_shardings["params"])

  def params(self, step: int | None = None, which: str = "ema", *, module: str | None = None,
             on_host: bool = False) -> tuple[dict, int]:
    """(params, step) of checkpoint `step` (default: the latest): EMA or raw weights, the whole
    model or one top-level module; on the run's mesh, or as numpy arrays on the host."""
    target = self.abstract_params(on_host)
    if module is not None:
      if module not in target or not jax.tree.leaves(target[module]):
        raise ConversionError(f"the model in {self.workdir} has no {module!r} parameters "
                              f"(modules: {sorted(k for k in target if jax.tree.leaves(target[k]))})")
      target = {module: target[module]}
    params, step = restore_params(self.workdir, step, which, target)
    if on_host:
      params = jax.tree.map(np.asarray, params)
    return (params[module] if module is not None else params), step

  def model(self, params):
    """The MMAR module holding `params` (merging copies no arrays)."""
    return self.trainer.model(params)

  def context(self):
    """The run's mesh and sharding rules, under which activations are constrained as in training."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.trainer.mesh))
    stack.enter_context(sharding.use_rules(self.config.sharding_rules))
    return stack
