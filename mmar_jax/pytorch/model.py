"""The whole MMAR in PyTorch: a trained run opened from a `convert jax-to-safetensors` directory.

    from mmar_jax.pytorch import MMAR
    model = MMAR.from_pretrained("export/")          # mmar_config.json + safetensors + tokenizer/
    images = model.generate(["a red circle at the top left"], cfg=4.0, seed=0)   # uint8 [B, H, W, 3]
    print(model.caption(images))                    # ["a red circle at the top left"]

Written from method.md, not from the JAX code (`repro torch-parity` compares the two on the same
weights and draws). The decoder is `transformers.Qwen2ForCausalLM` (`backbone.*`); the image
enters as EmbeddingViT -> VisProjector embeddings at the image slots; MAR's SimpleMLPAdaLN
(`diffloss.net.*`) denoises each image token given the decoder's output at that slot.

The sequence (method.md §1.6-1.7) of the three sample kinds:
  kind 0  [text] <boi> [img] <eoi>      P(I|T)   (a dropped caption: no text, the same as kind 2)
  kind 1  <boi> [img] <eoi> [text]      P(T|I)
  kind 2  <boi> [img] <eoi>             P(I)
padded at the end to Lt + N + 2. Attention: causal across blocks, bidirectional inside the image
block (every text token, <boi> and <eoi> one block each, the image one block); RoPE positions
are the block index (the image shares one position) or, with `image.positions = per_token`, the
index in the sequence. Padding sees only itself (a query with no visible key would give NaN keys
and values that a masked softmax still multiplies by zero) and is never seen.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmar_jax.convert import safetensors_io as sio
from mmar_jax.convert.whole_model import CONFIG_FILE, read_export_config
from mmar_jax.data.text_tokenizer import encode_prompts, encode_questions, load_text_tokenizer
from mmar_jax.diffusion import schedule as sched_lib
from mmar_jax.errors import ConversionError
from mmar_jax.files import atomic_output
from mmar_jax.models.vae import VAEConfig
from mmar_jax.pytorch.modules import DiffLoss, EmbeddingViT, VisProjector, patchify, unpatchify
from mmar_jax.pytorch.vae import AutoencoderKL

TEXT, BOI, IMAGE, EOI, PAD = 0, 1, 2, 3, -1  # what a sequence position holds
TEXT_TO_IMAGE, IMAGE_TO_TEXT, IMAGE_ONLY = 0, 1, 2


def hf_qwen2_config(bb: dict, max_positions: int):
  from transformers import Qwen2Config  # lazy: seconds to import, this path only
  extra = dict(head_dim=bb["head_dim"]) if bb.get("head_dim") else {}
  return Qwen2Config(
      vocab_size=bb["vocab_size"], hidden_size=bb["hidden_size"],
      intermediate_size=bb["intermediate_size"], num_hidden_layers=bb["num_layers"],
      num_attention_heads=bb["num_heads"], num_key_value_heads=bb["num_kv_heads"],
      rope_theta=bb["rope_theta"], rms_norm_eps=bb["rms_norm_eps"],
      tie_word_embeddings=bb["tie_word_embeddings"], max_position_embeddings=max(max_positions, 2048),
      attn_implementation="sdpa", **extra)


def allowed(q_seg, q_blk, k_seg, k_blk, q_slot=None) -> torch.Tensor:
  """bool [B, 1, T, S]: query t may attend key s (same sample, key block <= query block); a padding
  query (segment 0) attends its own slot `q_slot` [B, T] only."""
  ok = (k_seg[:, None, :] != 0) & (q_seg[:, :, None] != 0) & (k_blk[:, None, :] <= q_blk[:, :, None])
  if q_slot is not None:
    ok = ok | (torch.arange(k_seg.shape[1])[None, None, :] == q_slot[:, :, None])
  return ok[:, None]


class MMAR(nn.Module):
  def __init__(self, config: dict, tokenizer=None):
    """`config`: the model block of mmar_config.json (MMARConfig.to_dict())."""
    super().__init__()
    from transformers import Qwen2ForCausalLM  # lazy: seconds to import, this path only
    self.config, self.tokenizer = config, tokenizer
    self.source = None  # (directory, mmar_config.json) when loaded by from_pretrained
    c = config
    self.lt, self.n = int(c["max_text_len"]), int(c["vit"]["num_tokens"])
    self.channels = int(c["vit"]["token_channels"])
    self.image = dict(c["image"])
    self.per_token = self.image.get("positions") == "per_token"
    self.backbone = Qwen2ForCausalLM(hf_qwen2_config(c["backbone"], self.lt + self.n + 2))
    self.vit = EmbeddingViT(c["vit"])
    self.projector = VisProjector(c["vit"]["width"], c["backbone"]["hidden_size"])
    self.diffloss = DiffLoss(c["head"])
    head = c["head"]
    self.prediction = head["prediction"]
    self.diffusion_pos_embed_learned = (nn.Parameter(torch.zeros(1, head["n_positions"], head["cond_dim"]))
                                        if head["n_positions"] else None)
    kind = self.image.get("kind", "vae")
    if kind not in ("vae", "patchify"):
      raise ConversionError(f"{CONFIG_FILE}: unknown model.image.kind {kind!r}")
    self.vae = AutoencoderKL(c["vae"]) if kind == "vae" else None
    self.patch = int(self.image.get("patch_size") or (1 if kind == "vae" else 4))
    self.scale = float(self.image.get("scale") or 1.0)
    norm = self.image.get("norm", "fixed")
    if norm not in ("data", "fixed"):
      raise ConversionError(f"{CONFIG_FILE}: unknown model.image.norm {norm!r}")
    self.norm = None if norm == "fixed" else tuple(
        torch.tensor(self.image[k], dtype=torch.float32) for k in ("token_shift", "token_scale"))

  @torch.no_grad()
  def init_weights(self, seed: int = 0) -> "MMAR":
    """The initialisation of a model trained from scratch (the backbone keeps transformers' own):
    xavier-uniform linears with zero biases, N(0, 0.02) embeddings and MAR's time MLP, and the
    head's adaLN and output layers at zero, so every res block starts as the identity."""
    torch.manual_seed(seed)
    for module in (self.vit, self.projector, self.diffloss):
      for m in module.modules():
        if isinstance(m, nn.Linear):
          nn.init.xavier_uniform_(m.weight)
          nn.init.zeros_(m.bias)
    for p in (self.vit.mask_token, self.vit.pos_embed, self.diffusion_pos_embed_learned):
      if p is not None:
        nn.init.normal_(p, std=0.02)
    net = self.diffloss.net
    for lin in (net.time_embed.mlp[0], net.time_embed.mlp[2]):
      nn.init.normal_(lin.weight, std=0.02)
    for lin in [b.adaLN_modulation[1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[1],
                                                                   net.final_layer.linear]:
      nn.init.zeros_(lin.weight)
      nn.init.zeros_(lin.bias)
    return self

  # -- images <-> tokens ----------------------------------------------------------------------------

  def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, H, W, 3] in [-1, 1] -> the posterior of the model-space tokens (mean, logvar or None):
    the tokenizer's scaled tokens, then the per-channel normalisation of `model.image.norm=data`
    (image_tokenizer.token_norm: (token - shift) * scale)."""
    if self.vae is None:
      mean, logvar = patchify(images.float(), self.patch) * self.scale, None
    else:
      mean, logvar = self.vae.encode(images.permute(0, 3, 1, 2))
      nhwc = lambda a: a.permute(0, 2, 3, 1)
      mean = patchify(nhwc(mean), self.patch) * self.scale
      logvar = patchify(nhwc(logvar), self.patch) + 2.0 * math.log(self.scale)
    if self.norm is not None:
      shift, scale = self.norm
      mean = (mean - shift) * scale
      logvar = None if logvar is None else logvar + 2.0 * torch.log(scale)
    return mean, logvar

  def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
    """Model-space tokens [B, N, C] -> images [B, H, W, 3] (not clipped)."""
    tokens = tokens.float()
    if self.norm is not None:
      tokens = tokens / self.norm[1] + self.norm[0]
    x = unpatchify(tokens / self.scale, self.patch)
    if self.vae is None:
      return x
    return self.vae.decode(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

  def embed_image(self, tokens, masked):
    return self.projector(self.vit(tokens, masked))

  # -- the training sequence ------------------------------------------------------------------------

  def layout(self, kind: torch.Tensor, text_len: torch.Tensor) -> dict:
    """Where every slot (text 0..Lt-1, <boi>, image 0..N-1, <eoi>) of each sample goes, and the
    per-position ids: seq [B, slots], what [B, S], positions, segments, blocks [B, S]."""
    b, lt, n = kind.shape[0], self.lt, self.n
    length = torch.where(kind == IMAGE_ONLY, 0, text_len).long()[:, None]
    first = (kind == TEXT_TO_IMAGE)[:, None]
    j, i = torch.arange(lt)[None], torch.arange(n)[None]
    start = torch.where(first, length, 0)  # where <boi> sits
    text_seq = torch.where(first & (j < length), j, n + 2 + j)
    seq = torch.cat([text_seq, start, start + 1 + i, start + n + 1], 1)
    real_text = j < length
    what_slot = torch.cat([torch.where(real_text, TEXT, PAD), torch.full((b, 1), BOI),
                           torch.full((b, n), IMAGE), torch.full((b, 1), EOI)], 1)
    blk_slot = torch.cat([torch.where(first, j, 3 + j), start, (start + 1).expand(b, n), start + 2], 1)
    pos_slot = seq if self.per_token else blk_slot
    scatter = lambda v: torch.zeros_like(v).scatter(1, seq, v)
    return dict(seq=seq, what=scatter(what_slot), positions=scatter(pos_slot),
                blocks=scatter(blk_slot), segments=(scatter(what_slot) != PAD).long(),
                image_seq=seq[:, lt + 1:lt + 1 + n], length=length[:, 0])

  def sequence_ids(self, text, lay) -> torch.Tensor:
    """Token id at each position (0 at image and padding positions)."""
    b = text.shape[0]
    ids_slot = torch.cat([text.long(), torch.full((b, 1), self.config["boi_id"]),
                          torch.zeros(b, self.n, dtype=torch.long), torch.full((b, 1), self.config["eoi_id"])], 1)
    ids = torch.zeros_like(ids_slot).scatter(1, lay["seq"], ids_slot)
    return torch.where(lay["what"] == PAD, 0, ids)

  def forward(self, prep: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The decoder over a prepared batch (`prep`: tokens, masked, kind, text, text_len as the JAX
    `MMAR.prepare` gives them): (final hidden states [B, S, d], the layout, token ids)."""
    lay = self.layout(prep["kind"], prep["text_len"])
    ids = self.sequence_ids(prep["text"], lay)
    x = self.backbone.model.embed_tokens(ids)
    img = self.embed_image(prep["tokens"].to(x.dtype), prep["masked"]).to(x.dtype)
    x = x.scatter(1, lay["image_seq"][..., None].expand(-1, -1, x.shape[-1]), img)
    mask = allowed(lay["segments"], lay["blocks"], lay["segments"], lay["blocks"],
                   torch.arange(x.shape[1])[None].expand(x.shape[0], -1))
    hidden = self.backbone.model(inputs_embeds=x, attention_mask=mask, position_ids=lay["positions"],
                                 use_cache=False).last_hidden_state
    return hidden, lay, ids

  def text_targets(self, lay, ids):
    """(targets, valid) [B, S]: position p predicts the next text token or <eoi>."""
    nxt_what = torch.cat([lay["what"][:, 1:], torch.full_like(lay["what"][:, :1], PAD)], 1)
    valid = (lay["what"] != PAD) & ((nxt_what == TEXT) | (nxt_what == EOI))
    return torch.cat([ids[:, 1:], ids[:, :1]], 1), valid

  def head(self, x, t, z, positions=None):
    if self.diffusion_pos_embed_learned is not None:
      z = z.float() + self.diffusion_pos_embed_learned[0, positions].float()
    return self.diffloss.net(x, t, z)

  def loss_sums(self, prep: dict, gather: bool = True) -> dict:
    """Summed, weighted text cross-entropy and diffusion loss over a prepared batch (the draws
    t [B, N, mul], noise [B, N, mul, C], masked, text_scale come in `prep`), with the LM head on
    the text targets and the diffusion head on generation samples (`gather`), or everywhere."""
    hidden, lay, ids = self(prep)
    targets, valid = self.text_targets(lay, ids)
    weight = valid.float() * prep["text_scale"].float()[:, None]
    if gather:
      logits, targets, weight = self.backbone.lm_head(hidden[valid]), targets[valid], weight[valid]
    else:
      logits, targets, weight = self.backbone.lm_head(hidden).flatten(0, 1), targets.flatten(), weight.flatten()
    text_sum = (F.cross_entropy(logits.float(), targets, reduction="none") * weight).sum()

    b, n, c = prep["tokens"].shape
    mul = prep["t"].shape[-1]
    z = hidden.gather(1, lay["image_seq"][..., None].expand(-1, -1, hidden.shape[-1]))
    rows = dict(x0=prep["tokens"].float(), z=z, t=prep["t"], noise=prep["noise"].float(),
                w=prep["masked"].float())
    if gather:  # understanding samples see their image unmasked: no image loss
      keep = prep["kind"] != IMAGE_TO_TEXT
      rows = {k: v[keep] for k, v in rows.items()}
    g = rows["x0"].shape[0]
    flat = lambda a: a.reshape(g * n, *a.shape[2:])
    draw_major = lambda a: a.movedim(2, 0).reshape(mul * g * n, *a.shape[3:])  # row d G N + r
    x0, z, w = (flat(rows[k]).repeat(mul, *([1] * (rows[k].ndim - 2))) for k in ("x0", "z", "w"))
    t, noise = draw_major(rows["t"]).long(), draw_major(rows["noise"])
    image_sum = diffusion_loss(self.head, x0, z, w, t, noise, self.prediction,
                               torch.arange(n).repeat(g * mul))
    return dict(text_sum=text_sum, image_sum=image_sum)

  def loss(self, prep: dict, image_weight: float = 1.0, text_weight: float = 1.0, gather=True):
    """(the training loss, its parts): global means over `prep`'s text_count and image_count."""
    sums = self.loss_sums(prep, gather)
    loss_text = sums["text_sum"] / max(float(prep["text_count"]), 1.0)
    loss_image = sums["image_sum"] / max(float(prep["image_count"]), 1.0)
    return image_weight * loss_image + text_weight * loss_text, dict(loss_text=loss_text,
                                                                    loss_image=loss_image)

  # -- sampling -------------------------------------------------------------------------------------

  @torch.no_grad()
  def generate_tokens(self, text, text_len, *, ar_steps: int = 64, diffusion_steps: int = 100,
                      cfg: float = 4.0, cfg_schedule: str = "linear", temperature: float = 1.0,
                      sampler: str = "ddpm", orders=None, x_T=None, step_noise=None, seed: int = 0):
    """Masked-AR generation (MAR's loop): image tokens [B, N, C].

    All N positions start masked, in a random order per sample (`orders` [B, N]); each of the
    `ar_steps` steps runs the ViT and the decoder's image block on the current tokens, attending
    to the `[text] <boi>` prefix whose keys and values were computed once, and the head samples
    the positions leaving the mask (MAR's cosine schedule) with `diffusion_steps` DDPM (or DDIM)
    steps from `x_T` [B, N, C] with `step_noise` [K, B, N, C] (drawn from `seed` when not given).
    With cfg != 1 the conditional and unconditional (empty caption) rows run as one doubled batch
    and the head's outputs are guided, cond + (cfg_k - 1)(cond - uncond), cfg_k growing linearly
    with the filled fraction (MAR) or constant."""
    from transformers import DynamicCache  # lazy: seconds to import, this path only
    b, n, c = text.shape[0], self.n, self.channels
    gen = torch.Generator().manual_seed(int(seed))
    orders = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]) if orders is None else orders.long()
    x_T = torch.randn(b, n, c, generator=gen) if x_T is None else x_T.float()
    step_noise = (torch.randn(diffusion_steps, b, n, c, generator=gen) if step_noise is None
                  else step_noise.float())
    guided = float(cfg) != 1.0
    rows_text = torch.cat([text, text]) if guided else text
    rows_len = torch.cat([text_len, torch.zeros_like(text_len)]) if guided else text_len
    r, lt = rows_text.shape[0], self.lt
    # The prefix `[text] <boi>`, left-padded so every row's image block starts at slot Lt + 1.
    j = torch.arange(lt + 1)[None] - (lt - rows_len[:, None])  # index in the unpadded prefix
    real = j >= 0
    ids = torch.where(j == rows_len[:, None], self.config["boi_id"],
                      rows_text.gather(1, j.clamp(0, lt - 1)))
    ids = torch.where(real, ids, 0)
    pos = j.clamp(min=0)
    seg = real.long()
    slots = torch.arange(lt + 1)[None].expand(r, -1)
    cache = DynamicCache()
    embed = self.backbone.model.embed_tokens
    self.backbone.model(inputs_embeds=embed(ids), attention_mask=allowed(seg, pos, seg, pos, slots),
                        position_ids=pos, past_key_values=cache, use_cache=True)
    img_blk = (rows_len + 1)[:, None].expand(r, n)
    img_pos = img_blk + torch.arange(n)[None] if self.per_token else img_blk
    k_seg, k_blk = torch.cat([seg, torch.ones(r, n, dtype=torch.long)], 1), torch.cat([pos, img_blk], 1)
    img_mask = allowed(torch.ones(r, n, dtype=torch.long), img_blk, k_seg, k_blk)

    after = mask_schedule(n, ar_steps)
    before = [n] + after[:-1]
    scales = cfg_scales(float(cfg), n, ar_steps, cfg_schedule)
    tokens, masked = torch.zeros(b, n, c), torch.ones(b, n, dtype=torch.bool)
    rank = orders.argsort(1)
    for k in range(ar_steps):
      both = (lambda a: torch.cat([a, a])) if guided else (lambda a: a)
      hidden = self.backbone.model(inputs_embeds=self.embed_image(both(tokens), both(masked)),
                                   attention_mask=img_mask, position_ids=img_pos,
                                   past_key_values=cache, use_cache=True).last_hidden_state
      cache.crop(-n)  # drop the image block again: it is recomputed every step
      sel = orders[:, after[k]:before[k]]  # [B, m] positions sampled now
      if sel.shape[1] == 0:
        masked = rank < after[k]
        continue
      m = sel.shape[1]
      pick = lambda h, rows: h[rows].gather(1, sel[..., None].expand(-1, -1, h.shape[-1])).reshape(b * m, -1)
      z = pick(hidden, slice(0, b))
      if guided:
        z = torch.cat([z, pick(hidden, slice(b, 2 * b))])
      brow = torch.arange(b)[:, None]
      x0 = sample_head(self.head, z, x_T[brow, sel].reshape(b * m, c),
                       step_noise[:, brow, sel].reshape(diffusion_steps, b * m, c),
                       positions=sel.reshape(-1).repeat(2 if guided else 1), prediction=self.prediction,
                       cfg=scales[k] if guided else None, temperature=temperature, method=sampler)
      tokens[brow, sel] = x0.reshape(b, m, c)
      masked = rank < after[k]
    return tokens

  @torch.no_grad()
  def generate(self, prompts, **kw) -> np.ndarray:
    """uint8 images [B, H, W, 3] for captions (None or "": unconditional); `generate_tokens`'s
    keywords."""
    text, lens = encode_prompts(self._tokenizer(), list(prompts), self.lt)
    text, lens = torch.from_numpy(text).long(), torch.from_numpy(lens).long()
    images = self.decode_tokens(self.generate_tokens(text, lens, **kw))
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

  @torch.no_grad()
  def caption_ids(self, images: torch.Tensor, question=None, question_len=None, max_tokens: int = 64):
    """Greedy captioning / VQA with a KV cache: `<boi> [img] <eoi> [question]` (left-padded) fills
    the cache once, then one single-token pass per token; ids [B, max_tokens], pad after EOS.
    Ids of <boi>/<eoi> and spare embedding rows are never chosen. images [B, H, W, 3] in [-1, 1]."""
    from transformers import DynamicCache  # lazy: seconds to import, this path only
    b, n = images.shape[0], self.n
    if question is None:
      question, question_len = torch.zeros(b, 1, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    q = question.shape[1]
    mean, _ = self.encode_images(images.float())
    img = self.embed_image(mean, torch.zeros(b, n, dtype=torch.bool))
    s = q + n + 2
    j = torch.arange(s)[None] - (q - question_len[:, None])  # index in the unpadded prefix
    real = j >= 0
    jj = j.clamp(min=0)
    qi = (j - n - 2).clamp(0, max(q - 1, 0))
    ids = torch.where(j - n - 2 >= 0, question.gather(1, qi), 0)
    ids = torch.where(jj == 0, self.config["boi_id"], torch.where(jj == n + 1, self.config["eoi_id"], ids))
    ids = torch.where(real, ids, 0)
    blk = torch.where(jj == 0, 0, torch.where(jj <= n, 1, jj - n + 1))
    pos = jj if self.per_token else blk
    seg = real.long()
    x = self.backbone.model.embed_tokens(ids)
    image_slot = (q - question_len)[:, None] + 1 + torch.arange(n)[None]
    x = x.scatter(1, image_slot[..., None].expand(-1, -1, x.shape[-1]), img.to(x.dtype))
    cache = DynamicCache()
    slots = torch.arange(s)[None].expand(b, -1)
    h = self.backbone.model(inputs_embeds=x, attention_mask=allowed(seg, blk, seg, blk, slots),
                            position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state
    eos, pad, vocab = self.config["eos_id"], self.config["pad_id"], self.config["text_vocab"]
    out = torch.full((b, max_tokens), pad, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    k_seg, k_blk = seg, blk
    for i in range(max_tokens):
      logits = self.backbone.lm_head(h[:, -1]).float()
      logits[:, vocab:] = -torch.inf
      token = torch.where(done, pad, logits.argmax(-1))
      out[:, i] = token
      done = done | (token == eos)
      if bool(done.all()) or i == max_tokens - 1:
        break
      nb = blk[:, -1:] + 1 + i
      k_seg = torch.cat([k_seg, torch.ones(b, 1, dtype=torch.long)], 1)
      k_blk = torch.cat([k_blk, nb], 1)
      h = self.backbone.model(inputs_embeds=self.backbone.model.embed_tokens(token[:, None]),
                              attention_mask=allowed(torch.ones(b, 1, dtype=torch.long), nb, k_seg, k_blk),
                              position_ids=pos[:, -1:] + 1 + i, past_key_values=cache,
                              use_cache=True).last_hidden_state
    return out

  def caption(self, images, question: str | None = None, max_tokens: int = 64) -> list[str]:
    """Captions (or answers to `question`) of uint8 [B, H, W, 3] or [-1, 1] float images."""
    images = torch.as_tensor(np.asarray(images))
    if images.dtype == torch.uint8:
      images = images.float() / 127.5 - 1.0
    tok = self._tokenizer()
    b = images.shape[0]
    q, q_len = encode_questions(tok, question, b)
    ids = self.caption_ids(images, torch.from_numpy(q).long(), torch.from_numpy(q_len).long(), max_tokens)
    texts = []
    for row in ids.tolist():
      row = row[:row.index(self.config["eos_id"])] if self.config["eos_id"] in row else row
      texts.append(tok.decode(row))
    return texts

  def _tokenizer(self):
    if self.tokenizer is None:
      raise ValueError("this MMAR has no text tokenizer: load it with from_pretrained(DIR) from a "
                       "directory with tokenizer/, or pass tokenizer=")
    return self.tokenizer

  # -- loading --------------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, directory: str, dtype: torch.dtype | None = None) -> "MMAR":
    """A `convert jax-to-safetensors` output: mmar_config.json, the safetensors files and, when
    present, tokenizer/. Every tensor of the model must be there with its shape, and nothing
    else: the error names the first that is not. The model takes the files' dtype (or `dtype`)."""
    meta = read_export_config(directory)
    path = os.path.join(directory, CONFIG_FILE)
    config = resolved_config(meta["model"], path)
    tokenizer = None
    if os.path.isdir(os.path.join(directory, "tokenizer")):
      tokenizer = load_text_tokenizer(os.path.join(directory, "tokenizer"))
    model = cls(config, tokenizer)
    model.source = (directory, meta)
    with sio.CheckpointDir(directory) as ckpt:
      state = load_checked(model, {name: ckpt.get(name) for name in ckpt.keys()}, directory)
    model.load_state_dict(state, strict=False)  # strictness checked above (a tied lm_head)
    model.to(dtype or next(iter(state.values())).dtype)
    return model.eval()

  def save_pretrained(self, directory: str, overwrite: bool = False) -> None:
    """Writes what `from_pretrained` reads and `convert safetensors-to-jax` imports: the state dict
    under its own names (one model.safetensors), the mmar_config.json the model was loaded with
    and its tokenizer/. Atomic: an existing `directory` is kept unless `overwrite`."""
    if self.source is None:
      raise ValueError("save_pretrained writes a model opened with from_pretrained (it needs the "
                       "run's mmar_config.json)")
    src, meta = self.source
    tied = self.backbone.config.tie_word_embeddings
    tensors = {k: to_numpy(v) for k, v in self.state_dict().items()
               if not (tied and k == "backbone.lm_head.weight")}
    with atomic_output(directory, overwrite) as tmp:
      sio.save_file(os.path.join(tmp, sio.SINGLE_NAME), tensors, {"format": "pt"})
      with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
      if os.path.isdir(os.path.join(src, "tokenizer")):
        shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(tmp, "tokenizer"))


def resolved_config(model: dict, where: str) -> dict:
  """The model block with the VAE's full config (from its `vae_config.json` directory, as the run
  resolved it) so the module tree can be built without JAX-side defaults."""
  c = dict(model)
  for key in ("backbone", "vit", "head", "image", "max_text_len", "boi_id", "eoi_id", "pad_id",
              "eos_id", "text_vocab"):
    if key not in c:
      raise ConversionError(f"{where}: model config has no {key!r}")
  if c["image"].get("kind", "vae") == "vae":
    fields = dict(c["image"].get("vae") or {})
    if c["image"].get("path") and os.path.isfile(os.path.join(c["image"]["path"], "vae_config.json")):
      with open(os.path.join(c["image"]["path"], "vae_config.json")) as f:
        fields = dict(json.load(f), **fields)
    c["vae"] = VAEConfig.from_dict(fields).to_dict()
  return c


def to_torch(a: np.ndarray) -> torch.Tensor:
  """numpy (ml_dtypes bfloat16 included) -> torch, bit for bit."""
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.array(a))


def to_numpy(t: torch.Tensor) -> np.ndarray:
  """torch -> numpy (bfloat16 as ml_dtypes.bfloat16), bit for bit."""
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy().copy()


def load_checked(model: nn.Module, tensors: dict, where: str) -> dict:
  """{name: torch tensor} for `model.load_state_dict`, refusing a missing, extra or misshapen one."""
  expected = dict(model.state_dict())
  if model.backbone.config.tie_word_embeddings:
    expected.pop("backbone.lm_head.weight", None)  # the embedding's own tensor
  missing = [k for k in expected if k not in tensors]
  extra = sorted(k for k in tensors if k not in expected)
  if missing:
    raise ConversionError(f"{where}: missing tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  if extra:
    raise ConversionError(f"{where}: unexpected tensor {extra[0]}"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  out = {}
  for name, want in expected.items():
    a = tensors[name]
    if tuple(a.shape) != tuple(want.shape):
      raise ConversionError(f"{where}: tensor {name} has shape {tuple(a.shape)}, the config "
                            f"gives {tuple(want.shape)}")
    out[name] = to_torch(a)
  return out


# -- the diffusion pieces ---------------------------------------------------------------------------

def _table(a) -> torch.Tensor:
  return torch.tensor(np.asarray(a), dtype=torch.float32)


def x0_eps(prediction: str, pred, x_t, alpha, sigma):
  """(x0_hat, eps_hat) from what the head predicts; x_t = alpha x0 + sigma eps, v = alpha eps - sigma x0."""
  if prediction == "v":
    return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
  if prediction == "eps":
    return (x_t - sigma * pred) / alpha, pred
  return pred, (x_t - alpha * pred) / sigma


def diffusion_loss(head, x0, z, w, t, noise, prediction: str, positions=None) -> torch.Tensor:
  """sum over rows of w * MAR's per-token loss (mean over channels of (target - out)^2, plus the
  VLB of a learned variance, which trains only the variance channels)."""
  base = sched_lib.base_schedule()
  g = lambda a: _table(a)[t][:, None]
  alpha, sigma = g(base.alpha), g(base.sigma)
  x_t = alpha * x0 + sigma * noise
  out = head(x_t, t, z, positions).float()
  c = x0.shape[-1]
  pred = out[:, :c]
  target = {"v": lambda: alpha * noise - sigma * x0, "eps": lambda: noise, "x0": lambda: x0}[prediction]()
  per_token = (target - pred).square().mean(-1)
  if out.shape[-1] == 2 * c:
    coef1, coef2 = g(base.posterior_mean_coef1), g(base.posterior_mean_coef2)
    true_log_var, log_beta = g(base.posterior_log_variance_clipped), g(base.log_betas)
    x0_hat, _ = x0_eps(prediction, pred.detach(), x_t, alpha, sigma)
    model_mean, true_mean = coef1 * x0_hat + coef2 * x_t, coef1 * x0 + coef2 * x_t
    frac = (out[:, c:] + 1.0) / 2.0
    model_log_var = frac * log_beta + (1.0 - frac) * true_log_var
    kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                + (true_mean - model_mean).square() * torch.exp(-model_log_var))
    nll = -discretized_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    per_token = per_token + torch.where(t == 0, nll.mean(-1), kl.mean(-1)) / math.log(2.0)
  return torch.where(w > 0, per_token * w, torch.zeros_like(per_token)).sum()


def discretized_log_likelihood(x, means, log_scales):
  """guided-diffusion's 256-bin Gaussian log-likelihood of data in [-1, 1]."""
  cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
  inv = torch.exp(-log_scales)
  plus, minus = cdf(inv * (x - means + 1.0 / 255.0)), cdf(inv * (x - means - 1.0 / 255.0))
  log_plus = torch.log(plus.clamp(min=1e-12))
  log_one_minus = torch.log((1.0 - minus).clamp(min=1e-12))
  log_delta = torch.log((plus - minus).clamp(min=1e-12))
  return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, log_delta))


