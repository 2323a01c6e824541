"""Many inputs per process start: the input lists of `generate --prompts` (drawn by
commands/generate_files.py) and `caption --images`.

`caption --images DIR|GLOB|JSONL --out FILE.jsonl [--question TEXT] [--batch-size B]`: every
picture of a folder (sorted), of a glob, or of a JSONL's `image` key (relative to the file; a
record's own `question` wins over --question); one output record per input in input order,
{image, caption[, question]} or, for a picture that cannot be read, {image, error}: named in the
log, counted, never fatal. An existing FILE is refused without --overwrite.

Why SPMD, as generate: the backbone of a large run does not fit one small host, so every process
runs one captioning program over one global batch of B pictures on one global mesh (`--mesh`, or
every device present on the fsdp axis), the params FSDP-sharded over all hosts. Each process
reads only the pictures of the rows its devices hold, and the process that owns a row of the
output writes that picture's record (parallel/shares.ItemRecords: one small file per picture
beside FILE until it is complete). A picture that does not decode is an error record of its
owner; its row is drawn from zeros and dropped, so no process waits on another's bad file. Item
n's sampling key is fold_in(key(seed), n) and every question is padded to the longest of the
list, so a record depends neither on its batch nor on the process count; a re-run, on any number
of processes, captions only the pictures without a record. When every share is done, process 0
writes FILE atomically, in input order, and removes the records. (On another device count, FSDP
partitions the matmuls differently: a near-tied greedy token could then flip.)
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from mmar_jax.data.text_tokenizer import encode_questions
from mmar_jax.errors import InputError
from mmar_jax.files import jsonl_records
from mmar_jax.parallel import distributed, shares
from mmar_jax.parallel.mesh import sampling_overrides
from mmar_jax.run import Run
from mmar_jax.sample.image import split_model
from mmar_jax.sample.io import load_image
from mmar_jax.sample.text import caption_ids, strip_after_eos

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NAMED = 10  # unreadable pictures named in the log per process; all are counted
log = logging.getLogger(__name__)


# -- inputs ---------------------------------------------------------------------------------------

# -- what every sampling command shares ------------------------------------------------------------

def add_sampling_args(p):
  """How images are drawn, and from which weights (generate, and the drawing of eval fid)."""
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
  p.add_argument("--cfg-schedule", default="linear", choices=("linear", "constant"))
  p.add_argument("--ar-steps", type=int, default=64, help="masked-autoregressive steps K")
  p.add_argument("--diffusion-steps", type=int, default=100)
  p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
  p.add_argument("--temperature", type=float, default=1.0)
  add_checkpoint_args(p)


def sampling_kwargs(args) -> dict:
  """The keyword arguments of generate_files.generate_files that `add_sampling_args` sets."""
  return dict(seed=args.seed, ar_steps=args.ar_steps, diffusion_steps=args.diffusion_steps,
              sampler=args.sampler, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
              temperature=args.temperature)


def add_checkpoint_args(p):
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", default="ema", choices=("ema", "raw"))


def open_run(args):
  """(Run, (graphdef, params), step) of the workdir the arguments name."""
  run = Run(args.workdir, sampling_overrides(args.config_overrides))
  params, step = run.params(args.step, args.params)
  return run, (run.trainer.graphdef, params), step



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

def question_rows(tokenizer, questions: list[str | None], width: int):
  """(ids int32 [B, width], lengths [B]) of questions padded to `width` tokens."""
  ids, lens = encode_questions(tokenizer, [q or "" for q in questions], len(questions))
  out = np.full((len(questions), width), tokenizer.pad_id, np.int32)
  out[:, :ids.shape[1]] = ids
  return out, lens


def question_width(tokenizer, questions) -> int:
  """The padded question length of a whole input list (one compiled shape for every batch)."""
  return max([1] + [len(tokenizer.encode(q)) for q in set(questions) if q])


def compile_captioner(run, model, batch_size: int, width: int, *, max_tokens: int,
                      top_p: float | None) -> shares.RowProgram:
  """(pictures [B, S, S, 3] in [-1, 1], question ids [B, width], lengths [B], key data [B, 2])
  global rows -> generated ids [B, max_tokens] on the same rows."""
  graphdef, state = split_model(model)
  tok, size = run.tokenizer, run.model_cfg.image["size"]

  def caption(state, images, question, question_len, key_data):
    ids, _ = caption_ids(graphdef, state, images, question, question_len,
                         jax.random.wrap_key_data(key_data),
                         jnp.float32(top_p if top_p is not None else 1.0), jnp.int32(tok.eos_id),
                         jnp.int32(tok.pad_id), max_tokens=max_tokens, sample=top_p is not None)
    return ids

  rows = (jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch_size, width), jnp.int32),
          jax.ShapeDtypeStruct((batch_size,), jnp.int32),
          jax.ShapeDtypeStruct((batch_size, 2), jnp.uint32))
  return shares.RowProgram(caption, state, rows, run.trainer.mesh, run.context())


def load_rows(paths: list[str], rows: list[int], size: int) -> tuple[np.ndarray, dict[int, str]]:
  """Pictures [len(paths), size, size, 3] with only `rows` read (the others zeros), and the
  error of each of those rows that does not decode."""
  images = np.zeros((len(paths), size, size, 3), np.float32)
  errors = {}
  for r in rows:
    try:
      images[r] = load_image(paths[r], size)
    except (ValueError, FileNotFoundError) as e:
      errors[r] = str(e)
  return images, errors


def caption_files(run, model, inputs: list[tuple[str, str | None]], out: str, *,
                  batch_size: int = 8, max_tokens: int = 64, top_p=None, seed: int = 0,
                  weights: str = "", overwrite: bool = False, progress: bool = True) -> dict:
  """Writes `out` (module docstring); `weights` names the checkpoint (a resumed run must use the
  same). Returns this process's counts (`wait_s`: the seconds it waited for the others at the
  end) and, on process 0, the summary of the whole file."""
  lead = jax.process_index() == 0
  size, tok = run.model_cfg.image["size"], run.tokenizer
  width = question_width(tok, [q for _, q in inputs])
  records = shares.ItemRecords(out, dict(inputs=inputs, workdir=run.workdir, weights=weights,
                                         max_tokens=max_tokens, top_p=top_p, seed=seed))
  records.check(overwrite)
  if lead:  # before the others look (they wait in `agreed`)
    records.start(overwrite)
  name = lambda n: f"{n:08d}"
  done = shares.agreed(lambda n: records.has(name(n)), len(inputs), "caption")
  todo = shares.missing(list(range(len(inputs))), done)
  t0 = time.perf_counter()
  program = (compile_captioner(run, model, batch_size, width, max_tokens=max_tokens, top_p=top_p)
             if todo else None)
  distributed.barrier("mmar_caption_compiled")  # a collective's peers must join together
  t1 = time.perf_counter()
  bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not (progress and lead and todo))
  written = unreadable = 0
  for chunk, padded in shares.batches(todo, batch_size):
    images, errors = load_rows([inputs[n][0] for n in padded], program.held(), size)
    question, question_len = question_rows(tok, [inputs[n][1] for n in padded], width)
    ids = program(images, question, question_len, shares.item_keys(seed, padded))
    for row, row_ids in shares.owned_rows(ids):
      if row >= len(chunk):  # the padding's repeats are dropped
        continue
      path, q = inputs[chunk[row]]
      if row in errors:
        unreadable += 1
        if unreadable <= NAMED:
          log.warning("caption: skipping %s", errors[row])
        record = dict(image=path, error=errors[row])
      else:
        text = tok.decode(strip_after_eos(row_ids[None], tok.eos_id)[0])
        record = dict(image=path, caption=text, **({"question": q} if q else {}))
      records.write(name(chunk[row]), record)
      written += 1
    bar.update(len(chunk))
  bar.close()
  working_s = time.perf_counter() - t1
  distributed.barrier("mmar_caption_written")  # every share is on disk before the merge
  wait_s = time.perf_counter() - t1 - working_s
  here = dict(process=jax.process_index(), images=len(inputs), captioned_now=len(todo),
              written_here=written, unreadable_here=unreadable, compile_s=t1 - t0,
              wait_s=wait_s, seconds=time.perf_counter() - t0)
  if lead:
    merged = [records.read(name(n)) for n in range(len(inputs))]
    records.finish("".join(json.dumps(r) + "\n" for r in merged).encode())
    bad = [r["image"] for r in merged if "error" in r]
    here.update(captioned=len(merged) - len(bad), unreadable=len(bad), unreadable_files=bad[:20],
                out=str(out))
  return here


def cli_caption_files(args, run, model, step) -> int:
  if args.batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
  inputs = image_inputs(args.images, args.question)
  here = caption_files(run, model, inputs, args.out, batch_size=args.batch_size,
                       max_tokens=args.max_tokens, top_p=args.top_p, seed=args.seed,
                       weights=f"step {step} {args.params}", overwrite=args.overwrite)
  print(json.dumps(here), flush=True)
  return 0
