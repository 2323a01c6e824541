"""`mmar-jax diagnose context --workdir DIR`: does the image block use the tokens it has drawn?

Masked autoregression only works if a masked position reads the tokens already drawn: that is
what makes the tiles of one picture agree. This measures it on any run (EMA weights by default,
on the run's own mesh, so a sharded 0.5B or 7B run is measured as it trains). Batches come from
the run's data source; each sample is made a captioned `[text][img]` or an unconditional `[img]`
sample with exactly v of its N image tokens visible (a random order per sample, as in training),
v in VISIBLE_FRACTIONS of N and N - 1. On the masked tokens, with fixed draws of t and noise
(DRAWS per token):

  loss          the diffusion loss (the training objective)
  loss_cut_llm  the same with the LLM's attention from masked to visible image positions cut
                (models/sequence.cut_image_context)
  loss_cut_vit  the same with that cut made in the EmbeddingViT instead
  loss_swapped  the visible tokens replaced by another picture's (same positions)
  attention     per LLM layer, the share of a masked query's attention on visible image tokens,
                on masked ones (itself included), on <boi> and on the caption

If the LLM carries the context, loss_cut_llm rises towards the loss with nothing visible, and
loss_cut_vit does not. And on the captioned masked tokens, the head's x0 estimate at t = 999 (where
x_t holds no trace of x0, so it can only use z) is compared with a nearest-neighbour estimate from
the same z: the x0 of the closest z in a reference half of the batches. A head far worse than that
neighbour does not use what z holds. MSEs are in the tokenizer's space (before token
normalisation), over all masked tokens and over the "lit" ones (all but the most frequent token:
the demo's empty background).

Writes OUT/context.json and OUT/context.png (OUT defaults to WORKDIR/diagnose/context; present
outputs are refused without --overwrite) and prints a table.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mmar_jax.commands import figures
from mmar_jax.data.pipeline import global_batch, make_batcher
from mmar_jax.data.sources import make_source
from mmar_jax.diffusion import parameterization as par
from mmar_jax.diffusion import schedule
from mmar_jax.errors import ConfigError
from mmar_jax.files import write_bytes_atomic
from mmar_jax.models import sequence
from mmar_jax.models.image_tokenizer import denormalize, token_norm
from mmar_jax.models.qwen2 import attention_weights
from mmar_jax.run import Run

OUTPUTS = ("context.json", "context.png")
VISIBLE_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
KINDS = {"captioned": sequence.TEXT_TO_IMAGE, "unconditional": sequence.IMAGE_ONLY}
LOSSES = ("loss", "loss_cut_llm", "loss_cut_vit", "loss_swapped")
SHARES = ("visible", "masked", "boi", "text")
DRAWS = 4
SEED = 4321  # the diagnostic's own draws (masks, t, noise): the same for every run measured
NN_TOKENS = 4096  # at most this many tokens on each side of the nearest-neighbour estimate


def _log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def visible_counts(n: int) -> list[int]:
  return sorted({int(round(f * n)) for f in VISIBLE_FRACTIONS} | {n - 1})


def with_visible(model, batch, kind: int, visible: int, key):
  """The prepared batch with every sample of `kind` and exactly `visible` image tokens visible."""
  n = model.cfg.num_image_tokens
  batch = dict(batch, kind=jnp.full_like(batch["kind"], kind))
  # `random_mask` masks ceil(n * ratio): half a token below n - visible rounds to exactly that.
  ratio = jnp.maximum((n - visible - 0.5) / n, 0.0).astype(jnp.float32)
  return model.prepare(batch, key, ratio, 0.0, DRAWS)


def masked_loss(model, prep, cut=None):
  """(sum, count) of the diffusion loss over the masked tokens and draws."""
  hidden, _, lay = model.forward(prep, cut)
  r = model.head_rows(prep, hidden, lay)
  return par.diffusion_loss(lambda x, t, z: model.head(x, t, z, r["positions"]), r["x0"], r["z"],
                            r["mask_weights"], r["t"], r["noise"], prediction=model.cfg.head.prediction)


def swapped(prep):
  """Each sample's visible tokens taken from the next sample of the batch."""
  other = jnp.roll(prep["tokens"], 1, axis=0)
  return dict(prep, tokens=jnp.where(prep["masked"][..., None], prep["tokens"], other))


