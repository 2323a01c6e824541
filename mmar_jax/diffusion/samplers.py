"""Per-token samplers of the diffusion head: ancestral DDPM (MAR's) and DDIM, over K respaced steps.

Both are pure functions, jittable as a whole (`lax.fori_loop` over the steps), of
`head_apply(x_t [M, C], t [M] int, z [M, D]) -> output [M, C or 2C]`. The head is given the
ORIGINAL timestep index of each kept step. Arithmetic outside the head is fp32 on fp64-derived
constants, whatever the head's dtype.

Classifier-free guidance as MAR: the caller passes z as the doubled batch [cond; uncond] (2N rows)
and a scale `cfg` (scalar or [N]); both halves see the same x_t (x_t is kept for N rows and
duplicated for the head) and the guided output is cond + (cfg - 1)(cond - uncond), which is
MAR's uncond + cfg (cond - uncond) rearranged so that cfg = 1 returns the conditional half's
output bit for bit. Guidance acts on the prediction channels (any of eps / v / x0: with x_t shared, each
is an affine function of the others, so guiding one guides all); learned-variance channels come
from the conditional half, as in MAR. Temperature scales the per-step noise, not the initial noise.

Randomness: `key` is one key or N keys (one per token row, so a token's trajectory does not depend
on what else is in the batch). The initial noise and step k's noise come from disjoint streams.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmar_jax.diffusion import parameterization as par
from mmar_jax.diffusion import schedule as sched_lib

HeadApply = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class StepCoefs(NamedTuple):
  """fp32 constants of one reverse step t -> t_prev (t_prev = the previous kept step, or 'x0')."""
  t: jax.Array  # original timestep index given to the head
  alpha: jax.Array
  sigma: jax.Array
  alpha_prev: jax.Array
  sigma_prev: jax.Array
  coef1: jax.Array  # posterior mean = coef1 x0 + coef2 x_t
  coef2: jax.Array
  log_var: jax.Array  # fixed-small posterior log variance (clipped at step 0)
  log_beta: jax.Array  # upper end of the learned range
  ddim_sigma: jax.Array  # DDIM's noise scale at eta = 1
  is_last: jax.Array  # bool: the step that lands on x0 adds no noise


def _ddim_sigma(s: sched_lib.Schedule) -> np.ndarray:
  abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
  return np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)


def schedule_arrays(num_steps: int, num_timesteps: int = sched_lib.NUM_TIMESTEPS) -> dict:
  """The respaced chain's per-step constants as fp32 arrays (index k = k-th kept step)."""
  s = sched_lib.respaced_schedule(num_steps, num_timesteps)
  f = lambda a: jnp.asarray(a, jnp.float32)
  return dict(t=jnp.asarray(s.timesteps, jnp.int32), alpha=f(s.alpha), sigma=f(s.sigma),
              alpha_prev=f(np.sqrt(s.alphas_cumprod_prev)),
              sigma_prev=f(np.sqrt(1.0 - s.alphas_cumprod_prev)),
              coef1=f(s.posterior_mean_coef1), coef2=f(s.posterior_mean_coef2),
              log_var=f(s.posterior_log_variance_clipped), log_beta=f(s.log_betas),
              ddim_sigma=f(_ddim_sigma(s)))


def step_coefs(arrays: dict, k) -> StepCoefs:
  """Constants of the k-th kept step (k may be traced)."""
  return StepCoefs(**{name: a[k] for name, a in arrays.items()}, is_last=jnp.asarray(k) == 0)


# -- single steps ----------------------------------------------------------------------------------

def ddpm_step(out, x_t, c: StepCoefs, noise, *, prediction: str, temperature=1.0):
  """Ancestral step: posterior mean from x0_hat, plus exp(log_var / 2) * temperature * noise
  (no noise on the last step). A 2C-channel output uses its learned-range variance."""
  pred, var_values = par.split_output(out.astype(jnp.float32), x_t.shape[-1])
  x0_hat, _ = par.x0_eps_from_prediction(prediction, pred, x_t, c.alpha, c.sigma)
  mean = c.coef1 * x0_hat + c.coef2 * x_t
  log_var = c.log_var if var_values is None else par.learned_range_log_variance(
      var_values, c.log_var, c.log_beta)
  scale = jnp.where(c.is_last, 0.0, jnp.exp(0.5 * log_var))
  return mean + scale * noise * _rows(temperature)


