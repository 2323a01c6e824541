"""`convert safetensors-to-jax --src DIR --out WORKDIR [--step N] [--overwrite]`: the way back from
PyTorch into a training run.

DIR is a `convert jax-to-safetensors` output whose tensors may have been changed in PyTorch
(names and layout: convert/whole_model.py). The command makes a NEW training workdir from it:
  config.json        the source run's training config, as mmar_config.json records it (`run_config`)
  model_config.json  the model it implies, which must equal mmar_config.json's `model`
  tokenizer/         DIR/tokenizer
  checkpoints/<N>/   one checkpoint in the trainer's own layout (train/step.py), N the exported
                     step or --step: params = ema = the tensors, a fresh optimizer state (the
                     optimizer's init, as a new run has it), `skipped` 0, and a data position
                     that continues the source run's example stream at step N
so `mmar-jax train --workdir WORKDIR` resumes from it (raise `--config.steps` past N to train on)
and `generate`, `caption`, `eval` and the exports read it like any run.

Why a new workdir and not a new step in the source run: the source run may live elsewhere or be
read-only (a bucket, a colleague's directory, or gone: DIR is all the user has), and its optimizer
moments belong to the weights it trained, not to weights edited elsewhere; a fresh workdir keeps
the old run untouched and makes the break in its history visible.

dtype: params are stored in the run's param dtype (fp32). A `--dtype bf16` export is read back
bit for bit and cast up, which is exact but does not bring back the bits bf16 rounded away.

The output is written atomically (files.atomic_output): an existing --out is refused unless
--overwrite, and on any error nothing is left behind and an existing --out is untouched.

Nothing heavy is imported at module level: the command line builds its parser from `add_args`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
from etils import epath

from mmar_jax.convert import safetensors_io as sio
from mmar_jax.convert import whole_model
from mmar_jax.convert.whole_model import read_export_config as read
from mmar_jax.errors import ConversionError
from mmar_jax.files import atomic_output
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.train.checkpoint import Checkpointer
from mmar_jax.train.step import abstract_train_state, build
from mmar_jax.train.workdir import model_setup, resolve_config


def add_args(p):
  p.add_argument("--src", required=True, help="a `convert jax-to-safetensors` output directory")
  p.add_argument("--out", required=True, help="the new training workdir")
  p.add_argument("--step", type=int, default=None,
                 help="the new run's step counter (default: the step mmar_config.json records)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def read_export_config(src: str) -> dict:
  """mmar_config.json of a jax-to-safetensors output, with the keys the way back needs."""
  return read(src, ("model", "step", "run_config"))


def train_state(config, mcfg, params: dict, step: int) -> dict:
  """The train state of a run at `step` holding `params` as weights and EMA, with everything else
  as a fresh run has it; checked against the structure the trainer restores."""
  cpu = jax.local_devices(backend="cpu")[0]
  # One host device: a checkpoint's layout does not depend on the mesh it was written from
  # (restores go against the reader's shardings), and this machine need not have the run's chips.
  tr = build(config, mcfg, make_mesh("1,1,1", devices=[cpu]))
  with jax.default_device(cpu):
    params = jax.tree.map(lambda a: jax.device_put(a, cpu), params)
    state = dict(step=jnp.asarray(step, jnp.int32), skipped=jnp.zeros([], jnp.int32),
                 params=params, ema=params, opt_state=tr.tx.init(params))
  target = abstract_train_state(tr)
  if jax.tree.structure(state) != jax.tree.structure(target):
    raise ConversionError("the imported state's structure differs from the trainer's: "
                          f"{jax.tree.structure(state)} vs {jax.tree.structure(target)}")
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(target)):
    if (got.shape, got.dtype) != (want.shape, want.dtype):
      raise ConversionError(f"state{jax.tree_util.keystr(path)} is {got.dtype}{list(got.shape)}, "
                            f"the trainer restores {want.dtype}{list(want.shape)}")
  return state


def safetensors_to_workdir(src: str, out: str, *, step: int | None = None,
                           overwrite: bool = False) -> tuple[int, list[str]]:
  """Builds the training workdir `out` from the export `src` (module docstring); returns (its
  step, the dtypes the tensors were stored in)."""
  if "://" in out:
    raise ConversionError(f"--out {out}: write the workdir locally, then copy it (the output is "
                          "made atomically by a local rename)")
  if os.path.exists(out) and not overwrite:  # before any work; atomic_output checks again
    raise ConversionError(f"output {os.path.abspath(out)} exists; pass --overwrite to replace it")
  if os.path.abspath(out) == os.path.abspath(src):
    raise ConversionError(f"--out {out} is --src: the new workdir must be another directory")
  recorded = read_export_config(src)
  step = int(recorded["step"] if step is None else step)
  if step < 0:
    raise ConversionError(f"--step {step}: a step counts updates, it cannot be negative")
  with atomic_output(out, overwrite) as tmp:
    (epath.Path(tmp) / "config.json").write_text(
        json.dumps(recorded["run_config"], indent=2, sort_keys=True) + "\n")
    tok = os.path.join(src, "tokenizer")
    if os.path.isdir(tok):
      shutil.copytree(tok, os.path.join(tmp, "tokenizer"))
    # The config and tokenizer exactly as `train --workdir` will read them back.
    config = resolve_config(tmp, None, [])
    _, mcfg = model_setup(config, tmp)
    whole_model.check_model_config(recorded["model"], mcfg, os.path.join(src, whole_model.CONFIG_FILE))
    with sio.CheckpointDir(src) as ckpt:
      specs = ckpt.specs()
      whole_model.check_tensors(specs, mcfg)  # from the headers, before reading anything
      stored = sorted({spec.dtype.name for spec in specs.values()})
      params = whole_model.params_from_tensors(ckpt.get, ckpt.keys(), mcfg)
    state = train_state(config, mcfg, params, step)
    batch = int(config.train.batch_size)
    # The source run's example stream, continued at `step` (data/pipeline.py: one example index
    # per step and row), so a resumed run does not re-read what the exported weights were fed.
    position = recorded.get("data_position")
    position = (step * batch if position is None
                else max(int(position) + (step - int(recorded["step"])) * batch, 0))
    meta = dict(step=step, data_position=position, batch_size=batch, seed=int(config.seed),
                process_count=1, mesh=[1, 1, 1], imported_from=os.path.abspath(src))
    ckptr = Checkpointer(tmp, keep=config.train.keep_checkpoints,
                         save_every=config.train.checkpoint_every, async_save=False)
    try:
      ckptr.save(step, state, meta, force=True)
    finally:
      ckptr.close()
    (epath.Path(tmp) / "model_config.json").write_text(
        json.dumps(mcfg.to_dict(), indent=2, sort_keys=True) + "\n")
  return step, stored


def cli_safetensors_to_jax(args) -> int:
  step, stored = safetensors_to_workdir(args.src, args.out, step=args.step,
                                        overwrite=args.overwrite)
  cast = [d for d in stored if d != "float32"]
  print(f"safetensors-to-jax: {args.src} -> training workdir {args.out} at step {step} "
        f"(params = ema = the tensors, fresh optimizer state"
        + (f"; {'/'.join(cast)} tensors cast up to float32, exactly" if cast else "")
        + f"); `mmar-jax train --workdir {args.out} --config.steps=N` trains on from it",
        file=sys.stderr, flush=True)
  return 0
