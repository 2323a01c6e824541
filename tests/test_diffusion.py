"""Schedule, parameterisations, the diffusion loss and the samplers (method.md §4)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmar_jax.diffusion import parameterization as par
from mmar_jax.diffusion import samplers
from mmar_jax.diffusion import schedule as sched_lib

_BASE = sched_lib.base_schedule()  # float64 alpha_t, sigma_t by original timestep

C = 4  # token channels: one tiny shape family for the whole file
N = 6


# -- schedule -------------------------------------------------------------------------------------

def test_cosine_schedule_check_values():
  s = sched_lib.base_schedule()
  assert s.alphas_cumprod[-1] == pytest.approx(2.43e-9, rel=0.01)
  assert 1 / s.alpha[-1] == pytest.approx(20291, rel=0.01)
  assert 1 / s.sigma[0] == pytest.approx(155.6, rel=0.01)
  assert np.all(np.diff(s.alphas_cumprod) < 0) and s.betas.max() == pytest.approx(0.999)
  alpha, sigma = sched_lib.alpha_sigma(jnp.array([0, 999]))
  assert alpha.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(alpha ** 2 + sigma ** 2), 1.0, rtol=1e-6)


def test_respacing_matches_mar():
  kept = sched_lib.respaced_timesteps(100)
  np.testing.assert_array_equal(kept, np.round(np.arange(100) * 999 / 99))
  assert list(kept[:8]) == [0, 10, 20, 30, 40, 50, 61, 71] and list(kept[-2:]) == [989, 999]
  r, base = sched_lib.respaced_schedule(100), sched_lib.base_schedule()
  # Betas recomputed between kept steps keep abar at the kept steps.
  np.testing.assert_allclose(r.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10)
  np.testing.assert_allclose(r.betas[1], 1 - base.alphas_cumprod[10] / base.alphas_cumprod[0])
  # Fixed-small posterior variance; step 0 lands exactly on x0.
  assert r.posterior_variance[0] == 0 and r.posterior_mean_coef1[0] == pytest.approx(1.0)
  assert r.posterior_log_variance_clipped[0] == r.posterior_log_variance_clipped[1]
  np.testing.assert_array_equal(sched_lib.respaced_timesteps(1000), np.arange(1000))


# -- parameterisations ----------------------------------------------------------------------------

@jax.jit
def _round_trips(x0, eps):
  """Every conversion at every t, in one compiled program."""
  alpha, sigma = [a[:, None] for a in sched_lib.alpha_sigma(jnp.arange(1000))]
  x_t = par.q_sample(x0, eps, alpha, sigma)
  v = par.v_from_x0_eps(x0, eps, alpha, sigma)
  out = {"x0_from_v": par.x0_from_v(x_t, v, alpha, sigma),
         "eps_from_v": par.eps_from_v(x_t, v, alpha, sigma)}
  for p in par.PREDICTIONS:
    target = par.prediction_target(p, x0, eps, alpha, sigma)
    out[p] = par.x0_eps_from_prediction(p, target, x_t, alpha, sigma)
  return out


def test_conversions_invert_each_other_at_every_t():
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(1000, C)).astype(np.float32)
  eps = rng.normal(size=(1000, C)).astype(np.float32)
  out = _round_trips(x0, eps)
  # Through v: well conditioned at every t (fp32, |x| up to ~4).
  np.testing.assert_allclose(out["x0_from_v"], x0, atol=4e-6)
  np.testing.assert_allclose(out["eps_from_v"], eps, atol=4e-6)
  # x0 <-> eps amplify rounding by 1/alpha_t (eps-pred) or 1/sigma_t (x0-pred).
  alpha, sigma = _BASE.alpha[:, None], _BASE.sigma[:, None]
  for p in par.PREDICTIONS:
    x0_hat, eps_hat = out[p]
    tol = 4e-6 * {"v": 1.0, "eps": 1 / alpha, "x0": 1 / sigma}[p]
    assert np.all(np.abs(np.asarray(x0_hat) - x0) <= tol), p
    assert np.all(np.abs(np.asarray(eps_hat) - eps) <= tol), p
  # In float64 the x0 <-> eps conversions are exact to 1e-9 everywhere.
  x0n, epsn = x0.astype(np.float64), eps.astype(np.float64)
  xtn = alpha * x0n + sigma * epsn
  np.testing.assert_allclose(par.x0_from_eps(xtn, epsn, alpha, sigma), x0n, atol=1e-9)
  np.testing.assert_allclose(par.eps_from_x0(xtn, x0n, alpha, sigma), epsn, atol=1e-9)


# -- loss -----------------------------------------------------------------------------------------

def _linear_head(seed=0, out=C, d=3):
  """A fixed differentiable stand-in for the head, easy to redo in NumPy."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(C, out)).astype(np.float32)
  b = rng.normal(size=(d, out)).astype(np.float32)
  jax_fn = lambda x, t, z: x @ a + z @ b + (t[:, None] / 1000.0).astype(jnp.float32)
  np_fn = lambda x, t, z: x @ a + z @ b + t[:, None] / 1000.0
  return jax_fn, np_fn


