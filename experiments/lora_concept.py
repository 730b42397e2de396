"""The LoRA concept experiment: teach the bundled model a shape the shapes world never had (`cross`; `purple` as a
colour), with the training library's LoRA fine-tuning, and judge before and after with an extended shapes detector
(docs/lora_and_conversion.md has the commands and the results).

    python -m experiments.lora_concept render --concept cross --output runs/cross-data     # png + txt folder
    python -m training.finetune_lora --data runs/cross-data --output runs/lora-cross
    python -m experiments.lora_concept evaluate --concept cross --adapter runs/lora-cross/final   # before/after
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from modeling_transfusion.lora_transfusion import check_adapter
from training.finetune_lora import DEFAULT_BASE
from training.models import load_base


# ----------------------------------------------------------------------------------------------------------------
# Concept experiment: a colour or a shape the shapes world never had
# ----------------------------------------------------------------------------------------------------------------
# name → (kind, RGB for a colour); purple's chromaticity is far from red, green, blue and yellow
NEW_CONCEPTS = {"purple": ("colour", (150, 50, 210)), "cross": ("shape", None)}
NEW_COLOUR = ("purple", NEW_CONCEPTS["purple"][1])
PLURALS = {"cross": "crosses"}


def concept_world(concept: str) -> tuple[dict, tuple]:
    """(palette, shapes) of the shapes world extended by `concept`."""
    from training.datasets import COLOURS, SHAPES

    if concept not in NEW_CONCEPTS:
        raise ValueError(f"concept={concept!r}; available: {sorted(NEW_CONCEPTS)}")
    kind, rgb = NEW_CONCEPTS[concept]
    return ({**COLOURS, concept: rgb} if kind == "colour" else dict(COLOURS)), (
        (*SHAPES, concept) if kind == "shape" else SHAPES
    )


def concept_shape_mask(shape: str, size: int) -> np.ndarray:
    """The shapes world's masks, plus `cross`: a plus sign whose arms are a third of the box wide."""
    from training.datasets import shape_mask

    if shape != "cross":
        return shape_mask(shape, size)
    c = np.abs((np.arange(size) + 0.5) - size / 2)  # pixel-centre distance from the box centre
    return (c[:, None] < size / 6) | (c[None, :] < size / 6)


