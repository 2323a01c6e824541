"""The vocabulary-tiled LM-head cross-entropy against `log_softmax` of the full logits: values,
gradients, bf16 compute, jit, and that no [rows, vocab] array appears in its jaxpr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

from mmar_jax.models.text_loss import tiled_cross_entropy

# V is prime, so no tile count > 1 divides it: 4 tiles of 53 (last one clamped, 1 column shared),
# 7 tiles of 31 (6 shared).
R, D, V = 24, 32, 211


def _inputs(hidden_dtype=jnp.float32, w_dtype=jnp.float32, seed=0):
  kh, kw, kt, kg = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(kh, (R, D), jnp.float32).astype(hidden_dtype)
  # Logit std ~2.5: softmaxes that are neither flat nor one-hot.
  w = (jax.random.normal(kw, (D, V), jnp.float32) * (2.5 / np.sqrt(D))).astype(w_dtype)
  targets = jax.random.randint(kt, (R,), 0, V, jnp.int32)
  # Both ends of the vocabulary and the columns the clamped last tile of 4 and 7 tiles shares.
  targets = targets.at[:5].set(jnp.array([0, V - 1, 158, 186, 181], jnp.int32))
  # A few confident rows (target = argmax), whose small losses make the relative check harder.
  logits = jnp.dot(hidden.astype(jnp.float32), w.astype(jnp.float32))
  targets = targets.at[5:8].set(jnp.argmax(logits[5:8], axis=1).astype(jnp.int32))
  weights = jax.random.uniform(kg, (R,), jnp.float32) * (jnp.arange(R) % 3 != 0)  # some zero
  return hidden, w, targets, weights


def _reference(hidden, w, targets, compute_dtype=jnp.float32):
  logits = jnp.dot(hidden.astype(compute_dtype), w.astype(compute_dtype),
                   preferred_element_type=jnp.float32)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]


def _rel(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return np.abs(got - ref).max() / np.abs(ref).max()


def _weighted(loss_fn, weights):
  return lambda h, w, t: jnp.sum(loss_fn(h, w, t) * weights)


@pytest.mark.parametrize("num_tiles", [1, 4, 7])
def test_values_match_log_softmax(num_tiles):
  hidden, w, targets, _ = _inputs()
  got = tiled_cross_entropy(hidden, w, targets, num_tiles=num_tiles, compute_dtype=jnp.float32)
  ref = _reference(hidden, w, targets)
  assert got.shape == (R,) and got.dtype == jnp.float32
  assert np.all(np.asarray(ref) > 0.05), "losses near 0 would make the relative check vacuous"
  rel = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)) / np.abs(np.asarray(ref))
  assert rel.max() < 1e-6, rel.max()


@pytest.mark.parametrize("num_tiles, unroll", [(1, False), (4, False), (7, False), (7, True)])
def test_grads_match_log_softmax(num_tiles, unroll):
  """`unroll` (the cost compiles' straight-line tiles) against the same reference."""
  hidden, w, targets, weights = _inputs()
  tiled = lambda h, w_, t: tiled_cross_entropy(h, w_, t, num_tiles=num_tiles,
                                               compute_dtype=jnp.float32, unroll=unroll)
  got = jax.grad(_weighted(tiled, weights), argnums=(0, 1))(hidden, w, targets)
  ref = jax.grad(_weighted(_reference, weights), argnums=(0, 1))(hidden, w, targets)
  for g, r in zip(got, ref):
    assert g.shape == r.shape and g.dtype == r.dtype
    assert _rel(g, r) < 1e-5, _rel(g, r)


def test_more_tiles_than_the_vocabulary_needs():
  # 100 tiles of V=211 are 3 wide, so only 71 are walked; 500 tiles are clamped to width 1.
  hidden, w, targets, weights = _inputs()
  ref = _reference(hidden, w, targets)
  ref_g = jax.grad(_weighted(_reference, weights), argnums=(0, 1))(hidden, w, targets)
  for num_tiles in (100, 500):
    tiled = lambda h, w_, t: tiled_cross_entropy(h, w_, t, num_tiles=num_tiles,
                                                 compute_dtype=jnp.float32)
    assert _rel(tiled(hidden, w, targets), ref) < 1e-6
    got_g = jax.grad(_weighted(tiled, weights), argnums=(0, 1))(hidden, w, targets)
    assert max(_rel(g, r) for g, r in zip(got_g, ref_g)) < 1e-5


def test_bf16_compute_dtype():
  # bf16 activations with fp32 master weights, as in training.
  hidden, w, targets, weights = _inputs(hidden_dtype=jnp.bfloat16)
  tiled = lambda h, w_, t: tiled_cross_entropy(h, w_, t, num_tiles=4, compute_dtype=jnp.bfloat16)
  ref_fn = lambda h, w_, t: _reference(h, w_, t, jnp.bfloat16)
  got = tiled(hidden, w, targets)
  assert got.dtype == jnp.float32
  assert _rel(got, ref_fn(hidden, w, targets)) < 1e-2
  d_hidden, d_w = jax.grad(_weighted(tiled, weights), argnums=(0, 1))(hidden, w, targets)
  assert d_hidden.dtype == jnp.bfloat16 and d_w.dtype == jnp.float32
  ref_h, ref_w = jax.grad(_weighted(ref_fn, weights), argnums=(0, 1))(hidden, w, targets)
  # Our backward matmuls run in bf16 where autodiff of the reference upcasts to fp32.
  assert _rel(d_hidden, ref_h) < 3e-2 and _rel(d_w, ref_w) < 3e-2


def test_same_values_under_jit():
  hidden, w, targets, weights = _inputs(seed=1)
  fn = lambda h, w_, t: tiled_cross_entropy(h, w_, t, num_tiles=7, compute_dtype=jnp.float32)
  eager = fn(hidden, w, targets)
  np.testing.assert_allclose(jax.jit(fn)(hidden, w, targets), eager, rtol=1e-6)
  np.testing.assert_allclose(_reference(hidden, w, targets), eager, rtol=1e-6)
  grad = jax.grad(_weighted(fn, weights), argnums=(0, 1))
  for g, jg in zip(grad(hidden, w, targets), jax.jit(grad)(hidden, w, targets)):
    assert _rel(jg, g) < 1e-6


def _shapes(jaxpr):
  """Every variable's shape in a jaxpr, sub-jaxprs (scan bodies, custom-vjp calls) included."""
  for v in list(jaxpr.constvars) + list(jaxpr.invars):
    yield tuple(getattr(v.aval, "shape", ()))
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, ClosedJaxpr):
          yield from _shapes(sub.jaxpr)
        elif isinstance(sub, Jaxpr):
          yield from _shapes(sub)


def _rows_by_vocab(loss_fn, num_tiles):
  hidden, w, targets, weights = _inputs()
  closed = jax.make_jaxpr(jax.value_and_grad(_weighted(loss_fn, weights), argnums=(0, 1)))(
      hidden, w, targets)
  tile = -(-V // num_tiles)
  vocab_sizes = {V, tile * num_tiles}  # padded or not
  shapes = set(_shapes(closed.jaxpr))
  assert len(shapes) > 5  # the walk saw something
  return sorted(s for s in shapes if R in s and vocab_sizes & set(s))


@pytest.mark.parametrize("num_tiles", [4, 7])
def test_no_rows_by_vocab_array(num_tiles):
  tiled = lambda h, w_, t: tiled_cross_entropy(h, w_, t, num_tiles=num_tiles,
                                               compute_dtype=jnp.float32)
  assert _rows_by_vocab(tiled, num_tiles) == []
  # The check can fail: the full-logits reference has [R, V] arrays.
  assert (R, V) in _rows_by_vocab(_reference, num_tiles)
