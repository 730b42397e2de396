"""Instruction data, generated: edits of shapes scenes, requests to draw, questions about a picture, and multi-turn
conversations, all as conversations (``[{"role": "user" | "assistant", "content": [...]}, ...]``, laid out by the
processor).

Edits
-----
A source scene of one to three objects (the shapes world's objects, sizes and gaps) and one change:

- ``recolour``: one object takes another colour, in place;
- ``move``:     one of two objects goes to the left of / right of / above / below the other, which stays;
- ``add``:      a new object, anywhere or beside the one object there is;
- ``remove``:   one of two or three different objects goes;
- ``count``:    one to three identical objects become another count of them ("add another …", "make it three …").

Every instruction has several phrasings (:data:`EDIT_TEMPLATES`). Held out from training (:data:`HELDOUT_EDITS`): a
few (kind, what changes) combinations, e.g. recolouring a circle blue, so evaluation asks for edits never shown; no
scene of an edit, before or after, is one of the shapes world's held-out relation pairs or counts.

Conversations
-------------
- ``draw``: "draw a red circle" / "please make a picture of …" / "show me …" → the image (shapes and Fashion-MNIST);
- ``ask``:  an image and "what is in this picture?", "what colour is the circle?", "how many squares are there?",
  "is there a blue square?" (Fashion-MNIST: "what is this?") → a short answer in text;
- ``multi``: draw, then edit the result ("now make the circle blue").

Each example is a pure function of (seed, split, index), as in the shapes world. Registered as two training sources:
``edit`` (the edits) and ``chat`` (the conversations), to weight in ``--mix``.
"""

import argparse
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from .base import ImageCaptionSource, Source, register_dataset, rgb_to_tensor
from .fashion_mnist import FASHION_CLASSES, fashion_caption, fashion_to_tensor, load_fashion_mnist
from .shapes import (
    COLOURS,
    COUNT_WORDS,
    HELDOUT_COUNTS,
    HELDOUT_RELATION_PAIRS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    PlacedObject,
    _boxes_apart,
    _random_object,
    _relation_rendered_clearly,
    shape_mask,
    shapes_scene,
)

EDIT_KINDS = ("recolour", "move", "add", "remove", "count")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# {kind: phrasings}; {o} names an object ("red circle"), {s} a shape, {c}/{c2} colours, {r} a relation, {n} a count
EDIT_TEMPLATES = {
    "recolour": ("make the {o} {c2}", "change the {o} to {c2}", "paint the {o} {c2}", "turn the {o} {c2}",
                 "recolour the {o} {c2}"),  # fmt: skip
    "move": ("move the {o} {r} the {o2}", "put the {o} {r} the {o2}", "place the {o} {r} the {o2}",
             "move the {o} so it is {r} the {o2}"),  # fmt: skip
    "add": ("add a {o}", "put a {o} in the picture", "draw a {o} too", "add a {o} {r} the {o2}",
            "put a {o} {r} the {o2}"),  # fmt: skip
    "remove": ("remove the {o}", "delete the {o}", "take away the {o}", "get rid of the {o}"),
    "more": ("add another {o}", "add one more {o}", "make it {n} {o}s"),
    "fewer": ("remove one of the {o}s", "take away one {o}", "make it {n} {o}s"),
}
DRAW_TEMPLATES = ("draw {}", "please draw {}", "please make a picture of {}", "show me {}", "can you draw {}?",
                  "make an image of {}", "i would like a picture of {}")  # fmt: skip
DESCRIBE_QUESTIONS = ("what is in this picture?", "what do you see?", "describe the picture", "what is this?")
THEN_TEMPLATES = ("now {}", "{}", "then {}", "and now {}")

# Edits never shown in training: (kind, what changes). recolour: (new colour, shape); move: (shape moved, relation);
# add: (colour, shape) added; remove: (colour, shape) removed; count: (new count, shape).
HELDOUT_EDITS = frozenset({
    ("recolour", ("blue", "circle")), ("recolour", ("yellow", "triangle")), ("recolour", ("red", "square")),
    ("move", ("triangle", "above")), ("move", ("circle", "to the right of")),
    ("add", ("green", "square")), ("add", ("red", "triangle")),
    ("remove", ("yellow", "circle")), ("remove", ("blue", "square")),
    ("count", (3, "triangle")), ("count", (1, "square")),
})  # fmt: skip


