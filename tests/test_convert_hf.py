"""HF Qwen2 <-> JAX conversion: the safetensors reader/writer, bit-exact round trips, refusal of
broken checkpoints, and the `repro hf-parity` check."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

import helpers_hf as H
from mmar_jax import cli
from mmar_jax.convert import hf, safetensors_io as sio
from mmar_jax.errors import ConversionError
from mmar_jax.files import load_params, read_json

# -- safetensors_io ---------------------------------------------------------------------------------


def _sample_tensors():
  rng = np.random.RandomState(0)
  return {
      "bf16": rng.randn(3, 5).astype(ml_dtypes.bfloat16),
      "f32": rng.randn(7).astype(np.float32),
      "f16": rng.randn(2, 2).astype(np.float16),
      "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
      "scalar": np.array(1.5, np.float32),
      "empty": np.zeros((0, 4), np.float32),
      "u8": np.arange(3, dtype=np.uint8),
  }


def test_safetensors_matches_reference_library(tmp_path):
  import torch
  from safetensors.torch import load_file, save_file

  from mmar_jax.convert.common import numpy_to_torch, torch_to_numpy
  tensors = _sample_tensors()
  ours = str(tmp_path / "ours.safetensors")
  sio.save_file(ours, tensors, {"format": "pt"})
  theirs = load_file(ours)
  for k, v in tensors.items():
    H.assert_same_tensors({k: v}, {k: torch_to_numpy(theirs[k])})
  ref = str(tmp_path / "ref.safetensors")
  # (reshape: common.numpy_to_torch turns a 0-d array into shape [1], via np.ascontiguousarray)
  save_file({k: numpy_to_torch(v).reshape(v.shape) for k, v in tensors.items()}, ref, metadata={"format": "pt"})
  H.assert_same_tensors(tensors, sio.read_all(ref))
  assert sio.read_metadata(ref) == {"format": "pt"}
  with sio.open_file(ref) as f:
    assert f.spec("bf16") == sio.TensorSpec(np.dtype(ml_dtypes.bfloat16), (3, 5))
    assert torch.equal(numpy_to_torch(f.get("bf16")), numpy_to_torch(tensors["bf16"]))


def test_safetensors_sharded_writer(tmp_path):
  tensors = {f"w{i}": np.full((100,), i, np.float32) for i in range(5)}  # 400 bytes each
  specs = [(k, sio.TensorSpec(v.dtype, v.shape)) for k, v in tensors.items()]
  files = sio.write_sharded(str(tmp_path), specs, tensors.__getitem__, max_shard_size="1KB")
  assert files == [sio.shard_name(i, 3) for i in range(3)] + [sio.INDEX_NAME]
  index = json.loads((tmp_path / sio.INDEX_NAME).read_text())
  assert index["metadata"]["total_size"] == 2000
  assert index["weight_map"]["w4"] == "model-00003-of-00003.safetensors"
  H.assert_same_tensors(tensors, dict(sio.iter_dir(str(tmp_path))))
  assert sio.parse_size("5GB") == 5 * 10**9 and sio.parse_size("200KB") == 200_000
  assert sio.parse_size("2GiB") == 2 * 2**30
  with pytest.raises(ConversionError, match="bad size"):
    sio.parse_size("5 parsecs")


def test_safetensors_refuses_corrupt_files(tmp_path):
  path = str(tmp_path / "x.safetensors")
  sio.save_file(path, {"a": np.zeros(4, np.float32)})
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-4])
  with pytest.raises(ConversionError, match="truncated"):
    sio.read_all(path)
  header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
  open(path, "wb").write(struct.pack("<Q", len(header)) + header + bytes(16))
  with pytest.raises(ConversionError, match="'a' offsets"):
    sio.read_all(path)
  open(path, "wb").write(struct.pack("<Q", 10**6) + b"{}")
  with pytest.raises(ConversionError, match="header length"):
    sio.read_all(path)


# -- round trips ------------------------------------------------------------------------------------


def _assert_loads_cleanly(hf_dir, dtype):
  import torch
  from transformers import Qwen2ForCausalLM
  model, info = Qwen2ForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert model.dtype == getattr(torch, dtype)


@pytest.mark.parametrize("name,dtype,sharded", [
    ("base", "float32", False),
    ("tied_mqa", "float32", True),
    ("odd_heads", "bfloat16", False),
    ("tied_mqa", "bfloat16", True),
])
def test_roundtrip_is_bit_exact(tmp_path, name, dtype, sharded):
  src = H.tiny_hf(name, dtype, sharded)
  assert os.path.exists(os.path.join(src, sio.INDEX_NAME)) == sharded
  cfg = hf.hf_to_jax(src, str(tmp_path / "jax"))
  stored = read_json(str(tmp_path / "jax"), hf.MODEL_CONFIG)
  assert stored["param_dtype"] == dtype and stored["source"]["architecture"] == hf.ARCHITECTURE
  params = load_params(str(tmp_path / "jax"))
  assert "lm_head" not in params if cfg.tie_word_embeddings else params["lm_head"].dtype == dtype
  assert params["layers"]["q_kernel"].shape == (2, 64, cfg.num_heads * cfg.hd)
  _, source = hf.read_model_config(str(tmp_path / "jax"))
  out = str(tmp_path / "back")
  files = hf.jax_to_hf(params, cfg, out, max_shard_size=H.SHARD_SIZE if sharded else "5GB",
                       tokenizer_dir=str(tmp_path / "jax" / hf.TOKENIZER_DIR),
                       extra_config=hf.carried_config(source["hf_config"]))
  assert (sio.INDEX_NAME in files) == sharded
  H.assert_same_tensors(H.hf_tensors(src), H.hf_tensors(out))
  for fname in H.TOKENIZER_FILES:
    assert open(os.path.join(out, fname)).read() == H.TOKENIZER_FILES[fname]
  _assert_loads_cleanly(out, dtype)


def test_cli_roundtrip_with_dtype_cast(tmp_path):
  src = H.tiny_hf("base", "bfloat16", True)
  jax_dir, back, wide = (str(tmp_path / n) for n in ("jax", "back", "wide"))
  assert cli.main(["convert", "hf-to-jax", "--hf", src, "--out", jax_dir]) == 0
  assert sorted(os.listdir(os.path.join(jax_dir, hf.TOKENIZER_DIR))) == sorted(
      [*H.TOKENIZER_FILES, "generation_config.json"])
  assert cli.main(["convert", "jax-to-hf", "--ckpt", jax_dir, "--out", back, "--max-shard-size", H.SHARD_SIZE]) == 0
  H.assert_same_tensors(H.hf_tensors(src), H.hf_tensors(back))
  assert cli.main(["convert", "jax-to-hf", "--ckpt", jax_dir, "--out", wide, "--dtype", "fp32"]) == 0
  assert os.listdir(wide).count("model.safetensors") == 1
  cfg = json.load(open(os.path.join(wide, "config.json")))
  assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
  assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 1e4
  up = {k: v.astype(np.float32) for k, v in H.hf_tensors(src).items()}
  H.assert_same_tensors(up, H.hf_tensors(wide))
  _assert_loads_cleanly(wide, "float32")


def test_params_from_hf_dir_matches_module_structure():
  cfg, params = hf.params_from_hf_dir(H.tiny_hf("odd_heads"))
  assert cfg.head_dim == 32 and cfg.num_heads == 3 and cfg.param_dtype == "float32"
  abstract = hf.abstract_params(cfg)
  import jax
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, abstract)
  # Transposed, not reshaped: row j of q_proj (output feature j) is column j of our kernel.
  hf_q = H.hf_tensors(H.tiny_hf("odd_heads"))["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(params["layers"]["q_kernel"][1], hf_q.T)


# -- refusals ---------------------------------------------------------------------------------------


def _rewrite_single(hf_dir, edit):
  path = os.path.join(hf_dir, sio.SINGLE_NAME)
  tensors = sio.read_all(path)
  edit(tensors)
  sio.save_file(path, tensors, {"format": "pt"})


def _no_leftovers(tmp_path, out):
  assert not os.path.exists(out)
  assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(f".{os.path.basename(out)}")]


@pytest.mark.parametrize("case,match", [
    ("missing", "missing tensors: model.layers.1.mlp.up_proj.weight"),
    ("shape", r"model.layers.0.self_attn.k_proj.weight has shape \[16, 64\], expected \[32, 64\]"),
    ("unexpected", "unexpected tensors .*model.layers.0.self_attn.extra.weight"),
    ("architecture", r"architectures \['LlamaForCausalLM'\]"),
    ("rope", "rope_type='yarn'"),
    ("sliding", "use_sliding_window=true"),
    ("mixed", "mixed tensor dtypes"),
    ("untied_head_missing", "missing tensors: lm_head.weight"),
])
def test_broken_checkpoints_are_refused(tmp_path, case, match):
  src = H.copy_hf("base", dst=str(tmp_path / "hf"))
  if case == "missing":
    _rewrite_single(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  elif case == "shape":
    _rewrite_single(src, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
  elif case == "unexpected":
    _rewrite_single(src, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
  elif case == "architecture":
    H.edit_config(src, architectures=["LlamaForCausalLM"])
  elif case == "rope":
    H.edit_config(src, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
  elif case == "sliding":
    H.edit_config(src, use_sliding_window=True)
  elif case == "mixed":
    _rewrite_single(src, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(ml_dtypes.bfloat16)}))
  elif case == "untied_head_missing":
    _rewrite_single(src, lambda t: t.pop("lm_head.weight"))
  out = str(tmp_path / "out")
  with pytest.raises(ConversionError, match=match):
    hf.hf_to_jax(src, out)
  _no_leftovers(tmp_path, out)


# Qwen/Qwen2-0.5B's config.json as published (transformers 4.40 format: rope_theta at the top).
HUB_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}


def test_config_forms():
  from mmar_jax.models.qwen2 import Qwen2Config
  cfg = hf.qwen2_config_from_hf(dict(HUB_CONFIG))
  assert cfg == Qwen2Config(param_dtype="bfloat16")  # the module's defaults are Qwen2-0.5B's
  v5 = {k: v for k, v in HUB_CONFIG.items() if k not in ("rope_theta", "torch_dtype")}
  v5.update(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, dtype="bfloat16")
  assert hf.qwen2_config_from_hf(v5) == cfg
  out = hf.hf_config_dict(cfg, "bfloat16", hf.carried_config(HUB_CONFIG))
  assert hf.qwen2_config_from_hf(out) == cfg and out["max_position_embeddings"] == 131072
  with pytest.raises(ConversionError, match="disagrees"):
    hf.qwen2_config_from_hf({**HUB_CONFIG, "rope_parameters": {"rope_theta": 1e4}})
  with pytest.raises(ConversionError, match=r"rope_scaling.rope_type='linear'"):
    hf.qwen2_config_from_hf({**HUB_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}})
  with pytest.raises(ConversionError, match="model_type 'llama'"):
    hf.qwen2_config_from_hf({**HUB_CONFIG, "architectures": None, "model_type": "llama"})
  with pytest.raises(ConversionError, match="contradicts"):
    hf.hf_config_dict(cfg, "bfloat16", {"hidden_size": 10})


def test_tied_checkpoint_with_a_stored_lm_head(tmp_path):
  src = H.copy_hf("tied_mqa", dst=str(tmp_path / "hf"))
  _rewrite_single(src, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  cfg, params = hf.params_from_hf_dir(src)  # an identical copy is accepted (and not stored)
  assert cfg.tie_word_embeddings and "lm_head" not in params
  _rewrite_single(src, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
  with pytest.raises(ConversionError, match="lm_head.weight differs from model.embed_tokens.weight"):
    hf.params_from_hf_dir(src)


def test_cli_refusals(tmp_path, capsys):
  src = H.copy_hf("base", dst=str(tmp_path / "hf"))
  _rewrite_single(src, lambda t: t.pop("model.norm.weight"))
  out = str(tmp_path / "out")
  assert cli.main(["convert", "hf-to-jax", "--hf", src, "--out", out]) == 2
  assert "missing tensors: model.norm.weight" in capsys.readouterr().err
  _no_leftovers(tmp_path, out)
  # An existing --out is kept unless --overwrite is given.
  os.makedirs(out)
  open(os.path.join(out, "keep"), "w").write("x")
  good = H.tiny_hf("base")
  assert cli.main(["convert", "hf-to-jax", "--hf", good, "--out", out]) == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err
  assert os.listdir(out) == ["keep"]
  assert cli.main(["convert", "hf-to-jax", "--hf", good, "--out", out, "--overwrite"]) == 0
  assert "keep" not in os.listdir(out) and os.path.isdir(os.path.join(out, "params"))
  assert cli.main(["convert", "jax-to-hf", "--ckpt", out, "--out", out]) == 2  # itself exists
  assert cli.main(["convert", "jax-to-hf", "--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "is not a training workdir" in capsys.readouterr().err
  assert cli.main(["convert", "hf-to-jax", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
  assert "not found" in capsys.readouterr().err


def test_jax_to_hf_refuses_wrong_params(tmp_path):
  cfg, params = hf.params_from_hf_dir(H.tiny_hf("base"))
  params["layers"]["up_kernel"] = params["layers"]["up_kernel"][:, :, :64]
  with pytest.raises(ConversionError, match=r"layers/up_kernel has shape \[2, 64, 64\]"):
    hf.jax_to_hf(params, cfg, str(tmp_path / "o"))
  with pytest.raises(ConversionError, match="missing lm_head"):
    hf.jax_to_hf({k: v for k, v in params.items() if k != "lm_head"}, cfg, str(tmp_path / "o"))
  _no_leftovers(tmp_path, str(tmp_path / "o"))


# -- repro hf-parity --------------------------------------------------------------------------------


def test_repro_hf_parity_cli(tmp_path, capsys):
  ids = np.random.RandomState(3).randint(0, 256, 576)
  np.save(tmp_path / "ids.npy", ids)
  dump = str(tmp_path / "logits.npy")
  rc = cli.main(["repro", "hf-parity", "--prompt-ids", str(tmp_path / "ids.npy"), "--dump-logits", dump])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert "hf-parity: PASS" in text and "max |logit diff|" in text and "argmax agreement" in text
  assert np.load(dump).shape == (576, 256)


def test_repro_hf_parity_fails_on_a_perturbed_weight():
  from mmar_jax.repro.hf_parity import check_hf_parity

  def perturb(params):
    params["layers"]["down_kernel"] = params["layers"]["down_kernel"].at[1, 3, 5].add(0.5)
    return params

  good = check_hf_parity(H.tiny_hf("base"), log=lambda _: None)
  assert good["passed"] and good["max_abs_diff"] < 1e-4 and good["seq_len"] == 576
  bad = check_hf_parity(H.tiny_hf("base"), perturb=perturb, log=lambda _: None)
  assert not bad["passed"] and bad["max_abs_diff"] > 1e-4
