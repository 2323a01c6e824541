"""The MMAR model: one Qwen2 decoder over text tokens and continuous image tokens, an EmbeddingViT
+ VisProjector feeding the image into the LLM, and a diffusion head on the LLM's image outputs.

Training goes in two steps so gradient accumulation can average over the global batch:
  `prepare` draws everything random for a batch (keyed per example) and needs no gradients;
  `loss_sums` runs the model on (part of) a prepared batch and returns summed losses, which the
  caller divides by the global counts from `prepare` (method.md §1.9: a term whose count is 0
  contributes 0).
"""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mmar_jax.diffusion import parameterization, schedule
from mmar_jax.dtypes import resolve_dtype
from mmar_jax.models import sequence
from mmar_jax.models.diffusion_head import DiffusionHead, HeadConfig
from mmar_jax.models.image_tokenizer import (denormalize, make_image_tokenizer, normalize,
                                             sample_posterior, token_norm, token_spec)
from mmar_jax.models.qwen2 import Qwen2, Qwen2Config
from mmar_jax.models.vit import EmbeddingViT, VisProjector, ViTConfig
from mmar_jax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MMARConfig:
  backbone: Qwen2Config
  vit: ViTConfig
  head: HeadConfig
  image: dict  # the config's model.image group (tokenizer kind, size, patch, scale, vae, positions)
  max_text_len: int
  boi_id: int
  eoi_id: int
  pad_id: int
  eos_id: int
  text_vocab: int  # len(text tokenizer): ids below it are the tokenizer's own

  @property
  def num_image_tokens(self) -> int:
    return self.vit.num_tokens

  @property
  def seq_len(self) -> int:
    return self.max_text_len + self.num_image_tokens + 2

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def __hash__(self):
    # `image` is a dict: hash the JSON form, so a graphdef holding this config is hashable and
    # can be a static jit argument (equal models share one compiled program).
    return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

  @classmethod
  def from_dict(cls, d: dict) -> "MMARConfig":
    d = dict(d)
    d["backbone"] = Qwen2Config.from_dict(d["backbone"])
    d["vit"] = ViTConfig(**d["vit"])
    d["head"] = HeadConfig.from_dict(d["head"])
    return cls(**d)


def special_token_ids(vocab_size: int, text_vocab: int) -> tuple[int, int, int]:
  """(<boi>, <eoi>, final vocab size), method.md §1.6: reuse the embedding's first two spare rows
  (ids >= len(tokenizer)), or grow the embedding by two rows."""
  if vocab_size >= text_vocab + 2:
    return text_vocab, text_vocab + 1, vocab_size
  return vocab_size, vocab_size + 1, vocab_size + 2