def attention_shares(model, prep) -> jax.Array:
  """[L, 4] share of masked image queries' attention on (visible, masked, <boi>, caption) keys,
  summed over queries and heads (the caller divides by their count)."""
  image_embeds = model.embed_image(prep["tokens"], prep["masked"])
  x, ids, lay = model.sequence_inputs(prep["text"], prep["text_len"], prep["kind"], image_embeds)
  b, s = ids.shape
  masked_seq = jnp.zeros((b, s), bool).at[jnp.arange(b)[:, None], lay["image_pos"]].set(prep["masked"])
  image = ids == sequence.IMAGE_TOKEN
  real_text = (ids >= 0) & (lay["segment_ids"] != 0) & (ids != model.cfg.boi_id) & (ids != model.cfg.eoi_id)
  keys = jnp.stack([image & ~masked_seq, masked_seq, ids == model.cfg.boi_id, real_text], -1)
  reduce = lambda p: jnp.einsum("bhts,bt,bsc->c", p, masked_seq.astype(p.dtype), keys.astype(p.dtype))
  return attention_weights(model.backbone, x, lay["positions"], lay["segment_ids"],
                           lay["block_ids"], reduce=reduce)


def head_x0_at_end(model, prep):
  """(x0, the head's x0 estimate at t = T - 1, z) of every token [B N, ...], and the masked flags:
  x_t is then almost pure noise, so the estimate is what the head reads from z alone."""
  b, n, c = prep["tokens"].shape
  x0 = prep["tokens"].reshape(b * n, c)
  hidden, _, lay = model.forward(prep)
  z = sequence.gather_image(hidden, lay["image_pos"]).reshape(b * n, -1)
  t = jnp.full((b * n,), schedule.NUM_TIMESTEPS - 1, jnp.int32)
  alpha, sigma = schedule.alpha_sigma(t)
  alpha, sigma = alpha[:, None], sigma[:, None]
  x_t = par.q_sample(x0, prep["noise"][:, :, 0].reshape(b * n, c), alpha, sigma)
  positions = jnp.tile(jnp.arange(n), b) if model.cfg.head.n_positions else None
  pred, _ = par.split_output(model.head(x_t, t, z, positions), c)
  x0_hat, _ = par.x0_eps_from_prediction(model.cfg.head.prediction, pred.astype(jnp.float32), x_t,
                                        alpha, sigma)
  return dict(x0=x0, x0_hat=x0_hat, z=z.astype(jnp.float32), masked=prep["masked"].reshape(-1))


def _gather(tree):
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def nearest_neighbour_mse(ref: dict, ev: dict, norm) -> dict:
  """MSE of the head's x0 estimate and of the nearest-neighbour one on the `ev` tokens."""
  raw = lambda a: np.asarray(denormalize(a, norm))
  x_ref, x_ev, head = raw(ref["x0"]), raw(ev["x0"]), raw(ev["x0_hat"])
  z_ref, z_ev = ref["z"].astype(np.float64), ev["z"].astype(np.float64)
  dist = (z_ev ** 2).sum(1)[:, None] - 2 * z_ev @ z_ref.T + (z_ref ** 2).sum(1)[None]
  nn = x_ref[np.argmin(dist, axis=1)]
  rounded = np.round(np.concatenate([x_ref, x_ev]), 3)
  values, counts = np.unique(rounded, axis=0, return_counts=True)
  background = values[np.argmax(counts)]
  lit = np.abs(x_ev - background).max(1) > 1e-3 if counts.max() > 1 else np.ones(len(x_ev), bool)
  mse = lambda est, sel: float(np.mean((est[sel] - x_ev[sel]) ** 2)) if sel.any() else None
  every = np.ones(len(x_ev), bool)
  out = {}
  for name, sel in (("all", every), ("lit", lit)):
    h, nb = mse(head, sel), mse(nn, sel)
    out[name] = dict(head_mse=h, nn_mse=nb, ratio=(h / nb if h is not None and nb else None),
                     tokens=int(sel.sum()))
  out["reference_tokens"] = int(len(x_ref))
  return out


