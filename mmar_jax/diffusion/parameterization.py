"""What the head predicts (eps, v or x0), the conversions between them, and the training loss.

  x_t = alpha_t x0 + sigma_t eps,   v = alpha_t eps - sigma_t x0
  x0  = alpha_t x_t - sigma_t v,    eps = sigma_t x_t + alpha_t v       (well conditioned at any t)
  x0  = (x_t - sigma_t eps) / alpha_t,  eps = (x_t - alpha_t x0) / sigma_t (amplify rounding by
                                                   1/alpha_t, up to 20291, or 1/sigma_t, up to 156)

Precision (method.md §4): the head's output may be bf16; alpha_t, sigma_t, x_t, the targets and
the loss reduction are fp32. Randomness is explicit: `draw` makes (t, noise) from keys the caller
chooses, and `diffusion_loss` takes them as arrays, so training can key every draw by
(seed, step, global example index).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from mmar_jax.diffusion import schedule as sched_lib
from mmar_jax.dtypes import get_dtype

PREDICTIONS = ("eps", "v", "x0")
HeadApply = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def check_prediction(prediction: str) -> str:
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
  return prediction


# -- forward process and conversions (alpha, sigma broadcast against x: pass [N, 1] per row) ------

def q_sample(x0, noise, alpha, sigma):
  return alpha * x0 + sigma * noise


def v_from_x0_eps(x0, eps, alpha, sigma):
  return alpha * eps - sigma * x0


def x0_from_v(x_t, v, alpha, sigma):
  return alpha * x_t - sigma * v


def eps_from_v(x_t, v, alpha, sigma):
  return sigma * x_t + alpha * v


def x0_from_eps(x_t, eps, alpha, sigma):
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
  return (x_t - alpha * x0) / sigma


def prediction_target(prediction: str, x0, eps, alpha, sigma):
  """What a perfect head outputs for this (x0, eps): the regression target."""
  check_prediction(prediction)
  if prediction == "v":
    return v_from_x0_eps(x0, eps, alpha, sigma)
  return eps if prediction == "eps" else x0


def x0_eps_from_prediction(prediction: str, pred, x_t, alpha, sigma):
  """(x0_hat, eps_hat) from a head output; each taken the direct way from what was predicted."""
  check_prediction(prediction)
  if prediction == "v":
    return x0_from_v(x_t, pred, alpha, sigma), eps_from_v(x_t, pred, alpha, sigma)
  if prediction == "eps":
    return x0_from_eps(x_t, pred, alpha, sigma), pred
  return pred, eps_from_x0(x_t, pred, alpha, sigma)


def split_output(out, channels: int):
  """Head output [N, C] or [N, 2C] -> (prediction, learned-variance values or None)."""
  if out.shape[-1] == channels:
    return out, None
  if out.shape[-1] == 2 * channels:
    return out[..., :channels], out[..., channels:]
  raise ValueError(f"head output has {out.shape[-1]} channels; expected {channels} or "
                   f"{2 * channels}")


def learned_range_log_variance(var_values, min_log, max_log):
  """guided-diffusion's LEARNED_RANGE: var_values in [-1, 1] interpolate log variance between the
  fixed-small posterior (min) and beta (max)."""
  frac = (var_values + 1.0) / 2.0
  return frac * max_log + (1.0 - frac) * min_log


# -- random draws -------------------------------------------------------------------------------

def is_key_batch(key) -> bool:
  """True for an array of keys (one per row), False for a single key (typed or raw uint32[2])."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2


def normal_rows(key, n: int, channels: int) -> jax.Array:
  """fp32 N(0, 1) [n, C]: from one key, or one row per key (independent of batch composition)."""
  if is_key_batch(key):
    return jax.vmap(lambda k: jax.random.normal(k, (channels,), jnp.float32))(key)
  return jax.random.normal(key, (n, channels), jnp.float32)


def draw(key, n: int, channels: int, num_timesteps: int = sched_lib.NUM_TIMESTEPS):
  """One training draw per row: (t int32 [n] uniform in 0..T-1, noise fp32 [n, C]).

  `key` is one key or n keys; with per-row keys a row's draw depends only on its own key, so the
  caller can key rows by (seed, step, global example index, draw number) and get the same numbers
  on any mesh.
  """
  if is_key_batch(key):
    def one(k):
      kt, kn = jax.random.split(k)
      return (jax.random.randint(kt, (), 0, num_timesteps, jnp.int32),
              jax.random.normal(kn, (channels,), jnp.float32))
    return jax.vmap(one)(key)
  kt, kn = jax.random.split(key)
  return (jax.random.randint(kt, (n,), 0, num_timesteps, jnp.int32),
          jax.random.normal(kn, (n, channels), jnp.float32))


