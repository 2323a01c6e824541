"""MAR's discrete cosine noise schedule (guided-diffusion form) and its respacing.

Everything is computed once in float64 NumPy and handed to JAX as constants: the schedule spans
abar from ~1 to 2.4e-9, and deriving it in fp32 would lose the small end (1/alpha_999 = 20291).

  f(s)     = cos^2(((s / T) + 0.008) / 1.008 * pi / 2)
  beta_i   = min(1 - f(i + 1) / f(i), 0.999),  i = 0..T-1
  abar_t   = prod_{i <= t} (1 - beta_i);  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)

Respacing to K steps keeps the original indices round(i (T-1) / (K-1)) and recomputes the betas
between kept steps (1 - abar_kept / abar_previous_kept), exactly as guided-diffusion's
SpacedDiffusion, so the sampler's posteriors are those of the coarser chain. The head always sees
the ORIGINAL timestep index of a kept step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000
MAX_BETA = 0.999


def cosine_f(s: np.ndarray) -> np.ndarray:
  """guided-diffusion's alpha_bar(s) for s in [0, 1] (the 0.008 offset keeps beta_0 > 0)."""
  return np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int = NUM_TIMESTEPS, max_beta: float = MAX_BETA) -> np.ndarray:
  """Discrete betas; the clip at 0.999 fixes the last step (f(1) = 0 would give beta = 1)."""
  i = np.arange(num_timesteps, dtype=np.float64)
  betas = 1.0 - cosine_f((i + 1) / num_timesteps) / cosine_f(i / num_timesteps)
  return np.minimum(betas, max_beta)


def respaced_timesteps(num_steps: int, num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """The kept original indices, increasing: round(i (T-1) / (K-1)); K = T keeps all of them.

  The stride is accumulated in Python floats and rounded half-to-even, exactly as guided-diffusion's
  `space_timesteps` (MAR's sampler) does: for some K (e.g. 21) i (T-1) / (K-1) lands on a .5 and
  the accumulated float decides the side. For K = 100 both give 0, 10, 20, ..., 989, 999.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in 1..{num_timesteps}, got {num_steps}")
  stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
  steps, cursor = [], 0.0
  for _ in range(num_steps):
    steps.append(round(cursor))
    cursor += stride
  steps = np.asarray(steps, np.int64)
  if len(np.unique(steps)) != num_steps:
    raise ValueError(f"respacing to {num_steps} steps repeats a timestep")
  return steps


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-step float64 constants of a (possibly respaced) chain; index k is the k-th kept step.

  timesteps:                 original index of each kept step (what the head is given)
  betas, alphas_cumprod:     of the respaced chain (abar at kept steps equals the base abar)
  alphas_cumprod_prev:       abar of the previous kept step (1 before the first)
  alpha, sigma:              sqrt(abar), sqrt(1 - abar)
  posterior_variance:        "fixed-small" variance of q(x_prev | x_t, x0)
  posterior_log_variance_clipped: its log, with step 0's (= 0) replaced by step 1's
  posterior_mean_coef1/2:    mean of q(x_prev | x_t, x0) = coef1 x0 + coef2 x_t
  log_betas:                 upper end of the learned-range log variance
  """
  timesteps: np.ndarray
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  log_betas: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)


def _chain(betas: np.ndarray, timesteps: np.ndarray) -> Schedule:
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # Step 0's posterior variance is 0; guided-diffusion borrows step 1's for the log so the
  # learned-range interpolation and the decoder term stay finite.
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(
      np.maximum(post_var, 1e-20))
  return Schedule(
      timesteps=timesteps,
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      alpha=np.sqrt(abar),
      sigma=np.sqrt(1.0 - abar),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
      log_betas=np.log(betas),
  )


@functools.lru_cache(maxsize=None)
def base_schedule(num_timesteps: int = NUM_TIMESTEPS) -> Schedule:
  """The full T-step training chain."""
  return _chain(cosine_betas(num_timesteps), np.arange(num_timesteps, dtype=np.int64))


@functools.lru_cache(maxsize=None)
def respaced_schedule(num_steps: int, num_timesteps: int = NUM_TIMESTEPS) -> Schedule:
  """The K-step sampling chain (betas recomputed between kept steps)."""
  base = base_schedule(num_timesteps)
  kept = respaced_timesteps(num_steps, num_timesteps)
  abar = base.alphas_cumprod[kept]
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return _chain(betas, kept)


# Base-chain constants by original timestep, float64.
ALPHAS_CUMPROD = base_schedule().alphas_cumprod


def alpha_sigma(t, num_timesteps: int = NUM_TIMESTEPS):
  """(alpha_t, sigma_t) in fp32 for integer timesteps t (any shape), gathered from fp64 values."""
  base = base_schedule(num_timesteps)
  t = jnp.asarray(t, jnp.int32)
  return (jnp.asarray(base.alpha, jnp.float32)[t], jnp.asarray(base.sigma, jnp.float32)[t])
