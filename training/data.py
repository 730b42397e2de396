"""The offline data world: Fashion-MNIST, a generated shapes world, and English text from Python's standard library.

Images everywhere are (3, 32, 32) float tensors in [-1, 1] (uint8 arrays on disk and in the generators); captions
are plain strings. Nothing here touches the network.

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

import gzip
import hashlib
import importlib
import inspect
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------------

# The Debian package's folder; FASHION_MNIST_DIR points elsewhere (the same four idx .gz files, e.g. on a GPU host)
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def fashion_caption(label: int) -> str:
    """The caption of Fashion-MNIST class `label`: ``a photo of a {name}``."""
    return f"a photo of a {FASHION_CLASSES[int(label)]}"


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format): big-endian header of magic + dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ValueError(f"{path}: unsupported idx magic {magic:#x}; expected unsigned-byte data (0x0008nn)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def _load_fashion_cached(split: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(folder)
    prefix = FASHION_SPLIT_PREFIX[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{root}: inconsistent Fashion-MNIST {split} files: {images.shape} images, {labels.shape} labels")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str = "train", folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from the Debian package (or `folder`, or $FASHION_MNIST_DIR): uint8 images (N, 28, 28) and
    int64 labels (N,).

    `split` is "train" (60,000) or "test" (10,000). The arrays are cached and read-only; copy before editing.
    """
    if split not in FASHION_SPLIT_PREFIX:
        raise ValueError(f"split={split!r}; expected one of {sorted(FASHION_SPLIT_PREFIX)}")
    root = Path(folder) if folder is not None else FASHION_DIR
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} not found. "
            "Install the Debian package: apt-get install -y dataset-fashion-mnist "
            "(or set FASHION_MNIST_DIR to a folder holding its four idx .gz files)"
        )
    return _load_fashion_cached(split, str(root))


def fashion_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 3, 32, 32) in [-1, 1]: 2 px of background (0 → -1) padded, grey to RGB."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected uint8 images of shape (N, 28, 28), got {images.shape}")
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(127.5).sub_(1.0)  # (N, 28, 28)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 32, 32)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)


def rgb_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(127.5).sub_(1.0)
    return x.permute(0, 3, 1, 2).contiguous()


def tensor_to_rgb(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) or (3, H, W) in [-1, 1] → uint8 (N, H, W, 3) (or (H, W, 3))."""
    single = x.ndim == 3
    if single:
        x = x[None]
    out = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------------------------
# Shapes world
# ----------------------------------------------------------------------------------------------------------------

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

    Categories and what a generated image must show to pass (see `training.detector.score_prompt`):

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


def all_captions() -> list[str]:
    """Every caption the two image worlds can produce (fashion + all shapes scenes, train and held-out)."""
    captions = [fashion_caption(i) for i in range(len(FASHION_CLASSES))]
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    captions += [SceneSpec("single", c, s).caption for c, s in objects]
    captions += [SceneSpec("count", c, s, count=k).caption for k in COUNT_WORDS for c, s in objects]
    captions += [
        SceneSpec("relation", c1, s1, relation=r, colour2=c2, shape2=s2).caption
        for c1, s1 in objects
        for r in RELATIONS
        for c2, s2 in objects
        if (c1, s1) != (c2, s2)
    ]
    return captions


# ----------------------------------------------------------------------------------------------------------------
# Text corpus: docstrings of Python's standard library
# ----------------------------------------------------------------------------------------------------------------

# Fixed and sorted; modules with import side effects (antigravity, this, turtle, tkinter, idlelib) are left out.
STDLIB_MODULES = tuple(
    sorted(
        """abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs
        collections collections.abc colorsys compileall concurrent.futures configparser contextlib contextvars copy
        copyreg csv dataclasses datetime decimal difflib dis doctest email email.message email.utils enum filecmp
        fileinput fnmatch fractions ftplib functools gc getopt getpass gettext glob graphlib gzip hashlib heapq hmac
        html html.parser http http.client http.cookies http.server imaplib importlib importlib.metadata inspect io
        ipaddress itertools json keyword linecache locale logging logging.handlers lzma mailbox marshal math
        mimetypes multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pickletools pkgutil
        platform plistlib poplib pprint profile pstats queue quopri random re reprlib rlcompleter sched secrets
        select selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string
        stringprep struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time
        timeit token tokenize tomllib trace traceback tracemalloc types typing unicodedata unittest unittest.mock
        urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref wsgiref.simple_server
        xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client zipapp zipfile zlib zoneinfo""".split()
    )
)
CHUNK_CHARS = 600  # chunks are whole paragraphs joined up to about this many characters
MIN_CHUNK_CHARS = 40
HELDOUT_PERCENT = 5


def _clean(text: str) -> str:
    """ASCII-fold and normalise whitespace to single spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return " ".join(text.split())


def _docstrings(module_name: str) -> list[str]:
    """Docstrings of a module, its public classes and functions, and their public methods, in a sorted order."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing from this Python build (e.g. no _ssl) is simply skipped
        return []
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # skip private names and re-exports (they are collected in their home module)
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj))
            for member_name, member in sorted(vars(obj).items()):
                is_method = inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                if is_method and not member_name.startswith("_"):
                    docs.append(inspect.getdoc(member))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            docs.append(inspect.getdoc(obj))
    return [d for d in docs if d]


def _chunks(doc: str) -> list[str]:
    paragraphs = [_clean(p) for p in re.split(r"\n\s*\n", doc)]
    chunks, current = [], ""
    for p in paragraphs:
        if not p:
            continue
        if current and len(current) + 1 + len(p) > CHUNK_CHARS:
            chunks.append(current)
            current = p
        else:
            current = f"{current} {p}" if current else p
    if current:
        chunks.append(current)
    return [c for c in chunks if len(c) >= MIN_CHUNK_CHARS]


def text_split_of(chunk: str) -> str:
    """"heldout" for about HELDOUT_PERCENT% of chunks, chosen by a hash of the text (stable across runs)."""
    h = int.from_bytes(hashlib.sha1(chunk.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


@lru_cache(maxsize=1)
def _all_text_chunks() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # the language reference's help topics, shipped with pydoc

    with warnings.catch_warnings():  # importing and inspecting old modules (typing.io, ...) warns of deprecations
        warnings.simplefilter("ignore")
        docs = [doc for name in STDLIB_MODULES for doc in _docstrings(name)]
    docs += [topics[key] for key in sorted(topics)]
    seen, chunks = set(), []
    for doc in docs:
        for chunk in _chunks(doc):
            if chunk not in seen:
                seen.add(chunk)
                chunks.append(chunk)
    return tuple(chunks)


def text_corpus(split: str = "train") -> list[str]:
    """English text chunks (≤ ~600 chars each): docstrings of STDLIB_MODULES, then pydoc's help topics.

    `split` is "train" or "heldout" (~5%, by hash of the chunk text: deterministic and disjoint)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; expected 'train' or 'heldout'")
    return [c for c in _all_text_chunks() if text_split_of(c) == split]


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


class FashionDataset(Dataset):
    """Fashion-MNIST as (image (3, 32, 32) in [-1, 1], caption). `labels` holds the class ids."""

    def __init__(self, split: str = "train"):
        self.images, self.labels = load_fashion_mnist(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return fashion_to_tensor(self.images[index])[0], fashion_caption(self.labels[index])


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


class TextDataset(Dataset):
    """Text chunks of the standard-library corpus."""

    def __init__(self, split: str = "train"):
        self.texts = text_corpus(split)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]
