"""Sampling: masked-AR text-to-image (cached, jitted) against a plain full-recompute loop, the mask
schedule, guidance, captioning with the KV cache against uncached decoding, and the generate /
caption commands on a workdir trained for two steps.

One tiny fp32 model with random weights (the zero-initialised head layers made non-zero so the
head depends on its condition). Every generation test uses batch 2 and 3 diffusion steps, so
the compiled programs are few: K in {1, 8, 256} without guidance and K = 8 with it.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from mmar_jax.data.text_tokenizer import encode_prompts, encode_questions
from mmar_jax.diffusion import samplers
from mmar_jax.models import sequence
from mmar_jax.models.mmar import MMAR
from mmar_jax.sample import image as gen
from mmar_jax.sample import text as txt

B, DSTEPS = 2, 3
PROMPTS = ["a red square at the top left", None]  # one captioned row, one unconditional row


def _liven(params: dict) -> dict:
  """Random values (NumPy: nothing to compile) for the parameters that start at exactly zero (the
  head's adaLN and output layers, every bias), and larger token embeddings for clear logit
  margins."""
  rng = np.random.default_rng(7)

  def liven(path, x):
    x = np.asarray(x)
    if np.any(x):
      return x
    # Strong adaLN modulation makes the head depend on its condition z (what the tests look at);
    # the small rest keeps the tokens O(1).
    scale = 0.1 if "adaLN" in jax.tree_util.keystr(path) else 0.05
    return (scale * rng.standard_normal(x.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(liven, params)
  params["backbone"]["embed_tokens"] = params["backbone"]["embed_tokens"] * 20.0
  return params


@pytest.fixture(scope="module")
def model(tiny_mcfg):
  """(graphdef, params). Built eagerly like test_mmar's model, whose op compilations it reuses."""
  graphdef, state = nnx.split(MMAR(tiny_mcfg, rngs=nnx.Rngs(0)))
  return graphdef, jax.tree.map(jnp.asarray, _liven(state.to_pure_dict()))


@pytest.fixture(scope="module")
def prompts(tiny_mcfg, bytes_tokenizer):
  return encode_prompts(bytes_tokenizer, PROMPTS, tiny_mcfg.max_text_len)


def _run(model, prompts, key=0, **kw):
  kw = dict(dict(ar_steps=8, diffusion_steps=DSTEPS, cfg=3.0), **kw)
  tokens, stats = gen.generate_tokens(model, *prompts, jax.random.key(key), **kw)
  return np.asarray(tokens), jax.device_get(stats)


@pytest.fixture(scope="module")
def guided(model, prompts):
  return _run(model, prompts)


# -- the mask schedule -----------------------------------------------------------------------------

def _mar_mask_lens(n, k_steps):
  """MAR's loop, literally: mask_len from the current count, at least 1, below the count."""
  cur, out = n, []
  for k in range(k_steps):
    m = np.floor(n * np.cos(math.pi / 2.0 * (k + 1) / k_steps))
    mask_len = int(max(1, min(cur - 1, m)))
    out.append(mask_len)
    cur = mask_len
  return out


@pytest.mark.parametrize("n,k_steps", [(16, 1), (16, 8), (16, 16), (16, 256), (256, 64), (1, 4)])
def test_mask_schedule_is_mars_and_ends_empty(n, k_steps):
  after, mar = gen.mask_schedule(n, k_steps)
  assert list(mar) == _mar_mask_lens(n, k_steps)
  assert after[-1] == 0 and list(after[:-1]) == list(mar[:-1])
  before = np.concatenate([[n], after[:-1]])
  assert (before - after >= 0).all() and (before - after).sum() == n
  assert gen.max_per_step(n, k_steps) == (before - after).max()
  if 1 < k_steps <= n:
    assert (before - after >= 1).all()  # every step fills something in
  if n == 256 and k_steps == 64:
    assert mar[0] == 255 and gen.max_per_step(n, k_steps) <= 8  # the head samples 8 rows, not 256


# -- the cached layouts against the training layout ------------------------------------------------

def _unpadded(a, seg):
  return np.asarray(a)[np.asarray(seg) == 1]


@pytest.mark.parametrize("per_token", [False, True])
def test_left_padded_prefixes_match_training_layout(per_token):
  """Without their left padding, the cached layouts have exactly the ids, positions and blocks
  of sequence.layout: kind 0 for generation, kind 1 for captioning."""
  lt, n, boi, eoi, pad = 5, 3, 100, 101, 0
  text = jnp.asarray(np.arange(2 * lt).reshape(2, lt) + 10, jnp.int32)
  text_len = jnp.asarray([3, 0], jnp.int32)
  ids, pos, seg, blk = sequence.generation_prefix(text, text_len, boi, pad)
  img_pos, _, img_blk = sequence.image_block(text_len, n, per_token)
  c_ids, c_pos, c_seg, c_blk, _ = sequence.caption_prefix(text, text_len, n, boi, eoi, pad,
                                                          per_token)

  def layout(kind):
    lay = sequence.layout(jnp.full((2,), kind), text_len, lt, n, per_token_positions=per_token)
    ids = sequence.token_ids(text, lay, boi, eoi, pad)
    return [np.asarray(a) for a in (ids, lay["positions"], lay["block_ids"])]

  t2i, i2t = layout(sequence.TEXT_TO_IMAGE), layout(sequence.IMAGE_TO_TEXT)
  # method.md §1.7 by hand, for 3 text tokens and N = 3: one block per text token, <boi> and
  # <eoi>, one for the image; positions are the blocks, or the sequence index per token.
  want_t2i = [0, 1, 2, 3, 4, 4, 4, 5]  # t t t <boi> i i i <eoi>
  want_i2t = [0, 1, 1, 1, 2, 3, 4, 5]  # <boi> i i i <eoi> t t t
  per_token_pos = list(range(8))
  np.testing.assert_array_equal(t2i[2][0, :8], want_t2i)
  np.testing.assert_array_equal(i2t[2][0, :8], want_i2t)
  np.testing.assert_array_equal(t2i[1][0, :8], per_token_pos if per_token else want_t2i)
  np.testing.assert_array_equal(i2t[1][0, :8], per_token_pos if per_token else want_i2t)
  for b, t in enumerate(np.asarray(text_len)):
    # Generation: [text] <boi> in the cache, then the image block.
    np.testing.assert_array_equal(_unpadded(ids[b], seg[b]), t2i[0][b, :t + 1])
    got_pos = np.concatenate([_unpadded(pos[b], seg[b]), img_pos[b]])
    got_blk = np.concatenate([_unpadded(blk[b], seg[b]), img_blk[b]])
    np.testing.assert_array_equal(got_pos, t2i[1][b, :t + 1 + n])
    np.testing.assert_array_equal(got_blk, t2i[2][b, :t + 1 + n])
    # Captioning: <boi> [img] <eoi> [question].
    for got, want in zip((c_ids, c_pos, c_blk), i2t):
      np.testing.assert_array_equal(_unpadded(got[b], c_seg[b]), want[b, :n + 2 + t])


# -- generation ------------------------------------------------------------------------------------

def test_same_seed_same_tokens_other_seed_other_tokens(model, prompts, guided):
  again, _ = _run(model, prompts)
  np.testing.assert_array_equal(guided[0], again)
  other, _ = _run(model, prompts, key=1)
  assert np.abs(other - guided[0]).min(axis=-1).mean() > 1e-3
  assert np.isfinite(guided[0]).all()


@pytest.mark.parametrize("k_steps", [1, 8, 256])
def test_every_position_sampled_once_and_pass_count(model, prompts, k_steps):
  _, stats = _run(model, prompts, ar_steps=k_steps, cfg=1.0)
  assert not stats["masked"].any()
  np.testing.assert_array_equal(stats["writes"], 1)
  # Counted inside the compiled loop: one prefix pass, then one backbone pass per AR step.
  assert stats["backbone_passes"] == k_steps + 1 and stats["backbone_rows"] == B


def test_guidance_doubles_rows_not_passes(guided):
  _, stats = guided
  assert stats["backbone_passes"] == 8 + 1 and stats["backbone_rows"] == 2 * B
  assert not stats["masked"].any()


def test_cfg_one_equals_conditional_only(model, prompts):
  doubled, _ = _run(model, prompts, cfg=1.0, guidance=True)
  single, _ = _run(model, prompts, cfg=1.0, guidance=False)
  np.testing.assert_allclose(doubled, single, atol=1e-5, rtol=0)


def test_cfg_changes_the_captioned_row_only(model, prompts, guided):
  plain, _ = _run(model, prompts, cfg=1.0, guidance=True)
  assert np.abs(plain[0] - guided[0][0]).max() > 1e-3
  # The uncaptioned row's cond and uncond halves coincide: guidance cannot move it.
  np.testing.assert_allclose(plain[1], guided[0][1], atol=1e-5, rtol=0)


def _reference_generate(model, text, text_len, key, k_steps, cfg, cfg_schedule="linear"):
  """MAR's loop without a cache: every step embeds the whole sequence `[text] <boi> [img] <eoi>`
  (training layout) for cond and uncond rows and runs the backbone over all of it."""
  graphdef, state = model
  m = nnx.merge(graphdef, state)
  mc = m.cfg
  n, c = mc.num_image_tokens, mc.vit.token_channels
  orders, token_keys = gen.sample_keys(jax.random.key(key), B, n)
  orders = np.asarray(orders)
  text2 = jnp.concatenate([text, text])
  len2 = jnp.concatenate([text_len, jnp.zeros_like(text_len)])
  kind2 = jnp.asarray([sequence.TEXT_TO_IMAGE] * B + [sequence.IMAGE_ONLY] * B, jnp.int32)

  @jax.jit
  def conditions(tokens, masked):
    emb = m.embed_image(jnp.concatenate([tokens, tokens]), jnp.concatenate([masked, masked]))
    x, _, lay = m.sequence_inputs(text2, len2, kind2, emb)
    h, _ = m.backbone(x, lay["positions"], lay["segment_ids"], lay["block_ids"])
    return sequence.gather_image(h, lay["image_pos"])  # [2B, N, d]

  @jax.jit
  def draw(z, keys, scale):  # every position of every sample, with its own key
    return samplers.sample(lambda x, t, zz: m.head(x, t, zz), z, keys, method="ddpm",
                           num_steps=DSTEPS, cfg=scale, channels=c)

  tokens = np.zeros((B, n, c), np.float32)
  mask = np.ones((B, n), bool)
  for k in range(k_steps):
    z = np.asarray(conditions(jnp.asarray(tokens), jnp.asarray(mask)))
    mask_len = np.floor(n * np.cos(math.pi / 2.0 * (k + 1) / k_steps))
    mask_len = int(max(1, min(mask.sum(-1)[0] - 1, mask_len)))
    mask_next = np.zeros((B, n), bool)
    for b in range(B):
      mask_next[b, orders[b, :mask_len]] = True
    to_pred = mask if k == k_steps - 1 else mask ^ mask_next
    scale = 1 + (cfg - 1) * (n - mask_len) / n if cfg_schedule == "linear" else cfg
    zz = jnp.concatenate([z[:B].reshape(B * n, -1), z[B:].reshape(B * n, -1)])
    x0 = np.asarray(draw(zz, token_keys.reshape(B * n), jnp.float32(scale))).reshape(B, n, c)
    tokens = np.where(to_pred[..., None], x0, tokens)
    mask = mask_next
  return tokens


def test_jitted_cached_loop_equals_python_reference(model, prompts, guided):
  text, text_len = map(jnp.asarray, prompts)
  ref = _reference_generate(model, text, text_len, 0, 8, 3.0)
  np.testing.assert_allclose(guided[0], ref, atol=1e-5, rtol=0)


def test_images_and_unconditional_api(model, bytes_tokenizer, tiny_mcfg):
  imgs = gen.generate_images(model, bytes_tokenizer, None, jax.random.key(0), num=B, ar_steps=8,
                             diffusion_steps=DSTEPS)
  size = tiny_mcfg.image["size"]
  assert imgs.shape == (B, size, size, 3) and imgs.dtype == np.uint8
  # Unconditional = every caption empty, no guidance: the same as the token API with text_len 0.
  tokens, _ = gen.generate_tokens(model, np.zeros((B, tiny_mcfg.max_text_len), np.int32),
                                  np.zeros((B,), np.int32), jax.random.key(0), ar_steps=8,
                                  diffusion_steps=DSTEPS, cfg=1.0)
  np.testing.assert_array_equal(imgs, gen.tokens_to_images(model, tokens))


# -- captioning ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caption_inputs(bytes_tokenizer, tiny_mcfg):
  size = tiny_mcfg.image["size"]
  images = np.random.default_rng(0).uniform(-1, 1, (B, size, size, 3)).astype(np.float32)
  q, q_len = encode_questions(bytes_tokenizer, ["what colour?", None], B)
  return images, q, q_len


def _uncached_decode(model, images, q, q_len, max_tokens, key=None, top_p=None):
  """Recomputes the whole training-layout sequence `<boi> [img] <eoi> [question + answer]` for
  every new token; the image is re-encoded every time too."""
  graphdef, state = model
  m = nnx.merge(graphdef, state)
  mc = m.cfg
  lt = mc.max_text_len

  @jax.jit
  def next_logits(text, text_len):
    mean, _ = m.image_tokenizer.encode(jnp.asarray(images))
    emb = m.embed_image(mean, jnp.zeros(mean.shape[:2], bool))
    kind = jnp.full((B,), sequence.IMAGE_TO_TEXT, jnp.int32)
    x, _, lay = m.sequence_inputs(text, text_len, kind, emb)
    h, _ = m.backbone(x, lay["positions"], lay["segment_ids"], lay["block_ids"])
    last = mc.num_image_tokens + 1 + text_len  # <eoi> when the text is empty
    return m.backbone.logits(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])

  rows = [list(np.asarray(q[b, :q_len[b]])) for b in range(B)]
  out = []
  for i in range(max_tokens):
    text = np.full((B, lt), mc.pad_id, np.int32)
    for b, r in enumerate(rows):
      text[b, :len(r)] = r
    logits = next_logits(jnp.asarray(text), jnp.asarray([len(r) for r in rows], jnp.int32))
    keys = None if top_p is None else jax.vmap(
        lambda r: jax.random.fold_in(jax.random.fold_in(key, r), i))(jnp.arange(B))
    nxt = np.asarray(txt.select_tokens(logits, keys, top_p, mc.text_vocab))
    out.append(nxt)
    for b in range(B):
      rows[b].append(int(nxt[b]))
  return np.stack(out, axis=1)


