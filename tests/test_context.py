"""The context diagnostic (`diagnose context`): the cuts against dense-mask references, what they
must and must not change on tiny models whose structure fixes the answer, and the command on a
real two-step workdir."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from mmar_jax.commands import diagnose_context as dc
from mmar_jax.models import attention, sequence
from mmar_jax.models.mmar import MMAR
from mmar_jax.models.vit import attention_mask


def _masked(b, n, visible, seed=0):
  rng = np.random.default_rng(seed)
  out = np.ones((b, n), bool)
  for i in range(b):
    out[i, rng.permutation(n)[:visible]] = False
  return jnp.asarray(out)


def test_llm_cut_is_the_dense_mask_without_masked_to_visible():
  b, lt, n = 4, 6, 9
  kind = jnp.asarray([0, 2, 0, 1])
  text_len = jnp.asarray([3, 0, 6, 4])
  lay = sequence.layout(kind, text_len, lt, n)
  masked = _masked(b, n, 5) & (kind != sequence.IMAGE_TO_TEXT)[:, None]
  cut = sequence.cut_image_context(lay["block_ids"], lay["image_pos"], masked)
  mask = lambda blk: np.asarray(attention.structure_mask(lay["segment_ids"], blk, lay["segment_ids"], blk))[:, 0]
  # The reference: the original dense mask, with every (masked image query, visible image key)
  # entry removed and nothing else touched.
  s = lay["block_ids"].shape[1]
  m_seq = np.zeros((b, s), bool)
  v_seq = np.zeros((b, s), bool)
  for i in range(b):
    pos = np.asarray(lay["image_pos"][i])
    m_seq[i, pos] = np.asarray(masked[i])
    v_seq[i, pos] = ~np.asarray(masked[i])
  want = mask(lay["block_ids"]) & ~(m_seq[:, :, None] & v_seq[:, None, :])
  np.testing.assert_array_equal(mask(cut), want)
  assert (mask(cut) != mask(lay["block_ids"])).any()  # the cut removed something


def test_vit_visible_mask_against_reference():
  masked = _masked(3, 6, 2, seed=1)
  got = np.asarray(attention_mask(masked, "visible"))[:, 0]
  m = np.asarray(masked)
  for b in range(3):
    for q in range(6):
      for k in range(6):
        assert got[b, q, k] == ((not m[b, q] and not m[b, k]) or q == k)
  assert np.asarray(attention_mask(masked, "all")).all()


@pytest.fixture(scope="module")
def models(tiny_mcfg):
  """(graphdef, params) of the tiny model with the ViT attending to visible tokens (the default)
  and with it seeing every slot, both with non-zero head layers so the head reads z."""
  out = {}
  for attend in ("visible", "all"):
    cfg = dataclasses.replace(tiny_mcfg, vit=dataclasses.replace(tiny_mcfg.vit, attend=attend))
    graphdef, state = nnx.split(MMAR(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: x if np.any(x) else 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                          state.to_pure_dict())
    out[attend] = (graphdef, params)
  return out


@pytest.fixture(scope="module")
def measured(models, demo_batcher):
  """Each cut's loss (sum, count) at 12 of 16 visible, unconditional, plus the LLM-cut loss with
  swapped context, for both models; and the attention shares."""
  batch = jax.tree.map(jnp.asarray, demo_batcher.local_batch(0))

  @jax.jit
  def run(params_visible, params_all):
    out = {}
    for name, params in (("visible", params_visible), ("all", params_all)):
      model = nnx.merge(models[name][0], params)
      prep = dc.with_visible(model, batch, jnp.int32(sequence.IMAGE_ONLY), jnp.int32(12),
                             jax.random.key(0))
      out[name] = dict(masked=prep["masked"], loss=dc.masked_loss(model, prep),
                       cut_llm=dc.masked_loss(model, prep, "llm"),
                       cut_vit=dc.masked_loss(model, prep, "vit"),
                       cut_llm_swapped=dc.masked_loss(model, dc.swapped(prep), "llm"),
                       swapped=dc.masked_loss(model, dc.swapped(prep)),
                       shares=dc.attention_shares(model, prep))
    return out

  return jax.device_get(run(models["visible"][1], models["all"][1]))


def test_with_visible_masks_exactly_that_many(measured):
  assert (np.asarray(measured["visible"]["masked"]).sum(1) == 4).all()


def test_cuts_change_what_the_structure_says(measured):
  vis, full = measured["visible"], measured["all"]
  ratio = lambda x: float(x[0] / x[1])
  # ViT attending to visible tokens only: cutting its masked->visible attention changes nothing.
  assert ratio(vis["cut_vit"]) == pytest.approx(ratio(vis["loss"]), rel=1e-6)
  # ...and then, with the LLM's cut too, masked positions know nothing of the visible tokens:
  # swapping those for another picture's leaves the loss unchanged.
  assert ratio(vis["cut_llm_swapped"]) == pytest.approx(ratio(vis["cut_llm"]), rel=1e-5)
  # Without the cut the context matters (the invariance above could fail).
  assert abs(ratio(vis["swapped"]) - ratio(vis["loss"])) > 1e-4
  # A ViT that sees every slot carries context itself: its cut changes the loss.
  assert abs(ratio(full["cut_vit"]) - ratio(full["loss"])) > 1e-4


def test_attention_shares_are_probabilities(measured, tiny_mcfg):
  shares = np.asarray(measured["visible"]["shares"])  # [L, 4], summed over masked queries and heads
  queries = 4 * 8 * tiny_mcfg.backbone.num_heads
  # A masked image query sees the image block and <boi> only (no caption: unconditional).
  np.testing.assert_allclose(shares.sum(1), queries, rtol=1e-5)
  assert (shares[:, dc.SHARES.index("text")] == 0).all()
  assert (shares[:, dc.SHARES.index("visible")] > 0).all()


def test_nearest_neighbour_mse_against_hand_values():
  ref = dict(x0=np.asarray([[-1.0, -1.0], [1.0, 0.0]]), z=np.asarray([[0.0, 0.0], [5.0, 5.0]]),
             x0_hat=np.zeros((2, 2)))
  ev = dict(x0=np.asarray([[-1.0, -1.0], [1.0, 1.0]]), z=np.asarray([[0.1, 0.0], [4.0, 5.0]]),
            x0_hat=np.asarray([[-1.0, -0.5], [0.0, 1.0]]))
  got = dc.nearest_neighbour_mse(ref, ev, None)
  # Neighbours: token 0 -> ref 0 (exact), token 1 -> ref 1 (off by 1 in one channel).
  assert got["all"]["nn_mse"] == pytest.approx(0.25)
  assert got["all"]["head_mse"] == pytest.approx((0.25 + 1.0) / 4)
  # The background (the most frequent token, [-1, -1]) is not lit: only token 1 is.
  assert got["lit"]["tokens"] == 1 and got["lit"]["nn_mse"] == pytest.approx(0.5)


@pytest.mark.slow  # a trained run + the command; by default the in-process context tests check its parts
def test_diagnose_context_command_on_a_workdir(tmp_path, capsys):
  from helpers_train import train_here
  from mmar_jax.cli import main
  wd = tmp_path / "run"
  train_here(wd, "--config.steps=2")
  out = tmp_path / "ctx"
  assert main(["diagnose", "context", "--workdir", str(wd), "--out", str(out), "--batches", "2"]) == 0
  result = json.loads((out / "context.json").read_text())
  assert (out / "context.png").stat().st_size > 0
  assert result["visible"] == [0, 4, 8, 12, 15] and result["step"] == 2
  for kind in ("captioned", "unconditional"):
    r = result[kind]
    # Nothing visible: nothing to cut or swap.
    assert len({round(r[name][0], 6) for name in dc.LOSSES}) == 1
    # The tiny config's ViT attends to visible tokens only: its cut is a no-op everywhere.
    np.testing.assert_allclose(r["loss_cut_vit"], r["loss"], rtol=1e-5)
    assert len(r["attention"]["visible"]) == len(result["visible"])
  assert result["head_x0_t999"]["all"]["tokens"] > 0
  assert "cutting the LLM raises the loss" in capsys.readouterr().out
  assert main(["diagnose", "context", "--workdir", str(wd), "--out", str(out)]) != 0
  assert "--overwrite" in capsys.readouterr().err
