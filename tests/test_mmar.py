"""The MMAR model: attention structure, the joint loss, and a tiny model that overfits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmar_jax.models import sequence
from mmar_jax.models.mmar import MMAR, combine, mask_ratio, random_mask, special_token_ids


@pytest.fixture(scope="module")
def model(tiny_mcfg):
  return MMAR(tiny_mcfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def hidden_fn(model):
  """LLM hidden states for a mixed batch; one compile serves every perturbation below."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, text, text_len, kind, tokens):
    m = nnx.merge(graphdef, params)
    emb = m.embed_image(tokens, jnp.zeros(tokens.shape[:2], bool))
    x, _, lay = m.sequence_inputs(text, text_len, kind, emb)
    h, _ = m.backbone(x, lay["positions"], lay["segment_ids"], lay["block_ids"])
    return h, lay["image_pos"]

  return lambda *a: run(params, *a)


def _inputs(mcfg, kind):
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(0, 200, (2, mcfg.max_text_len)), jnp.int32)
  text_len = jnp.asarray([12, 20], jnp.int32)
  tokens = jnp.asarray(rng.normal(size=(2, mcfg.num_image_tokens, mcfg.vit.token_channels)), jnp.float32)
  return text, text_len, jnp.asarray([kind, kind], jnp.int32), tokens


def test_later_text_token_leaves_earlier_outputs_unchanged(tiny_mcfg, hidden_fn):
  for kind in (sequence.TEXT_TO_IMAGE, sequence.IMAGE_TO_TEXT):
    text, text_len, kinds, tokens = _inputs(tiny_mcfg, kind)
    h0, _ = hidden_fn(text, text_len, kinds, tokens)
    lay = sequence.layout(kinds, text_len, tiny_mcfg.max_text_len, tiny_mcfg.num_image_tokens)
    j = 9  # a text token inside both samples' captions
    text2 = text.at[:, j].set((text[:, j] + 7) % 200)
    h1, _ = hidden_fn(text2, text_len, kinds, tokens)
    pos = np.argmax(np.asarray(lay["order"]) == j, axis=1)  # sequence position of text slot j
    for b in range(2):
      np.testing.assert_array_equal(h0[b, :pos[b]], h1[b, :pos[b]])
      assert np.abs(h0[b, pos[b]:] - h1[b, pos[b]:]).max() > 1e-4


def test_one_image_token_changes_every_position_of_its_block(tiny_mcfg, hidden_fn):
  text, text_len, kinds, tokens = _inputs(tiny_mcfg, sequence.TEXT_TO_IMAGE)
  h0, image_pos = hidden_fn(text, text_len, kinds, tokens)
  h1, _ = hidden_fn(text, text_len, kinds, tokens.at[:, 5].add(1.0))
  img0 = np.take_along_axis(np.asarray(h0), np.asarray(image_pos)[..., None], axis=1)
  img1 = np.take_along_axis(np.asarray(h1), np.asarray(image_pos)[..., None], axis=1)
  assert (np.abs(img0 - img1).max(-1) > 1e-6).all()  # every image position of the block
  # ...and nothing before the block (the caption) moves.
  for b in range(2):
    first = int(image_pos[b, 0]) - 1  # <boi>
    np.testing.assert_array_equal(h0[b, :first + 1], h1[b, :first + 1])


def test_text_after_image_depends_on_every_image_token(tiny_mcfg, hidden_fn):
  text, text_len, kinds, tokens = _inputs(tiny_mcfg, sequence.IMAGE_TO_TEXT)
  n = tiny_mcfg.num_image_tokens
  last_text = n + 2 + int(text_len[0]) - 1  # <boi> [img] <eoi> [text]: the caption's last token
  jac = jax.jacobian(lambda t: hidden_fn(text, text_len, kinds, t)[0][0, last_text].sum())(tokens)
  assert (np.abs(np.asarray(jac[0])).sum(-1) > 0).all()


