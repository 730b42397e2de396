"""The evaluation suite: one command scores a Transfusion checkpoint on every task (text→image on Fashion-MNIST and
the shapes world, image→text, text perplexity) and writes JSON + a markdown table.

    python -m evaluation.evaluate --model checkpoints/transfusion-tiny --out results/transfusion-tiny.json
    python -m evaluation.evaluate --model runs/ablation-causal/final --tasks fashion,shapes --scheduler ddim --steps 25
    python -m evaluation.evaluate --compare results/a.json results/b.json [--plot results/a-vs-b.png]

Tasks (``--tasks``, comma-separated; default all):

- ``fashion``  text→image on Fashion-MNIST: ``--num-per-class`` images per class from ``a photo of a {name}``,
  scored by the repo's classifier (prompted-class accuracy) and by the Fréchet distance ("FD", not FID) of the
  classifier's features against real test images. Reference: the FD of the VAE's own reconstructions of as many real
  test images (the target is FD ≤ 1.5× that), and the FD of as many real images (the finite-sample floor).
- ``shapes``   text→image on held-out shapes-world prompts, scored GenEval-style by the deterministic detector per
  category (single object, two objects, counting, colour, position) and overall (the mean of the categories).
- ``caption``  image→text: greedy captions of Fashion-MNIST test images (exact caption and class-name accuracy) and of
  held-out shapes scenes (exact scene match, either orientation of a relation, and per-attribute accuracy).
- ``text``     held-out perplexity and bits per byte on the standard-library corpus; with ``--text-baseline`` the
  same for a text-only model and the ratio.
- ``vae``      the VAE alone: classifier accuracy on real test images vs their reconstructions, MSE, FD.
- ``edit``, ``instruct``, ``qa``  instruction following on held-out data: edits through `pipe(…, image=)`, requests to
  draw and questions about a picture through `pipe.chat` (:mod:`evaluation.instruct`).

Every metric is defined in docs/evaluation.md. Results depend only on the flags (seeded per image, so also not on
``--batch-size``); the JSON records them all.
"""

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_transfusion.scheduling_transfusion import SCHEDULER_NAMES
from training.datasets import (
    EVAL_CATEGORIES,
    FASHION_CLASSES,
    SceneSpec,
    fashion_caption,
    fashion_to_tensor,
    heldout_prompts,
    load_fashion_mnist,
    parse_caption,
    render_objects,
    render_scene,
    rgb_to_tensor,
    shapes_scene,
    tensor_to_rgb,
    text_corpus,
)
from evaluation import instruct
from evaluation.metrics import frechet_distance
from evaluation.report import compare_plot, compare_table, markdown_table, save_grid, summary_rows

TASKS = ("fashion", "shapes", "caption", "text", "vae", *instruct.INSTRUCT_TASKS)
FD_TARGET_RATIO = 1.5  # the target: FD of generated images ≤ 1.5 × FD of the VAE's reconstructions
# Seed streams: every generated image draws its noise from its own generator, seeded by (seed, stream, index).
STREAM_FASHION, STREAM_SHAPES = 1, 2
INVERSE_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


# ----------------------------------------------------------------------------------------------------------------
# Metric helpers (pure functions; the tests check them directly)
# ----------------------------------------------------------------------------------------------------------------


def balanced_indices(labels: np.ndarray, per_class: int, half: int) -> np.ndarray:
    """The first `per_class` test images of every class from one half of it, as sorted indices. Each class's images,
    in index order, alternate between half 0 (the FD reference set) and half 1 (reconstructions, real-vs-real FD,
    captions), so the halves are disjoint and hold 500 per class each."""
    if half not in (0, 1):
        raise ValueError(f"half={half}; expected 0 (reference) or 1 (samples)")
    labels = np.asarray(labels)
    picks = []
    for c in range(len(FASHION_CLASSES)):
        idx = np.nonzero(labels == c)[0][half::2][:per_class]
        if len(idx) < per_class:
            raise ValueError(f"per_class={per_class}: class {c} has only {len(idx)} test images in half {half}")
        picks.append(idx)
    return np.sort(np.concatenate(picks))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels of a saved 8-bit image, so metrics see what a PNG would hold."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def caption_class(caption: str) -> int | None:
    """The Fashion-MNIST class a caption names, or None if it names none or several ("t-shirt" is not "shirt")."""
    text = " ".join(caption.lower().split())
    found = {i for i, name in enumerate(FASHION_CLASSES) if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}
    return found.pop() if len(found) == 1 else None


