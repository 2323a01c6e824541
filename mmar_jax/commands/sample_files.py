"""Many inputs per process start: the input lists of `generate --prompts` (drawn by
commands/generate_files.py) and `caption --images`.

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
import time

import jax
import numpy as np
from etils import epath

from mmar_jax.errors import InputError
from mmar_jax.files import jsonl_records, write_bytes_atomic
from mmar_jax.sample.io import load_image
from mmar_jax.sample.text import caption_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- inputs ---------------------------------------------------------------------------------------

def read_prompts(path: str, key: str = "caption") -> list[str]:
  """Prompts of a text file (one a line) or a JSONL file (`key` of each record)."""
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


# -- caption --------------------------------------------------------------------------------------

def caption_files(run, model, inputs: list[tuple[str, str | None]], *, batch_size: int = 8,
                  max_tokens: int = 64, top_p=None, seed: int = 0) -> list[dict]:
  """One record per input, in order: {image, caption} or {image, error}."""
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
