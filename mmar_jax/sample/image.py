"""Masked-autoregressive image generation (method.md §5): text to image, and unconditional.

One jitted program per (batch, K, diffusion steps, sampler, guidance) does the whole job:

  prefix pass   the backbone runs once over `[text] <boi>` (cond rows) and `<boi>` (uncond rows)
                and writes their keys/values into one KV cache;
  K image steps each runs the EmbeddingViT + projector on the current tokens (masked ones
                replaced by the mask token) and the backbone on the N image positions only,
                attending to the cached prefix; the image block's keys/values are rewritten into
                the same cache slots every step (attention inside the image is bidirectional, so
                every image position changes whenever a token is filled in);
                the head then samples the positions that leave the mask at this step.

Cache layout (length Lt + 1 + N): rows are LEFT-padded so that cond and uncond rows, whose
prefixes have different lengths, share the slots of the image block (Lt + 1 ...). Padding slots
carry segment id 0 and are never attended; positions and block ids of the real tokens are those
of the training layout (sequence.py, kind 0 / kind 2), so the cached program computes what a
full-sequence forward pass over `[text] <boi> [img]` computes.

Mask schedule (MAR's): all N positions start masked in a random order per sample; after step k,
mask_len = max(1, min(masked - 1, floor(N cos(pi/2 (k+1)/K)))) positions stay masked (the first
ones of the order), except after the last step, where none do. The schedule depends on (N, K)
only, so it is a static table, and so is the largest number M of positions any step fills in:
each step samples M rows per image (the surplus rows are dropped), not N. When K > N the
schedule reaches one masked position before the last step and then holds it (MAR's `max(1, .)`
wins over `< masked`): those steps fill in nothing, and the last one fills in the rest.

Randomness: sample b of a batch uses fold_in(key, b), or its own key when one key per sample is
given (so a sample does not depend on the batch it is generated in); its order comes from
fold_in(that, 0), and the diffusion noise of image position p from fold_in(fold_in(that, 1), p),
each position being sampled exactly once. So the
unguided program gives the tokens of the guided one at cfg = 1 (within rounding: the backbone
then runs on twice the rows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax.data.preprocess import to_uint8
from mmar_jax.data.text_tokenizer import encode_prompts
from mmar_jax.diffusion import samplers
from mmar_jax.models import sequence

CFG_SCHEDULES = ("linear", "constant")


# -- the static plan -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything that shapes the compiled program (hashable: a jit static argument)."""
  ar_steps: int = 64
  diffusion_steps: int = 100
  sampler: str = "ddpm"
  cfg_schedule: str = "linear"
  guidance: bool = True  # run [cond; uncond] as one doubled batch

  def __post_init__(self):
    if self.ar_steps < 1:
      raise ValueError(f"ar_steps must be >= 1, got {self.ar_steps}")
    if self.diffusion_steps < 1:
      raise ValueError(f"diffusion_steps must be >= 1, got {self.diffusion_steps}")
    if self.sampler not in ("ddpm", "ddim"):
      raise ValueError(f"unknown sampler {self.sampler!r}; use ddpm or ddim")
    if self.cfg_schedule not in CFG_SCHEDULES:
      raise ValueError(f"unknown cfg schedule {self.cfg_schedule!r}; use linear or constant")