@dataclass(frozen=True)
class Edit:
    """A source scene, an instruction and the scene it asks for. `changed` names the objects of `target` the edit
    made or moved (empty for a removal); `removed` the source objects that went; every other object must stay."""

    kind: str
    instruction: str
    source: tuple[PlacedObject, ...]
    target: tuple[PlacedObject, ...]
    changed: tuple[PlacedObject, ...]
    removed: tuple[PlacedObject, ...] = ()
    relation: str | None = None  # move/add beside: changed[0] must be `relation` reference
    reference: PlacedObject | None = None
    signature: tuple = ()

    @property
    def split(self) -> str:
        return "heldout" if (self.kind, self.signature) in HELDOUT_EDITS else "train"

    @property
    def kept(self) -> tuple[PlacedObject, ...]:
        """The objects the edit must leave as they were (colour, shape and place)."""
        return tuple(o for o in self.target if o not in self.changed)


def render_objects(objects) -> np.ndarray:
    """Draw placed objects on black: uint8 (32, 32, 3)."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for obj in objects:
        image[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size][shape_mask(obj.shape, obj.size)] = COLOURS[obj.colour]
    return image


def _name(obj: PlacedObject) -> str:
    return f"{obj.colour} {obj.shape}"


def _scene_is_heldout(objects) -> bool:
    """A scene that shows one of the shapes world's held-out relation pairs or counts."""
    kinds = {(o.colour, o.shape) for o in objects}
    if any(frozenset({a, b}) in HELDOUT_RELATION_PAIRS for a in kinds for b in kinds if a != b):
        return True
    return any((sum((o.colour, o.shape) == k for o in objects), *k) in HELDOUT_COUNTS for k in kinds)


def _place(rng, colour, shape, others, tries=2000, fits=None) -> PlacedObject | None:
    """A new object apart from `others` (and satisfying `fits`), or None."""
    for _ in range(tries):
        obj = _random_object(rng, colour, shape)
        if all(_boxes_apart(obj, o) for o in others) and (fits is None or fits(obj)):
            return obj
    return None


def _objects(rng, kinds) -> list[PlacedObject] | None:
    placed = []
    for colour, shape in kinds:
        obj = _place(rng, colour, shape, placed)
        if obj is None:
            return None
        placed.append(obj)
    return placed


def _pick(rng, values):
    return values[int(rng.integers(len(values)))]


def _distinct_kinds(rng, n) -> list[tuple[str, str]]:
    """`n` different (colour, shape) objects, shapes different too so "the circle" names one."""
    shapes = list(rng.permutation(SHAPES))[:n]
    return [(_pick(rng, tuple(COLOURS)), str(s)) for s in shapes]


