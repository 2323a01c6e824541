"""FID (`mmar-jax eval fid`): the Inception network, its weights file, the Fréchet distance.

Against the real pytorch-fid (opt-in: it needs torchvision, which does not import next to this
venv's CPU torch, so it runs in a side venv; see tests/fid_reference.py):

  python3 -m venv /tmp/fidref && /tmp/fidref/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid numpy scipy
  MMAR_FID_REFERENCE_PYTHON=/tmp/fidref/bin/python .venv/bin/python -m pytest -q tests/test_fid.py -k reference

Everything else runs here on a real torch file of seeded random weights that the tests write.
A Fréchet distance of pool3 statistics is a 2048 x 2048 `sqrtm` (tens of seconds on two cores),
so the default run checks the distance on small dimensions and the command without a reference
(`--save-stats` only); the end-to-end FIDs are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fid_reference import write_random_weights
from mmar_jax import cli
from mmar_jax.commands import evaluate, fid
from mmar_jax.convert import inception as conv
from mmar_jax.errors import ConversionError
from mmar_jax.models import inception as net

SIZE = 32  # test images; the network resizes them to 299 itself


def _cli(capsys, *argv):
  """(exit code, the JSON line or None, stderr) of `mmar-jax ...` run in this process."""
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  lines = [line for line in out.splitlines() if line.startswith("{")]
  return rc, (json.loads(lines[-1]) if lines else None), err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / conv.WEIGHTS_FILE
  write_random_weights(path, seed=0)
  return path


def _images(n: int, seed: int) -> np.ndarray:
  """uint8 [n, SIZE, SIZE, 3]: coloured blocks, so that noise is a visible change."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
  return np.repeat(np.repeat(blocks, SIZE // 4, axis=1), SIZE // 4, axis=2)


def _folder(path, images, broken: tuple[str, ...] = ()):
  path.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(path / f"{i:03d}.png")
  for name in broken:
    (path / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
  return path


# -- the network's pieces against torch's ops ---------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (600, 170), (299, 299)])
def test_resize_is_torch_bilinear_without_antialiasing(shape):
  x = np.random.default_rng(0).uniform(0, 1, (2, 3) + shape).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear",
                       align_corners=False).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(net.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (299, 299)))
  assert np.abs(got - want).max() <= 2 * 2.0 ** -23  # torch's taps exactly; the blend's rounding
  antialiased = np.asarray(jax.image.resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (2, 299, 299, 3),
                                            "bilinear"))
  if shape[0] > 299:  # what jax.image.resize would have given: it antialiases when shrinking
    assert np.abs(antialiased - want).max() > 1e-2


def test_pools_are_the_fid_graphs():
  """Average pools leave the padding out of the count; max pools pad with -inf (all inputs < 0)."""
  x = np.random.default_rng(1).uniform(-3, -1, (2, 5, 9, 9)).astype(np.float32)
  xt, xj = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))
  back = lambda y: np.asarray(y).transpose(0, 3, 1, 2)
  want = F.avg_pool2d(xt, 3, stride=1, padding=1, count_include_pad=False).numpy()
  assert np.abs(back(net.avg_pool_exclude_pad(xj)) - want).max() < 1e-6
  with_pad = F.avg_pool2d(xt, 3, stride=1, padding=1).numpy()
  assert np.abs(back(net.avg_pool_exclude_pad(xj)) - with_pad).max() > 0.1  # the difference is real
  assert np.array_equal(back(net.max_pool(xj, stride=1, padding=1)),
                        F.max_pool2d(xt, 3, stride=1, padding=1).numpy())
  assert np.array_equal(back(net.max_pool(xj, stride=2)), F.max_pool2d(xt, 3, stride=2).numpy())


# -- the Fréchet distance ------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # diagonal Gaussians
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
  feats = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
  mu, sigma = fid.statistics(feats)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (8, 8)
  assert np.array_equal(sigma, np.cov(feats, rowvar=False))
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)  # full rank: ~0
  assert fid.frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(8.0, abs=1e-9)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's, on the case made for it
def test_frechet_distance_singular_retry_and_imaginary_check(caplog):
  # [[0, 1], [0, 0]] has no square root (sqrtm gives inf): pytorch-fid retries with eps * I on
  # both, and sqrt([[a, c], [0, a]]) has trace 2 sqrt(a), a = eps (1 + eps).
  eps = 1e-6
  got = fid.frechet_distance(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]), np.zeros(2), np.eye(2))
  assert got == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)
  assert "singular product" in caplog.text
  with pytest.raises(ValueError, match="Imaginary component"):  # sqrt(-1) on the diagonal
    fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="different sizes"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# -- the weights file ----------------------------------------------------------------------------


