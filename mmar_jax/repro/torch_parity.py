"""`repro torch-parity`: the JAX MMAR and the PyTorch MMAR (mmar_jax/pytorch) on the same weights
and the same prepared batch, its random draws made once by JAX and fed to both.

Compared, in fp32: the text logits at every text-target position and the diffusion head's outputs
at every head row (max |difference| / max |JAX value|), the text and image losses (relative; below
0.1 absolute, see LOSS_FLOOR), the
gradient norm of each top-level module (backbone, vit, projector, head; relative), masked-AR
generation with guidance from the same orders and diffusion noise (max |difference| of the image
tokens), and greedy captions (identical ids). The batch holds all three sample kinds, padding, a
dropped caption and two diffusion draws per token. Without a workdir the model is a random one
of `--config` (default: a tiny one with a learned variance and data-normalised tokens; every
weight perturbed, since a fresh head outputs exactly 0).

`perturb` breaks the PyTorch side on purpose, to show the check fails: 'position' shifts the
image block's RoPE position by one, 'kernel' transposes a square ViT kernel.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax import config as config_lib
from mmar_jax.convert.whole_model import tensors_from_params
from mmar_jax.data import token_stats
from mmar_jax.data.pipeline import Batcher
from mmar_jax.data.sources import make_source
from mmar_jax.data.text_tokenizer import encode_questions, load_text_tokenizer
from mmar_jax.diffusion import samplers, schedule
from mmar_jax.models import sequence
from mmar_jax.models.mmar import MMAR, combine, model_config
from mmar_jax.run import Run
from mmar_jax.sample.image import generate_tokens, sample_keys, typed_key
from mmar_jax.sample.text import caption_tokens

TOLERANCES = dict(logits=1e-5, head=1e-5, losses=1e-5, grad_norms=1e-4, tokens=1e-4)
GENERATION = dict(ar_steps=4, diffusion_steps=10, cfg=3.0, cfg_schedule="linear", temperature=1.0)


def _fp32(mcfg):
  return dataclasses.replace(mcfg, backbone=mcfg.backbone.replace(compute_dtype="float32"),
                             head=mcfg.head.replace(compute_dtype="float32"))


def _setup(workdir, config=None):
  """(config, tokenizer, fp32 model config, params as numpy): a run's EMA weights, or a random
  model of `config` (default: the tiny one with a learned variance and token normalisation)."""
  if workdir:
    run = Run(workdir)
    params, _ = run.params(None, "ema", on_host=True)
    return run.config, run.tokenizer, _fp32(run.model_cfg), params
  if config is None:
    config = config_lib.load("tiny", [("model.head.learn_sigma", "true"), ("model.image.norm", "data")])
    token_stats.fill_config(config)
  tokenizer = load_text_tokenizer(config.text_tokenizer)
  mcfg = _fp32(model_config(config, tokenizer))
  params = nnx.split(MMAR(mcfg, rngs=nnx.Rngs(0)))[1].to_pure_dict()
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(tree, [np.asarray(a + 0.05 * jax.random.normal(k, a.shape, a.dtype))
                                     for a, k in zip(leaves, keys)])
  return config, tokenizer, mcfg, params


def _batch(config, tokenizer, mcfg, size: int = 8):
  batcher = Batcher(make_source(config), tokenizer, batch_size=size, max_text_len=mcfg.max_text_len,
                    seed=int(config.seed), mix="0.45,0.45,0.1", random_flip=False)
  return batcher.local_batch(0)


def _rel(a, b, floor: float = 1e-30) -> float:
  """max |a - b| / max |b| (at least `floor`)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


# A trained model's text loss can be ~1e-5 nats: a mean of (logsumexp - logit) differences of ~10-nat
# fp32 numbers, whose rounding (~1e-7 each) is then a large fraction of it. Below this floor the
# losses are compared in absolute terms.
LOSS_FLOOR = 0.1


