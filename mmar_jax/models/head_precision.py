"""The diffusion head's bf16 numerics, measured (method.md §4): the precision contract read off the
jaxpr of the diffusion loss, and one head run bf16 and fp32 on identical (x_t, t, z).

Empirical evidence for the analytic argument of `diffusion/numerics.py`: relative RMS differences
of the one-step DDIM update, of x0_hat and of a DDIM chain down to x0, per timestep bucket, with
a standard error over token groups (the ordering check covers the DDIM step and the sample;
x0_hat is reported only, see numerics.ORDERING_METRICS). The precision contract: a head that
secretly computes in fp32 (and casts its output to bf16) cannot pass for a bf16 one.
`head_precision_metrics` is what the training-time monitor (train/precision.py) logs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmar_jax.diffusion import parameterization as par
from mmar_jax.diffusion import samplers
from mmar_jax.diffusion import schedule as sched_lib
from mmar_jax.diffusion.numerics import (BUCKETS, MIN_TOKENS, SAMPLE_BUCKETS, SAMPLE_STEPS, SHORT,
                                         assert_precision, by_timestep, iter_eqns, rel_rms)
from mmar_jax.models import diffusion_head as dh


def _dtypes(variables) -> list[str]:
  return sorted({str(v.aval.dtype) for v in variables})


def precision_summary(head_cfg, rows: int = 8) -> dict:
  """What the bf16 path of `head_cfg` computes in which dtype, read off the jaxpr of the diffusion
  loss (traced on abstract values: nothing is initialised or run)."""
  cfg = head_cfg.replace(compute_dtype="bfloat16")
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  c = cfg.token_channels
  args = (dh.abstract_params(cfg), f32(rows, c), f32(rows, cfg.cond_dim), f32(rows),
          jax.ShapeDtypeStruct((rows,), jnp.int32), f32(rows, c))
  positions = jnp.zeros((rows,), jnp.int32) if cfg.n_positions else None

  def head(params, x, t, z):
    return dh.forward(params, cfg, x, t, z, positions)

  def loss(params, x0, z, w, t, noise):
    return par.diffusion_loss(lambda a, b, cc: head(params, a, b, cc), x0, z, w, t, noise,
                              prediction=cfg.prediction)

  eqns = list(iter_eqns(jax.make_jaxpr(loss)(*args).jaxpr))
  dots = [e for e in eqns if e.primitive.name == "dot_general"]
  sums = [e for e in eqns if e.primitive.name == "reduce_sum"]
  params, x0, z, _, t, noise = args
  alpha, sigma = jax.eval_shape(sched_lib.alpha_sigma, t)
  target = jax.eval_shape(lambda *a: par.prediction_target(cfg.prediction, *a), x0, noise,
                          f32(rows, 1), f32(rows, 1))
  out = jax.eval_shape(head, params, x0, t, z)
  losses = jax.eval_shape(loss, *args)
  return {
      "claimed": "bfloat16",
      "dot_general": len(dots),
      "dot_operand_dtypes": _dtypes(v for e in dots for v in e.invars),
      "dot_result_dtypes": _dtypes(v for e in dots for v in e.outvars),
      "head_output": str(out.dtype),
      "alpha_sigma": sorted({str(alpha.dtype), str(sigma.dtype)}),
      "target": str(target.dtype),
      "reduction_dtypes": _dtypes(v for e in sums for v in e.invars),
      "loss": sorted({str(a.dtype) for a in losses}),
  }


def check_precision(head_cfg) -> dict:
  """`precision_summary` + `assert_precision`; returns the summary."""
  summary = precision_summary(head_cfg)
  assert_precision(summary)
  return summary


# -- 3. empirical: one head, bf16 vs fp32 on identical inputs -------------------------------------

def _column_coefs(arrays: dict, k) -> samplers.StepCoefs:
  """Per-token constants of kept step k [N]: [N, 1] columns against x [N, C]; t stays [N]."""
  c = samplers.step_coefs(arrays, k)
  cols = {f: getattr(c, f)[:, None] for f in samplers.StepCoefs._fields if f != "t"}
  return c._replace(**cols)


def _head(params, cfg, dtype: str, positions):
  cfg = cfg.replace(compute_dtype=dtype)
  return lambda x, t, z: dh.forward(params, cfg, x, t, z, positions)


def _one_step(head, prediction, x_t, k, z, arrays):
  """Head output (prediction channels, fp32), x0_hat and the DDIM update to the previous kept step,
  through the samplers' own code."""
  c = _column_coefs(arrays, k)
  out = head(x_t, c.t, z).astype(jnp.float32)
  pred, _ = par.split_output(out, x_t.shape[-1])
  x0_hat, _ = par.x0_eps_from_prediction(prediction, pred, x_t, c.alpha, c.sigma)
  return pred, x0_hat, samplers.ddim_step(out, x_t, c, prediction=prediction)


