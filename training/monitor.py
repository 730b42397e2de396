"""What a training run writes for people to look at: the log's loss plot and text→image sample grids."""

import json
import math
from pathlib import Path

import numpy as np
import torch

SAMPLE_PROMPTS = ("a photo of a t-shirt", "a photo of a trouser", "a photo of a sneaker", "a photo of a bag",
                  "a red circle", "a blue square", "a green triangle to the left of a yellow circle",
                  "two blue squares")


def sample_prompts(captions: dict[str, list[str]], n: int = 8) -> tuple[str, ...]:
    """`n` prompts for the sample grids drawn from the training captions (distinct ones, the sources in turn), so a
    run on a user's own data shows its own subjects; the fixed prompts when there are no image sources."""
    pools = [list(dict.fromkeys(c[:1000])) for c in captions.values() if c]
    prompts = [pool[i] for i in range(n) for pool in pools if i < len(pool)][:n]
    return tuple(prompts) or SAMPLE_PROMPTS


def read_log(path: Path) -> list[dict]:
    """The records of log.jsonl; a line torn by a kill mid-write is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_losses(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("loss", "lm_loss", "diffusion_loss")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if not points:
            continue
        steps, values = map(np.asarray, zip(*points))
        ax.plot(steps, values, lw=0.6, alpha=0.35, color="C0")
        smooth, ema = [], values[0]
        for v in values:
            ema = 0.95 * ema + 0.05 * v
            smooth.append(ema)
        ax.plot(steps, smooth, lw=1.5, color="C1", label="EMA 0.95")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_samples(model, tokenizer, png: Path, seed: int, prompts=SAMPLE_PROMPTS) -> str:
    """A grid of text→image samples (20 DDIM steps, guidance 3) if the pipeline is importable; returns what happened."""
    try:
        from modeling_transfusion import TransfusionPipeline
    except Exception as err:  # the pipeline lives in another package that may not be there yet
        return f"sample grid skipped (pipeline not importable: {err})"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    config = model.config
    scheduler_cls = FlowMatchEulerDiscreteScheduler if config.diffusion_type == "flow_matching" else DDIMScheduler
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            scheduler = scheduler_cls.from_config(config.scheduler_config())
            pipe = TransfusionPipeline(transformer=model, scheduler=scheduler, tokenizer=tokenizer)
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator().manual_seed(seed)
            images = pipe(prompt=list(prompts), num_inference_steps=20, guidance_scale=3.0, generator=generator).images
    except Exception as err:
        return f"sample grid failed: {type(err).__name__}: {err}"
    finally:
        model.train(was_training)
    cols = 4
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, prompt in zip(axes.flat, images, prompts):
        ax.imshow(np.asarray(image))
        ax.set_title(prompt if len(prompt) < 24 else prompt[:22] + "…", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"samples → {png}"