def _torch_model(mcfg, params, tokenizer, perturb):
  import torch  # lazy: seconds to import, this path only

  from mmar_jax.pytorch.model import MMAR as TorchMMAR  # lazy: imports torch
  from mmar_jax.pytorch.model import load_checked, resolved_config  # lazy: imports torch
  tensors = {name: f() for name, f in tensors_from_params(params, mcfg).items()}
  if perturb == "kernel":
    name = "vit.blocks.0.proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
  model = TorchMMAR(resolved_config(mcfg.to_dict(), "the JAX model"), tokenizer)
  model.load_state_dict(load_checked(model, tensors, "the JAX model"), strict=False)
  if perturb == "position":
    layout = model.layout

    def shifted(kind, text_len):
      lay = layout(kind, text_len)
      image = torch.zeros_like(lay["positions"], dtype=torch.bool).scatter(1, lay["image_seq"], True)
      return dict(lay, positions=lay["positions"] + image.long())
    model.layout = shifted
  return model.eval()


def reference(workdir=None, config=None) -> dict:
  """The JAX side, computed once: the model, the prepared batch and every JAX output."""
  t0 = time.perf_counter()
  config, tokenizer, mcfg, params = _setup(workdir, config)
  graphdef = nnx.split(nnx.eval_shape(lambda: MMAR(mcfg, rngs=nnx.Rngs(0))))[0]
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  batch = jax.tree.map(jnp.asarray, _batch(config, tokenizer, mcfg))
  mul = max(2, int(config.loss.diffusion_batch_mul))
  prep = model.prepare(batch, jax.random.key(11), jnp.float32(0.6), 0.5, mul,
                       float(config.loss.t2i_text_weight))
  counts = {k: prep[k] for k in ("text_count", "image_count")}
  weights = (float(config.loss.image_weight), float(config.loss.text_weight))

  def outputs(params):
    m = nnx.merge(graphdef, params)
    hidden, ids, lay = m.forward(prep)
    _, targets = sequence.text_targets(ids, lay["segment_ids"], mcfg.boi_id)
    r = m.head_rows(prep, hidden, lay)
    alpha, sigma = schedule.alpha_sigma(r["t"])
    x_t = alpha[:, None] * r["x0"] + sigma[:, None] * r["noise"]
    return m.backbone.logits(hidden), targets > 0, m.head(x_t, r["t"], r["z"], r["positions"]), x_t

  def loss_fn(params):
    return combine(nnx.merge(graphdef, params).loss_sums(prep), counts, *weights)

  ref = dict(config=config, tokenizer=tokenizer, mcfg=mcfg, params=params, weights=weights,
             prep={k: np.asarray(v) for k, v in prep.items()}, mul=mul)
  logits, targets, ref["head"], ref["x_t"] = jax.device_get(jax.jit(outputs)(params))
  ref["targets"], ref["logits"] = targets, logits[targets]
  (_, parts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  ref["losses"] = {k: float(v) for k, v in parts.items()}
  ref["grad_norms"] = {k: float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads[k]))))
                       for k in ("backbone", "vit", "projector", "head")}

  # Generation, and the orders and diffusion noise it drew (replayed from the sampler's keys).
  b, n, c = 4, mcfg.num_image_tokens, mcfg.vit.token_channels
  ref["text"], ref["text_len"] = np.asarray(batch["text"][:b]), np.asarray(batch["text_len"][:b])
  key = jax.random.key(5)
  ref["tokens"] = np.asarray(generate_tokens(model, ref["text"], ref["text_len"], key, **GENERATION)[0])
  orders, token_keys = sample_keys(typed_key(key), b, n)
  flat = token_keys.reshape(-1)
  ref["orders"] = np.asarray(orders)
  ref["x_T"] = np.asarray(samplers.initial_noise(flat, b * n, c)).reshape(b, n, c)
  ref["step_noise"] = np.stack([np.asarray(samplers.step_noise(flat, k, b * n, c)).reshape(b, n, c)
                                for k in range(GENERATION["diffusion_steps"])])
  # Greedy captions of the batch's first images (pixels: a run on prepared latents has none).
  if "image" in batch:
    ref["images"] = np.asarray(batch["image"][:b], np.float32)
    ref["question"], ref["question_len"] = encode_questions(tokenizer, None, b)
    ref["caption_ids"] = np.asarray(caption_tokens(model, ref["images"], ref["question"],
                                                   ref["question_len"], max_tokens=mcfg.max_text_len)[0])
  ref["seconds"] = time.perf_counter() - t0
  return ref


