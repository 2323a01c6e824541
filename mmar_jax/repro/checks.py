"""The reproducibility checks behind `mmar-jax repro`.

Each check is a function returning a `Result` (pass / fail / skip, the measured value, the
tolerance it was held to, a detail line). Checks are self-contained on tiny shapes: they make
their own tiny workdirs and checkpoints under a scratch directory. With `--workdir` the train-based
checks run against the user's own run instead (restore a checkpoint, re-run a few steps, compare
with the run's logged metrics.jsonl / stored checkpoints).

Every check takes keyword-only "break it on purpose" switches (a different seed, a skipped batch,
draws keyed by device, ...) that the test suite uses to prove the check can fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from mmar_jax import config as config_lib
from mmar_jax.commands import diagnose
from mmar_jax.convert import mar_head, mar_vae, safetensors_io
from mmar_jax.convert.hf import hf_to_jax, jax_to_hf, read_model_config
from mmar_jax.data.pipeline import Batcher
from mmar_jax.data.sources import make_source
from mmar_jax.data.text_tokenizer import load_text_tokenizer
from mmar_jax.files import load_params
from mmar_jax.models.diffusion_head import DiffusionHead, HeadConfig
from mmar_jax.models.mmar import model_config
from mmar_jax.models.qwen2 import Qwen2, Qwen2Config
from mmar_jax.models.vae import VAE, VAEConfig
from mmar_jax.parallel.mesh import make_mesh
from mmar_jax.repro import hf_parity, torch_parity
from mmar_jax.sample.image import generate_images
from mmar_jax.train import numerics
from mmar_jax.train.checkpoint import Checkpointer, checkpoint_steps
from mmar_jax.train.metrics import environment, read_metrics
from mmar_jax.train.step import abstract_train_state, build, init_state, make_train_step
from mmar_jax.train.workdir import model_setup, resolve_config

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")  # package data


@dataclasses.dataclass
class Result:
  name: str
  status: str  # pass | fail | skip
  value: Any = None
  tolerance: Any = None
  detail: str = ""

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _verdict(name, ok: bool, value, tolerance, detail="") -> Result:
  return Result(name, "pass" if ok else "fail", value, tolerance, detail)


# -- a few steps of training, in process ----------------------------------------------------------


def run_steps(config, steps: int, *, mesh: str | None = None, state=None, start: int = 0,
              skip_batch: int | None = None, key_by_device: bool = False, devices=None):
  """Runs `steps` train steps from `start` on the config's data; returns (losses, state, trainer).

  skip_batch: a step that consumes the next step's batch instead (a data-order bug).
  key_by_device: per-example draws keyed by the example's position inside its device shard
  instead of its global index (the bug the mesh check exists for)."""
  tokenizer = load_text_tokenizer(config.text_tokenizer)
  mcfg = model_config(config, tokenizer)
  shape = config_lib.parse_mesh(mesh or config.mesh)
  if devices is None and -1 not in shape:  # an explicit small mesh: the first devices
    devices = jax.devices()[:int(np.prod(shape))]
  tr = build(config, mcfg, make_mesh(mesh or config.mesh, config.mesh_dcn, devices=devices))
  if state is None:
    state = init_state(tr)
  else:
    state = jax.device_put(state, tr.state_shardings)
  batcher = Batcher(make_source(config), tokenizer, batch_size=config.train.batch_size,
                    max_text_len=mcfg.max_text_len, seed=config.seed, mix=config.data.mix,
                    random_flip=config.data.random_flip, long_caption=config.data.long_caption)
  step_fn = make_train_step(tr)
  shards = tr.mesh.shape["data"] * tr.mesh.shape["fsdp"]
  losses = []
  for s in range(start, start + steps):
    batch = batcher.local_batch(s + 1 if s == skip_batch else s)
    if key_by_device:
      per = len(batch["index"]) // shards
      batch["index"] = (np.arange(len(batch["index"])) % per).astype(np.int32)
    state, metrics = step_fn(state, global_batch_from(batch, tr))
    losses.append(float(metrics["loss"]))
  return np.asarray(losses), state, tr


def global_batch_from(local: dict, tr):
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(tr.batch_sharding, a), local)


def _params_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


# -- the checks ----------------------------------------------------------------------------------


def check_determinism(config=None, *, steps: int = 4, seed_b: int | None = None,
                      workdir=None) -> Result:
  """Two runs with one seed: bit-identical losses, parameters and samples. With `workdir`: the
  run's own steps, replayed from a checkpoint, against its logged metrics.jsonl."""
  if workdir:
    return _replay_run("determinism", workdir, atol=0.0)
  config = config or config_lib.load("tiny")
  cfg_b = config_lib.apply_overrides(config_lib.from_dict(config_lib.to_dict(config)),
                                     [("seed", str(seed_b))] if seed_b is not None else [])
  la, sa, tra = run_steps(config, steps)
  lb, sb, _ = run_steps(cfg_b, steps)
  same_params = _params_equal(sa["params"], sb["params"])
  samples_a = _samples(tra, sa["params"], config)
  samples_b = _samples(tra, sb["params"], config)
  diff = float(np.max(np.abs(la - lb)))
  ok = diff == 0.0 and same_params and np.array_equal(samples_a, samples_b)
  return _verdict("determinism", ok, diff, 0.0,
                  f"{steps} steps; params identical: {same_params}; "
                  f"samples identical: {np.array_equal(samples_a, samples_b)}")


