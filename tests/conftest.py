"""Test session set-up: 8 simulated CPU devices and the persistent compilation cache.

Both must be configured before JAX initialises its backend, so they live here, at import time.
Subprocess tests inherit XLA_FLAGS and MMAR_JAX_CACHE through `subprocess_env()`.
"""

import os
import re

# 8 simulated devices share 2 cores with everything else: a collective can wait far longer than
# XLA:CPU's default before its peers arrive, and XLA aborts the process then. Be patient instead.
# The suite's time is mostly XLA:CPU compiling tiny programs, and most of that is LLVM optimising
# code that then runs for milliseconds: the tests compile without those passes (measured on
# test_loss_rows + test_mmar from a cold cache: 130 s -> 79 s of CPU). Numbers compared across
# programs all come from this same setting; `repro` and the README's commands use XLA's default.
os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                  os.environ.get("XLA_FLAGS", "")) +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                           " --xla_cpu_collective_timeout_seconds=900"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CACHE_DIR = os.environ.setdefault(
    "MMAR_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def subprocess_env(**extra) -> dict:
  env = dict(os.environ)
  env.update({k: str(v) for k, v in extra.items()})
  return env


@pytest.fixture(scope="session")
def cpu_devices():
  devices = jax.devices()
  assert len(devices) == 8, "tests expect 8 simulated CPU devices"
  return devices


# -- the one tiny model family shared by the model, train and sampling tests ------------------------

TINY = "configs/tiny.py"


def tiny_config(*overrides: tuple[str, str]):
  from mmar_jax.config import apply_overrides, load_file
  return apply_overrides(load_file(os.path.join(ROOT, TINY)), overrides)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def bytes_tokenizer():
  from mmar_jax.data.text_tokenizer import load_text_tokenizer
  return load_text_tokenizer("bytes")


@pytest.fixture(scope="session")
def tiny_mcfg(bytes_tokenizer):
  from mmar_jax.models.mmar import model_config
  return model_config(tiny_config(), bytes_tokenizer)


@pytest.fixture(scope="session")
def demo_batcher(bytes_tokenizer, tiny_mcfg):
  from mmar_jax.data.pipeline import Batcher
  from mmar_jax.data.shapes import ShapesDataset, ShapesSpec
  return Batcher(ShapesDataset(ShapesSpec(image_size=16)), bytes_tokenizer, batch_size=8,
                 max_text_len=tiny_mcfg.max_text_len, seed=0, mix="0.45,0.45,0.1")
