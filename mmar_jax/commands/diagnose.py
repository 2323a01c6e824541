"""`mmar-jax diagnose numerics`: the bf16 error of eps / v / x0 heads, as a table, JSON and a plot.

Without --workdir: three diffusion heads (eps, v, x0) are trained on the demo's shapes in about a
minute, identically (same tokens, conditions, draws and initialisation; only the regression
target differs), then measured bf16 vs fp32 (`numerics.measure_head`). With --workdir: the run's
own head (EMA params by default) on conditions its LLM computes for demo batches; only its
parameterisation is measured, so the cross-parameterisation ordering check is skipped. --fast:
the analytic figures and the dtype checks only (seconds; what `repro numerics` runs by default).

Outputs in --out (refused if present, unless --overwrite):
  numerics.json       {"eps"|"v"|"x0": {"amplification": [1000 floats, t = 0..999],
                        "buckets": {"t>=900" | "100<t<900" | "t<=100": {"ddim_step_rel_rms",
                        "x0_rel_rms", "sample_rel_rms" (null in the middle bucket), "head_rel_rms",
                        "n_tokens", "stderr": {metric: standard error}, "ddim_step_by_t":
                        {"t": [...], "rel_rms": [...]}}} or null where that parameterisation was
                        not measured (--fast; the other two with --workdir),
                        "precision": the dtype summary of `numerics.precision_summary`}}
  numerics_meta.json  mode, timings, the demo setup or the run read, the check verdict
  numerics.png        log-scale amplification, and the one-step DDIM error against t (predicted
                      for a bf16-rounded output; measured per kept step), per parameterisation
Relative RMS errors are rms(bf16 - fp32) / rms(fp32) over a bucket's tokens and channels; the
sample is a deterministic DDIM chain (eta 0) on MAR's 100-step respacing from the token's x_t
down to x0. The exit status is 1 when a check of `numerics.check_numerics` fails.

Ablation recipe (issue 8, item 6): the demo trained with eps- vs v-prediction, compared by the
demo's generation accuracy and by this table. Everything but the target is the same run:
  mmar-jax train --config configs/demo.py --workdir runs/demo_v
  mmar-jax train --config configs/demo.py --workdir runs/demo_eps \
      --config.model.head.prediction=eps
  mmar-jax eval --workdir runs/demo_v            # eval/report.json: generation accuracy
  mmar-jax eval --workdir runs/demo_eps
  mmar-jax diagnose numerics --workdir runs/demo_v --out runs/demo_v/numerics
  mmar-jax diagnose numerics --workdir runs/demo_eps --out runs/demo_eps/numerics
The demo config trains and samples its head in fp32 (XLA:CPU is no faster in bf16), so on CPU
the accuracy gap measures the targets' training dynamics, not bf16 rounding; for the paper's
setting add --config.model.head.compute_dtype=bfloat16 to both train commands (on an
accelerator). `diagnose numerics` always compares bf16 with fp32 on the run's weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from mmar_jax.commands import figures
from mmar_jax.data.pipeline import global_batch, make_batcher
from mmar_jax.data.shapes import ShapesDataset, ShapesSpec
from mmar_jax.data.sources import make_source
from mmar_jax.diffusion import amplification as ampl
from mmar_jax.diffusion import parameterization as par
from mmar_jax.errors import ConfigError
from mmar_jax.files import write_bytes_atomic
from mmar_jax.models.diffusion_head import DiffusionHead, HeadConfig, forward, head_params
from mmar_jax.models.image_tokenizer import PatchifyTokenizer
from mmar_jax.models.mmar import MMARConfig, prepare_step
from mmar_jax.run import Run
from mmar_jax.train import numerics as nm

OUTPUTS = ("numerics.json", "numerics_meta.json", "numerics.png")
EVAL_SEED = 1234  # the bucket draws: the same for every head


def _log(msg: str):
  print(msg, file=sys.stderr, flush=True)


# -- the demo heads --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DemoSetup:
  """Sizes of the three demo heads (fp32 master weights and compute) and their training."""
  image_size: int = 16
  patch_size: int = 4  # 16 tokens of 48 channels per image
  cond_dim: int = 64
  width: int = 128
  depth: int = 3
  steps: int = 1200
  batch: int = 256  # tokens per step
  lr: float = 2e-3
  warmup: int = 100
  chunk: int = 100  # steps per jitted scan (one progress line each)
  seed: int = 0

  def head_cfg(self, prediction: str):
    return HeadConfig(token_channels=3 * self.patch_size ** 2, cond_dim=self.cond_dim,
                      width=self.width, depth=self.depth, prediction=prediction,
                      compute_dtype="float32")


def demo_pool(setup: DemoSetup) -> tuple[np.ndarray, np.ndarray]:
  """Every token of the demo's training images (x0 [M, C]) and a condition per token (z [M, D]):
  a fixed random embedding of (colour, shape, position, token index), so z tells the head which
  image and which patch it is drawing, as an LLM's output would."""
  spec = ShapesSpec(image_size=setup.image_size, seed=setup.seed)
  ds = ShapesDataset(spec, split="train")
  items = [ds[i] for i in range(len(ds))]
  images = np.stack([it["image"] for it in items]).astype(np.float32) / 127.5 - 1.0
  tokens = np.asarray(PatchifyTokenizer(setup.patch_size).encode(jnp.asarray(images))[0])
  n = tokens.shape[1]
  rng = np.random.default_rng([setup.seed, 8])
  # Four unit-variance parts summed: z has unit variance per dimension.
  table = lambda k: rng.normal(size=(k, setup.cond_dim)).astype(np.float32) / 2.0
  colour, shape, pos, tok = (table(len(spec.colours)), table(len(spec.shapes)),
                             table(len(spec.positions)), table(n))
  attrs = np.asarray([(it["colour"], it["shape"], it["position"]) for it in items])
  z = (colour[attrs[:, 0]] + shape[attrs[:, 1]] + pos[attrs[:, 2]])[:, None, :] + tok[None]
  return tokens.reshape(-1, tokens.shape[-1]), z.reshape(-1, setup.cond_dim)


