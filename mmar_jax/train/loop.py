"""The training loop: its workdir, resuming and preemption (the command is commands/train.py).

Resuming: the config is resolved as train/workdir.py says. `step` counts completed updates; checkpoints/<s>/ holds the state after s updates and the data
position (the global example index the next step starts at), so a resumed run reads the examples
an uninterrupted one would have, on any number of processes (data/pipeline.py).

Preemption: SIGTERM makes the run finish its step, save it and exit 0 (`Preemption`).
Several processes (`jax.distributed`, joined by the command before any JAX computation) run
this same program; each builds only its rows of every global batch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from mmar_jax import config as config_lib
from mmar_jax.data import token_stats
from mmar_jax.data.pipeline import local_rows, make_batcher, to_global
from mmar_jax.data.sources import make_source
from mmar_jax.parallel import distributed, sharding
from mmar_jax.train import flops as flops_lib
from mmar_jax.train import init_from
from mmar_jax.train.checkpoint import Checkpointer
from mmar_jax.train.metrics import MetricsWriter, environment, peak_flops
from mmar_jax.train.numerics import make_precision_probe
from mmar_jax.train.step import abstract_train_state, init_state, make_train_step
from mmar_jax.train.workdir import setup

log = logging.getLogger("mmar_jax.train")

class Preemption:
  """SIGTERM (a preemption notice) sets a flag checked every step; with several processes all
  agree on the step through JAX's preemption sync point (its coordination service catches the
  signal on each host), so they all save the same step.

  Installed before the model is built, so a notice that comes while compiling is not lost: the
  run then saves after its first step."""

  def __init__(self):
    self.flag = False
    self.multi = jax.process_count() > 1
    self.previous = None
    if not self.multi and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, *_):
    self.flag = True

  def close(self):
    """Gives SIGTERM back to whoever had it (train() may run inside a longer-lived process)."""
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
      self.previous = None

  def reached(self, step: int) -> bool:
    if self.multi:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.flag


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
          progress: bool = True) -> dict:
  """Trains until `config.steps` (or `stop_at`); returns the final state. Resumes from the latest
  checkpoint in `workdir`. SIGTERM makes it save and raise SystemExit(0)."""
  preempt = Preemption()
  try:
    return _train(config, workdir, preempt, stop_at, progress)
  finally:
    preempt.close()


def _train(config, workdir, preempt, stop_at, progress):
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  _refuse_cpu_mesh(config)
  token_stats.fill_config(config)  # a new run with model.image.norm=data
  tokenizer, mcfg, tr = setup(config, workdir)
  if jax.process_index() == 0:
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    (wd / "env.json").write_text(json.dumps(environment(), indent=2, sort_keys=True) + "\n")
    if not (wd / "tokenizer").exists():
      tokenizer.save(str(wd / "tokenizer"))
    (wd / "model_config.json").write_text(json.dumps(mcfg.to_dict(), indent=2, sort_keys=True) + "\n")

  distributed.barrier("mmar_setup_done")  # the restore below starts with collectives
  ckpt = Checkpointer(wd, keep=config.train.keep_checkpoints, save_every=config.train.checkpoint_every)
  latest = ckpt.latest_step()
  batch_size = int(config.train.batch_size)
  position = 0
  if latest is not None:
    state, meta = ckpt.restore(latest, abstract_train_state(tr))
    position = int(meta.get("data_position", latest * batch_size))
    log.info("resuming from %s at step %d, global example %d", ckpt.directory / str(latest),
             latest, position)
  else:
    state = init_state(tr)
    state = load_pretrained(config, tr, state)
  start = int(jax.device_get(state["step"]))
  total = int(config.steps if stop_at is None else min(stop_at, config.steps))
  if start >= total:
    log.info("step %d already reached %d: nothing to do", start, total)
    ckpt.close()
    return state

  batcher = make_batcher(config, make_source(config), tokenizer, mcfg.max_text_len)
  batcher.resume(start, position)
  rows = local_rows(tr.batch_sharding, batch_size)  # the global batch rows this process builds
  batches = batcher.batches(start, rows, threads=config.data.threads, prefetch=config.data.prefetch)
  put = lambda local: to_global(local, tr.batch_sharding, batch_size)
  step_fn = make_train_step(tr)
  probe, every = None, int(config.train.precision_every)
  if every > 0:  # the head's bf16-vs-fp32 error by timestep bucket (train/numerics.py)
    probe = make_precision_probe(tr)
  writer = MetricsWriter(wd)
  flops_per_step = flops_lib.train_step_flops(mcfg, config)
  peak = peak_flops(override=config.peak_flops)
  bar = _progress(total, start, progress and jax.process_index() == 0)
  meta = lambda s: dict(step=s, data_position=batcher.position(s), batch_size=batch_size,
                        seed=config.seed, process_count=jax.process_count(),
                        mesh=[int(n) for n in tr.mesh.devices.shape])
  local = next(batches)
  nxt = put(local)
  step_fn = _compiled(step_fn, tr, state, nxt)
  t_last, last_logged = time.perf_counter(), start
  for step in range(start, total):
    batch, text_len = nxt, local["text_len"]
    state, metrics = step_fn(state, batch)
    if step + 1 < total:  # build the next batch while the device works
      local = next(batches)
      nxt = put(local)
    done = step + 1
    probed = probe is not None and done % every == 0
    if done % config.train.log_every == 0 or done == start + 1 or done == total or probed:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      step_time = (now - t_last) / max(done - last_logged, 1)
      t_last, last_logged = now, done
      # From this process's rows (a global batch spans processes), scaled to the whole batch.
      text_tokens = float(np.sum(text_len)) * batch_size / len(rows)
      tokens = text_tokens + batch_size * (mcfg.num_image_tokens + 2)
      record = {k: float(v) for k, v in metrics.items()}
      record.update(step=done, skipped_steps=int(metrics["skipped_steps"]), step_time_s=step_time,
                    tokens_per_s=tokens / step_time,
                    mfu=(flops_per_step / step_time / (peak * jax.device_count())) if peak else None,
                    data_skipped=batcher.counters.skipped, data_truncated=batcher.counters.truncated)
      if probed:  # measured after the step time, so the probe's cost is not counted as a step's
        record.update({k: float(v) for k, v in jax.device_get(probe(state, batch)).items()})
        t_last = time.perf_counter()
      writer.write(record)
      if record["head_rows_dropped"]:  # that step was not applied (train/step.py)
        raise config_lib.ConfigError(
            f"step {done}: the batch held {int(record['head_rows_dropped'])} more generation "
            "samples than the diffusion head's static rows (data.mix x train.batch_size fixes "
            "them per batch; data/pipeline.py); set loss.head_rows=all to run the head on every "
            "row")
      line = (f"step {done}/{total} loss {record['loss']:.4f} text {record['loss_text']:.4f} "
              f"image {record['loss_image']:.4f} grad_norm {record['grad_norm']:.3f} "
              f"lr {record['lr']:.2e} {step_time:.3f}s/step")
      if jax.process_index() == 0:  # one console line per step, not one per host
        bar.write(line) if bar else print(line, flush=True)
    if bar:
      bar.update(1)
    if preempt.reached(done):
      ckpt.save(done, state, meta(done), force=True)
      ckpt.close()
      writer.close()
      if bar:
        bar.close()
      log.warning("preemption notice: saved step %d and stopping", done)
      raise SystemExit(0)
    ckpt.save(done, state, meta(done), force=(done == total))
  ckpt.close()
  writer.close()
  if bar:
    bar.close()
  return state


def _compiled(step_fn, tr, state, batch):
  """The train step compiled ahead of its first call, on every process before any of them runs
  it (a collective's peers must join it together; see distributed.barrier)."""
  with jax.set_mesh(tr.mesh), sharding.use_rules(tr.config.sharding_rules):
    compiled = step_fn.jitted.lower(state, batch).compile()
  distributed.barrier("mmar_train_step_compiled")
  return compiled


def _progress(total, start, enabled):
  if not enabled:
    return None
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
              mininterval=1.0)


def _refuse_cpu_mesh(config):
  """A multi-device mesh on a CPU backend means jax[tpu]/jax[cuda] is missing, unless simulated
  devices were asked for (XLA_FLAGS device count)."""
  if jax.default_backend() == "cpu" and jax.device_count() > 1:
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      raise config_lib.ConfigError("several CPU devices without --cpu-devices: is the accelerator "
                                   "build of jax installed?")


def load_pretrained(config, tr, state):
  """`init.backbone` / `init.vae` / `init.head` into the freshly initialised state."""
  return init_from.apply(config, tr, state)