def repeat_for_draws(x, diffusion_batch_mul: int):
  """MAR's `x.repeat(mul, 1)`: the whole batch tiled mul times (row r of draw d is d * N + r), so
  the LLM runs once per condition while the head sees mul (t, eps) draws of it."""
  if diffusion_batch_mul == 1:
    return x
  return jnp.tile(x, (diffusion_batch_mul,) + (1,) * (x.ndim - 1))


# -- the loss -------------------------------------------------------------------------------------

def diffusion_loss(head_apply: HeadApply, x0, z, mask_weights, t, noise, *, prediction: str = "v",
                   diffusion_batch_mul: int = 1, num_timesteps: int = sched_lib.NUM_TIMESTEPS,
                   expect_dtype=None):
  """(sum over rows of mask_weight * per-token loss, sum of mask weights), both fp32 scalars.

  x0 [N, C] clean tokens, z [N, D] conditions, mask_weights [N] (1 for masked tokens, 0 otherwise),
  t [N * mul] and noise [N * mul, C] the draws (see `draw`; row d * N + r is draw d of token r).
  The per-token loss is MAR's mean_flat: the MEAN over channels of (target - pred)^2, in fp32
  whatever the head's output dtype. With a 2C-channel head the VLB term of the learned variance
  is added (its gradient reaches only the variance channels, as MAR). The caller averages over the
  GLOBAL batch with `masked_mean(sum, count)`, which gives 0, not NaN, when nothing is masked.
  `expect_dtype` asserts the head's output dtype (catches a silent upcast of the bf16 path).
  """
  check_prediction(prediction)
  n, c = x0.shape
  mul = diffusion_batch_mul
  if t.shape != (n * mul,) or noise.shape != (n * mul, c):
    raise ValueError(f"draws must be t [{n * mul}] and noise [{n * mul}, {c}] for N={n}, "
                     f"diffusion_batch_mul={mul}; got {t.shape} and {noise.shape}")
  x0 = repeat_for_draws(x0.astype(jnp.float32), mul)
  z = repeat_for_draws(z, mul)
  weights = repeat_for_draws(mask_weights.astype(jnp.float32), mul)
  alpha, sigma = sched_lib.alpha_sigma(t, num_timesteps)
  alpha, sigma = alpha[:, None], sigma[:, None]
  noise = noise.astype(jnp.float32)
  x_t = q_sample(x0, noise, alpha, sigma)
  out = head_apply(x_t, t, z)
  if expect_dtype is not None and out.dtype != get_dtype(expect_dtype):
    raise TypeError(f"head output is {out.dtype}, expected {get_dtype(expect_dtype)}")
  pred, var_values = split_output(out, c)
  target = prediction_target(prediction, x0, noise, alpha, sigma)
  per_token = jnp.mean(jnp.square(target - pred.astype(jnp.float32)), axis=-1)
  if var_values is not None:
    per_token = per_token + vlb_term(jax.lax.stop_gradient(pred).astype(jnp.float32),
                                     var_values.astype(jnp.float32), x0, x_t, t, prediction,
                                     num_timesteps)
  # where, not multiply: an unmasked row's value (possibly inf from unused z) must not leak a NaN.
  total = jnp.sum(jnp.where(weights > 0, per_token * weights, 0.0))
  return total, jnp.sum(weights)


def masked_mean(total, count):
  """total / count, and exactly 0 (not NaN) when count is 0."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)


# -- MAR's learned-variance term (optional path) ---------------------------------------------------

def vlb_term(pred, var_values, x0, x_t, t, prediction: str,
             num_timesteps: int = sched_lib.NUM_TIMESTEPS):
  """Per-token VLB in bits (guided-diffusion `_vb_terms_bpd` with clip_denoised=False): KL of the
  true posterior to the model's at t > 0, the discretised decoder NLL at t = 0. `pred` must
  already be stop-gradient'ed: only the variance channels learn from this term."""
  s = sched_lib.base_schedule(num_timesteps)
  g = lambda a: jnp.asarray(a, jnp.float32)[t][:, None]
  alpha, sigma = g(s.alpha), g(s.sigma)
  coef1, coef2 = g(s.posterior_mean_coef1), g(s.posterior_mean_coef2)
  true_log_var = g(s.posterior_log_variance_clipped)
  x0_hat, _ = x0_eps_from_prediction(prediction, pred, x_t, alpha, sigma)
  model_mean = coef1 * x0_hat + coef2 * x_t
  true_mean = coef1 * x0 + coef2 * x_t
  model_log_var = learned_range_log_variance(var_values, true_log_var, g(s.log_betas))
  kl = jnp.mean(normal_kl(true_mean, true_log_var, model_mean, model_log_var), -1) / math.log(2.0)
  nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var),
                  -1) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """guided-diffusion's 256-bin likelihood of data in [-1, 1] (kept as MAR has it for latents)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
