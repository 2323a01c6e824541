"""Orbax checkpoints in WORKDIR/checkpoints/<step>/ (local or gs://): the train state plus a JSON
`meta` item.

What a checkpoint holds (design.md, the workdir): `state` = {step, skipped, params (layers
stacked), ema, opt_state}, the image tokenizer's (VAE's) weights included in params; `meta` =
the data position as a global example index (the first example the next step reads), the batch
size, seed and topology it was written with. The RNG needs no storage: every draw of training is
a function of (seed, step, global example index), and the seed is in config.json (and meta).
Because the data position is one global index, a run resumes on any number of processes.

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it (locally;
on gs:// it writes a commit marker last), so a process killed mid-save leaves only a temporary
directory, which `latest_step` never returns and the next start deletes. Saves are asynchronous:
`save` returns once the arrays are copied off the devices; the files are written in the
background while training goes on. Restores go against an abstract target whose leaves carry
shardings, so a checkpoint restores on another mesh shape or number of processes.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:

  def __init__(self, workdir, *, keep: int = 3, save_every: int = 500, async_save: bool = True,
               read_only: bool = False):
    self._ocp = ocp
    # Orbax refuses relative paths (in its background save thread, after the step): a local
    # --workdir such as the README's `workdirs/demo` is made absolute here.
    local = "://" not in os.fspath(workdir)
    self.directory = (epath.Path(os.path.abspath(workdir)) if local else epath.Path(workdir)) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only,
        # Leftovers of a save that was killed: never a checkpoint, only clutter.
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self.save_every = save_every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def due(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: dict, meta: dict, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` after `step` updates if one is due (or `force`)."""
    ocp = self._ocp
    if not (force or self.due(step)) or step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """(state, meta); `abstract_state` leaves are ShapeDtypeStructs with the target shardings."""
    ocp = self._ocp
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int) -> dict:
    ocp = self._ocp
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def checkpoint_steps(workdir) -> list[int]:
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def pick_step(workdir, step: int | None) -> int:
  """`step`, or the latest; a missing checkpoint is a FileNotFoundError naming what exists."""
  steps = checkpoint_steps(workdir) if (epath.Path(workdir) / "checkpoints").exists() else []
  where = epath.Path(workdir) / "checkpoints"
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {where}")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {where} (have {sorted(steps)})")
  return step


def restore_params(workdir, step: int | None, which: str, abstract_params: dict) -> tuple[dict, int]:
  """Only the params (or EMA) of a checkpoint, for export and sampling: (params, step).
  `abstract_params` leaves carry the shardings (or a single device) to restore onto."""
  if which not in ("ema", "raw"):
    raise ValueError(f"--params must be ema or raw, got {which!r}")
  step = pick_step(workdir, step)
  key = "ema" if which == "ema" else "params"
  target = {key: abstract_params}
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), target),
            partial_restore=True)))
  finally:
    ckpt.close()
  return out["state"][key], step
