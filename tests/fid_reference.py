"""The pytorch-fid side of tests/test_fid.py's parity test, run with a Python that has pytorch-fid.

pytorch-fid needs torchvision, which does not import next to the project's CPU torch, so it lives
in a side venv (not in requirements.txt):

  python3 -m venv /tmp/fidref && /tmp/fidref/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid numpy scipy
  MMAR_FID_REFERENCE_PYTHON=/tmp/fidref/bin/python .venv/bin/python -m pytest -q tests/test_fid.py -k reference

Run by the test as `python fid_reference.py OUT_DIR`: OUT_DIR holds `images_a.npy` and
`images_b.npy` (float32 [B, 3, H, W] in [0, 1]). pytorch-fid's own `InceptionV3([3],
resize_input=True, normalize_input=True, use_fid_inception=True)` is built with its weight
download replaced by seeded random weights (`random_state_dict`, the real file is never fetched),
which are saved as `weights.pth` in the layout of pytorch-fid's file; then pool3 features of both
batches (`features_a.npy`, `features_b.npy`) and pytorch-fid's `calculate_frechet_distance` of
their statistics (`fid.npy`) are written beside them; if OUT_DIR has a `folder/` of PNG files,
also pytorch-fid's statistics of it, read by its own loader (`folder_stats.npz`).

`random_state_dict` is numpy only, so the main venv's tests draw their weights with it too.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def random_state_dict(shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Seeded random weights for pytorch-fid's Inception names: He-scaled convs, so that
  activations stay of order one through 94 layers, and BatchNorm statistics as a trained network
  has them (a positive running_var)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    shape = tuple(shape)
    if name.endswith("num_batches_tracked"):
      out[name] = np.zeros(shape, np.int64)
    elif name.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      out[name] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif name.endswith("bn.weight"):
      out[name] = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("bn.bias"):
      out[name] = rng.normal(0.0, 0.2, shape)
    elif name.endswith("running_mean"):
      out[name] = rng.normal(0.0, 0.2, shape)
    elif name.endswith("running_var"):
      out[name] = rng.uniform(0.5, 2.0, shape)
    elif name == "fc.weight":
      out[name] = rng.normal(0.0, 0.01, shape)
    elif name == "fc.bias":
      out[name] = np.zeros(shape)
    else:
      raise KeyError(f"no random recipe for {name}")
    out[name] = out[name].astype(np.float32) if out[name].dtype == np.float64 else out[name]
  return out


def write_random_weights(path, seed: int = 0) -> None:
  """A real torch file in pytorch-fid's layout (the network's names plus fc.*), seeded random
  weights: the Inception network of the tests (and of measurements without the real file)."""
  import torch

  from mmar_jax.convert import inception as conv
  shapes = dict(conv.torch_shapes(), **conv.OPTIONAL)
  torch.save({k: torch.from_numpy(v) for k, v in random_state_dict(shapes, seed=seed).items()}, path)


def main(out_dir: str, seed: int = 0) -> None:
  import torch
  from pytorch_fid import fid_score
  from pytorch_fid import inception as pfi

  torch.set_num_threads(int(os.environ.get("FID_REFERENCE_THREADS", "2")))
  built = {}
  make = pfi._inception_v3

  def capture(*args, **kwargs):  # fid_inception_v3's torchvision Inception3, before it loads
    built["net"] = make(*args, **kwargs)
    return built["net"]

  def random_weights(url, progress=True):  # instead of the download
    assert url == pfi.FID_WEIGHTS_URL, url
    shapes = {k: tuple(v.shape) for k, v in built["net"].state_dict().items()}
    sd = {k: torch.from_numpy(v) for k, v in random_state_dict(shapes, seed).items()}
    torch.save(sd, os.path.join(out_dir, "weights.pth"))
    return sd

  pfi._inception_v3, pfi.load_state_dict_from_url = capture, random_weights
  model = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
  model.eval()
  feats = {}
  for name in ("a", "b"):
    images = torch.from_numpy(np.load(os.path.join(out_dir, f"images_{name}.npy")))
    with torch.no_grad():
      pred = model(images)[0]  # [B, 2048, 1, 1]: the final average pool
    feats[name] = pred.squeeze(3).squeeze(2).numpy().astype(np.float64)  # get_activations' array
    np.save(os.path.join(out_dir, f"features_{name}.npy"), feats[name])
  folder = os.path.join(out_dir, "folder")
  if os.path.isdir(folder):  # pytorch-fid's own file reading and statistics
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    mu, sigma = fid_score.calculate_activation_statistics(files, model, batch_size=2,
                                                          device="cpu", num_workers=0)
    np.savez(os.path.join(out_dir, "folder_stats.npz"), mu=mu, sigma=sigma)
  stats = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (feats["a"], feats["b"])]
  fid = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
  np.save(os.path.join(out_dir, "fid.npy"), np.float64(fid))


if __name__ == "__main__":
  main(sys.argv[1])