def mask_schedule(n: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """MAR's schedule for N tokens in K steps: (masked_after [K], mar_mask_len [K]).

  masked_after[k] positions are still masked after step k (0 after the last step);
  mar_mask_len[k] is MAR's `mask_len` at step k, which the linear guidance schedule reads (at the
  last step MAR computes it as usual, max(1, ...), although every position is then sampled).
  """
  after, mar = [], []
  cur = n
  for k in range(steps):
    m = math.floor(n * math.cos(math.pi / 2.0 * (k + 1) / steps))
    mask_len = max(1, min(cur - 1, m))
    mar.append(mask_len)
    cur = 0 if k == steps - 1 else mask_len
    after.append(cur)
  return np.asarray(after, np.int32), np.asarray(mar, np.int32)


def max_per_step(n: int, steps: int) -> int:
  """The most positions any step fills in: the rows the head samples per image and step."""
  after, _ = mask_schedule(n, steps)
  before = np.concatenate([[n], after[:-1]])
  return int(np.max(before - after))


def cfg_scales(cfg, n: int, steps: int, schedule: str) -> jax.Array:
  """Guidance scale per step [K]: MAR's linear 1 + (cfg - 1)(N - mask_len)/N, or constant."""
  cfg = jnp.asarray(cfg, jnp.float32)
  if schedule == "constant":
    return jnp.full((steps,), cfg)
  _, mar = mask_schedule(n, steps)
  frac = jnp.asarray((n - mar) / n, jnp.float32)
  return 1.0 + (cfg - 1.0) * frac


def sample_keys(key: jax.Array, batch: int, n: int) -> tuple[jax.Array, jax.Array]:
  """(orders int [B, N]: a random permutation per sample, token_keys [B, N]: the diffusion key of
  each image position). `key`: one key (sample b's is fold_in(key, b)) or one key per sample."""
  if key.ndim == 1:
    if key.shape[0] != batch:
      raise ValueError(f"{key.shape[0]} keys for a batch of {batch}")
    per_sample = key
  else:
    per_sample = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
  orders = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, 0), n))(per_sample)
  positions = jnp.arange(n)
  token_keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(
      jax.random.fold_in(k, 1), positions))(per_sample)
  return orders.astype(jnp.int32), token_keys


# -- the program -----------------------------------------------------------------------------------

def split_model(model):
  """An MMAR module or (graphdef, state) -> (graphdef, state)."""
  if isinstance(model, tuple):
    return model
  return nnx.split(model)