def _oriented(predicted: SceneSpec, truth: SceneSpec) -> SceneSpec:
    """A relation caption can name its objects in either order ("A left of B" = "B right of A"): flip the prediction
    to the truth's order when its subject is the truth's second object."""
    if predicted.kind == "relation" and truth.kind == "relation":
        if (predicted.colour, predicted.shape) == (truth.colour2, truth.shape2):
            return SceneSpec(
                "relation",
                predicted.colour2,
                predicted.shape2,
                relation=INVERSE_RELATION[predicted.relation],
                colour2=predicted.colour,
                shape2=predicted.shape,
            )
    return predicted


def scene_caption_scores(caption: str, truth: SceneSpec) -> dict[str, float]:
    """How well a generated caption describes a shapes scene: `parsed` (it is a shapes-world caption), `exact` (it
    describes the same scene, either orientation of a relation) and `per_attribute` (share of the truth's fields
    kind, colour, shape, count, relation, colour2, shape2 — those it has — that the caption gets right)."""
    truth = truth.semantic()
    fields = ["kind", "colour", "shape", "count"]
    if truth.kind == "relation":
        fields += ["relation", "colour2", "shape2"]
    try:
        predicted = _oriented(parse_caption(caption), truth)
    except ValueError:
        return {"parsed": 0.0, "exact": 0.0, "per_attribute": 0.0, **{f: 0.0 for f in fields}}
    hits = {f: float(getattr(predicted, f) == getattr(truth, f)) for f in fields}
    per_attribute = float(np.mean(list(hits.values())))
    return {"parsed": 1.0, "exact": float(predicted == truth), "per_attribute": per_attribute, **hits}


def geneval_summary(passed: dict[str, list[bool]]) -> dict:
    """Per-category pass rates and GenEval's overall score: the unweighted mean over categories."""
    categories = {c: float(np.mean(v)) for c, v in passed.items() if v}
    return {"overall": float(np.mean(list(categories.values()))), "categories": categories}


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_target) over a sequence of `n_tokens`: every position from 1 on is a target exactly
    once, predicted with up to `window - 1` tokens of context; position 0 (`<|bos|>`) is never a target."""
    if window < 2 or not 0 < stride < window:
        raise ValueError(f"need window ≥ 2 and 0 < stride < window, got window={window}, stride={stride}")
    out, scored_to = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end > scored_to:
            out.append((begin, end, scored_to - begin))
            scored_to = end
        if end == n_tokens:
            break
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(path: str | os.PathLike, device: str = "cpu"):
    """A saved TransfusionPipeline folder (model_index.json), or a model folder as `training.train` writes it
    (`<output-dir>/final`: config.json + weights + tokenizer), which gets the model's own DDPM scheduler."""
    import modeling_transfusion  # noqa: F401  (registers the Auto classes)
    from modeling_transfusion import TransfusionPipeline

    path = Path(path)
    if (path / "model_index.json").exists():
        pipe = TransfusionPipeline.from_pretrained(path)
    elif (path / "config.json").exists():
        import diffusers

        model, tokenizer = load_language_model(path)
        config = model.config.scheduler_config()
        scheduler = getattr(diffusers, config.pop("_class_name")).from_config(config)
        pipe = TransfusionPipeline(transformer=model, scheduler=scheduler, tokenizer=tokenizer)
    else:
        raise FileNotFoundError(f"{path} is neither a pipeline folder (model_index.json) nor a model (config.json)")
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_language_model(path: str | os.PathLike):
    """(model, tokenizer) from a pipeline folder or a model folder (for the text task and its baseline)."""
    import modeling_transfusion  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if (path / "model_index.json").exists():
        model_dir, tokenizer_dir = path / "transformer", path / "tokenizer"
    elif (path / "config.json").exists():
        model_dir = tokenizer_dir = path
    else:
        raise FileNotFoundError(f"{path} is neither a pipeline folder (model_index.json) nor a model (config.json)")
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