def test_layout_ids_match_method():
  kinds = jnp.asarray([0, 1, 2], jnp.int32)
  lay = sequence.layout(kinds, jnp.asarray([2, 3, 3]), 4, 3)
  ids = np.asarray(sequence.token_ids(jnp.full((3, 4), 10), lay, 100, 101, 0))
  np.testing.assert_array_equal(ids[0], [10, 10, 100, -1, -1, -1, 101, 0, 0])
  np.testing.assert_array_equal(ids[1], [100, -1, -1, -1, 101, 10, 10, 10, 0])
  np.testing.assert_array_equal(ids[2], [100, -1, -1, -1, 101, 0, 0, 0, 0])
  # Shared image position: the block has one RoPE position, and the position advances by 1.
  np.testing.assert_array_equal(np.asarray(lay["positions"])[0, :7], [0, 1, 2, 3, 3, 3, 4])
  per_token = sequence.layout(kinds, jnp.asarray([2, 3, 3]), 4, 3, per_token_positions=True)
  np.testing.assert_array_equal(np.asarray(per_token["positions"])[0, :7], [0, 1, 2, 3, 4, 5, 6])
  targets, weights = sequence.text_targets(jnp.asarray(ids), lay["segment_ids"], 100)
  # [text][img]: the second text token and <eoi> are targets; <boi> and image positions are not.
  np.testing.assert_array_equal(np.asarray(weights)[0], [1, 0, 0, 0, 0, 1, 0, 0, 0])
  assert int(targets[0, 5]) == 101
  # [img][text]: the image block predicts <eoi>, <eoi> the first text token, and so on; the last
  # text token (before padding) predicts nothing.
  np.testing.assert_array_equal(np.asarray(weights)[1], [0, 0, 0, 1, 1, 1, 1, 0, 0])


def test_special_tokens_reuse_spare_rows_or_grow():
  assert special_token_ids(151936, 151646) == (151646, 151647, 151936)
  assert special_token_ids(258, 258) == (258, 259, 260)


def test_mask_ratio_distributions_and_random_mask():
  keys = jax.random.split(jax.random.key(0), 2000)
  s1 = np.asarray(jax.vmap(lambda k: mask_ratio(k, "stage1"))(keys))
  s2 = np.asarray(jax.vmap(lambda k: mask_ratio(k, "stage2"))(keys))
  assert s1.min() >= 0.7 and s1.max() <= 1.0 and s1.mean() > 0.85
  assert s2.min() >= 0.0 and s2.max() <= 1.0 and abs(s2.mean() - 0.5) < 0.05
  m = np.asarray(random_mask(jax.random.split(jax.random.key(1), 4), 16, jnp.float32(0.7)))
  assert (m.sum(1) == 12).all()  # ceil(16 * 0.7)
  assert len({tuple(r) for r in m}) > 1  # a random order per sample


def test_loss_matches_independent_numpy(model, tiny_mcfg, demo_batcher):
  """Both terms recomputed in NumPy (float64) from the same draws: the v-target, the MEAN over
  channels, the masked sum; cross-entropy from the logits over the text targets."""
  from mmar_jax.diffusion import schedule
  batch = jax.tree.map(jnp.asarray, demo_batcher.local_batch(0))
  prep = model.prepare(batch, jax.random.key(3), jnp.float32(0.8), 0.0, 2)
  counts = {k: prep.pop(k) for k in ("text_count", "image_count")}
  sums = model.loss_sums(prep)
  # Independent diffusion term.
  b, n, c = prep["tokens"].shape
  x0 = np.asarray(prep["tokens"], np.float64)
  t = np.asarray(prep["t"])
  noise = np.asarray(prep["noise"], np.float64)
  a = np.sqrt(schedule.ALPHAS_CUMPROD)[t][..., None]
  s = np.sqrt(1 - schedule.ALPHAS_CUMPROD)[t][..., None]
  x_t = a * x0[:, :, None] + s * noise
  v = a * noise - s * x0[:, :, None]
  # The head's prediction is its own output on (x_t, t, z): recompute z from the model.
  image_embeds = model.embed_image(prep["tokens"], prep["masked"])
  x, ids, lay = model.sequence_inputs(prep["text"], prep["text_len"], prep["kind"], image_embeds)
  hidden, _ = model.backbone(x, lay["positions"], lay["segment_ids"], lay["block_ids"])
  z = np.asarray(sequence.gather_image(hidden, lay["image_pos"]))
  pred = np.asarray(model.head(jnp.asarray(x_t.reshape(-1, c), jnp.float32), jnp.asarray(t.reshape(-1)),
                               jnp.asarray(np.repeat(z.reshape(b * n, -1), 2, axis=0)))).reshape(b, n, 2, c)
  per_token = ((v - pred) ** 2).mean(-1)  # the MEAN over channels (MAR's mean_flat)
  masked = np.asarray(prep["masked"], np.float64)[..., None]
  np.testing.assert_allclose(float(sums["image_sum"]), (per_token * masked).sum(), rtol=1e-4)
  assert float(counts["image_count"]) == masked.sum() * 2
  # Independent text term.
  logits = np.asarray(model.backbone.logits(hidden), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  targets, weights = (np.asarray(a) for a in sequence.text_targets(ids, lay["segment_ids"], tiny_mcfg.boi_id))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(sums["text_sum"]), (ce * weights).sum(), rtol=1e-4)