def _chain(head, prediction, x_t, k, z, arrays):
  """DDIM (eta = 0) from each token's own kept step k down to x0. All tokens walk the steps
  together; a token stays at its x_t until the walk reaches its own start."""
  n = x_t.shape[0]

  def body(j, x):
    step = jnp.max(k) - j
    c = samplers.step_coefs(arrays, step)
    out = head(x, jnp.full((n,), c.t, jnp.int32), z)
    x_new = samplers.ddim_step(out, x, c, prediction=prediction)
    return jnp.where((k >= step)[:, None], x_new, x)

  return jax.lax.fori_loop(0, jnp.max(k) + 1, body, x_t)


def _evaluate(params, cfg, x_t, k, z, positions, with_sample: bool):
  arrays = samplers.schedule_arrays(SAMPLE_STEPS)
  res = {}
  for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
    head = _head(params, cfg, dtype, positions)
    pred, x0_hat, step = _one_step(head, cfg.prediction, x_t, k, z, arrays)
    res[name] = {"head": pred, "x0": x0_hat, "ddim_step": step}
    if with_sample:
      res[name]["sample"] = _chain(head, cfg.prediction, x_t, k, z, arrays)
  return res


_evaluate_jit = jax.jit(_evaluate, static_argnames=("cfg", "with_sample"))


def bucket_inputs(key, bucket: str, x0_pool, z_pool, n: int = MIN_TOKENS, positions_pool=None):
  """n draws for a bucket: pool rows (with replacement), a kept step of the SAMPLE_STEPS chain
  inside the bucket (so one DDIM step lands exactly on the previous kept step), fresh noise.
  Returns dict(x_t, k, t, z, positions) with x_t formed in fp32 as in training."""
  lo, hi = BUCKETS[bucket]
  kept = sched_lib.respaced_timesteps(SAMPLE_STEPS)
  ks = np.nonzero((kept >= lo) & (kept <= hi))[0]
  if len(ks) == 0:
    raise ValueError(f"bucket {bucket} holds no kept step of the {SAMPLE_STEPS}-step chain")
  k_rows, k_k, k_noise = jax.random.split(key, 3)
  rows = jax.random.randint(k_rows, (n,), 0, x0_pool.shape[0])
  k = jnp.asarray(ks, jnp.int32)[jax.random.randint(k_k, (n,), 0, len(ks))]
  t = jnp.asarray(kept, jnp.int32)[k]
  x0 = jnp.asarray(x0_pool, jnp.float32)[rows]
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  alpha, sigma = sched_lib.alpha_sigma(t)
  x_t = par.q_sample(x0, noise, alpha[:, None], sigma[:, None])
  positions = None if positions_pool is None else jnp.asarray(positions_pool)[rows]
  return dict(x_t=x_t, k=k, t=t, z=jnp.asarray(z_pool)[rows], positions=positions)