def set_scheduler(pipe, name: str | None, overrides: dict | None = None) -> None:
    """Swap the pipeline's scheduler for `name` (see pipelines' SCHEDULER_NAMES; "euler" is flow-euler for a
    flow-matching model), built from its own config, then apply `overrides` to that config (e.g.
    {"algorithm_type": "sde-dpmsolver++"})."""
    from modeling_transfusion.scheduling_transfusion import reconfigure_scheduler, scheduler_class

    scheduler = pipe.scheduler
    if name is not None:
        cls = scheduler_class(name, pipe.transformer.config.diffusion_type)
        scheduler = cls.from_config(scheduler.config)
    if overrides:
        scheduler = reconfigure_scheduler(scheduler, overrides)
    pipe.scheduler = scheduler  # only once both steps succeeded: a rejected override leaves the pipeline as it was


def scheduler_variant(scheduler) -> str | None:
    """DPM-Solver's `algorithm_type` (ODE or SDE), or None for a scheduler that takes no such setting: a DDIM built
    from a DPM-Solver config carries the key over without using it."""
    from modeling_transfusion.scheduling_transfusion import scheduler_arguments

    if "algorithm_type" not in scheduler_arguments(scheduler):
        return None
    return scheduler.config.get("algorithm_type")


def default_steps(pipe) -> int:
    """The pipeline's saved `default_inference_steps` (what `pipe(...)` uses), else the paper's 250 for DDPM and 25
    otherwise."""
    steps = pipe.config.get("default_inference_steps")
    if steps:
        return int(steps)
    return 250 if type(pipe.scheduler).__name__ == "DDPMScheduler" else 25


def model_info(pipe) -> dict:
    c = pipe.transformer.config
    n_params = sum(p.numel() for n, p in pipe.transformer.named_parameters() if not n.startswith("model.vae."))
    return {
        "transformer_parameters": n_params,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "patch_encoder": c.patch_encoder,
        "patch_size": c.patch_size,
        "image_slots": c.image_slots,
        "image_attention": getattr(c, "image_attention", "bidirectional"),
        "diffusion_type": c.diffusion_type,
        "prediction_type": c.prediction_type,
        "diffusion_loss_weight": c.diffusion_loss_weight,
        "noise_limit_timestep": c.noise_limit_timestep,
    }


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def item_seed(seed: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generate(pipe, prompts: list[str], args, stream: int, desc: str) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] (8-bit quantized) for `prompts`; image i's noise comes from its own generator,
    so the result does not depend on the batch size."""
    out = []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc=desc, dynamic_ncols=True, mininterval=5):
        batch = prompts[start : start + args.batch_size]
        generators = [torch.Generator().manual_seed(item_seed(args.seed, stream, start + j)) for j in range(len(batch))]
        images = pipe(
            batch, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators, output_type="pt"
        ).images  # (B, 3, H, W) in [0, 1]
        out.append(quantize(images.float().cpu() * 2 - 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------


class FashionReference:
    """Real Fashion-MNIST test images for the FD: the reference set (half 0, `per_class_reference` per class) and its
    classifier features, computed once."""

    def __init__(self, classifier, per_class_reference: int = 500):
        images, labels = load_fashion_mnist("test")
        self.images, self.labels = images, np.asarray(labels)
        self.classifier = classifier
        ref = balanced_indices(self.labels, per_class_reference, half=0)
        self.n_reference = len(ref)
        self.features = classifier.embed(fashion_to_tensor(images[ref]))

    def real(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` real test images per class from half 1 (disjoint from the reference), and their labels."""
        idx = balanced_indices(self.labels, per_class, half=1)
        return fashion_to_tensor(self.images[idx]), torch.from_numpy(self.labels[idx])

    def fd(self, x: torch.Tensor) -> float:
        return frechet_distance(self.classifier.embed(x), self.features)


