"""The shapes world: generated scenes of coloured shapes with exact captions and a held-out split.

Shapes world
------------
32×32 RGB on black; shapes circle / square / triangle in four colours; 1–3 non-overlapping objects of 9–11 px.
Three kinds of scene, each with one caption template:

- ``single``:   one object,                       ``a red circle``
- ``relation``: two different objects A and B,     ``a red circle to the left of a blue square``
  (relations ``to the left of``, ``to the right of``, ``above``, ``below``; x grows to the right, y downwards)
- ``count``:    two or three identical objects,    ``two red circles`` / ``three red circles``

Relations are rendered with a clear margin: along the relation's axis the two bounding boxes do not overlap
(centres at least 11 px apart), across it the centres differ by at most 3 px, so a detector decides by
comparing centroids (see :func:`relation_holds`).

Held-out split (never produced by ``sample_scene(rng, "train")``):

- relation scenes whose two objects are one of the unordered pairs in :data:`HELDOUT_RELATION_PAIRS`
  (any relation, either order);
- count scenes whose (count, colour, shape) is in :data:`HELDOUT_COUNTS`.

Every single-object (colour, shape) pair stays in training, so single-object prompts remain learnable.
"""

import argparse
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ImageCaptionSource, register_dataset, rgb_to_tensor

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}
SCENE_KINDS = ("single", "relation", "count")

MIN_SIZE, MAX_SIZE = 9, 11  # object bounding-box side in pixels ("about 10 px")
BORDER = 1  # free pixels between any object and the image edge
GAP = 2  # free pixels between the bounding boxes of two objects, so connected components never merge
CROSS_AXIS_TOLERANCE = 3  # rendered relation scenes: centre offset across the relation's axis, at most

# Unordered pairs of (colour, shape) objects never shown together in a training relation scene.
HELDOUT_RELATION_PAIRS = frozenset(
    frozenset(pair)
    for pair in (
        (("red", "circle"), ("blue", "square")),
        (("green", "triangle"), ("yellow", "square")),
        (("blue", "circle"), ("yellow", "triangle")),
        (("red", "triangle"), ("green", "circle")),
        (("yellow", "circle"), ("red", "square")),
        (("green", "square"), ("blue", "triangle")),
    )
)
# (count, colour, shape) never shown in a training count scene.
HELDOUT_COUNTS = frozenset(
    {(2, "blue", "triangle"), (3, "yellow", "circle"), (2, "green", "square"), (3, "red", "square")}
)

SCENE_KIND_PROBS = {"single": 0.3, "relation": 0.45, "count": 0.25}  # training mixture
EVAL_CATEGORIES = ("single_object", "two_objects", "counting", "colour", "position")


@dataclass(frozen=True)
class PlacedObject:
    """One object in a rendered scene: its bounding box is rows y..y+size-1, columns x..x+size-1."""

    colour: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def box_centre(self) -> tuple[float, float]:
        """(x, y) centre of the bounding box in pixel coordinates (pixel i spans [i, i+1))."""
        return (self.x + self.size / 2, self.y + self.size / 2)


@dataclass(frozen=True)
class SceneSpec:
    """What a shapes scene shows. The caption follows from the semantic fields; `objects` places them.

    kind "single":   colour/shape of the one object, count 1.
    kind "relation": subject colour/shape `relation` object colour2/shape2; objects[0] is the subject.
    kind "count":    `count` (2 or 3) objects of colour/shape.
    A spec parsed from a caption has no `objects`; :meth:`semantic` strips them for comparisons.
    """

    kind: str
    colour: str
    shape: str
    count: int = 1
    relation: str | None = None
    colour2: str | None = None
    shape2: str | None = None
    objects: tuple[PlacedObject, ...] = ()

    def __post_init__(self):
        if self.kind not in SCENE_KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {SCENE_KINDS}")
        for c in (self.colour, self.colour2):
            if c is not None and c not in COLOURS:
                raise ValueError(f"colour={c!r}; expected one of {tuple(COLOURS)}")
        for s in (self.shape, self.shape2):
            if s is not None and s not in SHAPES:
                raise ValueError(f"shape={s!r}; expected one of {SHAPES}")
        if self.kind == "relation" and (self.relation not in RELATIONS or self.colour2 is None or self.shape2 is None):
            raise ValueError(f"a relation scene needs relation in {RELATIONS}, colour2 and shape2; got {self}")
        if self.kind == "count" and self.count not in COUNT_WORDS:
            raise ValueError(f"count={self.count}; expected one of {tuple(COUNT_WORDS)}")
        if self.kind == "single" and self.count != 1:
            raise ValueError(f"a single-object scene has count 1, got {self.count}")

    @property
    def caption(self) -> str:
        if self.kind == "single":
            return f"a {self.colour} {self.shape}"
        if self.kind == "relation":
            return f"a {self.colour} {self.shape} {self.relation} a {self.colour2} {self.shape2}"
        return f"{COUNT_WORDS[self.count]} {self.colour} {self.shape}s"

    def semantic(self) -> "SceneSpec":
        """The same spec without placements (what a caption determines)."""
        return replace(self, objects=())

    @property
    def split(self) -> str:
        """"heldout" if this combination is in the held-out set, else "train"."""
        return "heldout" if is_heldout(self) else "train"


