"""A deterministic detector for the shapes world, and GenEval-style scoring of an image against its prompt.

Pipeline: (1) foreground = pixels whose brightest channel is at least `min_brightness` (the background is black);
(2) each foreground pixel takes the nearest palette colour by *chromaticity* (RGB divided by its brightest
channel), so the darker fringes of blurred or generated objects keep their object's colour; pixels far from every
palette colour stay unassigned; (3) connected components per colour (scipy.ndimage.label) of the object cores,
pixels at least half as bright as their palette colour (dim fringes would bridge close objects); small components
are noise; (4) shape from the component: a triangle has much less area in its top half than in its bottom half;
of the rest, a square fills its bounding box, a circle ~79%.

    python -m evaluation.detector --n 500      # accuracy on freshly rendered scenes
"""

import argparse
import os
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from training.datasets import (
    COLOURS,
    EVAL_CATEGORIES,
    SceneSpec,
    parse_caption,
    relation_holds,
    render_scene,
    shapes_scene,
)

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64)  # (K, 3)
_CHROMA = _PALETTE / _PALETTE.max(axis=1, keepdims=True)  # (K, 3)
_BRIGHTNESS = _PALETTE.max(axis=1)  # (K,)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    centroid: tuple[float, float]  # (x, y) in pixel coordinates: x to the right, y downwards, pixel i spans [i, i+1)
    area: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive


def colour_labels(image: np.ndarray, min_brightness: float = 60.0, max_chroma_distance: float = 0.35) -> np.ndarray:
    """Per-pixel palette index (H, W) for uint8 (H, W, 3); -1 for background or no palette colour close enough."""
    rgb = np.asarray(image, dtype=np.float64)
    brightness = rgb.max(axis=-1)  # (H, W)
    chroma = rgb / np.maximum(brightness, 1.0)[..., None]  # (H, W, 3)
    dist = np.linalg.norm(chroma[..., None, :] - _CHROMA, axis=-1)  # (H, W, K)
    labels = dist.argmin(-1)
    ok = (brightness >= min_brightness) & (dist.min(-1) <= max_chroma_distance)
    return np.where(ok, labels, -1)


def classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle from a boolean mask cropped to the object's bounding box."""
    h, w = mask.shape
    area = mask.sum()
    top, bottom = mask[: h // 2].sum(), mask[(h + 1) // 2 :].sum()  # the middle row of an odd box counts for neither
    if top < 0.6 * bottom:
        return "triangle"
    return "square" if area / (h * w) > 0.89 else "circle"


def detect(image: np.ndarray, min_pixels: int = 12, core_fraction: float = 0.5, **label_kwargs) -> list[DetectedObject]:
    """Objects in a uint8 (32, 32, 3) image, in reading order of their centroids (top to bottom, left to right)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got shape {image.shape}")
    labels = colour_labels(image, **label_kwargs)
    brightness = image.astype(np.float64).max(axis=-1)  # (H, W)
    objects = []
    for k, name in enumerate(_NAMES):
        # components of the object cores: the dim fringes of soft images would bridge close objects
        core = (labels == k) & (brightness >= core_fraction * _BRIGHTNESS[k])
        components, _ = ndimage.label(core)  # 4-connectivity
        for i, box in enumerate(ndimage.find_objects(components), start=1):
            mask = components == i
            area = int(mask.sum())
            if area < min_pixels:
                continue
            ys, xs = np.nonzero(mask)
            objects.append(
                DetectedObject(
                    colour=name,
                    shape=classify_shape(mask[box]),
                    centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
                    area=area,
                    bbox=(box[1].start, box[0].start, box[1].stop - 1, box[0].stop - 1),
                )
            )
    objects.sort(key=lambda o: (round(o.centroid[1]), o.centroid[0]))
    return objects


def score_prompt(spec_or_caption: SceneSpec | str, detections: list[DetectedObject]) -> dict[str, bool]:
    """GenEval-style checks of detections against a prompt; keys are the categories the prompt's kind answers.

    single   → {"single_object": a detection has the shape, "colour": a detection has the shape and the colour}
    relation → {"two_objects": both named objects detected, "position": some such pair satisfies the relation}
    count    → {"counting": exactly `count` detections of that colour and shape}
    (see `training.datasets.heldout_prompts` for the categories; take `result[prompt.category]`.)
    """
    spec = parse_caption(spec_or_caption) if isinstance(spec_or_caption, str) else spec_or_caption
    same = [d for d in detections if (d.colour, d.shape) == (spec.colour, spec.shape)]
    if spec.kind == "single":
        return {"single_object": any(d.shape == spec.shape for d in detections), "colour": bool(same)}
    if spec.kind == "count":
        return {"counting": len(same) == spec.count}
    others = [d for d in detections if (d.colour, d.shape) == (spec.colour2, spec.shape2)]
    return {
        "two_objects": bool(same) and bool(others),
        "position": any(relation_holds(a.centroid, b.centroid, spec.relation) for a in same for b in others),
    }


def _at(d: DetectedObject, obj, tolerance: float = 2.0) -> bool:
    """The detection lies on the placed object: same colour and shape, centroid in its box (± `tolerance` px)."""
    x, y = d.centroid
    low_x, low_y, high = obj.x - tolerance, obj.y - tolerance, obj.size + 2 * tolerance
    inside = low_x <= x <= low_x + high and low_y <= y <= low_y + high
    return (d.colour, d.shape) == (obj.colour, obj.shape) and inside


def score_edit(edit, detections: list[DetectedObject]) -> dict[str, bool]:
    """Whether an edited image did what `edit` (a `training.datasets.instruct.Edit`) asked, and kept the rest.

    success:    recolour — the object in the new colour where it was, and not in the old one; move — the moved object
                `relation` the other; add — the new object there (and `relation` the other when the instruction says
                where); remove — no object of that colour and shape left; count — exactly the new count of them.
    preserved:  every object the instruction did not name is still there: same colour, shape and place (for a count
                made smaller, every one left stands where one stood).
    """
    def of(colour, shape):
        return [d for d in detections if (d.colour, d.shape) == (colour, shape)]

    if edit.kind == "recolour":
        (new,) = edit.changed
        (old,) = [o for o in edit.source if (o.x, o.y) == (new.x, new.y)]
        success = any(_at(d, new) for d in detections) and not any(_at(d, old) for d in detections)
    elif edit.kind in ("move", "add"):
        (obj,) = edit.changed
        found = of(obj.colour, obj.shape)
        if edit.relation is None:
            success = bool(found)
        else:
            refs = of(edit.reference.colour, edit.reference.shape)
            success = any(relation_holds(a.centroid, b.centroid, edit.relation) for a in found for b in refs)
    elif edit.kind == "remove":
        (gone,) = edit.removed
        success = not of(gone.colour, gone.shape)
    else:  # count
        colour, shape = edit.target[0].colour, edit.target[0].shape
        success = len(of(colour, shape)) == len(edit.target)
    if edit.kind == "count" and len(edit.target) < len(edit.source):
        preserved = all(any(_at(d, o) for o in edit.source) for d in of(edit.source[0].colour, edit.source[0].shape))
    else:
        preserved = all(any(_at(d, o) for d in detections) for o in edit.kept)
    return {"success": bool(success), "preserved": bool(preserved)}


def detection_matches_scene(spec: SceneSpec, detections: list[DetectedObject]) -> bool:
    """Exactly the placed objects, same colours and shapes, each centroid inside its object's bounding box."""
    if len(detections) != len(spec.objects):
        return False
    unmatched = list(detections)
    for obj in spec.objects:
        for d in unmatched:
            inside = obj.x <= d.centroid[0] <= obj.x + obj.size and obj.y <= d.centroid[1] <= obj.y + obj.size
            if (d.colour, d.shape) == (obj.colour, obj.shape) and inside:
                unmatched.remove(d)
                break
        else:
            return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="scenes per split to render and check")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "1")))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for split in ("train", "heldout"):
        specs = [shapes_scene(i, split, args.seed) for i in range(args.n)]
        exact = np.mean([detection_matches_scene(s, detect(render_scene(s))) for s in specs])
        passed = {c: [] for c in EVAL_CATEGORIES}
        for s in specs:
            for category, ok in score_prompt(s, detect(render_scene(s))).items():
                passed[category].append(ok)
        summary = ", ".join(f"{c} {np.mean(v):.3f}" for c, v in passed.items() if v)
        print(f"{split}: {args.n} rendered scenes, exact detection {exact:.4f}; prompt checks: {summary}")
    print("(nothing written)")


if __name__ == "__main__":
    main()