def test_loss_is_finite_without_masked_tokens_or_text_targets(model, demo_batcher):
  batch = jax.tree.map(jnp.asarray, demo_batcher.local_batch(0))
  # All understanding samples with a zero mask ratio: no masked token at all.
  b1 = dict(batch, kind=jnp.full_like(batch["kind"], sequence.IMAGE_TO_TEXT))
  prep = model.prepare(b1, jax.random.key(0), jnp.float32(0.0), 0.0, 2)
  counts = {k: prep.pop(k) for k in ("text_count", "image_count")}
  loss, parts = combine(model.loss_sums(prep), counts, 1.0, 1.0)
  assert float(counts["image_count"]) == 0 and float(parts["loss_image"]) == 0.0
  assert np.isfinite(float(loss))
  # Unconditional samples only: no text target but <eoi>... drop that too by using kind [img]
  # with every caption dropped: the only target left is <eoi>, so check the image-only count path.
  b2 = dict(batch, kind=jnp.full_like(batch["kind"], sequence.IMAGE_ONLY))
  prep = model.prepare(b2, jax.random.key(0), jnp.float32(1.0), 0.0, 2)
  counts = {k: prep.pop(k) for k in ("text_count", "image_count")}
  loss, parts = combine(model.loss_sums(prep), counts, 1.0, 1.0)
  assert np.isfinite(float(loss)) and float(parts["loss_image"]) > 0
  zero = {"text_count": jnp.float32(0), "image_count": jnp.float32(0)}
  loss, parts = combine({"text_sum": jnp.float32(0), "image_sum": jnp.float32(0)}, zero, 1.0, 1.0)
  assert float(loss) == 0.0


def test_t2i_text_weight_scales_the_text_targets_of_text_to_image_samples(model, tiny_mcfg, demo_batcher):
  """loss.t2i_text_weight: a weighted mean in which the text targets of `[text][img]` samples
  count w times; 0 leaves exactly the other samples' mean."""
  batch = jax.tree.map(jnp.asarray, demo_batcher.local_batch(0))
  kind = np.asarray(batch["kind"])
  assert (kind == sequence.TEXT_TO_IMAGE).any() and (kind != sequence.TEXT_TO_IMAGE).any()
  per_sample = {}
  for w in (1.0, 0.0, 0.25):
    prep = model.prepare(batch, jax.random.key(3), jnp.float32(0.8), 0.0, 2, t2i_text_weight=w)
    counts = {k: prep.pop(k) for k in ("text_count", "image_count")}
    per_sample[w] = (float(model.loss_sums(prep)["text_sum"]), float(counts["text_count"]),
                     float(combine(model.loss_sums(prep), counts, 1.0, 1.0)[1]["loss_text"]))
  # Recompute the two groups' sums and counts separately.
  prep = model.prepare(batch, jax.random.key(3), jnp.float32(0.8), 0.0, 2)
  image_embeds = model.embed_image(prep["tokens"], prep["masked"])
  x, ids, lay = model.sequence_inputs(prep["text"], prep["text_len"], prep["kind"], image_embeds)
  hidden, _ = model.backbone(x, lay["positions"], lay["segment_ids"], lay["block_ids"])
  targets, weights = sequence.text_targets(ids, lay["segment_ids"], tiny_mcfg.boi_id)
  ce = np.asarray(-jnp.take_along_axis(jax.nn.log_softmax(model.backbone.logits(hidden)),
                                       targets[..., None], axis=-1)[..., 0]) * np.asarray(weights)
  t2i = kind == sequence.TEXT_TO_IMAGE
  s_t2i, n_t2i = ce[t2i].sum(), np.asarray(weights)[t2i].sum()
  s_rest, n_rest = ce[~t2i].sum(), np.asarray(weights)[~t2i].sum()
  for w, (text_sum, count, loss_text) in per_sample.items():
    np.testing.assert_allclose(text_sum, s_rest + w * s_t2i, rtol=1e-4)
    np.testing.assert_allclose(count, n_rest + w * n_t2i, rtol=1e-6)
    np.testing.assert_allclose(loss_text, (s_rest + w * s_t2i) / (n_rest + w * n_t2i), rtol=1e-4)