def test_loss_matches_numpy():
  mul, d = 2, 3
  head, head_np = _linear_head()
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(N, C)).astype(np.float32)
  z = rng.normal(size=(N, d)).astype(np.float32)
  mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
  t = rng.integers(0, 1000, size=(N * mul,)).astype(np.int32)
  t[:2] = [0, 999]
  noise = rng.normal(size=(N * mul, C)).astype(np.float32)
  losses = jax.jit(lambda *a: {
      p: par.diffusion_loss(head, *a, prediction=p, diffusion_batch_mul=mul)
      for p in par.PREDICTIONS})(x0, z, mask, t, noise)
  # NumPy, float64: MAR's tiling (row d*N + r is draw d of token r), mean over channels.
  nn = noise.astype(np.float64)
  a, s = _BASE.alpha[t][:, None], _BASE.sigma[t][:, None]
  x0r, zr, wr = np.tile(x0, (mul, 1)), np.tile(z, (mul, 1)), np.tile(mask, mul)
  xt = a * x0r + s * nn
  for prediction, (total, count) in losses.items():
    target = {"v": a * nn - s * x0r, "eps": nn, "x0": x0r}[prediction]
    per_token = np.mean((target - head_np(xt, t, zr)) ** 2, axis=-1)
    assert float(count) == mask.sum() * mul
    np.testing.assert_allclose(float(total), np.sum(per_token * wr), rtol=1e-5, err_msg=prediction)
    np.testing.assert_allclose(float(par.masked_mean(total, count)),
                               np.sum(per_token * wr) / np.sum(wr), rtol=1e-5)


def test_loss_without_masked_tokens_contributes_zero():
  head, _ = _linear_head()
  x0 = np.ones((N, C), np.float32)
  t = np.arange(N, dtype=np.int32)
  noise = np.ones((N, C), np.float32)
  # An inf condition on unmasked rows (NaN loss there) must not leak either.
  z = np.full((N, 3), np.inf, np.float32)
  total, count, mean = jax.jit(lambda *a: (lambda tc: (*tc, par.masked_mean(*tc)))(
      par.diffusion_loss(head, *a)))(x0, z, np.zeros((N,), np.float32), t, noise)
  assert float(total) == 0.0 and float(count) == 0.0 and float(mean) == 0.0
  with pytest.raises(TypeError, match="bfloat16"):
    jax.eval_shape(lambda *a: par.diffusion_loss(head, *a, expect_dtype="bfloat16"),
                   x0, z, np.ones((N,), np.float32), t, noise)


def test_learned_variance_term_trains_only_variance_channels():
  rng = np.random.default_rng(2)
  t = np.array([0, 1, 10, 500, 998, 999], np.int32)
  noise = rng.normal(size=(N, C)).astype(np.float32)
  out0 = 0.1 * rng.normal(size=(N, 2 * C)).astype(np.float32)
  x0 = rng.normal(size=(N, C)).astype(np.float32)

  def loss(out, channels):
    return par.diffusion_loss(lambda *_: out[:, :channels], x0, jnp.zeros((N, 1)), jnp.ones((N,)),
                              t, noise, prediction="v")[0]

  grads = jax.jit(lambda o: (loss(o, 2 * C), jax.grad(loss)(o, 2 * C), jax.grad(loss)(o, C)))
  value, g, g_mse = grads(out0)
  assert np.isfinite(float(value))
  np.testing.assert_allclose(g[:, :C], g_mse[:, :C], rtol=1e-6)
  assert np.all(np.abs(np.asarray(g[:, C:])).sum(-1) > 0)


def test_draw_per_row_keys_do_not_depend_on_batch():
  keys = jax.random.split(jax.random.key(7), N)
  draw = jax.jit(par.draw, static_argnums=(1, 2))
  t, noise = draw(keys, N, C)
  perm = np.array([3, 1, 5, 0, 2, 4])
  t2, noise2 = draw(keys[perm], N, C)
  np.testing.assert_array_equal(t[perm], t2)
  np.testing.assert_array_equal(noise[perm], noise2)
  assert t.dtype == jnp.int32 and noise.dtype == jnp.float32
  assert int(t.min()) >= 0 and int(t.max()) < 1000


# -- samplers -------------------------------------------------------------------------------------

