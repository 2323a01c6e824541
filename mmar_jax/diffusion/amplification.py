"""bf16 numerics of the eps / v / x0 parameterisations (method.md §4, "The numerical argument"):
the pure maths.

MMAR claims v-prediction minimises the bf16 error of every sampling step. The analytic argument:
a head that outputs o = a x0 + b eps with error delta sqrt(a^2 + b^2) makes a DDIM step t -> t'
err by |sigma_t' alpha_t - alpha_t' sigma_t| delta A_t with the amplification
A_t = sqrt(a^2 + b^2) / |alpha_t b - sigma_t a| >= 1 (Cauchy-Schwarz), = 1 exactly for v,
1/alpha_t for eps, 1/sigma_t for x0, computed here in float64 from the schedule. What measures a
head against it, monitors training and checks results is `train/numerics.py`.
"""

from __future__ import annotations

import numpy as np

from mmar_jax.diffusion import parameterization as par
from mmar_jax.diffusion import schedule as sched_lib

SAMPLE_STEPS = 100  # MAR's respacing: "one DDIM step" is one kept step of this chain
# bf16 unit roundoff: the relative rounding error of one bf16 value (8 significand bits).
BF16_ROUNDOFF = 2.0 ** -9


def coefficients(prediction: str, alpha, sigma):
  """(a, b) of o = a x0 + b eps for each parameterisation (arrays like alpha)."""
  par.check_prediction(prediction)
  one, zero = np.ones_like(alpha), np.zeros_like(alpha)
  return {"eps": (zero, one), "x0": (one, zero), "v": (-sigma, alpha)}[prediction]


def amplification(prediction: str, num_timesteps: int = sched_lib.NUM_TIMESTEPS) -> np.ndarray:
  """float64 [T]: sqrt(a^2 + b^2) / |alpha_t b - sigma_t a| at t = 0..T-1 (method.md §4)."""
  s = sched_lib.base_schedule(num_timesteps)
  a, b = coefficients(prediction, s.alpha, s.sigma)
  return np.hypot(a, b) / np.abs(s.alpha * b - s.sigma * a)


def step_factor(t: np.ndarray, t_prev: np.ndarray,
                num_timesteps: int = sched_lib.NUM_TIMESTEPS) -> np.ndarray:
  """|sigma_t' alpha_t - alpha_t' sigma_t|: what a unit error of the solved (x0, eps) pair costs
  one DDIM step t -> t' (t' = -1: the step onto x0, alpha = 1, sigma = 0)."""
  s = sched_lib.base_schedule(num_timesteps)
  t_prev = np.asarray(t_prev)
  alpha_p = np.where(t_prev < 0, 1.0, s.alpha[np.maximum(t_prev, 0)])
  sigma_p = np.where(t_prev < 0, 0.0, s.sigma[np.maximum(t_prev, 0)])
  return np.abs(sigma_p * s.alpha[t] - alpha_p * s.sigma[t])


def predicted_step_error(prediction: str, num_steps: int = SAMPLE_STEPS):
  """(t, error) at every kept step of the K-step chain: the one-step DDIM error the argument
  predicts for an output rounded to bf16 (delta = unit roundoff, unit-variance x0 and eps)."""
  kept = sched_lib.respaced_timesteps(num_steps)
  prev = np.append(-1, kept[:-1])
  return kept, BF16_ROUNDOFF * amplification(prediction)[kept] * step_factor(kept, prev)