def measure(workdir, *, step=None, params: str = "ema", batches: int = 4, overrides=(),
            log=_log) -> dict:
  t0 = time.perf_counter()
  run = Run(workdir, overrides)
  config, mcfg, tr = run.config, run.model_cfg, run.trainer
  weights, step = run.params(step, params)
  log(f"restored {params} params of step {step} from {workdir}")
  batcher = make_batcher(config, make_source(config), run.tokenizer, mcfg.max_text_len)
  n = mcfg.num_image_tokens
  counts = visible_counts(n)

  def one(weights, batch, key, kind, visible):
    model = tr.model(weights)
    prep = with_visible(model, batch, kind, visible, key)
    out = {"loss": masked_loss(model, prep), "loss_cut_llm": masked_loss(model, prep, "llm"),
           "loss_cut_vit": masked_loss(model, prep, "vit"),
           "loss_swapped": masked_loss(model, swapped(prep))}
    out["attention"] = attention_shares(model, prep)
    out["attention_queries"] = jnp.sum(prep["masked"]).astype(jnp.float32) * model.cfg.backbone.num_heads
    out["x0"] = head_x0_at_end(model, prep)
    return out

  jitted = jax.jit(one)  # kind and visible count traced: one program for every case
  totals = {k: {v: {} for v in counts} for k in KINDS}
  pools = []
  with run.context():
    for i in range(batches):
      batch = global_batch(batcher, i, tr.batch_sharding)
      for kname, kind in KINDS.items():
        for v in counts:
          key = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), i), v)
          got = _gather(jitted(weights, batch, key, jnp.int32(kind), jnp.int32(v)))
          acc = totals[kname][v]
          for name in LOSSES:
            s, c = got[name]
            acc[name] = np.add(acc.get(name, (0.0, 0.0)), (float(s), float(c)))
          acc["attention"] = acc.get("attention", 0.0) + got["attention"]
          acc["queries"] = acc.get("queries", 0.0) + float(got["attention_queries"])
          if kind == sequence.TEXT_TO_IMAGE:
            keep = got["x0"]["masked"]
            pools.append((i, {k: a[keep] for k, a in got["x0"].items() if k != "masked"}))
      log(f"  batch {i + 1}/{batches}")

  result = dict(workdir=str(workdir), step=int(step), params=params, batches=batches,
                batch_size=int(config.train.batch_size), num_image_tokens=n, draws=DRAWS,
                visible=counts, layers=mcfg.backbone.num_layers)
  for kname in KINDS:
    rows = {name: [] for name in LOSSES}
    shares = {name: [] for name in SHARES}
    for v in counts:
      acc = totals[kname][v]
      for name in LOSSES:
        s, c = acc[name]
        rows[name].append(float(s / c) if c else None)
      share = acc["attention"] / max(acc["queries"], 1.0)  # [L, 4]
      for j, name in enumerate(SHARES):
        shares[name].append([float(x) for x in share[:, j]])
    result[kname] = dict(rows, attention=shares)
  cat = lambda part, k: np.concatenate([p[k] for i, p in pools if i % 2 == part])[:NN_TOKENS]
  if batches >= 2:
    ref = {k: cat(0, k) for k in ("x0", "x0_hat", "z")}
    ev = {k: cat(1, k) for k in ("x0", "x0_hat", "z")}
    result["head_x0_t999"] = nearest_neighbour_mse(ref, ev, token_norm(mcfg.image))
  result["summary"] = summary(result)
  result["wall_s"] = round(time.perf_counter() - t0, 1)
  return result