def _train_chunk_fn(cfg, tx, setup: DemoSetup):
  """A jitted scan over `setup.chunk` steps; the draws of step s depend only on (seed, s)."""
  def loss_fn(params, x0, z, t, noise):
    head = lambda a, b, c: forward(params, cfg, a, b, c)
    return par.masked_mean(*par.diffusion_loss(head, x0, z, jnp.ones(x0.shape[:1]), t, noise,
                                                prediction=cfg.prediction))

  def one(carry, s, x0_pool, z_pool):
    params, opt = carry
    key = jax.random.fold_in(jax.random.key(setup.seed), s)
    rows = jax.random.randint(jax.random.fold_in(key, 0), (setup.batch,), 0, x0_pool.shape[0])
    t, noise = par.draw(jax.random.fold_in(key, 1), setup.batch, x0_pool.shape[1])
    loss, grads = jax.value_and_grad(loss_fn)(params, x0_pool[rows], z_pool[rows], t, noise)
    updates, opt = tx.update(grads, opt, params)
    return (jax.tree.map(jnp.add, params, updates), opt), loss

  @jax.jit
  def chunk(params, opt, start, x0_pool, z_pool):
    steps = start + jnp.arange(setup.chunk)
    (params, opt), losses = jax.lax.scan(lambda c, s: one(c, s, x0_pool, z_pool), (params, opt),
                                         steps)
    return params, opt, losses

  return chunk