def _oracle(prediction, x0):
  """A head that knows the answer: the exact eps / v / x0 of x0 given x_t."""
  def head(x_t, t, z):
    alpha, sigma = [a[:, None] for a in sched_lib.alpha_sigma(t)]
    if prediction == "x0":
      return jnp.broadcast_to(x0, x_t.shape)
    if prediction == "eps":
      return (x_t - alpha * x0) / sigma
    return (alpha * x_t - x0) / sigma  # v, rewritten without eps
  return head


@functools.lru_cache(maxsize=None)
def _oracle_samplers(method):
  """One compiled program per sampler runs all three parameterisations."""
  def run(x0, z, key):
    return {p: samplers.sample(_oracle(p, x0), z, key, method=method, prediction=p, channels=C,
                               temperature=0.0) for p in par.PREDICTIONS}
  return jax.jit(run)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_recovers_x0_with_oracle(method):
  x0 = np.random.default_rng(0).normal(size=(N, C)).astype(np.float32)
  outs = _oracle_samplers(method)(x0, jnp.zeros((N, 2)), jax.random.key(1))
  for prediction, out in outs.items():
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-3, err_msg=prediction)


MU, STD = 0.5, 0.3  # a Gaussian data distribution whose exact denoiser is known


def _gaussian_head(prediction, learned_var=False):
  """The exact E[x0 | x_t] of x0 ~ N(MU, STD^2), as an eps / v / x0 prediction; learned_var adds
  variance channels at -1, i.e. exactly the fixed-small variance."""
  def head(x_t, t, z):
    a, g = [u[:, None] for u in sched_lib.alpha_sigma(t)]
    x0 = MU + a * STD ** 2 / (a ** 2 * STD ** 2 + g ** 2) * (x_t - a * MU)
    out = par.prediction_target(prediction, x0, (x_t - a * x0) / g, a, g)
    return jnp.concatenate([out, -jnp.ones_like(out)], -1) if learned_var else out
  return head


def _gaussian_moments(method, temperature=1.0, num_steps=100):
  """Mean and std of the sampler's output, propagated exactly through the (linear) chain."""
  r = sched_lib.respaced_schedule(num_steps)
  m, var = 0.0, 1.0
  for k in reversed(range(num_steps)):
    a, g = r.alpha[k], r.sigma[k]
    gain = a * STD ** 2 / (a ** 2 * STD ** 2 + g ** 2)  # x0_hat = MU + gain (x_t - a MU)
    if method == "ddpm":
      c1, c2 = r.posterior_mean_coef1[k], r.posterior_mean_coef2[k]
      lin, off = c1 * gain + c2, c1 * (MU - gain * a * MU)
      noise_var = temperature ** 2 * r.posterior_variance[k] if k > 0 else 0.0
    else:
      a_prev, g_prev = np.sqrt(r.alphas_cumprod_prev[k]), np.sqrt(1 - r.alphas_cumprod_prev[k])
      lin = a_prev * gain + g_prev * (1 - a * gain) / g
      off = (a_prev - g_prev * a / g) * (MU - gain * a * MU)
      noise_var = 0.0
    m, var = lin * m + off, lin ** 2 * var + noise_var
  return m, np.sqrt(var)


def test_samplers_reproduce_a_gaussian_analytically():
  """With the exact denoiser of a Gaussian, each sampler's output moments equal the exact
  propagation of the initial noise through its chain: this pins the posterior coefficients, the
  fixed-small variance, temperature (per-step noise only) and DDIM's update."""
  rows = 4000
  z = jnp.zeros((rows, 1))

  @jax.jit
  def run(key):
    go = lambda head, **kw: samplers.sample(head, z, key, channels=C, **kw)
    return dict(ddpm=go(_gaussian_head("v"), method="ddpm", prediction="v"),
                ddpm_learned=go(_gaussian_head("v", True), method="ddpm", prediction="v"),
                ddpm_cold=go(_gaussian_head("x0"), method="ddpm", prediction="x0", temperature=0.5),
                ddim=go(_gaussian_head("eps"), method="ddim", prediction="eps"))

  out = run(jax.random.key(0))
  for name, method, temp in (("ddpm", "ddpm", 1.0), ("ddpm_cold", "ddpm", 0.5),
                             ("ddim", "ddim", 1.0)):
    mean, std = _gaussian_moments(method, temp)
    x = np.asarray(out[name])
    assert abs(x.mean() - mean) < 0.01 and abs(x.std() - std) < 0.01, (name, x.mean(), x.std(), std)
  assert _gaussian_moments("ddpm", 0.5)[1] < _gaussian_moments("ddpm")[1] - 0.03
  np.testing.assert_allclose(out["ddpm_learned"], out["ddpm"], atol=1e-5)


def _toy_head(x, t, z):
  """A condition-dependent stand-in head (any deterministic function of (x_t, t, z) will do)."""
  return jnp.tanh(x * z[:, :1] + z[:, 1:2] + t[:, None] / 1000.0)