def ddim_step(out, x_t, c: StepCoefs, noise=None, *, prediction: str, eta=0.0, temperature=1.0):
  """DDIM: x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - s^2) eps_hat + s * noise, s = eta *
  ddim_sigma. With eta = 0 (the default) it is deterministic and `noise` may be None."""
  pred, _ = par.split_output(out.astype(jnp.float32), x_t.shape[-1])
  x0_hat, eps_hat = par.x0_eps_from_prediction(prediction, pred, x_t, c.alpha, c.sigma)
  if noise is None:
    return c.alpha_prev * x0_hat + c.sigma_prev * eps_hat
  s = eta * c.ddim_sigma
  direction = jnp.sqrt(jnp.maximum(c.sigma_prev ** 2 - s ** 2, 0.0))
  s = jnp.where(c.is_last, 0.0, s)
  return c.alpha_prev * x0_hat + direction * eps_hat + s * noise * _rows(temperature)


# -- guidance --------------------------------------------------------------------------------------

def guide(out, cfg, channels: int):
  """[2N, *] output of [cond; uncond] -> [N, *]: cond + (cfg - 1)(cond - uncond) on the prediction
  channels; the conditional half's variance channels."""
  out = out.astype(jnp.float32)
  n = out.shape[0] // 2
  cond, uncond = out[:n], out[n:]
  w = _rows(cfg) - 1.0
  guided = cond[:, :channels] + w * (cond[:, :channels] - uncond[:, :channels])
  return jnp.concatenate([guided, cond[:, channels:]], axis=-1)


def model_output(head_apply: HeadApply, x, t, z, cfg=None):
  """The head's fp32 output for N rows at one original timestep t; with cfg, z holds 2N rows."""
  n, channels = x.shape
  if cfg is None:
    return head_apply(x, jnp.full((n,), t, jnp.int32), z).astype(jnp.float32)
  out = head_apply(jnp.concatenate([x, x]), jnp.full((2 * n,), t, jnp.int32), z)
  return guide(out, cfg, channels)


def _rows(v):
  """A scalar, or a per-row [N] value as a column [N, 1]."""
  v = jnp.asarray(v, jnp.float32)
  return v[:, None] if v.ndim == 1 else v


# -- samplers --------------------------------------------------------------------------------------

def _split(key):
  if par.is_key_batch(key):
    ks = jax.vmap(jax.random.split)(key)
    return ks[:, 0], ks[:, 1]
  k0, k1 = jax.random.split(key)
  return k0, k1


def _fold(key, k):
  if par.is_key_batch(key):
    return jax.vmap(lambda kk: jax.random.fold_in(kk, k))(key)
  return jax.random.fold_in(key, k)


def _rows_of(z, cfg) -> int:
  if cfg is None:
    return z.shape[0]
  if z.shape[0] % 2:
    raise ValueError(f"with cfg, z must be the doubled batch [cond; uncond]; got {z.shape[0]} rows")
  return z.shape[0] // 2


def initial_noise(key, n: int, channels: int) -> jax.Array:
  """x_T [N, C] of `sample` (its first stream of `key`)."""
  return par.normal_rows(_split(key)[0], n, channels)


def step_noise(key, k, n: int, channels: int) -> jax.Array:
  """The noise [N, C] that `sample` adds at the k-th kept step (its second stream of `key`):
  with `initial_noise`, what an outside implementation replays to draw the same tokens."""
  return par.normal_rows(_fold(_split(key)[1], k), n, channels)


def sample(head_apply: HeadApply, z, key, *, method: str = "ddpm", num_steps: int = 100,
           temperature=1.0, cfg=None, prediction: str = "v", channels: int = 16, eta=0.0,
           x_T=None, num_timesteps: int = sched_lib.NUM_TIMESTEPS):
  """Samples tokens x0 [N, C] (fp32) from the head given conditions z ([N, D], or [2N, D] =
  [cond; uncond] with `cfg`). method: 'ddpm' (MAR's ancestral sampler) or 'ddim' (eta = 0 by
  default). `x_T` overrides the initial noise (drawn from `key` otherwise; temperature does not
  scale it). `num_steps`, `method`, `prediction`, `channels` are static under jit."""
  par.check_prediction(prediction)
  if method not in ("ddpm", "ddim"):
    raise ValueError(f"unknown sampler {method!r}; use 'ddpm' or 'ddim'")
  n = _rows_of(z, cfg)
  arrays = schedule_arrays(num_steps, num_timesteps)
  x = initial_noise(key, n, channels) if x_T is None else jnp.asarray(x_T, jnp.float32)
  stochastic = method == "ddpm" or not (isinstance(eta, (int, float)) and eta == 0)

  def body(j, x):
    k = num_steps - 1 - j
    c = step_coefs(arrays, k)
    out = model_output(head_apply, x, c.t, z, cfg)
    noise = step_noise(key, k, n, channels) if stochastic else None
    if method == "ddpm":
      return ddpm_step(out, x, c, noise, prediction=prediction, temperature=temperature)
    return ddim_step(out, x, c, noise, prediction=prediction, eta=eta, temperature=temperature)

  return jax.lax.fori_loop(0, num_steps, body, x)
