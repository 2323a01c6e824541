"""`generate --prompts FILE --out-dir DIR [--num-per-prompt K] [--batch-size B]`: many prompts,
one process or every process of a pod.

Prompts come from a text file (one a line; an empty line is an unconditional prompt) or JSONL
(`--prompt-key`, default `caption`). Image (i, k), draw k of prompt i, is
`DIR/{i:06d}_{k:02d}.png`, drawn from the key fold_in(fold_in(key(seed), i), k): one key per
image, so its pixels depend neither on the batch it is drawn in nor on the batch size, the device
count or the process count.

Why SPMD, not per host: a 7B model's fp32 weights do not fit one small host, so every process
runs the same program over one global batch of B images on one global mesh (`--mesh`, or every
device present on the fsdp axis), the params FSDP-sharded over all hosts as in training. A row of
the output belongs to the process whose device holds it (parallel/shares.py), which writes that
PNG; every PNG is written atomically. The batches are a pure function of the prompt list and of
the files already in DIR (as process 0 sees them), so a re-run, on any number of processes,
draws only what is missing. After every process is done, process 0 writes `DIR/index.jsonl`
(file, prompt, prompt_index, draw, seed) of every image of the command, atomically.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from tqdm import tqdm

from mmar_jax.commands.sample_files import read_prompts, sampling_kwargs
from mmar_jax.data.text_tokenizer import encode_prompts
from mmar_jax.errors import InputError
from mmar_jax.files import remove_temporaries, write_bytes_atomic
from mmar_jax.parallel import distributed, shares
from mmar_jax.sample.image import generate_tokens, split_model
from mmar_jax.sample.io import png_bytes


def image_name(prompt_index: int, draw: int) -> str:
  return f"{prompt_index:06d}_{draw:02d}.png"


def compile_drawer(run, model, batch_size: int, *, guidance: bool, ar_steps: int = 64,
                   diffusion_steps: int = 100, sampler: str = "ddpm", cfg: float = 4.0,
                   cfg_schedule: str = "linear", temperature: float = 1.0) -> shares.RowProgram:
  """(text, text_len, key data) global rows -> uint8 images [B, H, W, 3] on the same rows."""

  graphdef, state = split_model(model)

  def draw(state, text, text_len, key_data):
    tokens, _ = generate_tokens((graphdef, state), text, text_len, jax.random.wrap_key_data(key_data),
                                ar_steps=ar_steps, diffusion_steps=diffusion_steps, sampler=sampler,
                                cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                                guidance=guidance)
    images = nnx.merge(graphdef, state).image_tokenizer.tokens_to_images(tokens)
    # data/preprocess.to_uint8, on the device: only uint8 rows travel to the hosts.
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

  lt = run.model_cfg.max_text_len
  rows = (jax.ShapeDtypeStruct((batch_size, lt), jnp.int32),
          jax.ShapeDtypeStruct((batch_size,), jnp.int32),
          jax.ShapeDtypeStruct((batch_size, 2), jnp.uint32))
  return shares.RowProgram(draw, state, rows, run.trainer.mesh, run.context())


def generate_files(run, model, prompts: list[str], out_dir: str, *, num_per_prompt: int = 1,
                   batch_size: int = 8, seed: int = 0, progress: bool = True, **sampling) -> dict:
  """Draws every (prompt, draw) image not yet in `out_dir` (module docstring); returns counts
  (`wait_s`: the seconds this process waited for the others at the end)."""

  out = epath.Path(out_dir)
  lead = jax.process_index() == 0
  if lead:  # before the others start writing (they wait in `agreed`)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)  # left by a process killed while writing
  items = [(i, k) for i in range(len(prompts)) for k in range(num_per_prompt)]
  done = shares.agreed(lambda n: (out / image_name(*items[n])).exists(), len(items), "generate")
  todo = shares.missing(items, done)
  # From the whole list, not what is left: a resumed run draws its images as the first run did.
  guidance = float(sampling.get("cfg", 4.0)) != 1.0 and any(prompts)
  t0 = time.perf_counter()
  draw = compile_drawer(run, model, batch_size, guidance=guidance, **sampling) if todo else None
  # Compiled everywhere before any process runs it: a collective's peers must join together.
  distributed.barrier("mmar_generate_compiled")
  t1 = time.perf_counter()
  bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not (progress and lead and todo))
  written = 0
  for chunk, padded in shares.batches(todo, batch_size):
    text, text_len = encode_prompts(run.tokenizer, [prompts[i] for i, _ in padded],
                                    run.model_cfg.max_text_len)
    images = draw(text, text_len, shares.item_keys(seed, padded))
    for row, image in shares.owned_rows(images):
      if row < len(chunk):  # the padding's repeats are dropped
        write_bytes_atomic(out / image_name(*chunk[row]), png_bytes(image))
        written += 1
    bar.update(len(chunk))
    bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - t1):.2f}")
  bar.close()
  drawing_s = time.perf_counter() - t1
  distributed.barrier("mmar_generate_written")  # every share is on disk before the index
  wait_s = time.perf_counter() - t1 - drawing_s
  if lead:
    index = "".join(json.dumps(dict(file=image_name(i, k), prompt=prompts[i], prompt_index=i,
                                    draw=k, seed=seed)) + "\n" for i, k in items)
    write_bytes_atomic(out / "index.jsonl", index.encode())
  seconds = time.perf_counter() - t0
  return dict(images=len(items), drawn=len(todo), skipped=len(items) - len(todo),
              processes=jax.process_count(), written_here=written, seconds=seconds,
              compile_s=t1 - t0, wait_s=wait_s,
              images_per_s=len(todo) / drawing_s if todo and drawing_s > 0 else None)


def cli_generate_files(args, run, model, step) -> int:
  prompts = read_prompts(args.prompts, args.prompt_key)
  if args.num_per_prompt < 1 or args.batch_size < 1:
    raise InputError("--num-per-prompt and --batch-size must be >= 1")
  if jax.process_index() == 0:
    print(f"generating {len(prompts)} prompt(s) x {args.num_per_prompt} from step {step} "
          f"({args.params} weights) into {args.out_dir} on {jax.process_count()} process(es), "
          f"mesh {dict(run.trainer.mesh.shape)} ...", file=sys.stderr, flush=True)
  result = generate_files(run, model, prompts, args.out_dir, num_per_prompt=args.num_per_prompt,
                          batch_size=args.batch_size, **sampling_kwargs(args))
  print(json.dumps(dict(result, process=jax.process_index())), flush=True)
  return 0