def model_config(config: ml_collections.ConfigDict, tokenizer) -> MMARConfig:
  """Resolves the config's `model` group and the text tokenizer into an MMARConfig."""
  m = config.model
  b = m.backbone
  boi, eoi, vocab = special_token_ids(b.vocab_size, tokenizer.vocab_size)
  backbone = Qwen2Config(
      vocab_size=vocab, hidden_size=b.hidden_size, num_layers=b.num_layers, num_heads=b.num_heads,
      num_kv_heads=b.num_kv_heads, head_dim=b.head_dim or None,
      intermediate_size=b.intermediate_size, rope_theta=b.rope_theta, rms_norm_eps=b.rms_norm_eps,
      tie_word_embeddings=b.tie_word_embeddings, compute_dtype=resolve_dtype(m.compute_dtype),
      scan_layers=m.scan_layers, remat=m.remat, attention=m.attention,
      fuse_projections=m.fuse_projections)
  image = m.image.to_dict()
  stride, channels = token_spec(image)
  if image["size"] % stride:
    raise ValueError(f"model.image.size {image['size']} is not a multiple of the tokenizer's "
                     f"stride {stride}")
  num_tokens = (image["size"] // stride) ** 2
  norm = token_norm(image)
  if norm is not None and norm[1].shape != (channels,):
    raise ValueError(f"model.image.token_scale has {norm[1].shape[0]} values, but the image "
                     f"tokenizer makes tokens of {channels} channels")
  vit = ViTConfig(token_channels=channels, num_tokens=num_tokens,
                  width=m.vit.width, layers=m.vit.layers, heads=m.vit.heads,
                  mlp_ratio=m.vit.mlp_ratio, scan_layers=m.scan_layers, pos_init=m.vit.pos_init,
                  attend=m.vit.attend)
  head = HeadConfig(token_channels=channels, cond_dim=b.hidden_size, width=m.head.width,
                    depth=m.head.depth, learn_sigma=m.head.learn_sigma,
                    prediction=m.head.prediction, compute_dtype=resolve_dtype(m.head.compute_dtype),
                    scan_layers=m.scan_layers,
                    n_positions=num_tokens if m.head.pos_embed else 0)
  return MMARConfig(backbone=backbone, vit=vit, head=head, image=image,
                    max_text_len=m.max_text_len, boi_id=boi, eoi_id=eoi, pad_id=tokenizer.pad_id,
                    eos_id=tokenizer.eos_id, text_vocab=tokenizer.vocab_size)


class MMAR(nnx.Module):
  def __init__(self, cfg: MMARConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Qwen2(cfg.backbone, rngs=rngs)
    self.vit = EmbeddingViT(cfg.vit, rngs=rngs)
    self.projector = VisProjector(cfg.vit.width, cfg.backbone.hidden_size, rngs=rngs)
    self.head = DiffusionHead(cfg.head, rngs=rngs)
    self.image_tokenizer = make_image_tokenizer(cfg.image, rngs=rngs)

  @property
  def dtype(self):
    return self.backbone.dtype

  # -- pieces shared by training and sampling -----------------------------------------------------

  def encode_tokens(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> the tokens of their posterior mean, in model space
    (normalised: image_tokenizer.token_norm), as captioning and understanding read them."""
    mean, _ = self.image_tokenizer.encode(images)
    return normalize(mean.astype(jnp.float32), token_norm(self.cfg.image))

  def decode_tokens(self, tokens: jax.Array) -> jax.Array:
    """Model-space tokens [B, N, C] -> images [B, H, W, 3] (not clipped)."""
    return self.image_tokenizer.tokens_to_images(denormalize(tokens, token_norm(self.cfg.image)))

  def embed_image(self, tokens: jax.Array, masked: jax.Array, cut_context: bool = False) -> jax.Array:
    """Image tokens [B, N, C] (masked positions replaced by the mask token) -> LLM inputs [B, N, d]."""
    return self.projector(self.vit(tokens, masked, self.dtype, cut_context), self.dtype)

  def sequence_inputs(self, text, text_len, kind, image_embeds):
    """The LLM's inputs for a mixed batch: embeddings, positions, ids, and the layout."""
    cfg = self.cfg
    lay = sequence.layout(kind, text_len, cfg.max_text_len, cfg.num_image_tokens,
                          per_token_positions=cfg.image["positions"] == "per_token")
    ids = sequence.token_ids(text, lay, cfg.boi_id, cfg.eoi_id, cfg.pad_id)
    x = self.backbone.embed(jnp.maximum(ids, 0))
    x = sequence.place_image(x, image_embeds, lay["image_pos"])
    return x, ids, lay

  # -- training -----------------------------------------------------------------------------------

  def training_tokens(self, batch: dict, keys: jax.Array) -> jax.Array:
    """A posterior sample per example (keyed) of pixels encoded on the fly, or of the stored
    posterior of `latents:` shards (the same keys give the same tokens either way), in model
    space."""
    if "latent_mean" in batch:
      mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
      mean, logvar = self.image_tokenizer.encode(batch["image"])
    if logvar is not None:
      mean = jax.vmap(sample_posterior)(mean, logvar, keys)
    return normalize(mean.astype(jnp.float32), token_norm(self.cfg.image))

  def forward(self, prep: dict, cut: str | None = None):
    """The LLM over a prepared (micro-)batch: (final hidden states [B, S, d], token ids [B, S],
    the layout). The one forward pass of the loss, the precision monitor and the diagnostics.

    `cut` (the context diagnostic): "llm" or "vit" removes the attention from masked image
    positions to visible ones in that module, so what a masked position knows of the drawn tokens
    can come only through the other one."""
    if cut not in (None, "llm", "vit"):
      raise ValueError(f"unknown context cut {cut!r}; use llm or vit")
    image_embeds = self.embed_image(prep["tokens"], prep["masked"], cut_context=cut == "vit")
    x, ids, lay = self.sequence_inputs(prep["text"], prep["text_len"], prep["kind"], image_embeds)
    blocks = lay["block_ids"]
    if cut == "llm":
      blocks = sequence.cut_image_context(blocks, lay["image_pos"], prep["masked"])
    hidden, _ = self.backbone(x, lay["positions"], lay["segment_ids"], blocks)
    return hidden, ids, lay

  def head_rows(self, prep: dict, hidden: jax.Array, lay: dict,
                samples: int | None = None) -> dict:
    """The diffusion head's rows of a prepared batch, draw-major as MAR tiles them (row d R + r is
    draw d of token r): x0, z (the LLM output at that image position, no shift, method.md §1.8),
    t, noise, mask_weights (1 where the token is masked: the rows carrying loss), positions for a
    head with a learned position embedding (else None), and with `samples` also `dropped`, the
    generation samples that did not fit.

    samples None: every token of every sample (R = B N). samples G: the tokens of the batch's
    generation samples only (kind != [img][text]; understanding samples see the image unmasked
    and carry no image loss), gathered into G slots (R = G N): a static shape when the batch holds
    exactly G of them, as data/pipeline.py's fixed kind counts make it. Unused slots weigh 0."""
    b, n, c = prep["tokens"].shape
    mul = prep["t"].shape[-1]
    z = sequence.gather_image(hidden, lay["image_pos"])
    fields = dict(x0=prep["tokens"], z=z, t=prep["t"], noise=prep["noise"],
                  mask_weights=prep["masked"].astype(jnp.float32))
    extra = {}
    if samples is not None:
      generation = prep["kind"] != sequence.IMAGE_TO_TEXT
      count = jnp.sum(generation.astype(jnp.int32))
      idx = jnp.nonzero(generation, size=samples, fill_value=0)[0]
      used = (jnp.arange(samples) < count).astype(jnp.float32)
      fields = {k: jnp.take(v, idx, axis=0) for k, v in fields.items()}
      fields["mask_weights"] = fields["mask_weights"] * used[:, None]
      extra["dropped"] = jnp.maximum(count - samples, 0)
      b = samples
    # Draws are stored per example [B, N, mul]; draw-major rows are (d, b, n).
    draw_major = lambda a: jnp.moveaxis(a, 2, 0).reshape(-1, *a.shape[3:])
    rep = lambda a: parameterization.repeat_for_draws(a.reshape(b * n, *a.shape[2:]), mul)
    positions = jnp.tile(jnp.arange(n), b * mul) if self.cfg.head.n_positions else None
    return dict(x0=rep(fields["x0"]), z=rep(fields["z"]), t=draw_major(fields["t"]),
                noise=draw_major(fields["noise"]), mask_weights=rep(fields["mask_weights"]),
                positions=positions, **extra)

  def text_loss_sum(self, hidden: jax.Array, ids: jax.Array, lay: dict, text_scale: jax.Array,
                    target_rows: int | None = None, vocab_tiles: int = 0) -> jax.Array:
    """The weighted sum of next-token cross-entropies over a batch's text targets.

    target_rows None: the LM head at every position (the reference). target_rows K: at the first
    K target positions of each sample only, K = max_text_len + 1 holding them all (a sample's
    targets are its text tokens and <eoi>; `[img]` and image positions have none but <eoi>).
    vocab_tiles: see `Qwen2.cross_entropy`."""
    targets, weights = sequence.text_targets(ids, lay["segment_ids"], self.cfg.boi_id)
    weights = weights * text_scale[:, None]
    if target_rows is not None:
      # Target positions first, in sequence order (a stable sort of "not a target").
      order = jnp.argsort(weights <= 0, axis=1, stable=True)[:, :target_rows]
      hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
      targets = jnp.take_along_axis(targets, order, axis=1)
      weights = jnp.take_along_axis(weights, order, axis=1)
    d = hidden.shape[-1]
    ce = self.backbone.cross_entropy(hidden.reshape(-1, d), targets.reshape(-1), vocab_tiles)
    return jnp.sum(ce * weights.reshape(-1))

  def loss_sums(self, prep: dict, *, target_rows: int | None = None, vocab_tiles: int = 0,
                head_samples: int | None = None) -> dict:
    """Summed text cross-entropy and diffusion loss over a prepared (micro-)batch, and the
    generation samples that did not fit `head_samples` (`dropped`; 0 unless the batch breaks the
    data's fixed kind counts). The defaults compute everywhere (the reference); the step passes
    what the config's `loss.text_rows`, `loss.vocab_tiles` and `loss.head_rows` ask for."""
    cfg = self.cfg
    hidden, ids, lay = self.forward(prep)
    text_sum = self.text_loss_sum(hidden, ids, lay, prep["text_scale"], target_rows, vocab_tiles)
    r = self.head_rows(prep, hidden, lay, head_samples)
    batch_rows = lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1))  # data-parallel
    image_sum, _ = parameterization.diffusion_loss(
        lambda xt, t, z: self.head(batch_rows(xt), batch_rows(t), batch_rows(z), r["positions"]),
        r["x0"], r["z"], r["mask_weights"], r["t"], r["noise"], prediction=cfg.head.prediction,
        expect_dtype=cfg.head.compute_dtype)
    return dict(text_sum=text_sum, image_sum=image_sum,
                dropped=r.get("dropped", jnp.zeros([], jnp.int32)))

  def prepare(self, batch: dict, key: jax.Array, mask_ratio: jax.Array, caption_drop: float,
              diffusion_batch_mul: int, t2i_text_weight: float = 1.0) -> dict:
    """Every random draw of a training batch, keyed by (key, global example index).
    `t2i_text_weight` weighs the text targets (caption and <eoi>) of `[text][img]` samples in
    the text mean."""
    cfg = self.cfg
    b = batch["index"].shape[0]
    chex.assert_shape([batch["text"]], (b, cfg.max_text_len))
    chex.assert_shape([batch["text_len"], batch["kind"]], (b,))
    chex.assert_type([batch["text"], batch["text_len"], batch["kind"]], int)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["index"])
    k_post, k_order, k_drop, k_t, k_noise = [jax.vmap(jax.random.fold_in, (0, None))(keys, i)
                                            for i in range(5)]
    tokens = jax.lax.stop_gradient(self.training_tokens(batch, k_post))
    chex.assert_shape(tokens, (b, cfg.num_image_tokens, cfg.vit.token_channels))
    _, n, c = tokens.shape
    kind = batch["kind"].astype(jnp.int32)
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, caption_drop))(k_drop)
    text_len = jnp.where((kind == sequence.TEXT_TO_IMAGE) & drop, 0, batch["text_len"])
    masked = random_mask(k_order, n, mask_ratio) & (kind != sequence.IMAGE_TO_TEXT)[:, None]
    t = jax.vmap(lambda k: jax.random.randint(k, (n, diffusion_batch_mul), 0, schedule.NUM_TIMESTEPS))(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, (n, diffusion_batch_mul, c)))(k_noise)
    lay = sequence.layout(kind, text_len, cfg.max_text_len, n)
    ids = sequence.token_ids(batch["text"], lay, cfg.boi_id, cfg.eoi_id, cfg.pad_id)
    _, weights = sequence.text_targets(ids, lay["segment_ids"], cfg.boi_id)
    text_scale = jnp.where(kind == sequence.TEXT_TO_IMAGE, jnp.float32(t2i_text_weight), 1.0)
    return dict(tokens=tokens, masked=masked, kind=kind, text=batch["text"], text_len=text_len,
                t=t, noise=noise, text_scale=text_scale,
                text_count=jnp.sum(weights * text_scale[:, None]),
                image_count=jnp.sum(masked).astype(jnp.float32) * diffusion_batch_mul)