def compare(ref: dict, perturb: str | None = None, log=print) -> dict:
  """The PyTorch MMAR on `reference`'s weights and draws, against its JAX outputs."""
  import torch  # lazy: seconds to import, this path only
  t0 = time.perf_counter()
  tm = _torch_model(ref["mcfg"], ref["params"], ref["tokenizer"], perturb)
  prep = {k: torch.from_numpy(np.array(v)) for k, v in ref["prep"].items()}
  loss, parts = tm.loss(prep, *ref["weights"])
  loss.backward()
  groups = {"backbone": ("backbone.",), "vit": ("vit.",), "projector": ("projector.",),
            "head": ("diffloss.", "diffusion_pos_embed_learned")}
  norms = {k: float(torch.sqrt(sum((p.grad.double() ** 2).sum() for name, p in tm.named_parameters()
                                   if name.startswith(pre) and p.grad is not None)))
           for k, pre in groups.items()}
  with torch.no_grad():
    hidden, lay, ids = tm(prep)
    _, valid = tm.text_targets(lay, ids)
    same_targets = bool(np.array_equal(valid.numpy(), ref["targets"]))
    b, n, c = prep["tokens"].shape
    mul = ref["mul"]
    z = hidden.gather(1, lay["image_seq"][..., None].expand(-1, -1, hidden.shape[-1]))
    z = z.reshape(b * n, -1).repeat(mul, 1)
    t = prep["t"].movedim(2, 0).reshape(-1).long()
    head = tm.head(torch.from_numpy(np.array(ref["x_t"])), t, z, torch.arange(n).repeat(b * mul)).numpy()
    logits = tm.backbone.lm_head(hidden[valid]).numpy() if same_targets else None
    tokens = tm.generate_tokens(torch.from_numpy(ref["text"]).long(),
                                torch.from_numpy(ref["text_len"]).long(),
                                orders=torch.from_numpy(ref["orders"]), x_T=torch.from_numpy(ref["x_T"]),
                                step_noise=torch.from_numpy(ref["step_noise"]), **GENERATION)
  result = dict(
      logits=_rel(logits, ref["logits"]) if same_targets else float("inf"),
      head=_rel(head, ref["head"]),
      losses=max(_rel(float(parts[k].detach()), ref["losses"][k], LOSS_FLOOR) for k in ref["losses"]),
      grad_norms=max(_rel(norms[k], ref["grad_norms"][k]) for k in ref["grad_norms"]),
      tokens=float(np.max(np.abs(tokens.numpy() - ref["tokens"]))))
  if "images" in ref:
    ids = tm.caption_ids(torch.from_numpy(ref["images"]), torch.from_numpy(ref["question"]).long(),
                         torch.from_numpy(ref["question_len"]).long(), max_tokens=ref["mcfg"].max_text_len)
    result["captions_equal"] = bool(np.array_equal(ids.numpy(), ref["caption_ids"]))
  result["jax_seconds"], result["torch_seconds"] = ref["seconds"], time.perf_counter() - t0
  result["passed"] = (all(result[k] <= tol for k, tol in TOLERANCES.items())
                      and result.get("captions_equal", True))
  log(f"[torch-parity] {result}")
  return result