def test_cached_caption_equals_uncached(model, caption_inputs):
  images, q, q_len = caption_inputs
  got, stats = txt.caption_tokens(model, images, q, q_len, max_tokens=6, eos_id=-1)
  ref = _uncached_decode(model, images, q, q_len, 6)
  np.testing.assert_array_equal(np.asarray(got), ref)
  assert len({tuple(r) for r in ref.tolist()}) == B  # the rows differ: not a degenerate model
  # One prefix pass (the image and question, encoded once), then one pass per further token.
  assert int(stats["backbone_passes"]) == 6


def test_cached_top_p_equals_uncached(model, caption_inputs):
  images, q, q_len = caption_inputs
  key = jax.random.key(3)
  got, _ = txt.caption_tokens(model, images, q, q_len, key, max_tokens=5, top_p=0.9, eos_id=-1)
  ref = _uncached_decode(model, images, q, q_len, 5, key=key, top_p=0.9)
  np.testing.assert_array_equal(np.asarray(got), ref)
  again, _ = txt.caption_tokens(model, images, q, q_len, key, max_tokens=5, top_p=0.9, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_caption_stops_at_eos(model, caption_inputs, bytes_tokenizer):
  images, q, q_len = caption_inputs
  free, _ = txt.caption_tokens(model, images, q, q_len, max_tokens=6, eos_id=-1)
  free = np.asarray(free)
  eos = int(free[0, 2])  # pretend the third token of row 0 is EOS
  got, _ = txt.caption_tokens(model, images, q, q_len, max_tokens=6, eos_id=eos, pad_id=999)
  got = np.asarray(got)
  for b in range(B):
    stop = list(free[b]).index(eos) if eos in free[b] else 6
    np.testing.assert_array_equal(got[b, :stop + 1], free[b, :stop + 1])
    assert (got[b, stop + 1:] == 999).all()
  assert txt.strip_after_eos(got, eos)[0] == list(free[0, :list(free[0]).index(eos)])


def test_select_tokens_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 0.0]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = jax.jit(jax.vmap(lambda k, p: txt.select_tokens(logits, k[None], p, vocab=4), (0, None)))
  draws = np.asarray(draw(keys, 0.7))
  assert set(draws.ravel().tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
  assert (np.asarray(draw(keys, 1e-6)) == 0).all()  # only the most likely token is kept
  assert set(np.asarray(draw(keys, 1.0)).ravel().tolist()) == {0, 1, 2, 3}  # id 4 >= vocab
  assert int(txt.select_tokens(logits, None, vocab=4)[0]) == 0


# -- the commands on a trained workdir -------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from mmar_jax.train.loop import train
  wd = tmp_path_factory.mktemp("sample_run")
  config = tiny_config(("steps", "2"), ("train.checkpoint_every", "2"), ("train.log_every", "1"))
  train(config, str(wd), progress=False)
  return wd


def _cli(*argv):
  from mmar_jax import cli
  return cli.main([str(a) for a in argv])


def test_generate_command_is_byte_reproducible(workdir, tmp_path, capsys):
  args = ["--workdir", workdir, "--prompt", "a red square at the top left", "--num", 3,
          "--ar-steps", 4, "--diffusion-steps", DSTEPS, "--seed", 5]
  assert _cli("generate", *args, "--out", tmp_path / "a.png") == 0
  assert _cli("generate", *args, "--out", tmp_path / "b.png") == 0
  for suffix in ("", "-0", "-1", "-2"):
    a, b = (tmp_path / f"{n}{suffix}.png" for n in "ab")
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  from PIL import Image
  assert Image.open(tmp_path / "a-0.png").size == (16, 16)
  assert Image.open(tmp_path / "a.png").size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 grid, 2 px pad
  # An existing output is refused without --overwrite, and nothing is written.
  before = (tmp_path / "a-1.png").read_bytes()
  assert _cli("generate", *args, "--seed", 6, "--out", tmp_path / "a.png") == 2
  assert "a.png" in capsys.readouterr().err and (tmp_path / "a-1.png").read_bytes() == before
  assert _cli("generate", *args, "--seed", 6, "--out", tmp_path / "a.png", "--overwrite") == 0
  assert (tmp_path / "a-1.png").read_bytes() != before


def test_caption_command(workdir, tmp_path, capsys):
  from PIL import Image
  from mmar_jax.data.shapes import ShapesSpec, render
  img = np.asarray(render("red", "square", "top left", ShapesSpec()), np.uint8)
  Image.fromarray(np.kron(img, np.ones((2, 3, 1), np.uint8))).save(tmp_path / "in.png")  # 32x48
  capsys.readouterr()
  argv = ["caption", "--workdir", workdir, "--image", tmp_path / "in.png", "--max-tokens", 5]
  assert _cli(*argv) == 0
  assert len(capsys.readouterr().out.splitlines()) == 1  # the caption, one line
  assert _cli(*argv, "--question", "what?", "--top-p", 0.9, "--seed", 1) == 0


def test_commands_name_missing_inputs(workdir, tmp_path, capsys):
  assert _cli("generate", "--workdir", tmp_path / "nope", "--out", tmp_path / "x.png") == 2
  assert str(tmp_path / "nope") in capsys.readouterr().err
  assert _cli("caption", "--workdir", workdir, "--image", tmp_path / "missing.png") == 2
  assert "missing.png" in capsys.readouterr().err
  assert _cli("caption", "--workdir", tmp_path, "--image", tmp_path / "missing.png") == 2
  assert _cli("generate", "--workdir", workdir, "--step", 7, "--out", tmp_path / "x.png") == 2
  assert "step 7" in capsys.readouterr().err


# -- many prompts / pictures per process start (commands/sample_files.py) ---------------------------

MANY = ["--ar-steps", 4, "--diffusion-steps", DSTEPS, "--seed", 5, "--num-per-prompt", 2]


def _prompts_file(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("a red square at the top left\n\na blue cross at the bottom right\n")
  return path


def _pngs(directory) -> dict:
  return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png"))}


@pytest.mark.slow  # by default the row program is checked by caption --images and generate's bytes
def test_generate_prompts_file_same_bytes_whatever_the_batch_size(workdir, tmp_path, capsys):
  import json
  prompts = _prompts_file(tmp_path)
  for b in (1, 4):
    assert _cli("generate", "--workdir", workdir, "--prompts", prompts, "--out-dir", tmp_path / f"b{b}",
                "--batch-size", b, *MANY) == 0
  one, four = _pngs(tmp_path / "b1"), _pngs(tmp_path / "b4")
  assert sorted(one) == [f"{i:06d}_{k:02d}.png" for i in range(3) for k in range(2)]
  assert one == four
  assert len(set(one.values())) == 6  # every draw differs
  index = [json.loads(l) for l in (tmp_path / "b4" / "index.jsonl").read_text().splitlines()]
  assert [(r["prompt_index"], r["draw"]) for r in index] == [(i, k) for i in range(3) for k in range(2)]
  assert index[2]["prompt"] == "" and index[2]["file"] == "000001_00.png"
  # A re-run draws only what is missing, and the same bytes.
  (tmp_path / "b4" / "000002_01.png").unlink()
  capsys.readouterr()
  assert _cli("generate", "--workdir", workdir, "--prompts", prompts, "--out-dir", tmp_path / "b4",
              "--batch-size", 4, *MANY) == 0
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert (result["drawn"], result["skipped"]) == (1, 5) and _pngs(tmp_path / "b4") == one


@pytest.mark.slow  # two subprocesses (model load + compile each)
def test_generate_prompts_file_one_device_killed_and_resumed(workdir, tmp_path):
  """On 1 device instead of 8, killed after its first pictures and run again: every file once,
  the same bytes as the 8-device run, no temporary file left."""
  import os
  import signal
  import subprocess
  import sys
  import time

  from conftest import ROOT, subprocess_env
  prompts = _prompts_file(tmp_path)
  assert _cli("generate", "--workdir", workdir, "--prompts", prompts, "--out-dir", tmp_path / "ref",
              "--batch-size", 2, *MANY) == 0
  out = tmp_path / "one"
  cmd = [sys.executable, "-m", "mmar_jax", "generate", "--cpu-devices", "1", "--workdir", str(workdir),
         "--prompts", str(prompts), "--out-dir", str(out), "--batch-size", "1", *map(str, MANY)]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(TQDM_DISABLE="1"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < 2:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = len(list(out.glob("*.png")))
  assert 2 <= partial < 6, partial
  subprocess.run(cmd, cwd=ROOT, env=subprocess_env(TQDM_DISABLE="1"), check=True, capture_output=True)
  assert _pngs(out) == _pngs(tmp_path / "ref")
  assert not [p for p in os.listdir(out) if p.startswith(".")]


def test_caption_many_pictures_skips_the_unreadable(workdir, tmp_path, capsys):
  import json

  from PIL import Image

  from mmar_jax.data.shapes import ShapesSpec, render
  pics = tmp_path / "pics"
  pics.mkdir()
  for i, names in enumerate([("red", "square", "top left"), ("blue", "cross", "center")]):
    Image.fromarray(render(*names, ShapesSpec())).save(pics / f"{i}.png")
  (pics / "broken.png").write_bytes(b"not a picture")
  out = tmp_path / "captions.jsonl"
  capsys.readouterr()
  assert _cli("caption", "--workdir", workdir, "--images", pics, "--out", out, "--max-tokens", 5,
              "--batch-size", 2) == 0
  summary = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert (summary["captioned"], summary["unreadable"]) == (2, 1)
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert [os.path.basename(r["image"]) for r in records] == ["0.png", "1.png", "broken.png"]
  assert "broken.png" in records[2]["error"] and "caption" not in records[2]
  # A second run refuses to replace the file, naming it, and leaves it as it was.
  written = out.read_bytes()
  assert _cli("caption", "--workdir", workdir, "--images", pics, "--out", out) == 2
  assert f"would overwrite {out} (pass --overwrite)" in capsys.readouterr().err
  assert out.read_bytes() == written
  # Batched greedy captions are the one-picture command's.
  for r in records[:2]:
    capsys.readouterr()
    assert _cli("caption", "--workdir", workdir, "--image", r["image"], "--max-tokens", 5) == 0
    assert capsys.readouterr().out.strip() == r["caption"].strip()


def test_prompt_and_picture_lists(tmp_path):
  from mmar_jax.commands.sample_files import image_inputs, read_prompts
  from mmar_jax.errors import InputError
  (tmp_path / "p.jsonl").write_text('{"caption": "a red square"}\n\n{"text": "x", "caption": "b"}\n')
  assert read_prompts(str(tmp_path / "p.jsonl")) == ["a red square", "b"]
  with pytest.raises(InputError, match=r"p.jsonl:1: no 'text' key.*--prompt-key"):
    read_prompts(str(tmp_path / "p.jsonl"), "text")
  (tmp_path / "i.jsonl").write_text('{"image": "a.png", "question": "what?"}\n{"image": "b.png"}\nnot json\n')
  with pytest.raises(InputError, match="i.jsonl:3: not JSON"):
    image_inputs(str(tmp_path / "i.jsonl"), None)
  (tmp_path / "i.jsonl").write_text('{"image": "a.png", "question": "what?"}\n{"image": "b.png"}\n')
  assert image_inputs(str(tmp_path / "i.jsonl"), "q") == [(str(tmp_path / "a.png"), "what?"),
                                                           (str(tmp_path / "b.png"), "q")]
  with pytest.raises(FileNotFoundError, match="no pictures"):
    image_inputs(str(tmp_path / "*.png"), None)
