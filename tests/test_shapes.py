"""The demo data: holdout, rendering, captions, the dataset and the programmatic detector."""

import collections
import itertools

import numpy as np
import pytest

from mmar_jax.data import shapes as S

SIZES = (16, 24, 32)


def _degrade(image, rng, noise_std, blur_sigma):
  """What a generator's output may look like: blurred, noisy, floats in [-1, 1]."""
  from scipy import ndimage
  x = image.astype(np.float64) / 127.5 - 1.0
  if blur_sigma:
    x = ndimage.gaussian_filter(x, (blur_sigma, blur_sigma, 0))
  return np.clip(x + rng.normal(0.0, noise_std, x.shape), -1.0, 1.0)


def _truth(spec, example):
  return spec.names((example["colour"], example["shape"], example["position"]))


def _read(d):
  return (d["colour"], d["shape"], d["position"])


# --- holdout --------------------------------------------------------------------------------

def test_holdout_properties():
  spec = S.ShapesSpec()
  assert (len(spec.colours), len(spec.shapes), len(spec.positions)) == (6, 4, 9)
  held, train = spec.heldout_combinations(), spec.train_combinations()
  assert len(held) >= 0.1 * spec.num_combinations
  assert not set(held) & set(train)
  assert sorted(held + train) == spec.all_combinations()
  # Every single value and every pair of values is still seen in training.
  for axes in [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]:
    everything = {tuple(c[a] for a in axes) for c in spec.all_combinations()}
    assert {tuple(c[a] for a in axes) for c in train} == everything, axes
  # Balanced: each value of an attribute is held out as often as the others, +-1.
  for a in range(3):
    counts = collections.Counter(c[a] for c in held)
    assert max(counts.values()) - min(counts.values()) <= 1, (a, counts)


def test_holdout_is_deterministic_from_the_seed():
  a = S.ShapesSpec(seed=3).heldout_combinations()
  assert a == S.ShapesSpec(seed=3).heldout_combinations()
  assert a != S.ShapesSpec(seed=4).heldout_combinations()
  assert S.ShapesSpec(holdout_fraction=0.0).heldout_combinations() == []
  assert len(S.ShapesSpec(holdout_fraction=0.25).heldout_combinations()) == 54


def test_spec_rejects_bad_values():
  with pytest.raises(ValueError, match="image_size"):
    S.ShapesSpec(image_size=12)
  with pytest.raises(ValueError, match="purple"):
    S.ShapesSpec(colours=("red", "purple"))
  with pytest.raises(ValueError, match="holdout_fraction"):
    S.ShapesSpec(holdout_fraction=1.0)


# --- rendering and captions -----------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_render_canonical(size):
  spec = S.ShapesSpec(image_size=size)
  lay = S.layout(size)
  for shape in spec.shapes:
    image = S.render("blue", shape, "bottom right", spec)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    lit = np.argwhere(image.any(axis=-1))
    assert len(lit) == S.shape_mask(shape, lay.box).sum()
    assert (image[tuple(lit.T)] == (0, 0, 255)).all()
    # Inside the bottom-right cell.
    assert lit.min() >= lay.origin + 2 * lay.cell and lit.max() < lay.origin + 3 * lay.cell


def test_shapes_are_unambiguous_masks():
  # The largest IoU between two different shapes, over every offset the detector tries, stays
  # well below a perfect match: the detector's margin.
  for size in SIZES:
    masks, labels, _ = S._templates(S.ShapesSpec(image_size=size))
    for a, b in itertools.combinations(range(len(S.SHAPE_NAMES)), 2):
      x = masks[labels[:, 0] == a].reshape(-1, size * size).astype(np.float32)
      y = masks[labels[:, 0] == b].reshape(-1, size * size).astype(np.float32)
      inter = x @ y.T
      union = x.sum(1)[:, None] + y.sum(1)[None] - inter
      assert (inter / union).max() <= 0.67, (size, a, b)


def test_caption_parse_round_trip():
  spec = S.ShapesSpec(colours=tuple(S.PALETTE))
  for combo in spec.all_combinations():
    names = spec.names(combo)
    text = S.caption(*names)
    assert S.parse_caption(text) == names
    # Generated text: odd case and spacing, then whatever came after a missed EOS.
    noisy = "  " + text.upper().replace(" ", "  ") + "\ufffd<eos> a blue cross at the top"
    assert S.parse_caption(noisy) == names
  assert S.caption("red", "square", "top left") == "a red square at the top left"
  assert S.caption("orange", "plus", "center") == "an orange plus at the center"


def test_parse_caption_partial():
  assert S.parse_caption("") == (None, None, None)
  assert S.parse_caption("a bored square at the top") == (None, "square", "top")
  assert S.parse_caption("green thing, top left-ish") == ("green", None, "top left")
  assert S.parse_caption("cyan at the bottom right") == ("cyan", None, "bottom right")


# --- dataset --------------------------------------------------------------------------------

