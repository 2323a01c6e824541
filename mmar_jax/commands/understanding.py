"""`mmar-jax eval understanding --workdir DIR --data FILE.jsonl [--out OUT.json]`: a benchmark
file the user supplies, scored on a training run.

Records, one JSON object a line (`image` relative to the file, or absolute):
  {"image", "question", "answer"}             open: the greedy answer (KV-cached decoding, the
                                              question after the image as in training) against
                                              `answer` by normalised exact match (lower case,
                                              punctuation and articles dropped, spaces collapsed)
  {"image", "question", "choices", "answer"}  multiple choice: each choice scored by its
                                              log-likelihood under the model, the choice tokens
                                              and EOS after `<boi> [img] <eoi> question` (EOS
                                              too, so a choice that is only a prefix of a longer
                                              one does not win for free); `answer` is the right
                                              choice's text, or its index (int) or letter
                                              ("A", "B", ...)
A missing `question` is the empty one (captioning). Unreadable images are skipped, counted and
named. Output: per-record predictions and a summary (accuracy per kind and overall, the chance
level of the multiple-choice part), written atomically to --out (default
WORKDIR/eval/understanding.json; an existing one is refused without --overwrite).

Why SPMD, as generate and caption: a 7B run's weights do not fit one small host, so every process
runs the same two programs (choice likelihoods, greedy open answers) over global batches of rows
on one global mesh (`--mesh`, or every device present on the fsdp axis), params FSDP-sharded over
all hosts. A row is one choice of a multiple-choice record, or one open record. Each process reads
the pictures of the rows its devices hold and writes the record of each row it owns
(parallel/shares.ItemRecords, beside --out until the report is complete), so a killed run
re-run on any number of processes scores only the missing rows. An unreadable picture is an
error record of its row's owner, not a stop. After every share is done, process 0 writes the
report once, atomically. The report is one process's on the same mesh, whatever the process
count; on another device count the likelihoods may differ in their last bits (FSDP partitions
the matmuls differently), as may, rarely, a near-tied greedy token.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import string
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from tqdm import tqdm

from mmar_jax.commands.sample_files import (compile_captioner, load_rows, open_run, question_rows,
                                            question_width)
from mmar_jax.errors import InputError
from mmar_jax.files import jsonl_records
from mmar_jax.models import sequence
from mmar_jax.parallel import distributed, shares
from mmar_jax.sample.image import split_model
from mmar_jax.sample.io import check_writable
from mmar_jax.sample.text import strip_after_eos

log = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
  text = str(text).lower()
  text = "".join(" " if ch in string.punctuation else ch for ch in text)
  return " ".join(_ARTICLES.sub(" ", text).split())


def read_records(path: str) -> list[dict]:
  base, records = os.path.dirname(path), []
  for n, r in jsonl_records(path, "benchmark file", ("image", "answer")):
    if "choices" in r and (not isinstance(r["choices"], list) or len(r["choices"]) < 2):
      raise InputError(f"{path}:{n}: 'choices' must be a list of at least two texts")
    r = dict(r, line=n, image=os.path.join(base, r["image"]), question=r.get("question") or "")
    if "choices" in r:
      r["answer_index"] = answer_index(r, path)
    records.append(r)
  return records


def answer_index(record: dict, path: str) -> int:
  """The index of the right choice: the answer as text, index or letter."""
  choices, answer = record["choices"], record["answer"]
  if isinstance(answer, int) and 0 <= answer < len(choices):
    return answer
  texts = [normalise(c) for c in choices]
  if normalise(answer) in texts:
    return texts.index(normalise(answer))
  letter = str(answer).strip().upper()
  if len(letter) == 1 and 0 <= ord(letter) - ord("A") < len(choices):
    return ord(letter) - ord("A")
  raise InputError(f"{path}:{record['line']}: answer {answer!r} is none of the choices")


def choice_rows(tokenizer, question: str, choices: list[str], max_text_len: int, where: str):
  """(text int32 [K, Lt], text_len [K], start [K], length [K]): question + choice + EOS per choice;
  `start`/`length` the span of the scored tokens (choice and EOS) in the text."""
  q = list(tokenizer.encode(question)) if question else []
  text = np.full((len(choices), max_text_len), tokenizer.pad_id, np.int32)
  lens, starts, spans = [], [], []
  for k, choice in enumerate(choices):
    ids = q + list(tokenizer.encode(str(choice))) + [tokenizer.eos_id]
    if len(ids) > max_text_len:
      raise InputError(f"{where}: question and choice {k} take {len(ids)} tokens; the model's "
                       f"text holds {max_text_len} (model.max_text_len)")
    text[k, :len(ids)] = ids
    lens.append(len(ids))
    starts.append(len(q))
    spans.append(len(ids) - len(q))
  return text, np.asarray(lens, np.int32), np.asarray(starts, np.int32), np.asarray(spans, np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _log_likelihood(graphdef, state, tokens, text, text_len, start, length):
  """Sum of log p(text[start:start+length]) per row of `<boi> [img] <eoi> text` (teacher forced)."""
  model = nnx.merge(graphdef, state)
  b, n, _ = tokens.shape
  prep = dict(tokens=tokens, masked=jnp.zeros((b, n), bool), text=text, text_len=text_len,
              kind=jnp.full((b,), sequence.IMAGE_TO_TEXT, jnp.int32))
  hidden, _, _ = model.forward(prep)
  lt = text.shape[1]
  j = jnp.arange(lt)[None, :]
  # In the image-first layout text token j is predicted at sequence position n + 1 + j (<eoi> is
  # at n + 1 and predicts token 0).
  h = hidden[:, n + 1:n + 1 + lt]
  logp = jax.nn.log_softmax(model.backbone.logits(h), axis=-1)
  picked = jnp.take_along_axis(logp, text[..., None], axis=-1)[..., 0]
  scored = (j >= start[:, None]) & (j < (start + length)[:, None])
  return jnp.sum(jnp.where(scored, picked, 0.0), axis=1)


def compile_likelihood(run, model, batch_size: int) -> shares.RowProgram:
  """(pictures [B, S, S, 3], text, text_len, start, length) global rows -> log-likelihood [B]."""
  graphdef, state = split_model(model)
  mc = run.model_cfg
  size, lt = mc.image["size"], mc.max_text_len

  def likelihood(state, images, text, text_len, start, length):
    tokens = nnx.merge(graphdef, state).encode_tokens(images)  # normalised, as training saw them
    return _log_likelihood(graphdef, state, tokens, text, text_len, start, length)

  rows = (jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch_size, lt), jnp.int32),
          *[jax.ShapeDtypeStruct((batch_size,), jnp.int32)] * 3)
  return shares.RowProgram(likelihood, state, rows, run.trainer.mesh, run.context())


def _rows(run, records: list[dict]):
  """The items of a benchmark: one row per choice of a multiple-choice record (n, k, text row,
  len, start, span) and one per open record (n, 0); each a pure function of the file."""
  mc = run.model_cfg
  choice, opened = [], []
  for n, r in enumerate(records):
    if "choices" in r:
      text, lens, starts, spans = choice_rows(run.tokenizer, r["question"], r["choices"],
                                              mc.max_text_len, f"record at line {r['line']}")
      choice += [(n, k, text[k], lens[k], starts[k], spans[k]) for k in range(len(r["choices"]))]
    else:
      opened.append((n, 0))
  return choice, opened


def score(run, model, records: list[dict], out: str, *, batch_size: int = 16,
          max_tokens: int | None = None, weights: str = "", overwrite: bool = False,
          summary: dict | None = None, progress: bool = True) -> tuple[dict | None, dict]:
  """Predictions for every record and the summary (module docstring), written to `out` by
  process 0 with `summary` added. Returns (the result on process 0, else None; what this process
  did, with `wait_s`: the seconds it waited for the others at the end).

  SPMD on the run's mesh (see `cli_eval_understanding`): every process runs the two programs
  (choice likelihoods, open answers) over the same global batches of rows, reads the pictures of
  the rows its devices hold, and writes the record of each row it owns."""
  mc = run.model_cfg
  max_tokens = max_tokens or mc.max_text_len
  size, lead = mc.image["size"], jax.process_index() == 0
  choice, opened = _rows(run, records)
  name = lambda n, k: f"{n:06d}_{k:02d}"
  items = [(r[0], r[1]) for r in choice] + opened
  store = shares.ItemRecords(out, dict(records=records, workdir=run.workdir, weights=weights,
                                       max_tokens=max_tokens))
  store.check(overwrite)
  if lead:  # before the others look (they wait in `agreed`)
    store.start(overwrite)
  done = dict(zip(items, shares.agreed(lambda i: store.has(name(*items[i])), len(items), "understanding")))
  choice_todo = [r for r in choice if not done[r[:2]]]
  open_todo = [r for r in opened if not done[r]]
  t0 = time.perf_counter()
  width = question_width(run.tokenizer, [records[n]["question"] for n, _ in opened])
  likelihood = compile_likelihood(run, model, batch_size) if choice_todo else None
  answer = (compile_captioner(run, model, batch_size, width, max_tokens=max_tokens, top_p=None)
            if open_todo else None)
  distributed.barrier("mmar_understanding_compiled")  # a collective's peers must join together
  t1 = time.perf_counter()
  bar = tqdm(total=len(choice_todo) + len(open_todo), unit="row", file=sys.stderr,
             disable=not (progress and lead))
  written = unreadable = 0

  def write(n, k, errors, row, record):
    nonlocal written, unreadable
    if row in errors:
      unreadable += 1
      log.warning("understanding: skipping %s", errors[row])
      record = dict(error=errors[row])
    store.write(name(n, k), record)
    written += 1

  for chunk, padded in shares.batches(choice_todo, batch_size):
    images, errors = load_rows([records[r[0]]["image"] for r in padded], likelihood.held(), size)
    ll = likelihood(images, *(np.stack([r[i] for r in padded]) for i in (2, 3, 4, 5)))
    for row, value in shares.owned_rows(ll):
      if row < len(chunk):  # the padding's repeats are dropped
        write(*chunk[row][:2], errors, row, dict(log_likelihood=float(value)))
    bar.update(len(chunk))
  tok = run.tokenizer
  for chunk, padded in shares.batches(open_todo, batch_size):
    images, errors = load_rows([records[n]["image"] for n, _ in padded], answer.held(), size)
    question, question_len = question_rows(tok, [records[n]["question"] for n, _ in padded], width)
    ids = answer(images, question, question_len, np.zeros((len(padded), 2), np.uint32))
    for row, row_ids in shares.owned_rows(ids):
      if row < len(chunk):
        text = tok.decode(strip_after_eos(row_ids[None], tok.eos_id)[0]).strip()
        write(*chunk[row], errors, row, dict(prediction=text))
    bar.update(len(chunk))
  bar.close()
  working_s = time.perf_counter() - t1
  distributed.barrier("mmar_understanding_written")  # every share is on disk before the report
  here = dict(process=jax.process_index(), rows=len(items), scored_now=len(choice_todo) + len(open_todo),
              written_here=written, unreadable_here=unreadable, compile_s=t1 - t0,
              wait_s=time.perf_counter() - t1 - working_s)
  if not lead:
    return None, here
  parts = {item: store.read(name(*item)) for item in items}
  result = report(records, parts)
  result["summary"].update(summary or {})
  store.finish((json.dumps(result, indent=1) + "\n").encode())
  return result, here


def report(records: list[dict], parts: dict) -> dict:
  """The per-record predictions and the summary from every row's record."""
  out, mc_ok, open_ok, unreadable = [], [], [], []
  for n, r in enumerate(records):
    rows = [parts[(n, k)] for k in range(len(r.get("choices", [None])))]
    rec = {k: r[k] for k in ("line", "image", "question", "answer") if k in r}
    errors = [row["error"] for row in rows if "error" in row]
    if errors:
      rec["error"] = errors[0]
      if r["image"] not in unreadable:
        unreadable.append(r["image"])
    elif "choices" in r:
      lls = [row["log_likelihood"] for row in rows]
      pick = int(np.argmax(lls))
      rec.update(choices=r["choices"], log_likelihoods=lls, prediction=r["choices"][pick],
                 correct=pick == r["answer_index"])
      mc_ok.append(rec["correct"])
    else:
      rec.update(prediction=rows[0]["prediction"],
                 correct=normalise(rows[0]["prediction"]) == normalise(r["answer"]))
      open_ok.append(rec["correct"])
    out.append(rec)
  mean = lambda xs: float(np.mean(xs)) if xs else None
  chance = [1.0 / len(r["choices"]) for r, rec in zip(records, out)
            if "choices" in r and "error" not in rec]
  summary = dict(records=len(records), scored=len(mc_ok) + len(open_ok), unreadable=len(unreadable),
                 unreadable_files=unreadable[:20], accuracy=mean(mc_ok + open_ok),
                 multiple_choice=dict(n=len(mc_ok), accuracy=mean(mc_ok), chance=mean(chance)),
                 open=dict(n=len(open_ok), accuracy=mean(open_ok)))
  return dict(summary=summary, predictions=out)


def cli_eval_understanding(args) -> int:
  distributed.join(args)  # before any other JAX call
  records = read_records(args.data)  # a bad file fails before the (slow) model load
  out = args.out or str(epath.Path(args.workdir) / "eval" / "understanding.json")
  check_writable([out], args.overwrite)
  if args.batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
  t0 = time.perf_counter()
  run, model, step = open_run(args)
  result, here = score(run, model, records, out, batch_size=args.batch_size,
                       weights=f"step {step} {args.params}", overwrite=args.overwrite,
                       summary=dict(step=int(step), params=args.params, data=args.data))
  if result is None:
    print(json.dumps(here), flush=True)
    return 0
  print(json.dumps(dict(result["summary"], out=out, seconds=time.perf_counter() - t0,
                        processes=jax.process_count(),
                        **{k: here[k] for k in ("scored_now", "written_here", "wait_s")})),
        flush=True)
  print(f"wrote {out}", file=sys.stderr)
  return 0