# -- against a user's run ------------------------------------------------------------------------


def _run_context(workdir):
  """(config, env note, checkpoint steps, logged losses by step) of a training workdir."""
  config = resolve_config(workdir, None, [])
  env_path = epath.Path(workdir) / "env.json"
  note = ""
  if env_path.exists():
    then, now = json.loads(env_path.read_text()), environment()
    differ = [k for k in ("backend", "device_kind", "device_count") if then.get(k) != now.get(k)]
    differ += [f"{k} {then['versions'].get(k)}->{now['versions'].get(k)}"
               for k in ("jax", "jaxlib", "flax") if then.get("versions", {}).get(k) != now["versions"].get(k)]
    note = "; environment as recorded" if not differ else f"; environment differs: {differ}"
  logged = {m["step"]: m["loss"] for m in read_metrics(workdir)}
  return config, note, sorted(checkpoint_steps(workdir)), logged


def _run_devices(workdir):
  """The run's devices (as many as env.json records), so its mesh resolves as it did."""
  env_path = epath.Path(workdir) / "env.json"
  count = json.loads(env_path.read_text()).get("device_count") if env_path.exists() else None
  return jax.devices()[:count] if count and count <= jax.device_count() else None


def _restore(workdir, config, step, mesh=None, devices=None):
  _, mcfg = model_setup(config, workdir)
  tr = build(config, mcfg, make_mesh(mesh or config.mesh, config.mesh_dcn, devices=devices))
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    state, _ = ckpt.restore(step, abstract_train_state(tr))
  finally:
    ckpt.close()
  return state


def _replay_run(name, workdir, *, atol: float, mesh: str | None = None) -> Result:
  """Restore the earliest checkpoint followed by logged steps, re-run up to the last logged step
  before the next checkpoint, and compare the losses with metrics.jsonl."""
  config, note, steps, logged = _run_context(workdir)
  for s in steps:
    later = [k for k in logged if k > s]
    if later:
      break
  else:
    return Result(name, "skip", detail=f"{workdir}: no checkpoint followed by logged steps")
  end = min(later + [k for k in steps if k > s])
  targets = sorted(k for k in logged if s < k <= end)
  devices = None if mesh else _run_devices(workdir)
  state = _restore(workdir, config, s, mesh, devices)
  losses, _, _ = run_steps(config, end - s, state=state, start=s, mesh=mesh, devices=devices)
  ours = np.asarray([losses[k - s - 1] for k in targets])
  ref = np.asarray([logged[k] for k in targets])
  diff = float(np.max(np.abs(ours - ref)))
  return _verdict(name, diff <= atol, diff, atol,
                  f"steps {s + 1}..{end} replayed from checkpoint {s}"
                  + (f" on mesh {mesh}" if mesh else "") + f", {len(targets)} logged losses{note}")