def test_torch_names_and_shapes_are_pytorch_fids():
  shapes = conv.torch_shapes()
  assert len(shapes) == 94 * 5  # 94 BasicConv2d: conv.weight + four BatchNorm tensors
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  assert sum(np.prod(s) for s in shapes.values()) == 21_820_000


def test_a_wrong_tensor_is_refused_by_name():
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in conv.torch_shapes().items()}
  counters = {"Mixed_5b.branch1x1.bn.num_batches_tracked": np.int64(0)}
  assert len(conv.inception_from_torch(dict(sd, **counters))) == 470  # counters, no fc: fine
  with pytest.raises(ConversionError, match=r"missing tensor Mixed_6e\.branch7x7_3\.bn\.running_mean"):
    conv.inception_from_torch({k: v for k, v in sd.items() if k != "Mixed_6e.branch7x7_3.bn.running_mean"})
  with pytest.raises(ConversionError, match=r"unexpected tensor AuxLogits\.fc\.weight"):
    conv.inception_from_torch(dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}))
  with pytest.raises(ConversionError, match=r"Mixed_7b\.branch1x1\.conv\.weight has shape \(320, 1280, 3, 3\)"):
    conv.inception_from_torch(dict(sd, **{"Mixed_7b.branch1x1.conv.weight": np.zeros((320, 1280, 3, 3))}))
  with pytest.raises(ConversionError, match=r"fc\.weight has shape \(1000, 2048\)"):  # torchvision's
    conv.inception_from_torch(dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)}))


def test_missing_weights_file_names_it_and_where_to_get_it(tmp_path, capsys):
  missing = tmp_path / conv.WEIGHTS_FILE
  with pytest.raises(FileNotFoundError) as e:
    conv.load_inception(str(missing))
  assert str(missing) in str(e.value) and conv.WEIGHTS_URL in str(e.value)
  images = _folder(tmp_path / "a", _images(2, 0))
  rc, line, err = _cli(capsys, "eval", "fid", "--images", images, "--ref-images", images,
                       "--inception", missing)
  assert rc == 2 and line is None
  assert str(missing) in err and conv.WEIGHTS_URL in err


# -- the command ---------------------------------------------------------------------------------


def test_eval_is_a_group_whose_flags_first_mean_the_demo():
  parse = lambda *argv: cli.build_parser().parse_args(cli.with_default_subcommand(list(argv)))
  demo = parse("eval", "--workdir", "W", "--step", "3", "--params", "raw")
  assert demo.target is evaluate.cli_eval
  assert (demo.eval, demo.workdir, demo.step, demo.params) == ("demo", "W", 3, "raw")
  assert vars(parse("eval", "demo", "--workdir", "W", "--step", "3", "--params", "raw")) == vars(demo)
  got = parse("eval", "fid", "--images", "A", "--ref-stats", "s.npz", "--inception", "w.pth")
  assert got.target is fid.cli_fid and got.batch_size == 50
  with pytest.raises(SystemExit):  # one reference at a time
    parse("eval", "fid", "--images", "A", "--ref-stats", "s.npz", "--ref-images", "B",
          "--inception", "w.pth")


def test_stats_only_skips_unreadable_files_and_compiles_once(tmp_path, weights, capsys, caplog):
  """4 readable images in batches of 3 (the second padded), one broken file named and skipped;
  the same images in another order give the same rows: padding and order do not leak."""
  images = _images(4, 0)
  a = _folder(tmp_path / "a", images, broken=("001b_broken.png",))
  b = _folder(tmp_path / "b", images[[3, 0, 1, 2]])
  compiled = net.pool3_features._cache_size()
  out = tmp_path / "stats_a.npz"
  rc, line, _ = _cli(capsys, "eval", "fid", "--images", a, "--inception", weights,
                     "--batch-size", 3, "--save-stats", out)
  assert rc == 0, line
  assert line["fid"] is None and line["num_images"] == 4
  assert line["num_skipped"] == 1 and line["skipped"] == ["001b_broken.png"]
  assert "001b_broken.png" in caplog.text
  with np.load(out) as f:
    mu, sigma = f["mu"], f["sigma"]
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == sigma.dtype == np.float64
  graphdef, state = conv.load_inception(str(weights))
  rows_b = fid.folder_features(graphdef, state, str(b), 3, progress=False)
  assert net.pool3_features._cache_size() - compiled == 1  # [8, 32, 32, 3] only: 1 per device
  assert rows_b.files == ["000.png", "001.png", "002.png", "003.png"] and not rows_b.skipped
  assert np.isfinite(rows_b.features).all() and rows_b.features.std() > 0.1
  np.testing.assert_allclose(np.mean(rows_b.features[[1, 2, 3, 0]], axis=0), mu, rtol=0, atol=1e-5)
  # refusals: an existing output, no reference and nothing to save
  rc, _, err = _cli(capsys, "eval", "fid", "--images", a, "--inception", weights, "--save-stats", out)
  assert rc == 2 and "--overwrite" in err
  rc, _, err = _cli(capsys, "eval", "fid", "--images", a, "--inception", weights)
  assert rc == 2 and "--ref-images" in err and "--ref-stats" in err