def typed_key(key) -> jax.Array:
  """A new-style key (raw uint32[2] keys are wrapped): key arrays index and reshape as scalars."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def model_config_of(model):
  """The MMARConfig of a module or of (graphdef, state) (merging copies no arrays)."""
  if isinstance(model, tuple):
    return nnx.merge(*model).cfg
  return model.cfg


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _generate(graphdef, state, text, text_len, key, cfg, temperature, *, plan: Plan):
  model = nnx.merge(graphdef, state)
  mc = model.cfg
  b, lt = text.shape
  n, c = mc.num_image_tokens, mc.vit.token_channels
  per_token = mc.image["positions"] == "per_token"
  orders, token_keys = sample_keys(key, b, n)
  rank = jnp.argsort(orders, axis=1)  # rank[b, p]: where position p comes in the order

  # Rows of the backbone: [cond; uncond] with guidance, the uncond caption being empty.
  if plan.guidance:
    rows_text = jnp.concatenate([text, text])
    rows_len = jnp.concatenate([text_len, jnp.zeros_like(text_len)])
  else:
    rows_text, rows_len = text, text_len
  r = rows_text.shape[0]
  cache = model.backbone.init_cache(r, lt + 1 + n)
  ids, pos, seg, blk = sequence.generation_prefix(rows_text, rows_len, mc.boi_id, mc.pad_id)
  _, cache = model.backbone(model.backbone.embed(ids), pos, seg, blk, cache=cache, cache_index=0)
  img_pos, img_seg, img_blk = sequence.image_block(rows_len, n, per_token)

  after_np, _ = mask_schedule(n, plan.ar_steps)
  after = jnp.asarray(after_np)
  before = jnp.asarray(np.concatenate([[n], after_np[:-1]]).astype(np.int32))
  m = max_per_step(n, plan.ar_steps)
  scales = cfg_scales(cfg, n, plan.ar_steps, plan.cfg_schedule)
  brow = jnp.arange(b)[:, None]

  def head_apply_for(sel):
    if not mc.head.n_positions:
      return lambda x, t, z: model.head(x, t, z)
    p = sel.reshape(-1)
    p = jnp.concatenate([p, p]) if plan.guidance else p
    return lambda x, t, z: model.head(x, t, z, p)

  rows = (lambda a: jnp.concatenate([a, a])) if plan.guidance else (lambda a: a)

  def step(k, carry):
    tokens, masked, cache, passes, writes = carry
    emb = model.embed_image(rows(tokens), rows(masked))
    hidden, cache = model.backbone(emb, img_pos, img_seg, img_blk, cache=cache, cache_index=lt + 1)
    # The positions leaving the mask: order[after_k : before_k], padded to M (surplus dropped).
    j = after[k] + jnp.arange(m)
    valid = j < before[k]
    sel = jnp.take_along_axis(orders, jnp.broadcast_to(jnp.minimum(j, n - 1), (b, m)), axis=1)
    gather = lambda h: jnp.take_along_axis(h, sel[..., None], axis=1).reshape(b * m, -1)
    z = gather(hidden[:b])
    if plan.guidance:
      z = jnp.concatenate([z, gather(hidden[b:])])
    x0 = samplers.sample(head_apply_for(sel), z, token_keys[brow, sel].reshape(b * m),
                         method=plan.sampler, num_steps=plan.diffusion_steps,
                         temperature=temperature, cfg=scales[k] if plan.guidance else None,
                         prediction=mc.head.prediction, channels=c)
    target = jnp.where(valid[None, :], sel, n)  # out of range: dropped by the scatter
    tokens = tokens.at[brow, target].set(x0.reshape(b, m, c), mode="drop")
    writes = writes.at[brow, target].add(1, mode="drop")
    return tokens, rank < after[k], cache, passes + 1, writes

  init = (jnp.zeros((b, n, c), jnp.float32), jnp.ones((b, n), bool), cache,
          jnp.asarray(1, jnp.int32), jnp.zeros((b, n), jnp.int32))
  tokens, masked, _, passes, writes = jax.lax.fori_loop(0, plan.ar_steps, step, init)
  stats = dict(backbone_passes=passes, backbone_rows=jnp.asarray(r, jnp.int32),
               head_rows_per_step=jnp.asarray(b * m, jnp.int32), masked=masked, writes=writes)
  return tokens, stats


def generate_tokens(model, text, text_len, key, *, ar_steps: int = 64, diffusion_steps: int = 100,
                    sampler: str = "ddpm", cfg: float = 4.0, cfg_schedule: str = "linear",
                    temperature: float = 1.0, guidance: bool | None = None):
  """Image tokens [B, N, C] (fp32) for captions `text` int [B, Lt] / `text_len` [B] (length 0:
  unconditional), and stats: backbone_passes (one prefix pass + K image steps, counted inside the
  loop), backbone_rows (2B with guidance), head_rows_per_step, the final `masked` [B, N] (all
  False) and `writes` [B, N] (how often each position was sampled: all 1).

  `model`: an MMAR module or (graphdef, state). Guidance (one doubled batch [cond; uncond]) is on
  when cfg != 1 unless `guidance` says otherwise; cfg and temperature are traced (no recompile).
  """
  graphdef, state = split_model(model)
  if guidance is None:
    guidance = float(cfg) != 1.0
  plan = Plan(ar_steps=int(ar_steps), diffusion_steps=int(diffusion_steps), sampler=sampler,
              cfg_schedule=cfg_schedule, guidance=bool(guidance))
  return _generate(graphdef, state, jnp.asarray(text, jnp.int32),
                   jnp.asarray(text_len, jnp.int32), typed_key(key), jnp.asarray(cfg, jnp.float32),
                   jnp.asarray(temperature, jnp.float32), plan=plan)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, tokens):
  model = nnx.merge(graphdef, state)
  return model.decode_tokens(tokens)


def tokens_to_images(model, tokens) -> np.ndarray:
  """Tokens [B, N, C] -> uint8 images [B, H, W, 3] through the model's image tokenizer."""
  graphdef, state = split_model(model)
  return to_uint8(jax.device_get(_decode(graphdef, state, tokens)))


def generate_images(model, tokenizer, prompts: Sequence[str | None] | None, key, *,
                    num: int | None = None, ar_steps: int = 64, diffusion_steps: int = 100,
                    sampler: str = "ddpm", cfg: float = 4.0, cfg_schedule: str = "linear",
                    temperature: float = 1.0) -> np.ndarray:
  """uint8 images [B, H, W, 3] for a list of captions (None / "" entries: unconditional), or
  `num` unconditional samples when `prompts` is None. Without any caption there is nothing to
  guide towards, so guidance is off."""
  graphdef, state = split_model(model)
  mc = model_config_of((graphdef, state))
  if prompts is None:
    if not num:
      raise ValueError("generate_images: give prompts or num")
    prompts = [None] * int(num)
  text, text_len = encode_prompts(tokenizer, prompts, mc.max_text_len)
  guidance = bool(text_len.any()) and float(cfg) != 1.0
  tokens, _ = generate_tokens((graphdef, state), text, text_len, key, ar_steps=ar_steps,
                              diffusion_steps=diffusion_steps, sampler=sampler, cfg=cfg,
                              cfg_schedule=cfg_schedule, temperature=temperature, guidance=guidance)
  return tokens_to_images((graphdef, state), tokens)