def test_dataset_is_deterministic():
  spec = S.ShapesSpec()
  a, b = S.ShapesDataset(spec), S.ShapesDataset(spec)
  assert len(a) == len(spec.train_combinations()) * 16
  for i in (0, 1, 777, len(a) - 1):
    x, y = a[i], b[np.int64(i)]
    assert x["caption"] == y["caption"] and np.array_equal(x["image"], y["image"])
    assert set(x) == {"image", "caption", "colour", "shape", "position"}
    assert x["image"].dtype == np.uint8 and x["image"].shape == (16, 16, 3)
    assert x["caption"] == S.caption(*_truth(spec, x))
  # Variations of one combination differ (colour jitter), the combination does not.
  n = len(a.combinations)
  assert a[5]["caption"] == a[5 + n]["caption"]
  assert not np.array_equal(a[5]["image"], a[5 + n]["image"])
  with pytest.raises(IndexError):
    a[len(a)]


def test_dataset_splits():
  spec = S.ShapesSpec()
  held = S.ShapesDataset(spec, "heldout")
  assert len(held) == len(spec.heldout_combinations())
  seen = {(e["colour"], e["shape"], e["position"]) for e in (held[i] for i in range(len(held)))}
  assert seen == set(spec.heldout_combinations())
  canonical = S.ShapesDataset(spec, "heldout", variations=0)
  c, s, p = spec.heldout_combinations()[0]
  assert np.array_equal(canonical[0]["image"], S.render(c, s, p, spec))
  with pytest.raises(ValueError):
    S.ShapesDataset(spec, "test")


def test_dataset_works_as_grain_source():
  grain = pytest.importorskip("grain")
  ds = grain.MapDataset.source(S.ShapesDataset()).shuffle(seed=0).batch(4)
  batch = ds[0]
  assert batch["image"].shape == (4, 16, 16, 3) and len(batch["caption"]) == 4


# --- detector -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_detector_right_on_ground_truth(size):
  spec = S.ShapesSpec(image_size=size)
  # Every combination, with the per-example variation (4 draws each at the default size).
  ds = S.ShapesDataset(spec, "all", variations=4 if size == 16 else 1)
  right = 0
  for i in range(len(ds)):
    d = S.detect(ds[i]["image"], spec)
    right += d["valid"] and _read(d) == _truth(spec, ds[i])
  assert right / len(ds) >= 0.99


@pytest.mark.parametrize("size", SIZES)
def test_detector_tolerates_moderate_noise_and_blur(size):
  # The claimed tolerance: Gaussian noise of std 0.2 on the [-1, 1] scale after a Gaussian
  # blur of 0.5 pixels. (Blur of 0.7 px or more erases the one-pixel strokes of plus and cross.)
  spec = S.ShapesSpec(image_size=size)
  ds = S.ShapesDataset(spec, "all", variations=1)
  rng = np.random.default_rng(0)
  right = 0
  for i in range(len(ds)):
    d = S.detect(_degrade(ds[i]["image"], rng, 0.2, 0.5), spec)
    right += d["valid"] and _read(d) == _truth(spec, ds[i])
  assert right / len(ds) >= 0.99


def test_detector_accepts_float_and_uint8_alike():
  spec = S.ShapesSpec()
  image = S.render("cyan", "triangle", "center", spec)
  for x in (image, image.astype(np.float32) / 127.5 - 1.0):
    d = S.detect(x, spec)
    assert d["valid"] and _read(d) == ("cyan", "triangle", "center") and d["reason"] == ""


@pytest.mark.parametrize("size", SIZES)
def test_detector_rejects_blank_and_noise(size):
  spec = S.ShapesSpec(image_size=size)
  rng = np.random.default_rng(1)
  shape = (size, size, 3)
  blanks = [np.zeros(shape, np.uint8), -np.ones(shape, np.float32),
            np.clip(rng.normal(-1.0, 0.1, shape), -1, 1), np.full(shape, 40, np.uint8)]
  for image in blanks:
    d = S.detect(image, spec)
    assert not d["valid"] and d["shape"] is None
  for _ in range(50):
    for image in (rng.uniform(-1, 1, shape), rng.integers(0, 256, shape, dtype=np.uint8),
                  np.clip(rng.normal(0.0, 0.5, shape), -1, 1),
                  np.clip(rng.normal(-1.0, 0.5, shape), -1, 1)):
      assert not S.detect(image, spec)["valid"]


@pytest.mark.parametrize("size", SIZES)
def test_detector_rejects_two_shapes(size):
  spec = S.ShapesSpec(image_size=size)
  rng = np.random.default_rng(2)
  # Every pair of cells (neighbours included: at 16x16 their shapes touch), random shapes.
  for p, q in itertools.combinations(range(9), 2):
    for _ in range(3):
      c1, c2 = rng.integers(0, 6, 2)
      s1, s2 = rng.integers(0, 4, 2)
      image = np.maximum(S.render(c1, s1, p, spec), S.render(c2, s2, q, spec))
      d = S.detect(image, spec)
      assert not d["valid"], (spec.names((c1, s1, p)), spec.names((c2, s2, q)), d)


def test_detector_rejects_unknown_colours():
  spec = S.ShapesSpec()
  for rgb in ((255, 128, 0), (128, 128, 128), (255, 255, 255)):  # orange, grey, white
    image = S.render("red", "square", "top", spec)
    image[image.any(-1)] = rgb
    d = S.detect(image, spec)
    assert not d["valid"] and d["colour"] is None and d["shape"] == "square", rgb
  # With orange in the palette, orange is read (the palette decides, not the detector).
  wide = S.ShapesSpec(colours=S.DEFAULT_COLOURS + ("orange",))
  d = S.detect(S.render("orange", "plus", "left", wide), wide)
  assert d["valid"] and _read(d) == ("orange", "plus", "left")