def sample_head(head, z, x_T, step_noise, *, positions, prediction: str, cfg=None,
                temperature: float = 1.0, method: str = "ddpm"):
  """Tokens x0 [M, C] from the head over the K-step respaced chain, from x_T [M, C] with
  step_noise [K, M, C] (row k: the noise of the k-th kept step, not used by DDIM). With `cfg`,
  z is [cond; uncond] (2M rows) and both halves see the same x_t."""
  if method not in ("ddpm", "ddim"):
    raise ValueError(f"unknown sampler {method!r}; use ddpm or ddim")
  s = sched_lib.respaced_schedule(step_noise.shape[0])
  f = lambda a: _table(a)
  ts, alpha, sigma = torch.tensor(np.asarray(s.timesteps)), f(s.alpha), f(s.sigma)
  coef1, coef2, log_var, log_beta = (f(s.posterior_mean_coef1), f(s.posterior_mean_coef2),
                                     f(s.posterior_log_variance_clipped), f(s.log_betas))
  alpha_prev, sigma_prev = f(np.sqrt(s.alphas_cumprod_prev)), f(np.sqrt(1.0 - s.alphas_cumprod_prev))
  x, c = x_T, x_T.shape[-1]
  for k in reversed(range(step_noise.shape[0])):
    m = x.shape[0]
    if cfg is None:
      out = head(x, ts[k].expand(m), z, positions).float()
    else:
      both = head(torch.cat([x, x]), ts[k].expand(2 * m), z, positions).float()
      cond, uncond = both[:m], both[m:]
      out = torch.cat([cond[:, :c] + (cfg - 1.0) * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], -1)
    x0_hat, eps_hat = x0_eps(prediction, out[:, :c], x, alpha[k], sigma[k])
    if method == "ddim":
      x = alpha_prev[k] * x0_hat + sigma_prev[k] * eps_hat
      continue
    lv = log_var[k] if out.shape[-1] == c else (
        (out[:, c:] + 1.0) / 2.0 * log_beta[k] + (1.0 - (out[:, c:] + 1.0) / 2.0) * log_var[k])
    x = coef1[k] * x0_hat + coef2[k] * x
    if k > 0:
      x = x + torch.exp(0.5 * lv) * step_noise[k] * temperature
  return x


def mask_schedule(n: int, steps: int) -> list[int]:
  """Positions still masked after each AR step (MAR's cosine schedule, at least one until the
  last step, which fills in the rest)."""
  after, cur = [], n
  for k in range(steps):
    cur = 0 if k == steps - 1 else max(1, min(cur - 1, math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps))))
    after.append(cur)
  return after


def cfg_scales(cfg: float, n: int, steps: int, schedule: str) -> list[float]:
  """Guidance per AR step: MAR's linear 1 + (cfg - 1)(N - mask_len_k)/N, or constant. MAR's
  mask_len at the last step is computed as at the others (max(1, ...))."""
  if schedule == "constant":
    return [cfg] * steps
  if schedule != "linear":
    raise ValueError(f"unknown cfg schedule {schedule!r}; use linear or constant")
  out, cur = [], n
  for k in range(steps):
    mask_len = max(1, min(cur - 1, math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps))))
    out.append(1.0 + (cfg - 1.0) * (n - mask_len) / n)
    cur = mask_len
  return out