def _samples(tr, params, config) -> np.ndarray:
  model = tr.model(jax.device_get(params))
  return generate_images(model, load_text_tokenizer(config.text_tokenizer), ["a red square at the top"],
                         jax.random.key(0), ar_steps=4, diffusion_steps=10, cfg=2.0)


def check_resume(config=None, *, steps: int = 6, skip_batch: bool = False, workdir=None) -> Result:
  """N steps straight equal N/2 + checkpoint + restart + N/2 (through a real orbax checkpoint).
  With `workdir`: a restart from one stored checkpoint reproduces the next one bit for bit."""
  if workdir:
    return _resume_run(workdir)
  config = config or config_lib.load("tiny")
  half = steps // 2
  straight, s_full, _ = run_steps(config, steps)
  first, s_half, tr = run_steps(config, half)
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = Checkpointer(tmp, async_save=False)
    ckpt.save(half, s_half, dict(step=half), force=True)
    ckpt.wait()
    restored, _ = ckpt.restore(half, abstract_train_state(tr))
    ckpt.close()
  second, s_end, _ = run_steps(config, steps - half, state=restored, start=half,
                               skip_batch=half if skip_batch else None)
  resumed = np.concatenate([first, second])
  diff = float(np.max(np.abs(resumed - straight)))
  same = _params_equal(s_full["params"], s_end["params"])
  return _verdict("resume", diff == 0.0 and same, diff, 0.0,
                  f"{steps} steps vs {half} + restart + {steps - half}; final params identical: {same}")


def check_mesh(config=None, *, steps: int = 4, meshes=("1,8,1", "2,2,2"), atol: float = 1e-5,
               key_by_device: bool = False, workdir=None) -> Result:
  """The same steps on two mesh shapes agree within `atol` (fp32 compute). With `workdir`: the
  run's logged steps replayed on another mesh (all devices on fsdp, or on data when the run
  used fsdp), within `atol` times 10 per the run's compute dtype."""
  if workdir:
    config, _, _, _ = _run_context(workdir)
    other = "1,-1,1" if config.mesh.replace(" ", "") != "1,-1,1" else "-1,1,1"
    tol = atol if config.model.compute_dtype == "float32" else 1e-2
    return _replay_run("mesh", workdir, atol=tol, mesh=other)
  config = config or config_lib.load("tiny")
  if jax.device_count() < 8:
    return Result("mesh", "skip", detail=f"needs 8 devices, have {jax.device_count()}")
  la, _, _ = run_steps(config, steps, mesh=meshes[0], key_by_device=key_by_device)
  lb, _, _ = run_steps(config, steps, mesh=meshes[1], key_by_device=key_by_device)
  diff = float(np.max(np.abs(la - lb)))
  return _verdict("mesh", diff <= atol, diff, atol, f"meshes {meshes[0]} vs {meshes[1]}, {steps} steps")


def _resume_run(workdir) -> Result:
  config, note, steps, _ = _run_context(workdir)
  if len(steps) < 2:
    return Result("resume", "skip", detail=f"{workdir}: needs two checkpoints, has {steps}")
  a, b = steps[-2], steps[-1]
  devices = _run_devices(workdir)
  state = _restore(workdir, config, a, devices=devices)
  _, ours, tr = run_steps(config, b - a, state=state, start=a, devices=devices)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    stored, _ = ckpt.restore(b, abstract_train_state(tr))
  finally:
    ckpt.close()
  same = _params_equal(ours["params"], stored["params"])
  worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
              zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(stored["params"])))
  return _verdict("resume", same, worst, 0.0,
                  f"restart from checkpoint {a} to {b} vs the stored checkpoint {b}{note}")