def train_demo_head(prediction: str, x0_pool, z_pool, setup: DemoSetup = DemoSetup(), log=_log):
  """(fp32 params, mean loss of the last chunk) of one demo head."""
  cfg = setup.head_cfg(prediction)
  params = head_params(DiffusionHead(cfg, rngs=nnx.Rngs(setup.seed)))
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, setup.lr, setup.warmup, setup.steps))
  opt = tx.init(params)
  chunk = _train_chunk_fn(cfg, tx, setup)
  x0_pool, z_pool = jnp.asarray(x0_pool), jnp.asarray(z_pool)
  loss = float("nan")
  for start in range(0, setup.steps, setup.chunk):
    params, opt, losses = chunk(params, opt, start, x0_pool, z_pool)
    loss = float(jnp.mean(losses))
    log(f"  head {prediction}: step {start + setup.chunk}/{setup.steps} loss {loss:.4f}")
  return params, loss


# -- a training run's head ------------------------------------------------------------------------

def run_head_cfg(workdir):
  """The HeadConfig of a workdir (model_config.json; nothing restored)."""
  path = epath.Path(workdir) / "model_config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  return MMARConfig.from_dict(json.loads(path.read_text())).head


def run_pool(workdir, step=None, which="ema", n_tokens=nm.MIN_TOKENS, max_batches=64,
             overrides=(), log=_log):
  """(head params, head cfg, x0 [M, C], z [M, D], positions [M] or None, info) of a workdir:
  masked tokens of its training batches with the conditions the run's own LLM gives them (mask
  ratio drawn as in training, no caption drop). Params are read onto one device, as `eval` does."""
  run = Run(workdir, overrides)
  config, mcfg, tr = run.config, run.model_cfg, run.trainer
  params, step = run.params(step, which)
  params = jax.device_get(params)
  log(f"  restored {which} params of step {step} from {workdir}")
  batcher = make_batcher(config, make_source(config), run.tokenizer, mcfg.max_text_len)

  @jax.jit
  def rows_of(params, batch, i):
    model = tr.model(params)
    prep = prepare_step(model, batch, EVAL_SEED, i, config.loss, caption_drop=0.0,
                        diffusion_batch_mul=1)
    hidden, _, lay = model.forward(prep)
    return model.head_rows(prep, hidden, lay)

  got, count = [], 0
  for i in range(max_batches):
    batch = jax.device_get(global_batch(batcher, i, tr.batch_sharding))
    rows = jax.device_get(rows_of(params, batch, i))
    keep = rows["mask_weights"] > 0
    got.append({k: (None if v is None else np.asarray(v)[keep]) for k, v in rows.items()})
    count += int(keep.sum())
    if count >= n_tokens:
      break
  cat = lambda k: None if got[0][k] is None else np.concatenate([g[k] for g in got])
  info = dict(workdir=str(workdir), step=int(step), params=which, pool_tokens=count,
              batches=i + 1, trained_compute_dtype=mcfg.head.compute_dtype)
  return params["head"], mcfg.head, cat("x0"), cat("z"), cat("positions"), info


# -- the whole diagnosis ---------------------------------------------------------------------------

def _refuse_existing(out, overwrite: bool):
  if out is None or overwrite:
    return
  present = [name for name in OUTPUTS if (epath.Path(out) / name).exists()]
  if present:
    raise FileExistsError(f"{out} already holds {', '.join(present)}; pass --overwrite to replace")