def _attempt(rng, kind) -> Edit | None:
    say = lambda key, **names: _pick(rng, EDIT_TEMPLATES[key]).format(**names)  # noqa: E731
    if kind == "recolour":
        source = _objects(rng, _distinct_kinds(rng, int(rng.integers(1, 4))))
        if source is None:
            return None
        i = int(rng.integers(len(source)))
        new = replace(source[i], colour=_pick(rng, [c for c in COLOURS if c != source[i].colour]))
        named = source[i].shape if rng.integers(2) else _name(source[i])  # shapes are distinct: either names it
        target = source[:i] + [new] + source[i + 1 :]
        return Edit(kind, say("recolour", o=named, c2=new.colour), tuple(source), tuple(target), (new,),
                    signature=(new.colour, new.shape))  # fmt: skip
    if kind == "move":
        source = _objects(rng, _distinct_kinds(rng, 2))
        if source is None:
            return None
        mover, ref = source if rng.integers(2) else source[::-1]
        relation = _pick(rng, RELATIONS)
        if _relation_rendered_clearly(mover, ref, relation):
            return None  # already there
        there = lambda o: _relation_rendered_clearly(o, ref, relation)  # noqa: E731
        moved = _place(rng, mover.colour, mover.shape, [ref], fits=there)
        if moved is None:
            return None
        target = [moved if o is mover else o for o in source]
        return Edit(kind, say("move", o=_name(mover), r=relation, o2=_name(ref)), tuple(source), tuple(target),
                    (moved,), relation=relation, reference=ref, signature=(mover.shape, relation))  # fmt: skip
    if kind == "add":
        n = int(rng.integers(1, 3))
        kinds = _distinct_kinds(rng, n + 1)
        source = _objects(rng, kinds[:n])
        if source is None:
            return None
        colour, shape = kinds[n]
        if n == 1 and rng.integers(2):  # beside the one object there is
            ref, relation = source[0], _pick(rng, RELATIONS)
            added = _place(rng, colour, shape, source, fits=lambda o: _relation_rendered_clearly(o, ref, relation))
            beside = [t for t in EDIT_TEMPLATES["add"] if "{r}" in t]
            text = _pick(rng, beside).format(o=f"{colour} {shape}", r=relation, o2=_name(ref))
        else:
            ref = relation = None
            added = _place(rng, colour, shape, source)
            text = _pick(rng, [t for t in EDIT_TEMPLATES["add"] if "{r}" not in t]).format(o=f"{colour} {shape}")
        if added is None:
            return None
        return Edit(kind, text, tuple(source), (*source, added), (added,), relation=relation, reference=ref,
                    signature=(colour, shape))  # fmt: skip
    if kind == "remove":
        source = _objects(rng, _distinct_kinds(rng, int(rng.integers(2, 4))))
        if source is None:
            return None
        gone = source[int(rng.integers(len(source)))]
        target = tuple(o for o in source if o is not gone)
        return Edit(kind, say("remove", o=_name(gone)), tuple(source), target, (), removed=(gone,),
                    signature=(gone.colour, gone.shape))  # fmt: skip
    colour, shape = _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES)  # count
    before = int(rng.integers(1, 4))
    after = _pick(rng, [k for k in (1, 2, 3) if k != before])
    source = _objects(rng, [(colour, shape)] * before)
    if source is None:
        return None
    if after > before:
        extra = _objects_after(rng, source, [(colour, shape)] * (after - before))
        if extra is None:
            return None
        target, changed, removed, key = (*source, *extra), tuple(extra), (), "more"
    else:
        keep = sorted(rng.choice(before, after, replace=False).tolist())
        target, changed = tuple(source[k] for k in keep), ()
        removed = tuple(o for k, o in enumerate(source) if k not in keep)
        key = "fewer"
    phrasings = [t for t in EDIT_TEMPLATES[key] if "{n}" in t or abs(after - before) == 1]
    text = _pick(rng, phrasings).format(o=f"{colour} {shape}", n=NUMBER_WORDS[after])
    text = text.replace("make it one ", "make it a ").replace(f"a {colour} {shape}s", f"a {colour} {shape}")
    return Edit("count", text, tuple(source), target, changed, removed=removed, signature=(after, shape))


def _objects_after(rng, placed, kinds) -> list[PlacedObject] | None:
    out = []
    for colour, shape in kinds:
        obj = _place(rng, colour, shape, [*placed, *out])
        if obj is None:
            return None
        out.append(obj)
    return out


