"""`mmar-jax generate` and `mmar-jax caption`: sampling from a training workdir (one prompt or
picture here; many per process start with `--prompts` / `--images`: sample_files.py).

Both read the stored config (WORKDIR/config.json), the workdir's tokenizer and, by default, the
EMA weights of the latest checkpoint; `--step` and `--params raw` choose others. The model runs
on `--mesh` if given, else on every device present (fsdp axis: parallel/mesh.sampling_overrides),
not on the training run's mesh. `--prompts` and `--images` also run across the processes of a pod (`--coordinator`,
or the environment `train` reads: parallel/distributed.py), the SPMD way (generate_files.py,
sample_files.py); one prompt and one picture run in one process.
"""

from __future__ import annotations

import sys
import time

import jax
from etils import epath

from mmar_jax.commands.generate_files import cli_generate_files
from mmar_jax.commands.sample_files import (add_checkpoint_args, add_sampling_args,
                                            cli_caption_files, image_inputs, open_run, read_prompts)
from mmar_jax.errors import ConfigError
from mmar_jax.parallel import distributed
from mmar_jax.parallel.distributed import add_arguments
from mmar_jax.sample import image as gen
from mmar_jax.sample import io as sio
from mmar_jax.sample import text as txt
from mmar_jax.sample.io import check_writable


def add_generate_args(p):
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", default=None, help="caption to draw (none: unconditional)")
  p.add_argument("--out", default=None, help="PNG; with --num > 1 a grid, singles beside it")
  p.add_argument("--num", type=int, default=1, help="images to draw")
  p.add_argument("--prompts", default=None,
                 help="many prompts: a text file (one a line) or JSONL; with --out-dir")
  p.add_argument("--prompt-key", default="caption", help="the prompt's key in a JSONL --prompts")
  p.add_argument("--out-dir", default=None, help="with --prompts: PNGs and index.jsonl")
  p.add_argument("--num-per-prompt", type=int, default=1, help="with --prompts: draws per prompt")
  p.add_argument("--batch-size", type=int, default=8, help="with --prompts: images per batch")
  add_sampling_args(p)
  p.add_argument("--overwrite", action="store_true", help="replace existing output files")
  add_arguments(p)


def add_caption_args(p):
  p.add_argument("--workdir", required=True)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--image", help="picture file (resized and centre-cropped)")
  src.add_argument("--images", help="many pictures: a folder, a glob or a JSONL (`image` key); "
                                    "with --out")
  p.add_argument("--out", default=None, help="with --images: the captions, one JSON line each")
  p.add_argument("--overwrite", action="store_true",
                 help="with --images: replace an existing --out (and start over)")
  p.add_argument("--batch-size", type=int, default=8, help="with --images: pictures per batch")
  p.add_argument("--question", default=None, help="a question about the image (VQA)")
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: greedy)")
  p.add_argument("--seed", type=int, default=0)
  add_checkpoint_args(p)
  add_arguments(p)


def _join(args, spread: bool, why: str):
  """Joins a multi-process run (before any other JAX call); a command that does not spread its
  inputs over the processes refuses one, saying `why`."""

  distributed.join(args)
  if not spread and jax.process_count() > 1:
    raise ConfigError(f"{why} (this run has {jax.process_count()} processes)")


def cli_generate(args) -> int:
  many = args.prompts is not None
  if many != (args.out_dir is not None) or many == (args.out is not None):
    print("mmar-jax: error: give --out (one prompt), or --prompts with --out-dir", file=sys.stderr)
    return 2
  _join(args, many, "one prompt runs in one process; --prompts spreads many over the processes")

  if many:
    read_prompts(args.prompts, args.prompt_key)  # a bad file fails before the (slow) model load
    run, model, step = open_run(args)
    return cli_generate_files(args, run, model, step)
  if args.num < 1:
    print(f"mmar-jax: error: --num must be >= 1, got {args.num}", file=sys.stderr)
    return 2
  sio.check_writable(sio.sample_paths(args.out, args.num), args.overwrite)
  run, model, step = open_run(args)
  prompts = [args.prompt] * args.num if args.prompt else None
  print(f"generating {args.num} image(s) from step {step} ({args.params} weights), "
        f"{args.ar_steps} AR steps x {args.diffusion_steps} {args.sampler} steps ...",
        file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  with run.context():
    images = gen.generate_images(
        model, run.tokenizer, prompts, jax.random.key(args.seed), num=args.num,
        ar_steps=args.ar_steps, diffusion_steps=args.diffusion_steps, sampler=args.sampler,
        cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature)
  paths = sio.save_samples(args.out, images, overwrite=args.overwrite)
  print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr, flush=True)
  return 0


def cli_caption(args) -> int:
  _join(args, args.images is not None,
        "one picture runs in one process; --images spreads many over the processes")

  if args.images is not None:
    if not args.out:
      print("mmar-jax: error: --images needs --out FILE.jsonl", file=sys.stderr)
      return 2
    image_inputs(args.images, args.question)  # before the (slow) model load
    check_writable([args.out], args.overwrite)  # also here: every process stops alike
    run, model, step = open_run(args)
    return cli_caption_files(args, run, model, step)
  if not epath.Path(args.image).exists():  # before the (slow) model load
    raise FileNotFoundError(f"image not found: {args.image}")
  run, model, _ = open_run(args)
  try:
    image = sio.load_image(args.image, run.model_cfg.image["size"])
  except ValueError as e:  # an unreadable picture: a bad input, not a crash
    print(f"mmar-jax: error: {e}", file=sys.stderr)
    return 2
  with run.context():
    texts = txt.caption_images(model, image[None], run.tokenizer, jax.random.key(args.seed),
                               max_tokens=args.max_tokens, top_p=args.top_p,
                               question=args.question)
  print(texts[0], flush=True)
  return 0
