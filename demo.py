"""Run the bundled Transfusion checkpoint offline: images from text and captions of real Fashion-MNIST test images.

    python demo.py [--model checkpoints/transfusion-tiny] [--out outputs/demo]

Writes a PNG grid (one generated image per prompt, then the captioned test images) and a JSON with the captions.
With `--random-tiny` (or when the bundled checkpoint is missing) it builds a tiny random model instead, which only
shows that the whole path runs.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines import TransfusionPipeline  # noqa: E402

DEFAULT_MODEL = ROOT / "checkpoints" / "transfusion-tiny"
PROMPTS = [
    "a photo of a t-shirt",
    "a photo of a trouser",
    "a photo of a dress",
    "a photo of a sneaker",
    "a photo of a bag",
    "a photo of a ankle boot",
    "a red circle",
    "a blue square",
    "a yellow triangle",
    "a green circle to the left of a red square",
    "two blue triangles",
    "three yellow circles",
]


def random_tiny_pipeline() -> TransfusionPipeline:
    from diffusers import DDIMScheduler

    from modeling_transfusion import TransfusionConfig, TransfusionForCausalLM, build_tokenizer

    tokenizer = build_tokenizer(PROMPTS * 10, vocab_size=300)
    model = TransfusionForCausalLM(TransfusionConfig.from_preset("tiny")).eval()
    scheduler = DDIMScheduler.from_config(model.config.scheduler_config())
    return TransfusionPipeline(transformer=model, scheduler=scheduler, tokenizer=tokenizer)


def fashion_test_images(n: int):
    from training.datasets import FASHION_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    picks = list(range(0, len(labels), max(len(labels) // n, 1)))[:n]
    return [Image.fromarray(images[i]) for i in picks], [FASHION_CLASSES[int(labels[i])] for i in picks]


def grid(tiles: list[Image.Image], labels: list[str], columns: int = 6, scale: int = 4) -> Image.Image:
    size = tiles[0].width * scale
    rows = (len(tiles) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * size, rows * (size + 24)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x, y = (i % columns) * size, (i // columns) * (size + 24)
        canvas.paste(tile.convert("RGB").resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 2, y + size + 4), label[:22], fill="black")
    return canvas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a saved TransfusionPipeline folder")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the scheduler's own)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--captions", type=int, default=6, help="number of Fashion-MNIST test images to caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-tiny", action="store_true", help="use a tiny random model (path check only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_path = Path(args.model)
    if args.random_tiny or not (model_path / "model_index.json").exists():
        if not args.random_tiny:
            print(f"No checkpoint at {model_path}; using a tiny random model (images and captions are noise)")
        pipe, name = random_tiny_pipeline(), "random tiny model"
    else:
        pipe, name = TransfusionPipeline.from_pretrained(model_path), str(model_path)
    steps = args.steps or getattr(pipe.scheduler.config, "default_inference_steps", None) or 25
    print(f"Model: {name} ({sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.1f}M parameters)")

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=args.guidance, generator=generator).images
    generation_seconds = time.perf_counter() - start

    real, truth = fashion_test_images(args.captions)
    captions = pipe.caption(real)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = images + real
    labels = PROMPTS + [f"says: {c}" for c in captions]
    grid(tiles, labels).save(out / "grid.png")
    report = {
        "model": name,
        "steps": steps,
        "guidance_scale": args.guidance,
        "generation_seconds": round(generation_seconds, 2),
        "prompts": PROMPTS,
        "captions": [{"true_class": t, "caption": c} for t, c in zip(truth, captions)],
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    for t, c in zip(truth, captions):
        print(f"  caption of a test {t!r}: {c!r}")
    print(f"Generated {len(images)} images in {generation_seconds:.1f}s ({steps} steps, guidance {args.guidance})")
    print(f"Wrote {out / 'grid.png'} and {out / 'demo.json'}")


if __name__ == "__main__":
    main()