def run_numerics(workdir=None, fast: bool = False, out=None, *, step=None, params: str = "ema",
                 overwrite: bool = False, n_tokens: int = nm.MIN_TOKENS,
                 setup: DemoSetup = DemoSetup(), overrides=(), log=_log) -> dict:
  """The diagnosis as a dict: {"eps"|"v"|"x0": {"amplification", "buckets", "precision"},
  "meta": {...}}; with `out`, also the files of the module docstring. Checks are run and their
  verdict recorded in meta["check"] ("passed" or the failure), never raised here: call
  `numerics.check_numerics` for that."""
  _refuse_existing(out, overwrite)
  t0 = time.perf_counter()
  head_cfg = run_head_cfg(workdir) if workdir else setup.head_cfg("v")
  result = {p: {"amplification": ampl.amplification(p).tolist(), "buckets": None,
                "precision": nm.precision_summary(head_cfg.replace(prediction=p))}
            for p in par.PREDICTIONS}
  meta = dict(mode="fast" if fast else ("workdir" if workdir else "demo"),
              tokens_per_bucket=n_tokens,
              buckets={k: list(v) for k, v in nm.BUCKETS.items()}, sample_steps=ampl.SAMPLE_STEPS,
              sampler="ddim (eta 0)", backend=jax.default_backend())
  if not fast and workdir:
    _measure_run(result, meta, workdir, step, params, n_tokens, overrides, log)
  elif not fast:
    _measure_demo(result, meta, setup, n_tokens, log)
  meta["ordering"] = nm.ordering_status(result)
  try:
    nm.check_numerics(result)
    meta["check"] = "passed"
  except AssertionError as e:
    meta["check"] = f"FAILED: {e}"
  meta["wall_s"] = round(time.perf_counter() - t0, 1)
  result["meta"] = meta
  if out is not None:
    write_outputs(result, out)
  return result


def _measure_demo(result, meta, setup, n_tokens, log):
  t0 = time.perf_counter()
  x0_pool, z_pool = demo_pool(setup)
  meta["demo"] = dict(dataclasses.asdict(setup), pool_tokens=int(x0_pool.shape[0]),
                      token_channels=int(x0_pool.shape[1]), train_loss={}, train_s={})
  key = jax.random.key(EVAL_SEED)
  for p in par.PREDICTIONS:
    log(f"training the {p} head ({setup.steps} steps of {setup.batch} tokens)")
    t1 = time.perf_counter()
    params, loss = train_demo_head(p, x0_pool, z_pool, setup, log)
    meta["demo"]["train_loss"][p] = loss
    meta["demo"]["train_s"][p] = round(time.perf_counter() - t1, 1)
    log(f"measuring the {p} head, bf16 vs fp32 ({n_tokens} tokens per bucket)")
    result[p]["buckets"] = nm.measure_head(params, setup.head_cfg(p), x0_pool, z_pool, key,
                                           n_tokens)
  meta["measure_s"] = round(time.perf_counter() - t0, 1)


def _measure_run(result, meta, workdir, step, which, n_tokens, overrides, log):
  t0 = time.perf_counter()
  log(f"reading the run in {workdir}")
  head_params, head_cfg, x0, z, positions, info = run_pool(workdir, step, which, n_tokens,
                                                           overrides=overrides, log=log)
  meta["run"] = dict(info, prediction=head_cfg.prediction)
  log(f"measuring the run's {head_cfg.prediction} head, bf16 vs fp32 ({n_tokens} tokens per "
      "bucket)")
  result[head_cfg.prediction]["buckets"] = nm.measure_head(
      head_params, head_cfg, x0, z, jax.random.key(EVAL_SEED), n_tokens, positions)
  meta["measure_s"] = round(time.perf_counter() - t0, 1)


# -- outputs ---------------------------------------------------------------------------------------

