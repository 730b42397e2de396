"""Sampling latency of TransfusionPipeline.

    python bench/bench_sampling.py [--model checkpoints/transfusion-tiny] [--threads 2] [--out results/bench_sampling.json]

1. Seconds per denoising step with an 8-token vs a 256-token prompt, with the prefix KV cache (the pipeline's way)
   and without it (the whole sequence recomputed every step). With the cache the cost of a step should hardly depend
   on the prompt length (target: ratio ≤ 1.3).
2. Wall time of one image with DDPM-250 (the paper's sampler) vs DPM-Solver++-20 and DDIM-20, guidance 3.
Without --model (or when the folder is missing) a random model of the bundled checkpoint's size is used.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from modeling_transfusion import TransfusionConfig, TransfusionForCausalLM, build_tokenizer  # noqa: E402
from pipelines import TransfusionPipeline  # noqa: E402


def load(model_path: str | None) -> TransfusionPipeline:
    if model_path and (Path(model_path) / "model_index.json").exists():
        pipe = TransfusionPipeline.from_pretrained(model_path)
    else:
        config = TransfusionConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024)
        model = TransfusionForCausalLM(config).eval()
        tokenizer = build_tokenizer(["a photo of a dress", "a red circle"] * 50, vocab_size=300)
        pipe = TransfusionPipeline(model, DDIMScheduler.from_config(config.scheduler_config()), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def step_seconds(pipe, prompt_tokens: int, cached: bool, repeats: int) -> float:
    """Median seconds of one guided denoising step (conditional + unconditional rows) after a prompt of n tokens."""
    model, c = pipe.transformer, pipe.transformer.config
    prefix = torch.full((2, prompt_tokens), 20)
    prefix[:, 0], prefix[:, -1] = c.bos_token_id, c.boi_token_id
    slots = torch.full((2, c.image_slots), c.image_token_id)
    latents = torch.randn(2, c.latent_channels, c.latent_size, c.latent_size)
    t = torch.tensor([500.0, 500.0])
    times = []
    if cached:
        cache = DynamicCache(config=c)
        model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        length = cache.get_seq_length()
    for _ in range(repeats + 2):
        start = time.perf_counter()
        if cached:
            model(input_ids=slots, past_key_values=cache, use_cache=True, image_latents=latents, image_timesteps=t,
                  logits_to_keep=1)
            model.crop_cache(cache, length)
        else:
            model(input_ids=torch.cat([prefix, slots], 1), image_latents=latents, image_timesteps=t, use_cache=False,
                  logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def sampler_seconds(pipe, scheduler_class, steps: int, **scheduler_kwargs) -> float:
    original = pipe.scheduler
    pipe.scheduler = scheduler_class.from_config(original.config, **scheduler_kwargs)
    start = time.perf_counter()
    pipe("a photo of a dress", num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    elapsed = time.perf_counter() - start
    pipe.scheduler = original
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "transfusion-tiny"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)

    per_step = {}
    for cached in (True, False):
        for n in (8, 256):
            per_step[f"{'cached' if cached else 'uncached'}_{n}_tokens_ms"] = round(
                1000 * step_seconds(pipe, n, cached, args.repeats), 2
            )
    result = {
        "model": args.model if (Path(args.model) / "model_index.json").exists() else "random (bundled size)",
        "threads": args.threads,
        "step_ms": per_step,
        "ratio_256_over_8_cached": round(per_step["cached_256_tokens_ms"] / per_step["cached_8_tokens_ms"], 3),
        "ratio_256_over_8_uncached": round(per_step["uncached_256_tokens_ms"] / per_step["uncached_8_tokens_ms"], 3),
        "one_image_seconds": {
            "ddpm_250": round(sampler_seconds(pipe, DDPMScheduler, 250), 2),
            "dpmsolver++_20": round(sampler_seconds(pipe, DPMSolverMultistepScheduler, 20, algorithm_type="dpmsolver++"), 2),
            "ddim_20": round(sampler_seconds(pipe, DDIMScheduler, 20), 2),
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