def measure_bucket(params, head_cfg, inputs: dict, with_sample: bool = True) -> dict:
  """bf16-vs-fp32 relative RMS errors of one head on one bucket's inputs (see `bucket_inputs`),
  with standard errors and the DDIM-step error per timestep (`ddim_step_by_t`)."""
  res = jax.device_get(_evaluate_jit(params, head_cfg, inputs["x_t"], inputs["k"], inputs["z"],
                                     inputs["positions"], with_sample))
  out = {"n_tokens": int(inputs["x_t"].shape[0]), "stderr": {},
         "ddim_step_by_t": by_timestep(res["bf16"]["ddim_step"], res["fp32"]["ddim_step"],
                                       inputs["t"])}
  names = {"ddim_step": "ddim_step_rel_rms", "x0": "x0_rel_rms", "sample": "sample_rel_rms",
           "head": "head_rel_rms"}
  for short, name in names.items():
    if short not in res["fp32"]:
      out[name], out["stderr"][name] = None, None
      continue
    out[name], out["stderr"][name] = rel_rms(res["bf16"][short], res["fp32"][short])
  return out


def measure_head(params, head_cfg, x0_pool, z_pool, key, n: int = MIN_TOKENS,
                 positions_pool=None) -> dict:
  """Every bucket for one head; the same key gives every head the same (x_t, t, z)."""
  buckets = {}
  for i, name in enumerate(BUCKETS):
    inputs = bucket_inputs(jax.random.fold_in(key, i), name, x0_pool, z_pool, n, positions_pool)
    buckets[name] = measure_bucket(params, head_cfg, inputs, name in SAMPLE_BUCKETS)
  return buckets


# -- what the training-time monitor logs --------------------------------------------------------

def _masked_rel(a, b, w):
  """Weighted relative RMS over rows: sqrt(sum w (a - b)^2 / sum w b^2); 0 with no rows."""
  err = jnp.sum(w[:, None] * jnp.square(a - b))
  ref = jnp.sum(w[:, None] * jnp.square(b))
  return jnp.where(ref > 0, jnp.sqrt(err / jnp.maximum(ref, 1e-30)), 0.0)


def head_precision_metrics(head_params, head_cfg, x0, z, t, noise, mask_weights=None,
                           positions=None) -> dict[str, jax.Array]:
  """bf16-vs-fp32 error of the head output and of the loss per timestep bucket (jittable).

  Rows are training draws: x0 [M, C], z [M, D], t [M], noise [M, C], mask_weights [M] (default
  all 1; rows with weight 0, e.g. unmasked tokens, are ignored), positions [M] for a head with
  a learned position embedding. Keys: `bf16/head_rel_rms_<high|mid|low>` (relative RMS of the
  prediction channels), `bf16/loss_rel_err_<...>` (|loss_bf16 - loss_fp32| / loss_fp32 of the
  bucket's mean per-token loss) and `bf16/rows_<...>`; 0 for an empty bucket.
  """
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  w = jnp.ones(x0.shape[:1], jnp.float32) if mask_weights is None else mask_weights.astype(
      jnp.float32)
  alpha, sigma = sched_lib.alpha_sigma(t)
  x_t = par.q_sample(x0, noise, alpha[:, None], sigma[:, None])
  outs = {d: _head(head_params, head_cfg, d, positions)(x_t, t, z) for d in ("bfloat16", "float32")}
  preds = {d: par.split_output(o.astype(jnp.float32), x0.shape[-1])[0] for d, o in outs.items()}
  out = {}
  for name, (lo, hi) in BUCKETS.items():
    wb = w * ((t >= lo) & (t <= hi))
    # The loss's own code on the outputs above (it forms the same x_t): one head call per dtype.
    losses = {d: par.masked_mean(*par.diffusion_loss(lambda *_, o=o: o, x0, z, wb, t, noise,
                                                     prediction=head_cfg.prediction))
              for d, o in outs.items()}
    ref = losses["float32"]
    key = SHORT[name]
    out[f"bf16/head_rel_rms_{key}"] = _masked_rel(preds["bfloat16"], preds["float32"], wb)
    out[f"bf16/loss_rel_err_{key}"] = jnp.where(
        ref > 0, jnp.abs(losses["bfloat16"] - ref) / jnp.maximum(ref, 1e-30), 0.0)
    out[f"bf16/rows_{key}"] = jnp.sum(wb)
  return out