def test_cfg_one_equals_conditional_only_and_guidance_changes_samples():
  z_cond = np.random.default_rng(0).normal(size=(N, 2)).astype(np.float32)
  doubled = np.concatenate([z_cond, np.zeros((N, 2), np.float32)])  # [cond; uncond]
  key = jax.random.split(jax.random.key(5), N)  # per-row keys
  guided_run = jax.jit(lambda z, cfg: samplers.sample(_toy_head, z, key, method="ddpm", cfg=cfg,
                                                       channels=C, num_steps=20))
  plain_run = jax.jit(lambda z, key: samplers.sample(_toy_head, z, key, method="ddpm", channels=C,
                                                      num_steps=20))
  plain = plain_run(z_cond, key)
  np.testing.assert_allclose(guided_run(doubled, jnp.full((N,), 1.0)), plain, atol=1e-6)
  guided = guided_run(doubled, jnp.full((N,), 4.0))
  assert guided.shape == (N, C) and np.all(np.isfinite(np.asarray(guided)))
  assert not np.allclose(guided, plain, atol=1e-3)
  # Per-row keys: a token's trajectory does not depend on where it sits in the batch.
  perm = np.array([3, 1, 5, 0, 2, 4])
  np.testing.assert_allclose(plain_run(z_cond[perm], key[perm]), plain[perm], atol=1e-6)


def test_guide_is_mar_formula_and_keeps_conditional_variance():
  out = np.random.default_rng(0).normal(size=(2 * N, 2 * C)).astype(np.float32)
  g = np.asarray(jax.jit(samplers.guide, static_argnums=2)(out, 3.0, C))
  cond, uncond = out[:N], out[N:]
  np.testing.assert_allclose(g[:, :C], uncond[:, :C] + 3.0 * (cond[:, :C] - uncond[:, :C]),
                             atol=1e-5)
  np.testing.assert_array_equal(g[:, C:], cond[:, C:])


def step_between(t: int, t_prev: int, num_timesteps: int = sched_lib.NUM_TIMESTEPS):
  """Constants of one reverse step between any two original timesteps (t_prev = -1: to x0), from
  fp64 by the textbook formulas: the reference the samplers' steps are checked against."""
  base = sched_lib.base_schedule(num_timesteps)
  abar = base.alphas_cumprod[t]
  abar_prev = 1.0 if t_prev < 0 else base.alphas_cumprod[t_prev]
  beta = 1.0 - abar / abar_prev
  post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
  f = lambda a: jnp.asarray(a, jnp.float32)
  return samplers.StepCoefs(
      t=jnp.asarray(t, jnp.int32), alpha=f(np.sqrt(abar)), sigma=f(np.sqrt(1 - abar)),
      alpha_prev=f(np.sqrt(abar_prev)), sigma_prev=f(np.sqrt(1 - abar_prev)),
      coef1=f(beta * np.sqrt(abar_prev) / (1 - abar)),
      coef2=f((1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)),
      log_var=f(np.log(max(post_var, 1e-20))), log_beta=f(np.log(beta)),
      ddim_sigma=f(np.sqrt(post_var)), is_last=jnp.asarray(t_prev < 0))


@jax.jit
def _single_steps(x0, eps):
  c, last = step_between(700, 300), step_between(0, -1)
  x_t = c.alpha * x0 + c.sigma * eps
  v = c.alpha * eps - c.sigma * x0
  x_0 = last.alpha * x0 + last.sigma * eps
  v_0 = last.alpha * eps - last.sigma * x0
  return dict(
      ddim=samplers.ddim_step(v, x_t, c, prediction="v"),
      ddim_want=c.alpha_prev * x0 + c.sigma_prev * eps,
      ddpm=samplers.ddpm_step(v, x_t, c, jnp.zeros_like(x_t), prediction="v"),
      ddpm_want=c.coef1 * x0 + c.coef2 * x_t,
      ddim_last=samplers.ddim_step(v_0, x_0, last, prediction="v"),
      ddpm_last=samplers.ddpm_step(v_0, x_0, last, jnp.ones_like(x0), prediction="v"))


def test_single_steps_match_closed_forms():
  """ddim_step between any two timesteps is alpha' x0_hat + sigma' eps_hat; ddpm_step without
  noise is the posterior mean; both land on x0 (no noise added) at the last step."""
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(N, C)).astype(np.float32)
  out = _single_steps(x0, rng.normal(size=(N, C)).astype(np.float32))
  np.testing.assert_allclose(out["ddim"], out["ddim_want"], atol=1e-5)
  np.testing.assert_allclose(out["ddpm"], out["ddpm_want"], atol=1e-5)
  np.testing.assert_allclose(out["ddim_last"], x0, atol=1e-5)
  np.testing.assert_allclose(out["ddpm_last"], x0, atol=1e-5)