def sample_edit(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> Edit:
    """An edit of `split` ("train": not held out; "heldout": only the held-out edits). Deterministic given rng."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; expected 'train' or 'heldout'")
    for _ in range(100_000):
        edit = _attempt(rng, kind or _pick(rng, EDIT_KINDS))
        if edit is None or edit.split != split:
            continue
        if _scene_is_heldout(edit.source) or _scene_is_heldout(edit.target):
            continue
        return edit
    raise RuntimeError(f"no {split} {kind or ''} edit found")


@lru_cache(maxsize=4096)
def edit_example(index: int, split: str = "train", seed: int = 0) -> Edit:
    """The `index`-th edit of a split, from its own RNG seeded by (seed, split, index)."""
    rng = np.random.default_rng([seed, 10 if split == "train" else 11, index])
    return sample_edit(rng, split, EDIT_KINDS[index % len(EDIT_KINDS)] if split == "heldout" else None)


def heldout_edits(n: int, seed: int = 0) -> list[Edit]:
    """`n` held-out edits for evaluation, the kinds in turn."""
    return [edit_example(i, "heldout", seed) for i in range(n)]


def draw_request(caption: str, rng) -> str:
    """A caption phrased as a request to draw it."""
    return _pick(rng, DRAW_TEMPLATES).format(caption)


# -- questions ---------------------------------------------------------------------------------------------------


def scene_questions(objects, caption: str) -> list[tuple[str, str]]:
    """(question, answer) pairs a scene answers exactly: what it shows, the colour of a shape that occurs once, how
    many of each shape, whether an object is there."""
    pairs = [(q, caption) for q in DESCRIBE_QUESTIONS]
    for shape in SHAPES:
        same = [o for o in objects if o.shape == shape]
        count = len(same)
        plural = f"{shape}s"
        pairs.append((f"how many {plural} are there?", NUMBER_WORDS.get(count, "none")))
        if count == 1:
            pairs.append((f"what colour is the {shape}?", same[0].colour))
    for colour in COLOURS:
        for shape in SHAPES:
            there = any((o.colour, o.shape) == (colour, shape) for o in objects)
            pairs.append((f"is there a {colour} {shape}?", "yes" if there else "no"))
    return pairs


def _question(rng, objects, caption) -> tuple[str, str]:
    pairs = scene_questions(objects, caption)
    kinds = {"describe": pairs[: len(DESCRIBE_QUESTIONS)],
             "count": [p for p in pairs if p[0].startswith("how many") and p[1] != "none"],
             "colour": [p for p in pairs if p[0].startswith("what colour")],
             "there": [p for p in pairs if p[0].startswith("is there")]}  # fmt: skip
    present = [p for p in kinds["there"] if p[1] == "yes"]
    kinds["there"] = present + [_pick(rng, [p for p in kinds["there"] if p[1] == "no"])] * len(present)
    options = [k for k, v in kinds.items() if v]
    return _pick(rng, kinds[_pick(rng, options)])


CHAT_KINDS = ("draw", "ask", "multi")
CHAT_KIND_PROBS = (0.4, 0.4, 0.2)


@dataclass(frozen=True)
class ChatExample:
    """One conversation: `turns` of (role, content) with images as ("shapes", objects) or ("fashion", index)."""

    kind: str
    turns: tuple
    answer: str | None = None  # the assistant's text answer (ask)


def chat_example(index: int, split: str = "train", seed: int = 0, fashion_labels=None) -> ChatExample:
    """The `index`-th conversation of a split. `fashion_labels` (the Fashion-MNIST labels of the split) adds its
    images to draw requests and "what is this?" questions; "heldout" draws shapes scenes from the held-out split."""
    rng = np.random.default_rng([seed, 20 if split == "train" else 21, index])
    kind = CHAT_KINDS[rng.choice(3, p=CHAT_KIND_PROBS)]
    if kind == "multi":
        edit = sample_edit(rng, split if split == "train" else "train")
        caption = _objects_caption(edit.source)
        request = draw_request(caption, rng) if caption else None
        if request is None:
            kind = "draw"
        else:
            then = _pick(rng, THEN_TEMPLATES).format(edit.instruction)
            return ChatExample("multi", (("user", request), ("assistant", ("shapes", edit.source)),
                                         ("user", then), ("assistant", ("shapes", edit.target))))  # fmt: skip
    if fashion_labels is not None and rng.random() < 0.3:
        i = int(rng.integers(len(fashion_labels)))
        caption = fashion_caption(fashion_labels[i])
        if kind == "draw":
            return ChatExample("draw", (("user", draw_request(caption, rng)), ("assistant", ("fashion", i))))
        question = _pick(rng, DESCRIBE_QUESTIONS)
        answer = caption
        return ChatExample("ask", (("user", (("fashion", i), question)), ("assistant", answer)), answer)
    spec = shapes_scene(int(rng.integers(2**31)), split, seed)
    if kind == "draw":
        return ChatExample("draw", (("user", draw_request(spec.caption, rng)), ("assistant", ("shapes", spec.objects))))
    question, answer = _question(rng, spec.objects, spec.caption)
    return ChatExample("ask", (("user", (("shapes", spec.objects), question)), ("assistant", answer)), answer)


def _objects_caption(objects) -> str | None:
    """The shapes-world caption of a scene of one object or two identical ones, else None."""
    if len(objects) == 1:
        return f"a {_name(objects[0])}"
    kinds = {(o.colour, o.shape) for o in objects}
    if len(kinds) == 1 and len(objects) in COUNT_WORDS:
        colour, shape = kinds.pop()
        return f"{COUNT_WORDS[len(objects)]} {colour} {shape}s"
    return None


def heldout_questions(n: int, seed: int = 0) -> list[tuple[np.ndarray, str, str]]:
    """`n` (image, question, answer) triples on held-out shapes scenes (relation pairs and counts never trained)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 22, i])
        spec = shapes_scene(i, "heldout", seed)
        question, answer = _question(rng, spec.objects, spec.caption)
        out.append((render_objects(spec.objects), question, answer))
    return out