def is_heldout(spec: SceneSpec) -> bool:
    """Whether the spec's combination of colours, shapes, relation and count is reserved for evaluation."""
    if spec.kind == "relation":
        return frozenset({(spec.colour, spec.shape), (spec.colour2, spec.shape2)}) in HELDOUT_RELATION_PAIRS
    if spec.kind == "count":
        return (spec.count, spec.colour, spec.shape) in HELDOUT_COUNTS
    return False


_CAPTION_RE = {
    "single": re.compile(r"^a (\w+) (\w+)$"),
    "relation": re.compile(r"^a (\w+) (\w+) (to the left of|to the right of|above|below) a (\w+) (\w+)$"),
    "count": re.compile(r"^(two|three) (\w+) (\w+)s$"),
}


def parse_caption(caption: str) -> SceneSpec:
    """Turn a shapes-world caption back into its (placement-free) SceneSpec; ValueError if it is not one."""
    text = " ".join(caption.strip().lower().split())
    try:
        m = _CAPTION_RE["relation"].match(text)
        if m:
            c1, s1, rel, c2, s2 = m.groups()
            return SceneSpec("relation", c1, s1, relation=rel, colour2=c2, shape2=s2)
        m = _CAPTION_RE["count"].match(text)
        if m:
            word, c, s = m.groups()
            return SceneSpec("count", c, s, count={v: k for k, v in COUNT_WORDS.items()}[word])
        m = _CAPTION_RE["single"].match(text)
        if m:
            return SceneSpec("single", m.group(1), m.group(2))
    except ValueError as err:
        raise ValueError(f"caption {caption!r} names an unknown colour or shape: {err}") from None
    raise ValueError(f"caption {caption!r} is not a shapes-world caption")


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape filling its bounding box (no anti-aliasing: colours stay exact)."""
    c = (np.arange(size) + 0.5) - size / 2  # pixel-centre offsets from the box centre
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = c[:, None] ** 2 + c[None, :] ** 2 <= (size / 2) ** 2
    elif shape == "triangle":
        # apex at the top centre, base on the bottom row: half-width grows linearly with the row
        half_width = (np.arange(size) + 1) / size * size / 2
        mask = np.abs(c[None, :]) <= half_width[:, None]
    else:
        raise ValueError(f"shape={shape!r}; expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


def render_scene(spec: SceneSpec) -> np.ndarray:
    """Draw the spec's placed objects on black: uint8 (32, 32, 3)."""
    if not spec.objects:
        raise ValueError("spec has no placed objects; use sample_scene / place_objects first")
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for obj in spec.objects:
        mask = shape_mask(obj.shape, obj.size)
        region = image[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size]
        region[mask] = COLOURS[obj.colour]
    return image