def random_mask(keys: jax.Array, n: int, ratio: jax.Array) -> jax.Array:
  """bool [B, n]: per sample a random order; the first ceil(n * ratio) positions are masked."""
  num = jnp.ceil(n * ratio).astype(jnp.int32)
  rank = jax.vmap(lambda k: jnp.argsort(jax.random.permutation(k, n)))(keys)
  return rank < num


def step_draws(seed: int, step, mask_ratio_kind: str) -> tuple[jax.Array, jax.Array]:
  """(the key `prepare` keys every per-example draw from, the batch's mask ratio) of training step
  `step` (design.md): the step key is fold_in(key(seed), step), the ratio comes from
  fold_in(step key, 0) and the examples from fold_in(step key, 1)."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.random.fold_in(key, 1), mask_ratio(jax.random.fold_in(key, 0), mask_ratio_kind)


def prepare_step(model: "MMAR", batch: dict, seed: int, step, loss_config, **changes) -> dict:
  """The prepared batch of training step `step`: its draws (`step_draws`) and the loss settings of
  `loss_config` (config.loss). Training, the precision probe, the diagnostics and the benchmarks
  all call this; a diagnostic that must differ says how in `changes` (e.g. caption_drop=0.0).
  The batch's mask ratio comes back as `mask_ratio` (a scalar beside the per-example arrays)."""
  key, ratio = step_draws(seed, step, loss_config.mask_ratio)
  settings = dict(caption_drop=float(loss_config.caption_drop),
                  diffusion_batch_mul=int(loss_config.diffusion_batch_mul),
                  t2i_text_weight=float(loss_config.t2i_text_weight))
  unknown = set(changes) - set(settings)
  if unknown:
    raise TypeError(f"prepare_step: unknown settings {sorted(unknown)}; use {sorted(settings)}")
  return dict(model.prepare(batch, key, ratio, **(settings | changes)), mask_ratio=ratio)


def mask_ratio(key: jax.Array, kind: str) -> jax.Array:
  """One ratio per global batch. stage1: MAR's truncated normal (mean 1, std 0.25) on [0.7, 1];
  stage2: uniform on [0, 1]."""
  if kind == "stage1":
    lo, hi = (0.7 - 1.0) / 0.25, 0.0
    return 1.0 + 0.25 * jax.random.truncated_normal(key, lo, hi)
  if kind == "stage2":
    return jax.random.uniform(key)
  raise ValueError(f"unknown loss.mask_ratio {kind!r}; use stage1 or stage2")


def combine(sums: dict, prep: dict, image_weight: float, text_weight: float):
  """Global means from summed losses; a term with no tokens contributes 0 (not NaN)."""
  loss_image = sums["image_sum"] / jnp.maximum(prep["image_count"], 1.0)
  loss_text = sums["text_sum"] / jnp.maximum(prep["text_count"], 1.0)
  return image_weight * loss_image + text_weight * loss_text, dict(loss_image=loss_image,
                                                                  loss_text=loss_text)

