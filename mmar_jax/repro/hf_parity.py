"""`repro hf-parity`: the JAX backbone against the PyTorch model of the same HF directory.

The directory is converted with `hf_to_jax` (the stored output is what is checked, not an
in-memory shortcut), both models run in fp32 on one deterministic prompt, and three numbers are
compared with tolerances: max |logit difference|, mean KL(torch || jax) over positions, and the
fraction of positions whose argmax agrees. Without --hf a tiny random fp32 Qwen2 is built first,
so the check runs anywhere without downloads.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmar_jax.convert import hf
from mmar_jax.errors import ConversionError
from mmar_jax.files import load_params
from mmar_jax.models.qwen2 import text_structure


@functools.lru_cache(maxsize=None)
def _forward_fn():
  @functools.partial(jax.jit, static_argnums=0)
  def forward(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    positions, segments, blocks = text_structure(mask)
    hidden, _ = model(model.embed(ids), positions, segments, blocks)
    return model.logits(hidden)

  return forward


def jax_logits(model, ids, attention_mask=None) -> np.ndarray:
  """fp32 logits [B, T, V] of a Qwen2 module on (left-padded) token ids [B, T]."""
  ids = jnp.asarray(ids, jnp.int32)
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  graphdef, state = nnx.split(model)
  return np.asarray(_forward_fn()(graphdef, state, ids, mask))


def torch_logits(model, ids, attention_mask=None) -> np.ndarray:
  import torch  # lazy: seconds to import, this path only
  ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
  mask = positions = None
  if attention_mask is not None:
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    # Positions count real tokens (as `generate` does for left padding), matching text_structure.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().numpy()


def load_torch_model(hf_dir: str):
  """fp32 `Qwen2ForCausalLM`; refuses a load that random-initialised or dropped tensors."""
  import torch  # lazy: seconds to import, this path only
  from transformers import Qwen2ForCausalLM  # lazy: seconds to import, this path only
  from transformers.utils import logging as hf_logging  # lazy: seconds to import, this path only
  hf_logging.disable_progress_bar()
  model, info = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
  bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
  if bad or info.get("error_msgs"):
    raise ConversionError(f"transformers loaded {hf_dir} with problems: {bad or info['error_msgs']}")
  return model.eval()


def compare_logits(ref: np.ndarray, got: np.ndarray, chunk: int = 64) -> dict:
  """max |diff|, mean KL(ref || got) over rows, argmax agreement; rows = all leading axes."""
  ref = ref.reshape(-1, ref.shape[-1])
  got = got.reshape(-1, got.shape[-1])
  max_abs, kl_sum, agree = 0.0, 0.0, 0
  for s in range(0, ref.shape[0], chunk):  # float64 in chunks: full-vocab rows are large
    r = ref[s:s + chunk].astype(np.float64)
    g = got[s:s + chunk].astype(np.float64)
    max_abs = max(max_abs, float(np.abs(r - g).max()))
    lr, lg = _log_softmax(r), _log_softmax(g)
    kl_sum += float((np.exp(lr) * (lr - lg)).sum())
    agree += int((r.argmax(-1) == g.argmax(-1)).sum())
  n = ref.shape[0]
  return dict(max_abs_diff=max_abs, mean_kl=kl_sum / n, argmax_agree=agree / n)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def default_prompt(vocab_size: int, seq_len: int) -> np.ndarray:
  return np.random.RandomState(0).randint(0, vocab_size, size=seq_len).astype(np.int32)


def _load_prompt(path: str, vocab_size: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise ConversionError(f"--prompt-ids file not found: {path}")
  ids = np.load(path)
  if ids.ndim == 2 and ids.shape[0] == 1:
    ids = ids[0]
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
    raise ConversionError(f"{path}: expected a 1-D integer array of token ids, got {ids.dtype} {list(ids.shape)}")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise ConversionError(f"{path}: token ids must lie in [0, {vocab_size}), found [{ids.min()}, {ids.max()}]")
  return ids.astype(np.int32)


def check_hf_parity(hf_dir: str | None = None, *, prompt_ids: str | np.ndarray | None = None,
                    seq_len: int = 576, atol: float = 1e-4, max_kl: float = 1e-6, min_argmax: float = 0.999,
                    dump_logits: str | None = None, perturb: Callable[[dict], dict] | None = None,
                    log: Callable[[str], None] = print) -> dict:
  """Runs the check; returns dict(max_abs_diff, mean_kl, argmax_agree, passed, seq_len).

  `perturb` edits the converted JAX params before the JAX run (to test that the check fails).
  """
  with tempfile.TemporaryDirectory(prefix="mmar_hf_parity_") as tmp:
    if hf_dir is None:
      hf_dir = hf.make_tiny_hf_checkpoint(os.path.join(tmp, "hf"))
      log("no --hf: built a tiny random fp32 Qwen2")
    jax_dir = os.path.join(tmp, "jax")
    hf.hf_to_jax(hf_dir, jax_dir)
    cfg, _ = hf.read_model_config(jax_dir)
    params = load_params(jax_dir)
    torch_model = load_torch_model(hf_dir)
  if perturb is not None:
    params = perturb(params)
  cfg = cfg.replace(param_dtype="float32", compute_dtype="float32")
  if prompt_ids is None:
    ids = default_prompt(cfg.vocab_size, seq_len)
  elif isinstance(prompt_ids, str):
    ids = _load_prompt(prompt_ids, cfg.vocab_size)
  else:
    ids = np.asarray(prompt_ids, np.int32).reshape(-1)
  log(f"prompt: {ids.size} tokens; model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
      f"vocab {cfg.vocab_size}")
  ref = torch_logits(torch_model, ids[None])[0]
  del torch_model
  got = jax_logits(hf.qwen2_from_params(cfg, params), ids[None])[0]
  del params
  if dump_logits:
    np.save(dump_logits, got.astype(np.float32))
  result = compare_logits(ref, got)
  result["passed"] = bool(result["max_abs_diff"] <= atol and result["mean_kl"] <= max_kl
                          and result["argmax_agree"] >= min_argmax)
  result["seq_len"] = int(ids.size)
  log(f"max |logit diff| {result['max_abs_diff']:.3e} (atol {atol:g})")
  log(f"mean KL(torch||jax) {result['mean_kl']:.3e} (max {max_kl:g})")
  log(f"argmax agreement {result['argmax_agree']:.4f} (min {min_argmax:g})")
  log("hf-parity: PASS" if result["passed"] else "hf-parity: FAIL")
  return result