def _concept_spec(rng: np.random.Generator, concept: str, kind: str | None = None):
    """A placed scene whose subject shows `concept` (a new colour, or a new shape in an old colour), with the shapes
    world's caption templates and geometry (placed as a red circle, then repainted/reshaped). `kind`: single |
    relation | count (default: drawn 2:1:1). Returns (caption, placed objects)."""
    from dataclasses import replace

    from training.datasets import COLOURS, RELATIONS, SHAPES, SceneSpec, place_objects

    is_colour = NEW_CONCEPTS[concept][0] == "colour"
    kind = kind or ("single", "single", "relation", "count")[rng.integers(4)]
    colour = concept if is_colour else tuple(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))] if is_colour else concept
    if kind == "single":
        spec = place_objects(rng, SceneSpec("single", "red", "circle"))
        caption = f"a {colour} {shape}"
    elif kind == "count":
        count = int(rng.integers(2, 4))
        spec = place_objects(rng, SceneSpec("count", "red", "circle", count=count))
        caption = f"{('two', 'three')[count - 2]} {colour} {PLURALS.get(shape, shape + 's')}"
    else:
        colour2, shape2 = tuple(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        scene = SceneSpec("relation", "red", "circle", relation=relation, colour2=colour2, shape2=shape2)
        spec = place_objects(rng, scene)
        caption = f"a {colour} {shape} {relation} a {colour2} {shape2}"
    objects = [replace(spec.objects[0], colour=colour, shape=shape)] + [
        replace(o, colour=colour, shape=shape) if kind == "count" else o for o in spec.objects[1:]
    ]
    return caption, objects


def render_objects(objects, palette: dict) -> np.ndarray:
    """Draw placed objects on black with `palette` colours, as `training.datasets.render_scene` does: uint8
    (32, 32, 3)."""
    from training.datasets import IMAGE_SIZE

    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for obj in objects:
        region = image[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size]
        region[concept_shape_mask(obj.shape, obj.size)] = palette[obj.colour]
    return image


def render_concept(args) -> Path:
    """Write a png + txt folder: `--count` scenes showing the new concept and `--replay` ordinary training scenes."""
    from training.datasets import shapes_images

    palette, _ = concept_world(args.concept)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([args.seed, 7])
    for i in range(args.count):
        caption, objects = _concept_spec(rng, args.concept)
        PIL.Image.fromarray(render_objects(objects, palette)).save(out / f"{args.concept}-{i:05d}.png")
        (out / f"{args.concept}-{i:05d}.txt").write_text(caption + "\n")
    images, captions = shapes_images(args.replay, "train", seed=args.seed + 1000)
    for i, (image, caption) in enumerate(zip(images, captions)):
        PIL.Image.fromarray(image).save(out / f"replay-{i:05d}.png")
        (out / f"replay-{i:05d}.txt").write_text(caption + "\n")
    print(f"wrote {args.count} '{args.concept}' scenes and {args.replay} replay scenes (png + txt) to {out}/")
    return out


def classify_concept_shape(mask: np.ndarray) -> str:
    """`evaluation.detector.classify_shape`, plus `cross`: centre filled, all four 2×2 box corners empty and at most
    72% of the box filled (a circle of this size has pixels in its corner patches, a square fills them)."""
    from evaluation.detector import classify_shape

    h, w = mask.shape
    corners = mask[:2, :2].any() or mask[:2, -2:].any() or mask[-2:, :2].any() or mask[-2:, -2:].any()
    if min(h, w) >= 6 and mask[h // 2, w // 2] and not corners and mask.mean() <= 0.72:
        return "cross"
    return classify_shape(mask)


def detect_concept_objects(image: np.ndarray, palette: dict, min_pixels: int = 12) -> list[tuple[str, str]]:
    """(colour, shape) of the objects in a uint8 image, with the shapes world's detector rules over `palette`
    (nearest chromaticity, bright cores, connected components) and `classify_concept_shape`."""
    from scipy import ndimage

    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float64)  # (K, 3)
    chroma_ref = colours / colours.max(axis=1, keepdims=True)
    rgb = np.asarray(image, dtype=np.float64)
    brightness = rgb.max(axis=-1)  # (H, W)
    chroma = rgb / np.maximum(brightness, 1.0)[..., None]
    distance = np.linalg.norm(chroma[..., None, :] - chroma_ref, axis=-1)  # (H, W, K)
    labels = np.where((brightness >= 60) & (distance.min(-1) <= 0.35), distance.argmin(-1), -1)
    found = []
    for k, name in enumerate(names):
        components, _ = ndimage.label((labels == k) & (brightness >= 0.5 * colours[k].max()))
        for i, box in enumerate(ndimage.find_objects(components), start=1):
            mask = components[box] == i
            if mask.sum() >= min_pixels:
                found.append((name, classify_concept_shape(mask)))
    return found


def _generate(pipe, prompts, steps, guidance, seed, batch=16) -> list[np.ndarray]:
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generator = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np")
        images += [(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for x in out.images]
    return images


def concept_scores(pipe, concept: str, per_prompt: int, steps: int, guidance: float, seed: int) -> dict:
    """Scores on the new concept (generation and captioning) and on the old world (forgetting)."""
    from training.datasets import COLOURS, SHAPES, heldout_prompts
    from evaluation.detector import detect, score_prompt

    palette, _ = concept_world(concept)
    is_colour = NEW_CONCEPTS[concept][0] == "colour"
    others = SHAPES if is_colour else tuple(COLOURS)
    scores = {}
    # new concept, text → image: "a purple {shape}" / "a {colour} cross"
    wanted = [(concept, o) if is_colour else (o, concept) for o in others for _ in range(per_prompt)]
    generated = _generate(pipe, [f"a {c} {s}" for c, s in wanted], steps, guidance, seed)
    found = [detect_concept_objects(im, palette) for im in generated]
    scores["_samples"] = generated[::per_prompt]  # one image per prompt, for --grid
    scores["new_concept_present"] = float(np.mean([any(concept in obj for obj in f) for f in found]))
    scores["new_concept_exact"] = float(np.mean([w in f for w, f in zip(wanted, found)]))
    scores["new_prompt_count"] = len(wanted)
    # new concept, image → text: captions of rendered single objects
    rng = np.random.default_rng([seed, 11])
    images, truths = [], []
    for _ in range(len(others) * per_prompt):
        caption, objects = _concept_spec(rng, concept, kind="single")
        images.append(PIL.Image.fromarray(render_objects(objects, palette)))
        truths.append(caption)
    captions = pipe.caption(images, max_new_tokens=8)
    scores["new_caption_exact"] = float(np.mean([c == t for c, t in zip(captions, truths)]))
    scores["new_caption_names_concept"] = float(np.mean([concept in c.split() for c in captions]))
    # old concepts, text → image: the GenEval-style held-out prompts of the shapes world, scored by the detector
    old = heldout_prompts(5 * per_prompt, seed=seed)
    old_images = _generate(pipe, [p.caption for p in old], steps, guidance, seed + 10_000)
    per_category: dict[str, list[bool]] = {}
    for prompt, image in zip(old, old_images):
        per_category.setdefault(prompt.category, []).append(score_prompt(prompt.spec, detect(image))[prompt.category])
    scores |= {f"old_{k}": float(np.mean(v)) for k, v in sorted(per_category.items())}
    scores["old_prompt_count"] = len(old)
    return scores


def vae_roundtrip_scores(model, concept: str, n: int, seed: int) -> dict:
    """The ceiling for generation: how often the concept (with the right colour and shape) survives the VAE
    (encode → decode) of rendered single objects; `rendered` checks the detector on the renderings themselves."""
    from training.datasets import rgb_to_tensor, tensor_to_rgb

    palette, _ = concept_world(concept)
    rng = np.random.default_rng([seed, 13])
    scenes = [_concept_spec(rng, concept, kind="single")[1] for _ in range(n)]
    images = np.stack([render_objects(objects, palette) for objects in scenes])
    with torch.no_grad():
        decoded = tensor_to_rgb(model.decode_latents(model.encode_images(rgb_to_tensor(images))))
    wanted = [(objects[0].colour, objects[0].shape) for objects in scenes]
    return {
        "rendered": float(np.mean([w in detect_concept_objects(im, palette) for w, im in zip(wanted, images)])),
        "vae_decoded": float(np.mean([w in detect_concept_objects(im, palette) for w, im in zip(wanted, decoded)])),
    }


def evaluate_concept(args) -> dict:
    """Score the base model, then the base model with the adapter, on the concept and on the old world."""
    from diffusers import DDIMScheduler

    from modeling_transfusion import TransfusionPipeline

    if args.adapter:
        check_adapter(args.adapter)  # before minutes of scoring the base model
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base(args.base)
    scheduler = DDIMScheduler.from_config(model.config.scheduler_config())
    pipe = TransfusionPipeline(transformer=model.eval(), scheduler=scheduler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    results = {"concept": args.concept, "base": args.base, "adapter": args.adapter, "per_prompt": args.per_prompt,
               "steps": args.steps, "guidance": args.guidance, "seed": args.seed}  # fmt: skip
    started = time.time()
    results["vae_roundtrip"] = vae_roundtrip_scores(model, args.concept, 3 * args.per_prompt, args.seed)
    if not args.skip_base:
        results["before"] = concept_scores(pipe, args.concept, args.per_prompt, args.steps, args.guidance, args.seed)
    if args.adapter:
        pipe.load_lora_weights(args.adapter)
        results["after"] = concept_scores(pipe, args.concept, args.per_prompt, args.steps, args.guidance, args.seed)
    results["seconds"] = round(time.time() - started, 1)
    samples = {k: results[k].pop("_samples") for k in ("before", "after") if k in results}
    if args.grid and samples:
        rows = [np.concatenate(images, axis=1) for images in samples.values()]  # one row per model
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid = PIL.Image.fromarray(np.concatenate(rows, axis=0))
        grid.resize((grid.width * 4, grid.height * 4), PIL.Image.NEAREST).save(args.grid)
        print(f"wrote {args.grid} (rows: {', '.join(samples)}; one image per prompt)")
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")
    return results


def build_concept_parsers() -> dict[str, argparse.ArgumentParser]:
    render = argparse.ArgumentParser(prog="python -m experiments.lora_concept render",
                                     description=render_concept.__doc__)  # fmt: skip
    render.add_argument("--concept", default="cross", choices=sorted(NEW_CONCEPTS), help="default: %(default)s")
    render.add_argument("--output", default="runs/cross-data", help="folder to write (default: %(default)s)")
    render.add_argument("--count", type=int, default=3000, help="scenes showing the new concept")
    render.add_argument("--replay", type=int, default=3000, help="ordinary training scenes mixed in against forgetting")
    render.add_argument("--seed", type=int, default=0)
    evaluate = argparse.ArgumentParser(prog="python -m experiments.lora_concept evaluate",
                                       description=evaluate_concept.__doc__ + " " + concept_scores.__doc__)  # fmt: skip
    evaluate.add_argument("--concept", default="cross", choices=sorted(NEW_CONCEPTS), help="default: %(default)s")
    evaluate.add_argument("--base", default=DEFAULT_BASE, help="pipeline or model folder (default: %(default)s)")
    evaluate.add_argument("--adapter", help="LoRA adapter folder; without it only the base model is scored")
    evaluate.add_argument("--skip-base", action="store_true", help="score only base + adapter")
    evaluate.add_argument("--per-prompt", type=int, default=16, help="images per prompt / category (default: 16)")
    evaluate.add_argument("--steps", type=int, default=25, help="DDIM steps")
    evaluate.add_argument("--guidance", type=float, default=3.0)
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--threads", type=int)
    evaluate.add_argument("--output", help="write the scores as JSON here")
    evaluate.add_argument("--grid", help="write a PNG of new-concept samples here (one row per model)")
    return {"render": render, "evaluate": evaluate}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = build_concept_parsers()
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m experiments.lora_concept {{{','.join(commands)}}} ... (--help for each)")
    args = commands[argv[0]].parse_args(argv[1:])
    return render_concept(args) if argv[0] == "render" else evaluate_concept(args)


if __name__ == "__main__":
    main()
