"""Orbax checkpoints in WORKDIR/checkpoints/<step>/: the train state plus a JSON `meta` item
(the data position as a global example index, the config's shape keys).

Saves are asynchronous; orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save never leaves a step that `latest_step` would pick. Restores go
against an abstract target with shardings, so a checkpoint restores on another mesh shape or
process count.
"""

from __future__ import annotations

import jax
from etils import epath


class Checkpointer:

  def __init__(self, workdir, *, keep: int = 3, save_every: int = 500, async_save: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self.save_every = save_every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, meta: dict, force: bool = False) -> bool:
    ocp = self._ocp
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
    ocp = self._ocp
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    ocp = self._ocp
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(workdir, step: int | None, which: str, abstract_params: dict) -> tuple[dict, int]:
  """Only the params (or EMA) of a checkpoint, for export and sampling: (params, step)."""
  import orbax.checkpoint as ocp
  if which not in ("ema", "raw"):
    raise ValueError(f"--params must be ema or raw, got {which!r}")
  ckpt = Checkpointer(workdir, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory} (have {steps})")
  key = "ema" if which == "ema" else "params"
  target = {key: abstract_params}
  out = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(
          lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), target),
          partial_restore=True)))
  ckpt.close()
  return out["state"][key], step