@pytest.mark.slow  # three 2048 x 2048 sqrtm: about 100 s on two cores
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 4 samples: rank-3 covariances
def test_fid_end_to_end(tmp_path, weights, capsys):
  """A folder against itself ~0, against a noised copy clearly more; --save-stats then --ref-stats
  gives exactly the FID of --ref-images."""
  images = _images(4, 0)
  noise = np.random.default_rng(1).normal(0, 40, images.shape)
  a = _folder(tmp_path / "a", images)
  b = _folder(tmp_path / "b", np.clip(images + noise, 0, 255).astype(np.uint8))
  args = ("--inception", weights, "--batch-size", 4)
  rc, same, _ = _cli(capsys, "eval", "fid", "--images", a, "--ref-images", a, *args)
  assert rc == 0
  rc, noised, _ = _cli(capsys, "eval", "fid", "--images", a, "--ref-images", b, *args)
  assert rc == 0 and noised["num_ref_images"] == 4
  with capsys.disabled():
    print(f"\n[fid] self {same['fid']!r}, noised {noised['fid']!r}")
  assert abs(same["fid"]) < 1e-3 and noised["fid"] > 1000 * abs(same["fid"])  # -3e-5, 54.6
  rc, _, _ = _cli(capsys, "eval", "fid", "--images", b, "--save-stats", tmp_path / "b.npz", *args)
  assert rc == 0
  rc, stats, _ = _cli(capsys, "eval", "fid", "--images", a, "--ref-stats", tmp_path / "b.npz", *args)
  assert rc == 0 and stats["fid"] == noised["fid"]


# -- against pytorch-fid itself (side venv) ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 4 samples: rank-3 covariances
def test_reference_pytorch_fid_parity(tmp_path, capsys):
  python = os.environ.get("MMAR_FID_REFERENCE_PYTHON")
  if not python:
    pytest.skip("MMAR_FID_REFERENCE_PYTHON unset: the python of a venv with pytorch-fid, see this "
                "module's docstring")
  rng = np.random.default_rng(2)
  a = rng.uniform(0, 1, (4, 3, SIZE, SIZE)).astype(np.float32)
  np.save(tmp_path / "images_a.npy", a)
  np.save(tmp_path / "images_b.npy", np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1).astype(np.float32))
  folder = tmp_path / "folder"  # pytorch-fid's loader: RGB, greyscale and RGBA PNGs
  folder.mkdir()
  for i, mode in enumerate(("RGB", "RGB", "L", "RGBA")):
    pixels = rng.integers(0, 256, (24, 40) + ((len(mode),) if mode != "L" else ()), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(folder / f"{i}.png")
  script = os.path.join(os.path.dirname(__file__), "fid_reference.py")
  done = subprocess.run([python, script, str(tmp_path)], capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stderr[-3000:]

  graphdef, state = conv.load_inception(str(tmp_path / "weights.pth"))
  diffs = {}
  for name in ("a", "b"):
    images = np.load(tmp_path / f"images_{name}.npy").transpose(0, 2, 3, 1)
    ours = np.asarray(net.pool3_features(graphdef, state, jnp.asarray(images)))
    diffs[name] = float(np.abs(ours - np.load(tmp_path / f"features_{name}.npy")).max())
  feats = [np.load(tmp_path / f"features_{n}.npy") for n in ("a", "b")]
  ours_fid = fid.frechet_distance(*fid.statistics(feats[0]), *fid.statistics(feats[1]))
  ref_fid = float(np.load(tmp_path / "fid.npy"))
  rc, _, _ = _cli(capsys, "eval", "fid", "--images", folder, "--inception", tmp_path / "weights.pth",
                  "--batch-size", 2, "--save-stats", tmp_path / "ours.npz")
  assert rc == 0
  with np.load(tmp_path / "ours.npz") as o, np.load(tmp_path / "folder_stats.npz") as r:
    mu_diff, sigma_diff = float(np.abs(o["mu"] - r["mu"]).max()), float(np.abs(o["sigma"] - r["sigma"]).max())
  with capsys.disabled():
    print(f"\n[fid parity] pool3 max abs diff {diffs}, FID ours {ours_fid!r} pytorch-fid {ref_fid!r} "
          f"(rel {abs(ours_fid - ref_fid) / abs(ref_fid):.2e}), folder stats max abs diff "
          f"mu {mu_diff:.2e} sigma {sigma_diff:.2e}")
  assert max(diffs.values()) < 1e-4
  assert ours_fid == pytest.approx(ref_fid, rel=1e-6)
  assert mu_diff < 1e-4 and sigma_diff < 1e-4