def relation_holds(subject: tuple[float, float], obj: tuple[float, float], relation: str) -> bool:
    """Whether `subject` (x, y) is `relation` `obj` (x, y): the offset along the relation's axis has the right sign,
    is at least 3 px, and is larger than the offset across it (so "left of" and "above" never both hold)."""
    dx, dy = obj[0] - subject[0], obj[1] - subject[1]  # positive dx: subject is left of the object
    along, across = {
        "to the left of": (dx, dy),
        "to the right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return along >= 3.0 and along > abs(across)


def _boxes_apart(a: PlacedObject, b: PlacedObject) -> bool:
    """At least GAP free pixels between the two bounding boxes along x or along y."""
    apart_x = a.x + a.size + GAP <= b.x or b.x + b.size + GAP <= a.x
    apart_y = a.y + a.size + GAP <= b.y or b.y + b.size + GAP <= a.y
    return apart_x or apart_y


def _random_object(rng: np.random.Generator, colour: str, shape: str) -> PlacedObject:
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    hi = IMAGE_SIZE - BORDER - size  # last valid top-left coordinate
    return PlacedObject(colour, shape, int(rng.integers(BORDER, hi + 1)), int(rng.integers(BORDER, hi + 1)), size)


def _relation_rendered_clearly(a: PlacedObject, b: PlacedObject, relation: str) -> bool:
    """The rendering constraint for relation scenes: boxes disjoint along the axis, centres aligned across it."""
    (ax, ay), (bx, by) = a.box_centre, b.box_centre
    if relation in ("to the left of", "to the right of"):
        left, right = (a, b) if relation == "to the left of" else (b, a)
        return left.x + left.size + GAP <= right.x and abs(ay - by) <= CROSS_AXIS_TOLERANCE
    top, bottom = (a, b) if relation == "above" else (b, a)
    return top.y + top.size + GAP <= bottom.y and abs(ax - bx) <= CROSS_AXIS_TOLERANCE


def place_objects(rng: np.random.Generator, spec: SceneSpec, max_tries: int = 10_000) -> SceneSpec:
    """Sample non-overlapping placements for the spec's objects (rejection sampling; deterministic given rng)."""
    if spec.kind == "single":
        wanted = [(spec.colour, spec.shape)]
    elif spec.kind == "relation":
        wanted = [(spec.colour, spec.shape), (spec.colour2, spec.shape2)]
    else:
        wanted = [(spec.colour, spec.shape)] * spec.count
    for _ in range(max_tries):
        objects = [_random_object(rng, c, s) for c, s in wanted]
        if not all(_boxes_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            continue
        if spec.kind == "relation" and not _relation_rendered_clearly(objects[0], objects[1], spec.relation):
            continue
        if spec.kind == "count":  # reading order, so equal scenes get equal specs
            objects.sort(key=lambda o: (o.y, o.x))
        return replace(spec, objects=tuple(objects))
    raise RuntimeError(f"could not place {spec.caption!r} in {max_tries} tries")


def _sample_semantic(rng: np.random.Generator, kind: str) -> SceneSpec:
    colours, n_shapes = tuple(COLOURS), len(SHAPES)
    colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(n_shapes)]
    if kind == "single":
        return SceneSpec("single", colour, shape)
    if kind == "count":
        return SceneSpec("count", colour, shape, count=int(rng.integers(2, 4)))
    while True:  # two different objects
        colour2, shape2 = colours[rng.integers(len(colours))], SHAPES[rng.integers(n_shapes)]
        if (colour2, shape2) != (colour, shape):
            break
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return SceneSpec("relation", colour, shape, relation=relation, colour2=colour2, shape2=shape2)


def sample_scene(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> SceneSpec:
    """Sample a placed scene from `split` ("train": everything but the held-out combinations; "heldout": only those,
    so only relation and count scenes). `kind` forces "single" | "relation" | "count". Deterministic given rng."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; expected 'train' or 'heldout'")
    if kind is None:
        if split == "train":
            kinds, probs = zip(*SCENE_KIND_PROBS.items())
            kind = kinds[rng.choice(len(kinds), p=probs)]
        else:
            kind = ("relation", "count")[rng.integers(2)]
    if kind not in SCENE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {SCENE_KINDS}")
    if split == "heldout" and kind == "single":
        raise ValueError("the held-out split has no single-object scenes: all single objects are in training")
    if split == "heldout":  # draw directly from the small held-out lists
        if kind == "relation":
            pairs = sorted(tuple(sorted(p)) for p in HELDOUT_RELATION_PAIRS)
            a, b = pairs[rng.integers(len(pairs))]
            if rng.integers(2):
                a, b = b, a
            relation = RELATIONS[rng.integers(len(RELATIONS))]
            spec = SceneSpec("relation", a[0], a[1], relation=relation, colour2=b[0], shape2=b[1])
        else:
            count, colour, shape = sorted(HELDOUT_COUNTS)[rng.integers(len(HELDOUT_COUNTS))]
            spec = SceneSpec("count", colour, shape, count=count)
    else:
        while True:
            spec = _sample_semantic(rng, kind)
            if not is_heldout(spec):
                break
    return place_objects(rng, spec)


def shapes_scene(index: int, split: str = "train", seed: int = 0) -> SceneSpec:
    """The `index`-th scene of a split: its own RNG seeded by (seed, split, index), so any item can be regenerated."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    return sample_scene(rng, split)


def shapes_images(n: int, split: str = "train", seed: int = 0, start: int = 0) -> tuple[np.ndarray, list[str]]:
    """Render scenes start..start+n-1 of a split: uint8 (n, 32, 32, 3) and their captions."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        spec = shapes_scene(start + i, split, seed)
        images[i] = render_scene(spec)
        captions.append(spec.caption)
    return images, captions


class EvalPrompt(NamedTuple):
    caption: str
    spec: SceneSpec  # placed: render_scene(spec) is a reference image
    category: str


def heldout_prompts(n: int, seed: int = 0) -> list[EvalPrompt]:
    """GenEval-style evaluation prompts: `n` (caption, spec, category) triples, categories in turn.

    Categories and what a generated image must show to pass (see `evaluation.detector.score_prompt`):

    - ``single_object``: ``a {colour} {shape}`` — an object of that shape is present (any colour).
    - ``colour``:        ``a {colour} {shape}`` — an object of that shape *and* colour is present.
    - ``two_objects``:   a held-out relation caption — both named (colour, shape) objects are present.
    - ``position``:      a held-out relation caption — both are present and the relation holds between them.
    - ``counting``:      a held-out count caption — exactly `count` objects of that colour and shape.

    single_object and colour prompts cycle through all 12 (colour, shape) pairs (every one is in training; the
    world holds out nothing single); the other three draw from the held-out combinations only.
    """
    rng = np.random.default_rng([seed, 2])
    singles = [(c, s) for c in COLOURS for s in SHAPES]
    start = int(rng.integers(len(singles)))
    prompts = []
    for i in range(n):
        category = EVAL_CATEGORIES[i % len(EVAL_CATEGORIES)]
        if category in ("single_object", "colour"):
            colour, shape = singles[(start + i // len(EVAL_CATEGORIES)) % len(singles)]
            spec = place_objects(rng, SceneSpec("single", colour, shape))
        elif category == "counting":
            spec = sample_scene(rng, "heldout", kind="count")
        else:
            spec = sample_scene(rng, "heldout", kind="relation")
        prompts.append(EvalPrompt(spec.caption, spec, category))
    return prompts


class ShapesDataset(Dataset):
    """`length` shapes scenes of a split, each generated on the fly from its own index-seeded RNG."""

    def __init__(self, split: str = "train", length: int = 60_000, seed: int = 0):
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}; expected 'train' or 'heldout'")
        self.split, self.length, self.seed = split, length, seed

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> SceneSpec:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        return shapes_scene(index, self.split, self.seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        spec = self.spec(index)
        return rgb_to_tensor(render_scene(spec))[0], spec.caption




@register_dataset
class ShapesSource(ImageCaptionSource):
    """The world's first `count` training scenes (a pure function of seed and index) as a training source."""

    name = "shapes"
    verify_cached_captions = False  # generated from (seed, index): the cache key already says which

    def __init__(self, count: int = 60_000, seed: int = 0):
        self.count, self.seed = count, seed
        self.cache_tag = f"s{seed}"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--shapes-count", type=int, default=60_000, help="shapes-world training scenes")

    @classmethod
    def from_args(cls, args: argparse.Namespace, image_size: int = 32) -> list[ImageCaptionSource]:
        if not isinstance(args.shapes_count, int) or args.shapes_count < 1:
            raise ValueError(f"--shapes-count={args.shapes_count!r}; must be an integer ≥ 1 (scenes to train on)")
        return [cls(count=args.shapes_count)]

    def __len__(self) -> int:
        return self.count

    def captions(self, n: int) -> list[str]:
        return [shapes_scene(i, "train", self.seed).caption for i in range(n)]

    def pixels(self, n: int, chunk: int = 1000):
        for i in range(0, n, chunk):
            yield rgb_to_tensor(shapes_images(min(chunk, n - i), "train", seed=self.seed, start=i)[0])
