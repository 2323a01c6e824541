"""Token normalisation (`model.image.norm=data`): the statistics against a NumPy reference, the
model-space round trip, the refusals, and that a resumed run keeps the statistics it started with."""

import json
import os

import numpy as np
import pytest

from conftest import ROOT, tiny_config
from mmar_jax.data import sources, token_stats
from mmar_jax.models import image_tokenizer as itok


def test_statistics_equal_a_numpy_reference():
  config = tiny_config(("model.image.norm", "data"), ("data.norm_samples", "50"))
  source = sources.make_source(config)
  shift, scale = token_stats.estimate(config, source)
  # The reference: the same evenly spaced records, patchified by hand (channel, row, column).
  idx = np.unique(np.linspace(0, len(source) - 1, 50).round().astype(int))
  images = np.stack([source[int(i)]["image"] for i in idx]).astype(np.float64) / 127.5 - 1.0
  b, h, w, c = images.shape
  p = 4
  tokens = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(-1, c * p * p)
  np.testing.assert_allclose(shift, tokens.mean(0), atol=1e-6)
  np.testing.assert_allclose(scale, 1.0 / tokens.std(0), rtol=1e-5)
  assert len(shift) == 48 and np.mean(shift) < -0.5  # mostly black background


def test_model_space_round_trip_and_refusals(bytes_tokenizer):
  from mmar_jax.models.mmar import model_config
  rng = np.random.default_rng(0)
  shift, scale = rng.normal(size=48), rng.uniform(0.5, 4.0, size=48)
  image = dict(norm="data", token_shift=tuple(shift), token_scale=tuple(scale))
  norm = itok.token_norm(image)
  x = rng.normal(size=(2, 16, 48)).astype(np.float32)
  z = np.asarray(itok.normalize(x, norm))
  np.testing.assert_allclose(z, (x - shift) * scale, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(itok.denormalize(z, norm)), x, rtol=1e-5, atol=1e-5)
  assert itok.token_norm(dict(norm="fixed")) is None
  with pytest.raises(ValueError, match="token_shift and token_scale"):
    model_config(tiny_config(("model.image.norm", "data")), bytes_tokenizer)
  with pytest.raises(ValueError, match="48 channels"):
    model_config(tiny_config(("model.image.norm", "data"), ("model.image.token_shift", "(0.0, 0.0)"),
                             ("model.image.token_scale", "(1.0, 1.0)")), bytes_tokenizer)
  with pytest.raises(ValueError, match="model.image.norm"):
    itok.token_norm(dict(norm="minmax"))


def test_a_resumed_run_keeps_its_statistics(tmp_path):
  """`train --config configs/demo.py --workdir DIR` again: the file's config has no statistics;
  the stored ones are kept (re-estimating could differ if the data changed), and overriding them
  on a stored run is refused."""
  from mmar_jax.config import ConfigError, load_file
  from mmar_jax.train.workdir import resolve_config
  spec = os.path.join(ROOT, "configs/demo.py")
  config = load_file(spec)
  assert config.model.image.norm == "data"
  config.model.image.token_shift, config.model.image.token_scale = (0.5,) * 48, (2.0,) * 48
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  resumed = resolve_config(str(tmp_path), spec, [])
  assert tuple(resumed.model.image.token_scale) == (2.0,) * 48
  with pytest.raises(ConfigError, match="token_scale"):
    resolve_config(str(tmp_path), None, [("model.image.token_scale", str((1.0,) * 48))])
  json.loads((tmp_path / "config.json").read_text())  # untouched