def write_outputs(result: dict, out):
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  body = {p: result[p] for p in par.PREDICTIONS}
  write_bytes_atomic(out / "numerics.json", (json.dumps(body, indent=1) + "\n").encode())
  meta = result.get("meta", {})
  write_bytes_atomic(out / "numerics_meta.json",
                (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
  write_bytes_atomic(out / "numerics.png", plot_png(result))


def _fmt(x, se=None) -> str:
  if x is None:
    return "-"
  return f"{x:.2e}" if se is None else f"{x:.2e} ±{se:.0e}"


def format_table(result: dict) -> str:
  ts = (0, 100, 500, 900, 999)
  lines = ["Amplification of a bf16 output error in one DDIM step (analytic, method.md §4)",
           "  prediction " + "".join(f"{f't={t}':>12}" for t in ts)]
  for p in par.PREDICTIONS:
    amp = result[p]["amplification"]
    lines.append(f"  {p:<10} " + "".join(f"{amp[t]:>12.4g}" for t in ts))
  lines += ["", "bf16 vs fp32 on identical inputs: relative RMS error (± standard error over "
            f"{nm.GROUPS} token groups)",
            f"  {'prediction':<10} {'bucket':<10} {'tokens':>6}  {'DDIM step':<18}"
            f"{'x0 estimate':<18}{'sample':<18}{'head output':<18}"]
  for p in par.PREDICTIONS:
    buckets = result[p]["buckets"]
    if not buckets:
      lines.append(f"  {p:<10} (not measured)")
      continue
    for b, v in buckets.items():
      cells = "".join(f"{_fmt(v[m], v['stderr'][m]):<18}" for m in
                      ("ddim_step_rel_rms", "x0_rel_rms", "sample_rel_rms", "head_rel_rms"))
      lines.append(f"  {p:<10} {b:<10} {v['n_tokens']:>6}  {cells}")
  prec = result["v"]["precision"]
  lines += ["", f"precision: {prec['dot_general']} matmuls in "
            f"{'/'.join(prec['dot_operand_dtypes'])}, head output {prec['head_output']}, "
            "alpha/sigma, target, reductions and loss "
            f"{'/'.join(prec['loss'])}"]
  lines.append(f"ordering (v <= eps at {nm.HIGH}, v <= x0 at {nm.LOW}, within "
               f"{nm.ORDERING_SIGMAS:g} standard errors): {nm.ordering_status(result)}")
  lines += [f"  {line}" for line in nm.ordering_report(result)]
  meta = result.get("meta", {})
  if meta:
    lines.append(f"checks: {meta.get('check')}")
  return "\n".join(lines)


def plot_png(result: dict) -> bytes:
  plt = figures.pyplot()
  colours = {"eps": "tab:red", "v": "tab:blue", "x0": "tab:green"}
  fig, (ax_amp, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2))
  t = np.arange(len(result["v"]["amplification"]))
  for p in par.PREDICTIONS:
    ax_amp.plot(t, result[p]["amplification"], color=colours[p], label=p)
    kept, pred = ampl.predicted_step_error(p)
    ax_err.plot(kept, pred, color=colours[p], alpha=0.6, label=f"{p}: predicted")
    _plot_measured(ax_err, result[p]["buckets"], colours[p], p)
  ax_amp.set(yscale="log", xlabel="t", ylabel="amplification",
             title="error amplification sqrt(a²+b²)/|αb−σa|")
  ax_err.set(yscale="log", xlabel="t", ylabel="relative RMS error",
             title="bf16 error of one DDIM step (100-step chain)")
  for ax in (ax_amp, ax_err):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  return figures.png_bytes(fig, dpi=110)



def _plot_measured(ax, buckets, colour, label):
  if not buckets:
    return
  ts, errs = [], []
  for v in buckets.values():
    ts += v["ddim_step_by_t"]["t"]
    errs += v["ddim_step_by_t"]["rel_rms"]
  order = np.argsort(ts)
  ax.plot(np.asarray(ts)[order], np.asarray(errs)[order], "o", ms=3, color=colour,
          label=f"{label}: measured")


# -- command line ----------------------------------------------------------------------------------

def cli_numerics(args) -> int:
  """Exit 0 when every check passes, 1 when one fails (the outputs are written either way)."""
  if args.config_overrides and not args.workdir:
    raise ConfigError("--config.* / --mesh overrides apply to a --workdir run only")
  result = run_numerics(args.workdir, args.fast, args.out, step=args.step, params=args.params,
                        overwrite=args.overwrite, overrides=args.config_overrides)
  print(format_table(result))
  print(f"wrote {', '.join(OUTPUTS)} to {args.out} in {result['meta']['wall_s']:.1f} s")
  return 0 if result["meta"]["check"] == "passed" else 1