@torch.no_grad()
def reconstruct(pipe, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The VAE's reconstructions (posterior mode) of images (N, 3, 32, 32), 8-bit quantized like generated images."""
    model, device = pipe.transformer, pipe._execution_device
    out = [
        model.decode_latents(model.encode_images(x[i : i + batch_size].to(device, model.dtype))).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return quantize(torch.cat(out))


def vae_reference(pipe, ref: FashionReference, per_class: int, batch_size: int) -> dict:
    x, y = ref.real(per_class)
    rec = reconstruct(pipe, x, batch_size)
    return {
        "n": len(x),
        "fd_vae_reconstruction": ref.fd(rec),
        "fd_real_vs_real": ref.fd(x),
        "accuracy_real": float((ref.classifier.predict(x) == y).float().mean()),
        "accuracy_reconstruction": float((ref.classifier.predict(rec) == y).float().mean()),
        "mse_reconstruction": float(F.mse_loss(rec, x)),
    }


def eval_fashion(pipe, args, ref: FashionReference) -> tuple[dict, torch.Tensor]:
    labels = [c for c in range(len(FASHION_CLASSES)) for _ in range(args.num_per_class)]
    images = generate(pipe, [fashion_caption(c) for c in labels], args, STREAM_FASHION, "fashion t→i")
    y = torch.tensor(labels)
    predicted = ref.classifier.predict(images)
    fd = ref.fd(images)
    vae = vae_reference(pipe, ref, args.num_per_class, args.batch_size)
    per_class = {name: float((predicted[y == c] == c).float().mean()) for c, name in enumerate(FASHION_CLASSES)}
    return {
        "n_generated": len(images),
        "accuracy": float((predicted == y).float().mean()),
        "per_class_accuracy": per_class,
        "fd": fd,
        "fd_reference_images": ref.n_reference,
        "fd_vae_reconstruction": vae["fd_vae_reconstruction"],
        "fd_real_vs_real": vae["fd_real_vs_real"],
        "fd_ratio_to_vae": fd / vae["fd_vae_reconstruction"] if vae["fd_vae_reconstruction"] > 0 else None,
        "fd_target_ratio": FD_TARGET_RATIO,
        "fd_target_met": bool(fd <= FD_TARGET_RATIO * vae["fd_vae_reconstruction"]),
        "accuracy_real": vae["accuracy_real"],
        "accuracy_reconstruction": vae["accuracy_reconstruction"],
    }, images


def eval_shapes(pipe, args) -> tuple[dict, np.ndarray]:
    from evaluation.detector import detect, score_prompt

    prompts = heldout_prompts(args.shapes_prompts, seed=args.data_seed)
    repeated = [p for p in prompts for _ in range(args.shapes_per_prompt)]
    images = tensor_to_rgb(generate(pipe, [p.caption for p in repeated], args, STREAM_SHAPES, "shapes t→i"))
    passed = {c: [] for c in EVAL_CATEGORIES}
    reference = {c: [] for c in EVAL_CATEGORIES}
    for prompt, image in zip(repeated, images):
        passed[prompt.category].append(bool(score_prompt(prompt.spec, detect(image))[prompt.category]))
    for prompt in prompts:  # the detector on the rendered reference scenes: the ceiling of each category
        checks = score_prompt(prompt.spec, detect(render_scene(prompt.spec)))
        reference[prompt.category].append(bool(checks[prompt.category]))
    summary = geneval_summary(passed)
    return {
        "n_prompts": len(prompts),
        "images_per_prompt": args.shapes_per_prompt,
        "prompts_per_category": {c: sum(p.category == c for p in prompts) for c in EVAL_CATEGORIES},
        **summary,
        "detector_on_references": geneval_summary(reference),
    }, images


def _captions(pipe, images: torch.Tensor, args, desc: str) -> list[str]:
    out = []
    for start in tqdm(range(0, len(images), args.batch_size), desc=desc, dynamic_ncols=True, mininterval=5):
        out += pipe.caption(list(images[start : start + args.batch_size]), max_new_tokens=args.caption_max_tokens)
    return out


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def eval_caption(pipe, args, ref: FashionReference | None) -> dict:
    result = {}
    if args.caption_per_class:
        x, y = ref.real(args.caption_per_class)
        captions = _captions(pipe, x, args, "caption fashion")
        named = [caption_class(c) for c in captions]
        result["fashion"] = {
            "n": len(x),
            "exact": float(np.mean([c == fashion_caption(int(t)) for c, t in zip(captions, y)])),
            "class_name": float(np.mean([n == int(t) for n, t in zip(named, y)])),
            "examples": [{"true": fashion_caption(int(t)), "caption": c} for c, t in list(zip(captions, y))[:10]],
        }
    if args.caption_shapes:
        specs = [shapes_scene(i, "heldout", args.data_seed) for i in range(args.caption_shapes)]
        x = torch.cat([rgb_to_tensor(render_scene(s)) for s in specs])
        captions = _captions(pipe, x, args, "caption shapes")
        scores = [scene_caption_scores(c, s) for c, s in zip(captions, specs)]
        fields = ("kind", "colour", "shape", "count", "relation", "colour2", "shape2")
        result["shapes"] = {
            "n": len(specs),
            "exact": float(np.mean([s["exact"] for s in scores])),
            "per_attribute": float(np.mean([s["per_attribute"] for s in scores])),
            "parsed": float(np.mean([s["parsed"] for s in scores])),
            "fields": {f: _mean_or_none([s[f] for s in scores if f in s]) for f in fields},
            "examples": [{"true": s.caption, "caption": c} for c, s in list(zip(captions, specs))[:10]],
        }
    return result


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str], window: int, batch_size: int, desc: str = "text") -> dict:
    """Token-level perplexity and bits per byte of rows `<|bos|> text <|eos|>`, scored in sliding windows of
    `window` tokens with stride window/2 (every token once, with ≥ window/2 tokens of context where there are any)."""
    c = model.config
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, (list, tuple)) else c.eos_token_id
    device = next(model.parameters()).device
    pieces = []  # (ids of one window, index of its first target)
    for text in texts:
        ids = [c.bos_token_id, *tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], eos]
        pieces += [(ids[b:e], first) for b, e, first in sliding_windows(len(ids), window, max(1, window // 2))]
    nll, tokens = 0.0, 0
    for start in tqdm(range(0, len(pieces), batch_size), desc=desc, dynamic_ncols=True, mininterval=5):
        batch = pieces[start : start + batch_size]
        length = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), length), c.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for i, (piece, first) in enumerate(batch):
            ids[i, : len(piece)] = torch.tensor(piece)
            mask[i, : len(piece)] = 1
            target[i, first : len(piece)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()  # (B, L, V)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
        nll += float(losses[target[:, 1:]].double().sum())
        tokens += int(target[:, 1:].sum())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "chunks": len(texts),
        "tokens": tokens,
        "bytes": n_bytes,
        "window": window,
        "nll_per_token": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / n_bytes,
    }


def eval_text(pipe, args) -> dict:
    texts = text_corpus("heldout")[: args.text_max_chunks]
    result = text_perplexity(pipe.transformer, pipe.tokenizer, texts, args.text_window, args.batch_size, "text ppl")
    if args.text_baseline:
        model, tokenizer = load_language_model(args.text_baseline)
        model.to(pipe._execution_device)
        same_tokenizer = tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
        base = text_perplexity(model, tokenizer, texts, args.text_window, args.batch_size, "baseline ppl")
        result["baseline"] = {"path": str(args.text_baseline), "same_tokenizer": same_tokenizer, **base}
        result["perplexity_ratio"] = result["perplexity"] / base["perplexity"] if same_tokenizer else None
        result["bits_per_byte_ratio"] = result["bits_per_byte"] / base["bits_per_byte"]
    return result


def eval_vae(pipe, args, ref: FashionReference) -> dict:
    return vae_reference(pipe, ref, args.vae_per_class, args.batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="checkpoints/transfusion-tiny", help="pipeline folder, or train.py's final/")
    p.add_argument("--out", help="JSON to write (default results/<model folder name>.json); the .md goes beside it")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--classifier", default="checkpoints/fmnist-classifier", help="Fashion-MNIST classifier folder")
    g = p.add_argument_group("sampling")
    g.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), help="default: the pipeline's own scheduler")
    g.add_argument("--steps", type=int, help="denoising steps (default: DDPM 250, others 25)")
    g.add_argument("--scheduler-config", type=json.loads, default={},
                   help='JSON overrides of the scheduler config, e.g. \'{"algorithm_type": "sde-dpmsolver++"}\'')
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (≤ 1: none)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (each image has its own generator)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the shapes prompts and scenes")
    g.add_argument("--batch-size", type=int, default=50, help="images (or text windows) per forward")
    g = p.add_argument_group("counts")
    g.add_argument("--num-per-class", type=int, default=20, help="fashion: generated images per class")
    g.add_argument("--shapes-prompts", type=int, default=100, help="shapes: held-out prompts (categories in turn)")
    g.add_argument("--shapes-per-prompt", type=int, default=1, help="shapes: images per prompt")
    g.add_argument("--caption-per-class", type=int, default=20, help="caption: Fashion images per class (0: skip)")
    g.add_argument("--caption-shapes", type=int, default=100, help="caption: held-out shapes scenes (0: skip)")
    g.add_argument("--caption-max-tokens", type=int, default=16, help="caption: max new tokens")
    g.add_argument("--vae-per-class", type=int, default=100, help="vae: real test images per class")
    g.add_argument("--fd-reference-per-class", type=int, default=500, help="FD reference: real test images per class")
    g.add_argument("--text-window", type=int, default=64, help="text: tokens per window (train.py's --max-text-tokens)")
    g.add_argument("--text-max-chunks", type=int, help="text: use only the first N held-out chunks")
    g.add_argument("--text-baseline", help="text: a text-only model folder (train.py --mix text=1) to compare with")
    instruct.add_arguments(g)
    g = p.add_argument_group("outputs, runtime")
    g.add_argument("--grid", action="store_true", help="also write <out>-fashion.png and <out>-shapes.png sample grids")
    g.add_argument("--compare", nargs="+", metavar="JSON", help="print a side-by-side table of saved reports and exit")
    g.add_argument("--names", nargs="+", help="column names for --compare (default: the file stems)")
    g.add_argument("--plot", help="with --compare: also write a bar chart PNG here")
    g.add_argument("--compare-out", help="with --compare: also write the table to this markdown file")
    g.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "1")), help="CPU threads")
    g.add_argument("--device", default="cpu")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        return args
    tasks = [t for t in args.tasks.replace(" ", "").split(",") if t]
    bad = sorted(set(tasks) - set(TASKS))
    if bad or not tasks:
        parser.error(f"--tasks {args.tasks!r}: unknown {bad}; choose from {','.join(TASKS)}")
    args.tasks = [t for t in TASKS if t in tasks]
    for name in ("batch_size", "num_per_class", "shapes_prompts", "shapes_per_prompt", "threads", "caption_max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; must be ≥ 1")
    if args.num_per_class < 2 and "fashion" in args.tasks:
        parser.error("--num-per-class must be ≥ 2 for the FD (a covariance needs two images per set)")
    for name in ("edit_prompts", "instruct_prompts", "qa_questions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; must be ≥ 1")
    for name in ("caption_per_class", "caption_shapes", "vae_per_class", "fd_reference_per_class",
                 "instruct_fashion_per_class"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; must be ≥ 0")
    if max(args.num_per_class, args.caption_per_class, args.vae_per_class, args.fd_reference_per_class) > 500:
        parser.error("per-class counts take at most 500 (the test split has 1,000 per class, half for the reference)")
    if args.fd_reference_per_class < 2:
        parser.error(f"--fd-reference-per-class={args.fd_reference_per_class}; must be ≥ 2")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps={args.steps}; must be ≥ 1")
    if args.text_window < 2:
        parser.error(f"--text-window={args.text_window}; must be ≥ 2")
    if args.out is None:
        args.out = str(Path("results") / f"{Path(args.model).resolve().name}.json")
    return args


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def run_compare(args) -> str:
    reports = [json.loads(Path(p).read_text()) for p in args.compare]
    names = args.names or [Path(p).stem for p in args.compare]
    if len(names) != len(reports):
        raise SystemExit(f"--names has {len(names)} entries for {len(reports)} reports")
    table = compare_table(reports, names)
    print(table)
    if args.compare_out:
        Path(args.compare_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.compare_out).write_text(table)
        print(f"wrote {args.compare_out}")
    if args.plot:
        compare_plot(reports, names, args.plot)
        print(f"wrote {args.plot}")
    return table


def main(argv=None) -> dict | str:
    args = parse_args(argv)
    if args.compare:
        return run_compare(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()

    pipe = load_pipeline(args.model, args.device)
    saved_scheduler = type(pipe.scheduler).__name__
    set_scheduler(pipe, args.scheduler, args.scheduler_config)
    args.steps = args.steps or default_steps(pipe)
    needs_classifier = {"fashion", "vae"} & set(args.tasks) or ("caption" in args.tasks and args.caption_per_class) or (
        "instruct" in args.tasks and args.instruct_fashion_per_class)
    ref = None
    if needs_classifier:
        from evaluation.classifier import load_classifier

        ref = FashionReference(load_classifier(args.classifier), args.fd_reference_per_class)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    for task in args.tasks:
        t0 = time.time()
        if task == "fashion":
            results[task], images = eval_fashion(pipe, args, ref)
            if args.grid:
                per = args.num_per_class
                picks = [c * per + j for j in range(min(per, 4)) for c in range(len(FASHION_CLASSES))]
                labels = [FASHION_CLASSES[i // per] for i in picks]
                save_grid(tensor_to_rgb(images[picks]), labels, out.with_name(out.stem + "-fashion.png"))
        elif task == "shapes":
            results[task], images = eval_shapes(pipe, args)
            if args.grid:
                prompts = heldout_prompts(args.shapes_prompts, seed=args.data_seed)[:40]
                first = images[:: args.shapes_per_prompt][: len(prompts)]  # the first image of each prompt
                save_grid(first, [p.caption for p in prompts], out.with_name(out.stem + "-shapes.png"))
        elif task == "caption":
            results[task] = eval_caption(pipe, args, ref)
        elif task == "text":
            results[task] = eval_text(pipe, args)
        elif task == "vae":
            results[task] = eval_vae(pipe, args, ref)
        elif task == "edit":
            results[task], pairs = instruct.eval_edit(pipe, args, item_seed)
            if args.grid:
                tiles = [x for e, edited in pairs[:16] for x in (render_objects(e.source), edited,
                                                                 render_objects(e.target))]  # fmt: skip
                labels = [x for e, _ in pairs[:16] for x in (e.instruction, "edited", "asked for")]
                save_grid(np.stack(tiles), labels, out.with_name(out.stem + "-edit.png"), columns=9)
        elif task == "instruct":
            results[task] = instruct.eval_instruct(pipe, args, item_seed, ref)
        elif task == "qa":
            results[task] = instruct.eval_qa(pipe, args)
        seconds[task] = round(time.time() - t0, 2)
        results[task]["seconds"] = seconds[task]
        print(f"{task}: done in {seconds[task]:.1f}s")

    import diffusers
    import transformers

    report = {
        "model": str(args.model),
        "tasks": args.tasks,
        "config": {
            "scheduler": args.scheduler or "pipeline default",
            "scheduler_class": type(pipe.scheduler).__name__,
            "scheduler_variant": scheduler_variant(pipe.scheduler),
            "scheduler_config": args.scheduler_config,
            "steps": args.steps,
            "guidance": args.guidance,
            "seed": args.seed,
            "data_seed": args.data_seed,
            "batch_size": args.batch_size,
            "num_per_class": args.num_per_class,
            "shapes_prompts": args.shapes_prompts,
            "shapes_per_prompt": args.shapes_per_prompt,
            "caption_per_class": args.caption_per_class,
            "caption_shapes": args.caption_shapes,
            "caption_max_tokens": args.caption_max_tokens,
            "vae_per_class": args.vae_per_class,
            "text_window": args.text_window,
            "text_max_chunks": args.text_max_chunks,
            "text_baseline": args.text_baseline,
            "edit_prompts": args.edit_prompts,
            "image_guidance": args.image_guidance,
            "instruct_prompts": args.instruct_prompts,
            "instruct_fashion_per_class": args.instruct_fashion_per_class,
            "qa_questions": args.qa_questions,
            "fd_reference_per_class": args.fd_reference_per_class,
            "classifier": args.classifier,
            "threads": args.threads,
            "device": args.device,
        },
        "command": "python -m evaluation.evaluate " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "model_info": {**model_info(pipe), "scheduler_saved": saved_scheduler},
        "results": results,
        "wall_seconds": round(time.time() - start, 2),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
        },
        "code_commit": _git_commit(),
    }
    report["summary"] = {k: v for k, v in summary_rows(report).items()}
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    table = markdown_table(report)
    md = out.with_suffix(".md")
    md.write_text(f"# Evaluation of `{args.model}`\n\n`{report['command']}`\n\n{table}")
    print(table)
    print(f"wrote {out} and {md}" + (" (+ sample grids)" if args.grid else ""))
    return report


if __name__ == "__main__":
    main()