def golden_key() -> str:
  return f"{jax.default_backend()}|{jax.devices()[0].device_kind}|jax-{jax.__version__}"


def golden_losses(steps: int = 5) -> np.ndarray:
  config = config_lib.load("tiny", [("mesh", "1,1,1")])
  losses, _, _ = run_steps(config, steps, devices=jax.devices()[:1])
  return losses


GOLDEN_RTOL = {"cpu": 1e-6, "gpu": 1e-3, "tpu": 1e-3}


def check_golden(*, write: bool = False, path: str = GOLDEN, losses: np.ndarray | None = None) -> Result:
  """The first tiny-config losses against references kept in the repo, keyed by backend, device
  kind and JAX version: a dependency upgrade that changes the numbers is noticed."""
  key = golden_key()
  store = json.loads(open(path).read()) if os.path.exists(path) else {}
  if losses is None:
    losses = golden_losses()
  if write:
    store[key] = [float(x) for x in losses]
    with open(path, "w") as f:
      json.dump(store, f, indent=1, sort_keys=True)
      f.write("\n")
    return Result("golden", "pass", len(losses), None, f"wrote the reference for {key} to {path}")
  if key not in store:
    return Result("golden", "skip", None, None,
                  f"no reference for {key} in {path}; record one with `mmar-jax repro golden --write`")
  ref = np.asarray(store[key])
  if ref.shape != losses.shape:
    return Result("golden", "fail", None, None, f"reference has {ref.size} losses, measured {losses.size}")
  rtol = GOLDEN_RTOL.get(jax.default_backend(), 1e-3)
  rel = float(np.max(np.abs(losses - ref) / np.maximum(np.abs(ref), 1e-12)))
  return _verdict("golden", rel <= rtol, rel, rtol, f"{losses.size} losses vs {key}")


def check_hf_parity(*, hf_dir=None, atol: float = 1e-4, max_kl: float = 1e-6,
                    min_argmax: float = 0.999, seq_len: int = 576, prompt_ids=None,
                    dump_logits=None, perturb=None) -> Result:
  """The JAX backbone against the PyTorch model of a HuggingFace directory (a tiny random one
  by default). `perturb(params) -> params` edits the converted JAX weights."""
  r = hf_parity.check_hf_parity(hf_dir, prompt_ids=prompt_ids, seq_len=seq_len, atol=atol,
                                max_kl=max_kl, min_argmax=min_argmax, dump_logits=dump_logits,
                                perturb=perturb, log=print)
  return _verdict("hf-parity", bool(r["passed"]), r["max_abs_diff"], atol,
                  f"mean KL {r['mean_kl']:.2e} (max {max_kl}), argmax agreement "
                  f"{r['argmax_agree']:.4f} (min {min_argmax}), {r['seq_len']} tokens")


def check_torch_parity(config=None, *, workdir=None, perturb: str | None = None,
                       reference=None) -> Result:
  """The JAX MMAR against the PyTorch MMAR on the same weights and draws (repro/torch_parity.py):
  a random model of `config` (default tiny), or the EMA weights of `workdir`. `reference` reuses
  a computed JAX side."""
  r = torch_parity.compare(reference or torch_parity.reference(workdir, config), perturb,
                           log=lambda *_: None)
  tol = torch_parity.TOLERANCES
  worst = max(r[k] / tol[k] for k in tol)
  detail = ", ".join(f"{k} {r[k]:.1e} (max {tol[k]:.0e})" for k in tol)
  if "captions_equal" in r:
    detail += f", greedy captions {'identical' if r['captions_equal'] else 'DIFFER'}"
  return _verdict("torch-parity", bool(r["passed"]), worst, 1.0,
                  f"{detail}; worst / tolerance shown; {r['jax_seconds'] + r['torch_seconds']:.0f} s")


