"""The built-in demo data: coloured shapes on a 3x3 grid, with captions, from a seed.

Every image holds one shape, of one palette colour, in one cell of a 3x3 grid on a black
canvas; its caption is "a {colour} {shape} at the {position}". A fixed part of the
colour x shape x position combinations is held out of training, so a model can be asked to
draw and caption combinations it never saw, while every single value (and every pair of
values) was seen. `detect` reads colour, shape and position back from pixels with no learned
model, so generation can be scored.

Why these sizes and shapes: the default canvas is 16x16 (the smallest supported is 15), where
a 3x3 grid gives 5x5 cells and the four shapes are still unambiguous pixel masks: a filled
square, a plus, a diagonal cross and an upward triangle differ pairwise in 8 to 16 of the 25
pixels (largest IoU 0.52, square vs triangle), whereas a disc and a square would differ only
in their 4 corners (IoU 0.84): so no "circle". Larger canvases (24, 32, ...) draw the same
shapes scaled, with a border in each cell that allows a position jitter of a pixel or more.
Per-example variation is a small brightness and colour shift (and that jitter).

The detector is exact on clean renders and reads >= 99% of them right after Gaussian noise of
std 0.2 (on the [-1, 1] scale) and a Gaussian blur of 0.5 px; stronger blur (0.7 px and up)
erases the one-pixel strokes of the plus and cross at 16x16 and is reported as invalid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import numpy as np

# Saturated RGB corners: any two differ by 255 in at least one channel, so the detector's
# nearest-colour test has a wide margin. White and orange are there for specs that want more
# colours (orange is only 128 away from red and yellow: the margin shrinks with it).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
DEFAULT_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPE_NAMES = ("square", "plus", "cross", "triangle")
# Row-major over the grid, so position index = 3 * row + column.
POSITIONS = ("top left", "top", "top right",
             "left", "center", "right",
             "bottom left", "bottom", "bottom right")
BACKGROUND = (0, 0, 0)

# Per-example colour variation: brightness scale and per-channel offset. Small next to the
# 255 palette separation, so it never changes the nearest palette colour.
_BRIGHTNESS_RANGE = (0.8, 1.0)
_COLOUR_OFFSET = 16


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """What the demo set contains; frozen (hashable) so the detector can cache its templates."""
  image_size: int = 16
  colours: tuple[str, ...] = DEFAULT_COLOURS
  shapes: tuple[str, ...] = SHAPE_NAMES
  positions: tuple[str, ...] = POSITIONS
  holdout_fraction: float = 0.1
  seed: int = 0

  def __post_init__(self):
    # Lists from a config file would make the spec unhashable: store tuples.
    for name in ("colours", "shapes", "positions"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.image_size < 15:
      raise ValueError(f"image_size {self.image_size} < 15: a grid cell must be at least 5 "
                       "pixels for the shapes to be told apart")
    for c in self.colours:
      if c not in PALETTE:
        raise ValueError(f"unknown colour {c!r}; known: {sorted(PALETTE)}")
    for s in self.shapes:
      if s not in SHAPE_NAMES:
        raise ValueError(f"unknown shape {s!r}; known: {SHAPE_NAMES}")
    for p in self.positions:
      if p not in POSITIONS:
        raise ValueError(f"unknown position {p!r}; known: {POSITIONS}")
    if not 0.0 <= self.holdout_fraction < 1.0:
      raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")

  @property
  def num_combinations(self) -> int:
    return len(self.colours) * len(self.shapes) * len(self.positions)

  def all_combinations(self) -> list[tuple[int, int, int]]:
    """Every (colour, shape, position) index triple, in row-major order."""
    return [(c, s, p) for c in range(len(self.colours)) for s in range(len(self.shapes))
            for p in range(len(self.positions))]

  def heldout_combinations(self) -> list[tuple[int, int, int]]:
    return list(_heldout(self.colours, self.shapes, self.positions, self.holdout_fraction,
                         self.seed))

  def train_combinations(self) -> list[tuple[int, int, int]]:
    held = set(self.heldout_combinations())
    return [t for t in self.all_combinations() if t not in held]

  def names(self, combo: Sequence[int]) -> tuple[str, str, str]:
    c, s, p = combo
    return self.colours[c], self.shapes[s], self.positions[p]


# --- holdout -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _heldout(colours, shapes, positions, fraction, seed) -> tuple[tuple[int, int, int], ...]:
  """A balanced, seed-determined set of held-out combinations.

  Greedy Latin-square-like selection: each step holds out the combination whose colour, shape
  and position have been held out least (relative to their fair share), ties broken by a
  seeded random rank. A combination is never taken if that would remove the last training
  example of any single value or any pair of values, so every colour-shape, colour-position
  and shape-position pairing stays in training: held-out combinations are new only as triples.
  """
  sizes = (len(colours), len(shapes), len(positions))
  combos = [(c, s, p) for c in range(sizes[0]) for s in range(sizes[1]) for p in range(sizes[2])]
  n_hold = math.ceil(fraction * len(combos) - 1e-9)
  if n_hold == 0:
    return ()
  rank = np.random.default_rng(seed).permutation(len(combos))
  value_held = [np.zeros(n, int) for n in sizes]
  pair_left = _pair_counts(combos)
  held: list[tuple[int, int, int]] = []
  taken = set()
  for _ in range(n_hold):
    best, best_key = None, None
    for idx, combo in enumerate(combos):
      if combo in taken or not _removable(combo, pair_left):
        continue
      loads = [(value_held[a][combo[a]] + 1) * sizes[a] / n_hold for a in range(3)]
      key = (max(loads), sum(loads), rank[idx])
      if best_key is None or key < best_key:
        best, best_key = combo, key
    if best is None:
      raise ValueError(f"cannot hold out {n_hold} of {len(combos)} combinations and keep every "
                       "value pair in training: lower holdout_fraction")
    held.append(best)
    taken.add(best)
    for a in range(3):
      value_held[a][best[a]] += 1
    for key in _pair_keys(best):
      pair_left[key] -= 1
  return tuple(sorted(held))


def _pair_keys(combo):
  c, s, p = combo
  return (("cs", c, s), ("cp", c, p), ("sp", s, p))


def _pair_counts(combos) -> dict:
  counts: dict = {}
  for combo in combos:
    for key in _pair_keys(combo):
      counts[key] = counts.get(key, 0) + 1
  return counts


def _removable(combo, pair_left) -> bool:
  # Pairs imply singles: a kept pair keeps both of its values in training too.
  return all(pair_left[key] > 1 for key in _pair_keys(combo))


# --- geometry and rendering -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  cell: int     # grid cell side
  origin: int   # where the grid starts (the grid is centred on the canvas)
  box: int      # shape side
  jitter: int   # the most a shape moves from its cell centre, per axis


@functools.lru_cache(maxsize=32)
def layout(image_size: int) -> Layout:
  cell = image_size // 3
  # Small cells give the shape the whole cell (every pixel is needed to tell shapes apart);
  # from 7 pixels up a border allows jitter while shapes stay inside their cell.
  jitter = 0 if cell < 7 else max(1, cell // 10)
  return Layout(cell=cell, origin=(image_size - 3 * cell) // 2, box=cell - 2 * jitter,
                 jitter=jitter)


@functools.lru_cache(maxsize=64)
def shape_mask(shape: str, box: int) -> np.ndarray:
  """bool [box, box]: the shape's pixels, drawn symmetrically for odd and even sides."""
  i, j = np.meshgrid(np.arange(box), np.arange(box), indexing="ij")
  m = (box - 1) / 2
  u, v = j - m, i - m  # u: right, v: down, from the box centre (half-integers for even sides)
  # Stroke width has the box's parity so strokes sit symmetrically on the centre line.
  stroke = max(1, box // 4)
  if stroke % 2 != box % 2:
    stroke += 1
  half = (stroke - 1) / 2 + 1e-6
  if shape == "square":
    mask = np.ones((box, box), bool)
  elif shape == "plus":
    mask = (np.abs(u) <= half) | (np.abs(v) <= half)
  elif shape == "cross":
    # One pixel diagonals up to 9 px boxes (thicker ones look like a square); 3 px above.
    w = 0 if box < 10 else 1
    mask = (np.abs(u - v) <= w) | (np.abs(u + v) <= w)
  elif shape == "triangle":
    # Apex up, base the full width: half-width grows by one pixel every two rows.
    mask = np.abs(u) <= (i // 2) + (0.5 if box % 2 == 0 else 0.0) + 1e-6
  else:
    raise ValueError(f"unknown shape {shape!r}")
  mask.setflags(write=False)
  return mask


def _index(value, names: Sequence[str], what: str) -> int:
  if isinstance(value, str):
    if value not in names:
      raise ValueError(f"unknown {what} {value!r}; this spec has {list(names)}")
    return names.index(value)
  value = int(value)
  if not 0 <= value < len(names):
    raise ValueError(f"{what} index {value} out of range [0, {len(names)})")
  return value


def _box_origin(position: str, lay: Layout, offset: tuple[int, int]) -> tuple[int, int]:
  row, col = divmod(POSITIONS.index(position), 3)
  top = lay.origin + row * lay.cell + lay.jitter + offset[0]
  left = lay.origin + col * lay.cell + lay.jitter + offset[1]
  return top, left


def render(colour, shape, position, spec: ShapesSpec = ShapesSpec(),
           rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, 3]. Names or indices into the spec. rng=None draws the canonical image
  (exact palette colour, shape centred in its cell); with rng, a small colour and position
  variation is drawn from it."""
  colour = spec.colours[_index(colour, spec.colours, "colour")]
  shape = spec.shapes[_index(shape, spec.shapes, "shape")]
  position = spec.positions[_index(position, spec.positions, "position")]
  lay = layout(spec.image_size)
  rgb = np.asarray(PALETTE[colour], np.float64)
  offset = (0, 0)
  if rng is not None:
    rgb = rgb * rng.uniform(*_BRIGHTNESS_RANGE) + rng.uniform(-_COLOUR_OFFSET, _COLOUR_OFFSET, 3)
    offset = tuple(int(x) for x in rng.integers(-lay.jitter, lay.jitter + 1, 2))
  image = np.empty((spec.image_size, spec.image_size, 3), np.uint8)
  image[...] = BACKGROUND
  top, left = _box_origin(position, lay, offset)
  box = image[top:top + lay.box, left:left + lay.box]
  box[shape_mask(shape, lay.box)] = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  return image


# --- captions -------------------------------------------------------------------------------

def caption(colour: str, shape: str, position: str) -> str:
  """'a red square at the top left'; 'an' before a vowel (orange)."""
  article = "an" if colour[0] in "aeiou" else "a"
  return f"{article} {colour} {shape} at the {position}"


def _alternation(words: Sequence[str]) -> str:
  # Longest first so "top left" wins over "top" (parse_caption collapses whitespace first).
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOURS = _alternation(list(PALETTE))
_SHAPES = _alternation(SHAPE_NAMES)
_POSITIONS = _alternation(POSITIONS)
# Whole words only, so "red" is not found inside "bored".
_COLOUR_RE = re.compile(rf"\b({_COLOURS})\b")
_SHAPE_RE = re.compile(rf"\b({_SHAPES})\b")
_POSITION_RE = re.compile(rf"\b({_POSITIONS})\b")
_FULL_RE = re.compile(rf"\b(?:a|an)\s+({_COLOURS})\s+({_SHAPES})\s+at\s+the\s+({_POSITIONS})\b")


def parse_caption(text: str) -> tuple[str | None, str | None, str | None]:
  """(colour, shape, position) names from generated text, None for any not found.

  The full caption pattern is looked for first; failing that, each attribute's first mention,
  so trailing junk after the caption (a missing EOS, repeated words) costs nothing.
  """
  text = " ".join(text.lower().split())
  full = _FULL_RE.search(text)
  if full:
    return full.group(1), full.group(2), full.group(3)
  found = []
  for pattern in (_COLOUR_RE, _SHAPE_RE, _POSITION_RE):
    m = pattern.search(text)
    found.append(m.group(1) if m else None)
  return tuple(found)


# --- dataset --------------------------------------------------------------------------------

_SPLITS = ("train", "heldout", "all")


class ShapesDataset:
  """Random-access source of demo examples (grain's RandomAccessDataSource protocol).

  Item i is combination i % C (C = combinations in the split) in variation i // C, drawn from
  a generator keyed by (seed, split, i): the same i is the same example in every process and
  every run. One epoch is C x `variations` items. `variations=0` gives the canonical image of
  each combination (no colour or position variation), once.
  """

  def __init__(self, spec: ShapesSpec = ShapesSpec(), split: str = "train",
               variations: int | None = None):
    if split not in _SPLITS:
      raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    self.spec = spec
    self.split = split
    self.combinations = {"train": spec.train_combinations, "heldout": spec.heldout_combinations,
                         "all": spec.all_combinations}[split]()
    if variations is None:
      variations = 16 if split == "train" else 1
    self.variations = variations

  def __len__(self) -> int:
    return len(self.combinations) * max(self.variations, 1)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    c, s, p = self.combinations[index % len(self.combinations)]
    rng = None
    if self.variations > 0:
      rng = np.random.default_rng([self.spec.seed, _SPLITS.index(self.split), index])
    names = self.spec.names((c, s, p))
    return {"image": render(c, s, p, self.spec, rng), "caption": caption(*names),
            "colour": c, "shape": s, "position": p}

  def __repr__(self) -> str:
    return (f"ShapesDataset(split={self.split!r}, combinations={len(self.combinations)}, "
            f"variations={self.variations}, image_size={self.spec.image_size})")


# --- detector -------------------------------------------------------------------------------

# Foreground: a pixel's brightest channel above half the image's brightest pixel (so a
# uniformly dimmed or blurred drawing still separates) and above this floor (so a dark,
# noisy background is never foreground).
_FG_FLOOR = 96.0
_MIN_PEAK = _FG_FLOOR         # darker than this everywhere: blank
_MIN_PIXELS = 3               # fewer lit pixels: nothing drawn
_MIN_IOU = 0.6                # below this the blob is no known shape
_MIN_MARGIN = 0.1             # over the best other shape's IoU, else ambiguous
_COLOUR_REJECT = 0.4          # x the closest palette pair's distance: farther is no colour
_MAX_STRAY_FRACTION = 0.005   # of the canvas (>= 2 px): specks allowed outside the box


@functools.lru_cache(maxsize=8)
def _templates(spec: ShapesSpec):
  """Every shape at every position and every offset up to jitter + 1 (one pixel of slack for
  imprecisely placed generated shapes): bool [K, H, W], the (shape, position) of each, and
  each one's box grown by a pixel: bool [K, H, W], where its foreground may be."""
  lay = layout(spec.image_size)
  reach = lay.jitter + 1
  masks, labels, windows = [], [], []
  for s, shape in enumerate(spec.shapes):
    small = shape_mask(shape, lay.box)
    for p, position in enumerate(spec.positions):
      for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
          top, left = _box_origin(position, lay, (dy, dx))
          if min(top, left) < 0 or max(top, left) + lay.box > spec.image_size:
            continue
          full = np.zeros((spec.image_size, spec.image_size), bool)
          full[top:top + lay.box, left:left + lay.box] = small
          window = np.zeros_like(full)
          window[max(top - 1, 0):top + lay.box + 1, max(left - 1, 0):left + lay.box + 1] = True
          masks.append(full)
          labels.append((s, p))
          windows.append(window)
  return np.stack(masks), np.asarray(labels), np.stack(windows)


@functools.lru_cache(maxsize=8)
def _template_matrix(spec: ShapesSpec) -> tuple[np.ndarray, np.ndarray]:
  masks = _templates(spec)[0]
  flat = masks.reshape(len(masks), -1).astype(np.float32)
  return flat, flat.sum(axis=1)


def _to_uint8_scale(image) -> np.ndarray:
  """float64 [H, W, 3] on the 0..255 scale from uint8 or from floats in [-1, 1]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  if image.dtype == np.uint8:
    return image.astype(np.float64)
  return (np.clip(image.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5


def _nearest_colour(mean_rgb: np.ndarray, spec: ShapesSpec) -> tuple[str | None, float]:
  # Scale the brightest channel to 255 first: blur and the renderer's brightness variation
  # dim a colour without changing its hue.
  rgb = mean_rgb * (255.0 / max(mean_rgb.max(), 1e-6))
  palette = np.asarray([PALETTE[c] for c in spec.colours], np.float64)
  dist = np.linalg.norm(palette - rgb, axis=1)
  gaps = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
  gap = gaps[~np.eye(len(palette), dtype=bool)].min() if len(palette) > 1 else 255.0
  k = int(dist.argmin())
  if dist[k] > _COLOUR_REJECT * gap:
    return None, float(dist[k])
  return spec.colours[k], float(dist[k])


def _invalid(reason: str, **found) -> dict[str, Any]:
  out = {"colour": None, "shape": None, "position": None, "valid": False, "reason": reason}
  out.update(found)
  return out


def detect(image, spec: ShapesSpec = ShapesSpec()) -> dict[str, Any]:
  """Reads colour, shape and position back from pixels, with no learned model.

  Foreground pixels are matched (IoU) against every shape drawn at every position and offset;
  the image is valid when the best match is a clear one (IoU >= 0.6, 0.1 above any other
  shape), its mean colour is near one palette colour, and nothing else is lit outside the
  matched shape's box grown by one pixel (so two shapes, or noise, are invalid).

  `image`: uint8, or float in [-1, 1], [H, W, 3] of the spec's size. Returns {"colour",
  "shape", "position": a name, or None where it could not be read; "valid"; "reason": why not
  valid ("" when valid); "iou": the best match's IoU}. Attributes are read independently, so a
  wrong shape can still count as a right colour.
  """
  pixels = _to_uint8_scale(image)
  if pixels.shape[:2] != (spec.image_size, spec.image_size):
    raise ValueError(f"image is {pixels.shape[:2]}, the spec draws "
                     f"{spec.image_size}x{spec.image_size}")
  intensity = pixels.max(axis=-1)
  peak = float(intensity.max())
  if peak < _MIN_PEAK:
    return _invalid("blank")
  fg = intensity > max(_FG_FLOOR, 0.5 * peak)
  # No connected-component test: noise can break a one-pixel stroke in two, and the IoU and
  # the outside-the-box count below already reject second objects.
  if fg.sum() < _MIN_PIXELS:
    return _invalid("no shape")
  _, template_labels, windows = _templates(spec)
  flat, areas = _template_matrix(spec)
  inter = flat @ fg.ravel().astype(np.float32)  # IoU of all templates at once, as a matmul
  iou = inter / (areas + fg.sum() - inter)
  k = int(iou.argmax())
  if iou[k] == 0:
    return _invalid("no shape")  # lit pixels only where no shape is ever drawn
  s, p = template_labels[k]
  colour, colour_dist = _nearest_colour(pixels[fg & windows[k]].mean(axis=0), spec)
  found = {"colour": colour, "position": spec.positions[p], "iou": float(iou[k]),
           "colour_distance": colour_dist}
  runner_up = float(iou[template_labels[:, 0] != s].max(initial=0.0))
  if iou[k] < _MIN_IOU or iou[k] - runner_up < _MIN_MARGIN:
    return _invalid(f"unknown shape (best IoU {iou[k]:.2f}, next shape {runner_up:.2f})", **found)
  found["shape"] = spec.shapes[s]
  if colour is None:
    return _invalid("unknown colour", **found)
  # At 16x16 neighbouring cells touch: a second shape next to this one shows up here.
  stray = int(np.logical_and(fg, ~windows[k]).sum())
  if stray > max(2, round(_MAX_STRAY_FRACTION * fg.size)):
    return _invalid(f"{stray} foreground pixels outside the shape", **found)
  return {**found, "valid": True, "reason": ""}
