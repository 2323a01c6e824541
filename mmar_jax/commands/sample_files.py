"""Sampling at scale, many inputs per process start (`generate --prompts`, `caption --images`).

`generate --prompts FILE --out-dir DIR [--num-per-prompt K] [--batch-size B]`: prompts from a text
file (one a line; an empty line is an unconditional prompt) or JSONL (`--prompt-key`, default
`caption`). Image (i, k), draw k of prompt i, is `DIR/{i:06d}_{k:02d}.png`, drawn from the key
fold_in(fold_in(key(seed), i), k): one key per image, so its pixels do not depend on the batch it
is drawn in, on the batch size or on the device count. Batches run on the run's mesh (the batch
split over the data axis) at one static shape (the last batch is padded with repeats, whose
results are dropped). One process (a multi-process run is refused: its processes would have to
agree on the batches, and a per-host output folder cannot tell them). A file already there is
not drawn again, so re-running the command resumes after a preemption; every
PNG is written atomically. `DIR/index.jsonl` (file, prompt, prompt_index, draw, seed), rewritten
atomically at the end, lists every image of the command.

`caption --images DIR|GLOB|JSONL --out FILE.jsonl [--question TEXT] [--batch-size B]`: every
picture of a folder (sorted), of a glob, or of a JSONL's `image` key (relative to the file; a
record's own `question` wins over --question); one output record per input in input order,
{image, caption} or, for a picture that cannot be read, {image, error}: skipped, counted, named,
never fatal.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np
from etils import epath

from mmar_jax.errors import ConfigError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- inputs ---------------------------------------------------------------------------------------

def read_prompts(path: str, key: str = "caption") -> list[str]:
  """Prompts of a text file (one a line) or a JSONL file (`key` of each record)."""
  from mmar_jax.files import jsonl_records
  if path.endswith(".jsonl"):
    try:
      return [str(r[key]) for _, r in jsonl_records(path, "prompts file", (key,))]
    except InputError as e:
      raise InputError(f"{e} (the prompt key is --prompt-key)") from None
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"prompts file not found: {path}")
  return [line.strip() for line in p.read_text().splitlines()]


def image_inputs(spec: str, question: str | None) -> list[tuple[str, str | None]]:
  """(path, question) of every picture a folder, a glob or a JSONL names."""
  if spec.endswith(".jsonl"):
    from mmar_jax.files import jsonl_records
    base = os.path.dirname(spec)
    return [(os.path.join(base, r["image"]), r.get("question", question))
            for _, r in jsonl_records(spec, "images file", ("image",))]
  if os.path.isdir(spec):
    paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_SUFFIXES))
  else:
    paths = sorted(glob.glob(spec))
  if not paths:
    raise FileNotFoundError(f"no pictures in {spec}")
  return [(p, question) for p in paths]


# -- generate -------------------------------------------------------------------------------------

def image_name(prompt_index: int, draw: int) -> str:
  return f"{prompt_index:06d}_{draw:02d}.png"


def generate_files(run, model, prompts: list[str], out_dir: str, *, num_per_prompt: int = 1,
                   batch_size: int = 8, seed: int = 0, progress: bool = True, **sampling) -> dict:
  """Draws every (prompt, draw) image not yet in `out_dir` (module docstring); returns counts."""
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from mmar_jax.files import write_bytes_atomic
  from mmar_jax.data.text_tokenizer import encode_prompts
  from mmar_jax.sample.image import generate_tokens, tokens_to_images
  from mmar_jax.sample.io import png_bytes
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if jax.process_count() > 1:
    raise ConfigError("generate --prompts runs in one process (this run has "
                      f"{jax.process_count()}): start one per host, each with its own --prompts share")
  items = [(i, k) for i in range(len(prompts)) for k in range(num_per_prompt)]
  todo = [it for it in items if not (out / image_name(*it)).exists()]
  root = jax.random.key(seed)
  mc = run.model_cfg
  # From the whole list, not what is left: a resumed run draws its images as the first run did.
  guidance = float(sampling.get("cfg", 4.0)) != 1.0 and any(prompts)
  t0, bar = time.perf_counter(), tqdm(total=len(todo), unit="img", disable=not progress or not todo)
  with run.context():
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one static shape
      text, text_len = encode_prompts(run.tokenizer, [prompts[i] for i, _ in padded], mc.max_text_len)
      keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(root, i), k) for i, k in padded])
      tokens, _ = generate_tokens(model, text, text_len, keys, guidance=guidance, **sampling)
      images = np.asarray(tokens_to_images(model, tokens))
      for (i, k), image in zip(chunk, images):
        write_bytes_atomic(out / image_name(i, k), png_bytes(image))
      bar.update(len(chunk))
      bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - t0):.2f}")
  bar.close()
  seconds = time.perf_counter() - t0
  index = "".join(json.dumps(dict(file=image_name(i, k), prompt=prompts[i], prompt_index=i, draw=k,
                                  seed=seed)) + "\n" for i, k in items)
  write_bytes_atomic(out / "index.jsonl", index.encode())
  return dict(images=len(items), drawn=len(todo), skipped=len(items) - len(todo), seconds=seconds,
              images_per_s=len(todo) / seconds if todo else None)


def cli_generate_files(args, run, model, step) -> int:
  prompts = read_prompts(args.prompts, args.prompt_key)
  if args.num_per_prompt < 1 or args.batch_size < 1:
    raise InputError("--num-per-prompt and --batch-size must be >= 1")
  print(f"generating {len(prompts)} prompt(s) x {args.num_per_prompt} from step {step} "
        f"({args.params} weights) into {args.out_dir} ...", file=sys.stderr, flush=True)
  result = generate_files(run, model, prompts, args.out_dir, num_per_prompt=args.num_per_prompt,
                          batch_size=args.batch_size, seed=args.seed, ar_steps=args.ar_steps,
                          diffusion_steps=args.diffusion_steps, sampler=args.sampler, cfg=args.cfg,
                          cfg_schedule=args.cfg_schedule, temperature=args.temperature)
  print(json.dumps(result), flush=True)
  return 0


# -- caption --------------------------------------------------------------------------------------

def caption_files(run, model, inputs: list[tuple[str, str | None]], *, batch_size: int = 8,
                  max_tokens: int = 64, top_p=None, seed: int = 0) -> list[dict]:
  """One record per input, in order: {image, caption} or {image, error}."""
  import jax

  from mmar_jax.sample.io import load_image
  from mmar_jax.sample.text import caption_images
  size = run.model_cfg.image["size"]
  records, ready = [], []
  for path, question in inputs:
    try:
      ready.append((len(records), load_image(path, size), question))
      records.append(dict(image=path))
    except (ValueError, FileNotFoundError) as e:
      records.append(dict(image=path, error=str(e)))
  with run.context():
    for start in range(0, len(ready), batch_size):
      chunk = ready[start:start + batch_size]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      texts = caption_images(model, np.stack([im for _, im, _ in padded]), run.tokenizer,
                             jax.random.fold_in(jax.random.key(seed), start), max_tokens=max_tokens,
                             top_p=top_p, question=[q or "" for _, _, q in padded])
      for (slot, _, question), text in zip(chunk, texts):
        records[slot].update(caption=text, **({"question": question} if question else {}))
  return records


def cli_caption_files(args, run, model) -> int:
  from mmar_jax.files import write_bytes_atomic
  inputs = image_inputs(args.images, args.question)
  t0 = time.perf_counter()
  records = caption_files(run, model, inputs, batch_size=args.batch_size, max_tokens=args.max_tokens,
                          top_p=args.top_p, seed=args.seed)
  write_bytes_atomic(args.out, "".join(json.dumps(r) + "\n" for r in records).encode())
  bad = [r["image"] for r in records if "error" in r]
  print(json.dumps(dict(images=len(records), captioned=len(records) - len(bad), unreadable=len(bad),
                        unreadable_files=bad[:20], seconds=time.perf_counter() - t0,
                        out=args.out)), flush=True)
  return 0
