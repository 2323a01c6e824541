"""Text tokenizers behind one small interface: UTF-8 bytes (no files, no dependency) or a local
HuggingFace tokenizer directory (Qwen2's at full scale).

`encode` adds no special tokens: the sequence builder places EOS (and the model's own
<boi>/<eoi>, which live at ids >= vocab_size, method.md §1.6) where the layout needs them.
`decode` drops special and out-of-vocabulary ids, so a sampled sequence that contains <eoi>,
padding or EOS decodes to its text.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator

import numpy as np
from etils import epath

MANIFEST = "mmar_tokenizer.json"  # what kind of tokenizer a saved directory holds


class TextTokenizer:
  """The interface every tokenizer here implements."""
  kind: str
  vocab_size: int        # ids in [0, vocab_size) are the tokenizer's; the model may add more
  bos_id: int | None
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def save(self, directory: str) -> None:
    raise NotImplementedError

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id})")


class ByteTokenizer(TextTokenizer):
  """UTF-8 bytes as ids 0..255, then pad = 256 and eos = 257: 258 ids, no BOS (as Qwen2).

  Enough for the demo's short captions, and nothing to download or ship.
  """
  kind = "bytes"
  pad_id = 256
  eos_id = 257
  bos_id = None
  vocab_size = 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    # A sampled sequence can stop inside a multi-byte character: replace, never raise.
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def save(self, directory: str) -> None:
    _write_text(directory, MANIFEST, json.dumps({"kind": self.kind}) + "\n")

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteTokenizer)

  def __hash__(self) -> int:
    return hash(self.kind)


class HFTokenizer(TextTokenizer):
  """A HuggingFace tokenizer directory (tokenizer.json, vocab.json + merges.txt, ...).

  vocab_size is len(tokenizer), added tokens included: Qwen2's embedding has more rows than
  that (151936), and the model takes <boi>/<eoi> from those spare rows.
  """
  kind = "hf"

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.vocab_size = len(tokenizer)
    self.bos_id = tokenizer.bos_token_id
    self.eos_id = tokenizer.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
    # Qwen2 has a pad token (<|endoftext|>); tokenizers without one pad with EOS, which the
    # loss masks out anyway.
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

  @classmethod
  def from_directory(cls, directory: str) -> "HFTokenizer":
    from transformers import AutoTokenizer  # lazy: seconds to import, only when asked for
    with _local_copy(directory) as local:
      return cls(AutoTokenizer.from_pretrained(local))

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False))

  def decode(self, ids: Iterable[int]) -> str:
    keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self.tokenizer.decode(keep, skip_special_tokens=True)

  def save(self, directory: str) -> None:
    with _staging_dir(os.fspath(directory)) as local:
      self.tokenizer.save_pretrained(local)
      with open(os.path.join(local, MANIFEST), "w") as f:
        f.write(json.dumps({"kind": self.kind}) + "\n")


def load_text_tokenizer(spec) -> TextTokenizer:
  """A tokenizer from "bytes", a directory that `save` wrote, or a HuggingFace tokenizer (or
  checkpoint) directory; an existing TextTokenizer is returned as it is. Paths may be gs://."""
  if isinstance(spec, TextTokenizer):
    return spec
  spec = os.fspath(spec)
  if spec == "bytes":
    return ByteTokenizer()
  if spec.startswith("hf:"):
    return HFTokenizer.from_directory(spec[3:])
  path = _epath(spec)
  if not path.is_dir():
    raise FileNotFoundError(f"text tokenizer: {spec!r} is neither 'bytes' nor a directory")
  manifest = path / MANIFEST
  kind = json.loads(manifest.read_text()).get("kind") if manifest.exists() else "hf"
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "hf":
    if not any((path / name).exists() for name in _HF_FILES):
      raise FileNotFoundError(f"text tokenizer: {spec} has none of {_HF_FILES}")
    return HFTokenizer.from_directory(spec)
  raise ValueError(f"text tokenizer: unknown kind {kind!r} in {manifest}")


_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# --- local and remote paths -----------------------------------------------------------------
# Workdirs may live on gs://, but transformers reads and writes local directories only: remote
# directories are staged through a local temporary copy.

def _is_remote(path: str) -> bool:
  return "://" in path


def _epath(path: str):
  return epath.Path(path)


def _write_text(directory: str, name: str, text: str) -> None:
  d = _epath(directory)
  d.mkdir(parents=True, exist_ok=True)
  (d / name).write_text(text)


@contextlib.contextmanager
def _local_copy(directory: str) -> Iterator[str]:
  """A local directory with the files of `directory` (itself when already local)."""
  if not _is_remote(directory):
    yield directory
    return
  tmp = tempfile.mkdtemp(prefix="mmar_tok_")
  try:
    for f in _epath(directory).iterdir():
      if f.is_file():
        with open(os.path.join(tmp, f.name), "wb") as out:
          out.write(f.read_bytes())
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _staging_dir(directory: str) -> Iterator[str]:
  """A local directory whose files end up in `directory` (copied there when remote)."""
  if not _is_remote(directory):
    os.makedirs(directory, exist_ok=True)
    yield directory
    return
  tmp = tempfile.mkdtemp(prefix="mmar_tok_")
  try:
    yield tmp
    dest = _epath(directory)
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(tmp)):
      src = os.path.join(tmp, name)
      if os.path.isfile(src):
        with open(src, "rb") as f:
          (dest / name).write_bytes(f.read())
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# -- text as the model lays it out -----------------------------------------------------------

def encode_prompts(tokenizer, prompts, max_text_len: int):
  """Captions -> (text int32 [B, Lt], text_len [B]) as training lays them out: the tokens, EOS,
  truncated to Lt (EOS kept last). None or "" is the empty caption (unconditional)."""
  text = np.full((len(prompts), max_text_len), tokenizer.pad_id, np.int32)
  lens = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    if not p:
      continue
    ids = list(tokenizer.encode(p)) + [tokenizer.eos_id]
    if len(ids) > max_text_len:
      ids = ids[:max_text_len - 1] + [tokenizer.eos_id]
    text[i, :len(ids)] = ids
    lens[i] = len(ids)
  return text, lens


def encode_questions(tokenizer, questions, batch: int):
  """Question texts (one, a list, or None) -> (ids int32 [B, Q], lengths [B]); no EOS (the answer
  continues the text). Q is at least 1 so the shapes stay simple."""
  if questions is None or isinstance(questions, str):
    questions = [questions] * batch
  if len(questions) != batch:
    raise ValueError(f"{len(questions)} questions for {batch} images")
  encoded = [list(tokenizer.encode(q)) if q else [] for q in questions]
  q = max([1] + [len(e) for e in encoded])
  ids = np.full((batch, q), tokenizer.pad_id, np.int32)
  for i, e in enumerate(encoded):
    ids[i, :len(e)] = e
  return ids, np.asarray([len(e) for e in encoded], np.int32)