def check_roundtrip(*, perturb: str | None = None) -> Result:
  """HF Qwen2, MAR VAE and MAR head weights, JAX -> PyTorch layout -> JAX, bit for bit (the head
  keeps its prediction type through the file metadata). `perturb` names a part ('hf', 'vae',
  'head') whose PyTorch-side weights are nudged, to show the check can fail."""
  def nudge(sd, part):
    if perturb != part:
      return sd
    name = sorted(sd)[0]
    sd = dict(sd)
    sd[name] = np.asarray(sd[name]).copy()
    sd[name].reshape(-1)[0] += 1e-3
    return sd

  mismatched = []
  # Backbone: JAX params -> HF directory -> JAX.
  qcfg = Qwen2Config(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, tie_word_embeddings=False)
  params = nnx.split(Qwen2(qcfg, rngs=nnx.Rngs(1)))[1].to_pure_dict()
  with tempfile.TemporaryDirectory() as tmp:
    jax_to_hf(params, qcfg, os.path.join(tmp, "hf"))
    if perturb == "hf":
      path = os.path.join(tmp, "hf", "model.safetensors")
      sd = nudge(safetensors_io.read_all(path), "hf")
      safetensors_io.save_file(path, sd)
    hf_to_jax(os.path.join(tmp, "hf"), os.path.join(tmp, "back"))
    back = jax.device_get(load_params(os.path.join(tmp, "back")))
    read_model_config(os.path.join(tmp, "back"))
  if not _params_equal(params, back):
    mismatched.append("hf")
  # VAE: JAX -> MAR state dict -> JAX.
  vcfg = VAEConfig(ch=32, ch_mult=(1, 2), embed_dim=4, z_channels=4)
  vparams = nnx.split(VAE(vcfg, rngs=nnx.Rngs(2)))[1].to_pure_dict()
  sd = nudge(mar_vae.jax_to_mar_vae(vcfg, vparams), "vae")
  _, vback = mar_vae.mar_vae_to_jax(sd)
  if not _params_equal(_str_keys(vparams), _str_keys(vback)):
    mismatched.append("vae")
  # Head: JAX -> MAR state dict (with its prediction type) -> JAX.
  hcfg = HeadConfig(token_channels=4, cond_dim=16, width=32, depth=2, prediction="v")
  hparams = nnx.split(DiffusionHead(hcfg, rngs=nnx.Rngs(3)))[1].to_pure_dict()
  hparams = jax.tree.map(lambda a: a + 0.01, hparams)  # the zero-initialised layers too
  sd = nudge(mar_head.jax_to_mar_head(hcfg, hparams), "head")
  hback_cfg, hback = mar_head.mar_head_to_jax(sd, prediction=hcfg.prediction)
  if not _params_equal(hparams, hback) or hback_cfg.prediction != "v":
    mismatched.append("head")
  return _verdict("roundtrip", not mismatched, len(mismatched), 0,
                  "bit for bit: hf, vae, head" if not mismatched else f"differ: {mismatched}")


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def check_numerics(*, full: bool = False, workdir=None) -> Result:
  """The bf16 checks of `diagnose numerics`: analytic factors and the precision contract (fast),
  plus trained heads' measured errors and their ordering (`full`)."""
  result = diagnose.run_numerics(workdir=workdir if full else None, fast=not full,
                                 log=lambda *a, **k: None)
  try:
    numerics.check_numerics(result)
  except AssertionError as e:
    return Result("numerics", "fail", None, None, str(e).splitlines()[0][:300])
  meta = result["meta"]
  return Result("numerics", "pass", meta.get("ordering"), "method.md §4",
                f"{meta['mode']}: analytic factors, bf16 matmuls/output, fp32 schedule/target/loss"
                + (", measured ordering" if full else ""))
