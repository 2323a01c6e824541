"""The demo's held-out evaluation (`mmar-jax eval`, and the end of `mmar-jax train` on the demo).

On the attribute combinations held out of training, with the EMA weights by default:
  understanding  caption each held-out image, parse colour / shape / position from the caption;
  generation     draw each held-out caption, read the attributes back with the programmatic
                 detector of data/shapes.py (no learned model);
  unconditional  the fraction of unconditional samples the detector finds valid.
Writes WORKDIR/eval/report.json and pictures beside it.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np
from etils import epath

from mmar_jax import startup
from mmar_jax.commands import figures
from mmar_jax.data import shapes
from mmar_jax.errors import ConfigError
from mmar_jax.run import Run
from mmar_jax.sample.image import generate_images
from mmar_jax.sample.text import caption_images
from mmar_jax.train.metrics import read_metrics

log = logging.getLogger("mmar_jax.eval")
ATTRS = ("colour", "shape", "position")


def accuracy(pred: list[tuple], truth: list[tuple]) -> dict:
  """Per-attribute and all-three accuracy of (colour, shape, position) name triples."""
  p, t = np.asarray(pred, dtype=object), np.asarray(truth, dtype=object)
  per = {a: float(np.mean(p[:, i] == t[:, i])) for i, a in enumerate(ATTRS)}
  per["all_three"] = float(np.mean((p == t).all(axis=1)))
  return per


def chance(spec: shapes.ShapesSpec) -> dict:
  c, s, p = len(spec.colours), len(spec.shapes), len(spec.positions)
  return dict(colour=1 / c, shape=1 / s, position=1 / p, all_three=1 / (c * s * p))


def not_applicable(config) -> str | None:
  """Why the demo's evaluation cannot measure a run (None when it can)."""
  if config.data.source != "demo":
    return (f"it measures the built-in demo data, and this run trains on "
            f"{config.data.source!r}")
  return None


def evaluate(workdir, *, step: int | None = None, params: str = "ema", seed: int = 0,
             sampling: dict | None = None, overrides=()) -> dict:
  t0 = time.perf_counter()
  run = Run(workdir, overrides)
  config, tokenizer, mcfg = run.config, run.tokenizer, run.model_cfg
  why = not_applicable(config)
  if why:
    raise ConfigError(f"eval: {why}")
  weights, step = run.params(step, params)
  model = run.model(jax.device_get(weights))
  spec = shapes.ShapesSpec(image_size=config.model.image.size, seed=config.seed)
  held = [spec.names(c) for c in spec.heldout_combinations()]
  sampling = dict(dict(ar_steps=config.eval.ar_steps, diffusion_steps=config.eval.diffusion_steps,
                       sampler="ddpm", cfg=config.eval.cfg, cfg_schedule=config.eval.cfg_schedule,
                       temperature=config.eval.temperature),
                  **(sampling or {}))
  key = jax.random.key(seed)
  out = epath.Path(workdir) / "eval"
  out.mkdir(parents=True, exist_ok=True)

  # Understanding: one image per held-out combination, with the training-time variation.
  rng = np.random.default_rng([seed, 1])
  images = np.stack([shapes.render(*names, spec, rng=rng) for names in held])
  captions = caption_images(model, images.astype(np.float32) / 127.5 - 1.0, tokenizer,
                            max_tokens=mcfg.max_text_len)
  understood = [shapes.parse_caption(c) for c in captions]

  # Generation: each held-out caption drawn `draws_per_prompt` times (4: 88 drawings, so that a
  # difference of 0.1 is well above the sampling noise), read back by the detector.
  draws = int(config.eval.draws_per_prompt)
  prompts = [shapes.caption(*names) for names in held for _ in range(draws)]
  truth = [names for names in held for _ in range(draws)]
  drawn = generate_images(model, tokenizer, prompts, jax.random.fold_in(key, 1), **sampling)
  detected = [shapes.detect(im, spec) for im in drawn]
  generated = [(d["colour"], d["shape"], d["position"]) for d in detected]

  num_unconditional = config.eval.num_unconditional
  uncond = generate_images(model, tokenizer, None, jax.random.fold_in(key, 2), num=num_unconditional,
                           **sampling)
  valid = [shapes.detect(im, spec)["valid"] for im in uncond]

  report = dict(
      understanding=accuracy(understood, held), generation=accuracy(generated, truth),
      unconditional_valid=float(np.mean(valid)), chance=chance(spec), step=int(step), params=params,
      sampling=sampling, num_heldout=len(held), draws_per_prompt=draws,
      num_unconditional=num_unconditional,
      eval_seconds=time.perf_counter() - t0)
  (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  _pictures(out, workdir, images, captions, drawn, prompts, detected, uncond, valid)
  (out / "examples.json").write_text(json.dumps(
      dict(captions=[dict(truth=shapes.caption(*h), caption=c) for h, c in zip(held, captions)],
           generation=[dict(prompt=p, detected=g, valid=d["valid"])
                       for p, g, d in zip(prompts, generated, detected)]), indent=1) + "\n")
  return report


def _pictures(out, workdir, images, captions, drawn, prompts, detected, uncond, valid):
  """Captioned test images, prompts with their drawings, unconditional samples, loss curves."""
  plt = figures.pyplot()

  def panel(path, imgs, titles, colours=None, cols=8):
    n = len(imgs)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
      ax.axis("off")
      if i < n:
        ax.imshow(imgs[i], interpolation="nearest")
        ax.set_title(titles[i], fontsize=6, color=(colours[i] if colours else "black"), wrap=True)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)

  ok = lambda d: "green" if d else "red"
  panel(out / "captions.png", images, captions)
  panel(out / "generated.png", drawn, prompts,
        [ok(d["valid"] and shapes.caption(d["colour"], d["shape"], d["position"]) == p)
         for d, p in zip(detected, prompts)])
  panel(out / "unconditional.png", uncond, ["valid" if v else "invalid" for v in valid],
        [ok(v) for v in valid])
  metrics = read_metrics(workdir)
  if metrics:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [m["step"] for m in metrics]
    for k in ("loss", "loss_text", "loss_image"):
      ax.plot(steps, [m[k] for m in metrics], label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(out / "loss.png"), dpi=110)
    plt.close(fig)


def print_report(report: dict, workdir) -> None:
  rows = [("understanding", report["understanding"]), ("generation", report["generation"]),
          ("chance", report["chance"])]
  print(f"{'':14s} {'colour':>7s} {'shape':>7s} {'position':>8s} {'all three':>9s}")
  for name, r in rows:
    print(f"{name:14s} {r['colour']:7.3f} {r['shape']:7.3f} {r['position']:8.3f} {r['all_three']:9.3f}")
  print(f"unconditional samples valid: {report['unconditional_valid']:.3f}")
  out = epath.Path(workdir) / "eval"
  print(f"report: {out / 'report.json'}")
  print(f"pictures: {out / 'generated.png'}, {out / 'captions.png'}, {out / 'unconditional.png'}, "
        f"{out / 'loss.png'}")


def cli_eval(args) -> int:
  startup.log_to_console(quiet=())
  report = evaluate(args.workdir, step=args.step, params=args.params,
                    overrides=args.config_overrides)
  print_report(report, args.workdir)
  return 0
