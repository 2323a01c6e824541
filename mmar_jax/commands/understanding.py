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
WORKDIR/eval/understanding.json).
"""

from __future__ import annotations

import functools
import json
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

from mmar_jax.errors import InputError
from mmar_jax.files import jsonl_records, write_bytes_atomic
from mmar_jax.models import sequence
from mmar_jax.run import Run
from mmar_jax.sample.image import split_model
from mmar_jax.sample.io import load_image
from mmar_jax.sample.text import caption_images

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


def choice_log_likelihoods(model, tokens, text, text_len, start, length) -> np.ndarray:
  """`_log_likelihood` of an MMAR module or (graphdef, state)."""
  graphdef, state = split_model(model)
  return np.asarray(_log_likelihood(graphdef, state, jnp.asarray(tokens), jnp.asarray(text),
                                    jnp.asarray(text_len), jnp.asarray(start), jnp.asarray(length)))


def score(run, model, records: list[dict], *, batch_size: int = 16, max_tokens: int | None = None) -> dict:
  """Predictions for every record and the summary (module docstring)."""
  mc = run.model_cfg
  max_tokens = max_tokens or mc.max_text_len
  images, unreadable = {}, []
  for r in records:
    if r["image"] not in images and r["image"] not in unreadable:
      try:
        images[r["image"]] = load_image(r["image"], mc.image["size"])
      except (ValueError, FileNotFoundError) as e:
        unreadable.append(r["image"])
        r["error"] = str(e)
  usable = [r for r in records if r["image"] in images]
  with run.context():
    tokens_of = jax.jit(lambda ims: model.image_tokenizer.encode(ims)[0])
    parts = split_model(model)  # once, not per batch
    rows = []  # (record, choice index, text row...)
    for r in (r for r in usable if "choices" in r):
      text, lens, starts, spans = choice_rows(run.tokenizer, r["question"], r["choices"], mc.max_text_len,
                                              f"record at line {r['line']}")
      rows += [(r, k, text[k], lens[k], starts[k], spans[k]) for k in range(len(r["choices"]))]
    for s in range(0, len(rows), batch_size):
      chunk = rows[s:s + batch_size]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      toks = tokens_of(jnp.asarray(np.stack([images[row[0]["image"]] for row in padded])))
      ll = choice_log_likelihoods(parts, toks, *(np.stack([row[i] for row in padded]) for i in (2, 3, 4, 5)))
      for (r, k, *_), value in zip(chunk, ll):
        r.setdefault("log_likelihoods", [None] * len(r["choices"]))[k] = float(value)
    opened = [r for r in usable if "choices" not in r]
    for s in range(0, len(opened), batch_size):
      chunk = opened[s:s + batch_size]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      texts = caption_images(model, np.stack([images[r["image"]] for r in padded]), run.tokenizer,
                             max_tokens=max_tokens, question=[r["question"] for r in padded])
      for r, text in zip(chunk, texts):
        r["prediction"] = text.strip()
  out, mc_ok, open_ok = [], [], []
  for r in records:
    rec = {k: r[k] for k in ("line", "image", "question", "answer") if k in r}
    if "error" in r:
      rec["error"] = r["error"]
    elif "choices" in r:
      pick = int(np.argmax(r["log_likelihoods"]))
      rec.update(choices=r["choices"], log_likelihoods=r["log_likelihoods"], prediction=r["choices"][pick],
                 correct=pick == r["answer_index"])
      mc_ok.append(rec["correct"])
    else:
      rec.update(prediction=r["prediction"], correct=normalise(r["prediction"]) == normalise(r["answer"]))
      open_ok.append(rec["correct"])
    out.append(rec)
  mean = lambda xs: float(np.mean(xs)) if xs else None
  chance = [1.0 / len(r["choices"]) for r in usable if "choices" in r]
  summary = dict(records=len(records), scored=len(mc_ok) + len(open_ok), unreadable=len(unreadable),
                 unreadable_files=unreadable[:20], accuracy=mean(mc_ok + open_ok),
                 multiple_choice=dict(n=len(mc_ok), accuracy=mean(mc_ok), chance=mean(chance)),
                 open=dict(n=len(open_ok), accuracy=mean(open_ok)))
  return dict(summary=summary, predictions=out)


def cli_eval_understanding(args) -> int:
  records = read_records(args.data)  # a bad file fails before the (slow) model load
  t0 = time.perf_counter()
  run = Run(args.workdir, args.config_overrides)
  params, step = run.params(args.step, args.params)
  model = run.model(params)
  result = score(run, model, records, batch_size=args.batch_size)
  result["summary"].update(step=int(step), params=args.params, seconds=time.perf_counter() - t0,
                           data=args.data)
  out = args.out or str(epath.Path(args.workdir) / "eval" / "understanding.json")
  epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
  write_bytes_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
  print(json.dumps(dict(result["summary"], out=out)), flush=True)
  print(f"wrote {out}", file=sys.stderr)
  return 0