# -- training sources ----------------------------------------------------------------------------------------------


class _ListedImages(ImageCaptionSource):
    """The images of generated conversations, in order, as one image source for the latent cache."""

    verify_cached_captions = False  # generated from (seed, index): the cache key says which

    def __init__(self, name: str, images: list, tag: str):
        self.name, self.images, self.cache_tag = name, images, tag

    def __len__(self) -> int:
        return len(self.images)

    def captions(self, n: int) -> list[str]:
        return [f"{self.name}-{i}" for i in range(n)]

    def pixels(self, n: int, chunk: int = 1000):
        fashion = None
        for start in range(0, n, chunk):
            out = []
            for kind, value in self.images[start : min(n, start + chunk)]:
                if kind == "shapes":
                    out.append(rgb_to_tensor(render_objects(value))[0])
                else:
                    fashion = load_fashion_mnist("train")[0] if fashion is None else fashion
                    out.append(fashion_to_tensor(fashion[value])[0])
            yield torch.stack(out)


class _ConversationSource(Source):
    """Generated conversations as an interleaved source: `images` for the latent cache, `rows(latents)` the rows."""

    modality = "interleaved"

    def __init__(self, turns: list[tuple]):
        self.turns, images = turns, []
        for row in turns:
            for _, content in row:
                for part in content if isinstance(content, tuple) and not _is_image(content) else (content,):
                    if _is_image(part):
                        images.append(part)
        self.images = _ListedImages(f"{self.name}_images", images, f"{self.cache_tag}-n{len(images)}")

    def __len__(self) -> int:
        return len(self.turns)

    def rows(self, latents: torch.Tensor) -> list[list]:
        rows, k = [], 0
        for row in self.turns:
            messages = []
            for role, content in row:
                parts = []
                for part in content if isinstance(content, tuple) and not _is_image(content) else (content,):
                    parts.append(latents[k] if _is_image(part) else part)
                    k += _is_image(part)
                messages.append({"role": role, "content": parts})
            rows.append(messages)
        return rows


def _is_image(part) -> bool:
    return isinstance(part, tuple) and len(part) == 2 and part[0] in ("shapes", "fashion")


@register_dataset
class EditSource(_ConversationSource):
    """`count` training edits: the source image and the instruction from the user, the edited image as the answer."""

    name = "edit"
    cache_tag = "e1"

    def __init__(self, count: int = 20_000, seed: int = 0):
        edits = [edit_example(i, "train", seed) for i in range(count)]
        self.cache_tag = f"e1s{seed}"
        super().__init__([(("user", (("shapes", e.source), e.instruction)), ("assistant", ("shapes", e.target)))
                          for e in edits])  # fmt: skip

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--edit-count", type=int, default=20_000, help="generated edit examples (edit)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, image_size: int = 32) -> list[Source]:
        if not isinstance(args.edit_count, int) or args.edit_count < 1:
            raise ValueError(f"--edit-count={args.edit_count!r}; must be an integer ≥ 1 (edits to train on)")
        return [cls(count=args.edit_count)]


@register_dataset
class ChatSource(_ConversationSource):
    """`count` training conversations: draw requests, questions about an image and draw-then-edit exchanges."""

    name = "chat"

    def __init__(self, count: int = 20_000, seed: int = 0, fashion: bool = True):
        labels = load_fashion_mnist("train")[1] if fashion else None
        self.cache_tag = f"c1s{seed}{'f' if fashion else ''}"
        super().__init__([chat_example(i, "train", seed, labels).turns for i in range(count)])

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--chat-count", type=int, default=20_000, help="generated conversations (chat)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, image_size: int = 32) -> list[Source]:
        if not isinstance(args.chat_count, int) or args.chat_count < 1:
            raise ValueError(f"--chat-count={args.chat_count!r}; must be an integer ≥ 1 (conversations to train on)")
        return [cls(count=args.chat_count)]


__all__ = ["ChatExample", "ChatSource", "EDIT_KINDS", "Edit", "EditSource", "HELDOUT_EDITS", "FASHION_CLASSES",
           "chat_example", "draw_request", "edit_example", "heldout_edits", "heldout_questions", "render_objects",
           "sample_edit", "scene_questions"]  # fmt: skip