def summary(result: dict) -> dict:
  """The headline figures: at the largest visible count below N - 1 (12 of 16 on the demo), how
  much each cut raises the unconditional and captioned masked loss (relative), and the head's
  x0 error over the nearest-neighbour one on lit captioned tokens."""
  counts = result["visible"]
  j = max(i for i, v in enumerate(counts) if v < counts[-1]) if len(counts) > 1 else 0
  out = dict(visible=counts[j])
  for kname in KINDS:
    r = result[kname]
    base = r["loss"][j]
    rel = lambda name: (r[name][j] / base - 1.0) if base else None
    out[kname] = dict(loss=base, loss_none_visible=r["loss"][0], cut_llm_increase=rel("loss_cut_llm"),
                      cut_vit_increase=rel("loss_cut_vit"), swapped_increase=rel("loss_swapped"),
                      # comparable across token normalisations, unlike the loss itself:
                      loss_over_none_visible=(base / r["loss"][0]) if r["loss"][0] else None,
                      attention_on_visible=r["attention"]["visible"][j])
  head = result.get("head_x0_t999")
  out["head_over_nn_lit"] = head["lit"]["ratio"] if head else None
  return out


def format_table(result: dict) -> str:
  lines = []
  for kname in KINDS:
    r = result[kname]
    lines.append(f"{kname}: masked-token loss against visible tokens (of {result['num_image_tokens']})")
    lines.append(f"  {'visible':>7s} " + " ".join(f"{n:>13s}" for n in LOSSES))
    for j, v in enumerate(result["visible"]):
      lines.append(f"  {v:7d} " + " ".join(f"{r[n][j]:13.4f}" if r[n][j] is not None else f"{'-':>13s}"
                                            for n in LOSSES))
    j = len(result["visible"]) - 2 if len(result["visible"]) > 1 else 0
    lines.append(f"  attention of masked queries at {result['visible'][j]} visible, per layer: " +
                 "; ".join(f"{n} " + "/".join(f"{x:.2f}" for x in r["attention"][n][j]) for n in SHARES))
  head = result.get("head_x0_t999")
  if head:
    for part in ("all", "lit"):
      h = head[part]
      if h["head_mse"] is not None:
        lines.append(f"head x0 at t=999 ({part} captioned masked tokens, {h['tokens']}): head MSE "
                     f"{h['head_mse']:.4f}, nearest neighbour {h['nn_mse']:.4f}, ratio {h['ratio']:.2f}")
  s = result["summary"]
  for kname in KINDS:
    k = s[kname]
    if k["cut_llm_increase"] is not None:
      lines.append(f"{kname} at {s['visible']} visible: cutting the LLM raises the loss by "
                   f"{100 * k['cut_llm_increase']:+.0f}%, cutting the ViT by {100 * k['cut_vit_increase']:+.0f}%")
  return "\n".join(lines)


def plot_png(result: dict) -> bytes:
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, kname in zip(axes[:2], KINDS):
    for name in LOSSES:
      ax.plot(result["visible"], result[kname][name], marker="o", label=name)
    ax.set_title(f"{kname}: masked-token loss")
    ax.set_xlabel("visible image tokens")
    ax.legend(fontsize=7)
  ax = axes[2]
  j = len(result["visible"]) - 2 if len(result["visible"]) > 1 else 0
  layers = np.arange(result["layers"])
  width = 0.2
  for i, name in enumerate(SHARES):
    ax.bar(layers + (i - 1.5) * width, result["unconditional"]["attention"][name][j], width, label=name)
  ax.set_title(f"unconditional, {result['visible'][j]} visible: attention of masked queries")
  ax.set_xlabel("LLM layer")
  ax.legend(fontsize=7)
  return figures.png_bytes(fig, dpi=100)


def cli_context(args) -> int:
  out = epath.Path(args.out or epath.Path(args.workdir) / "diagnose" / "context")
  present = [n for n in OUTPUTS if (out / n).exists()]
  if present and not args.overwrite:
    raise ConfigError(f"{out} already holds {', '.join(present)}: pass --overwrite to replace them")
  result = measure(args.workdir, step=args.step, params=args.params, batches=args.batches,
                   overrides=args.config_overrides)
  print(format_table(result))
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "context.json", (json.dumps(result, indent=1) + "\n").encode())
    write_bytes_atomic(out / "context.png", plot_png(result))
    print(f"wrote {out / 'context.json'} and {out / 'context.png'}")
  return 0
