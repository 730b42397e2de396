"""Sampling latency of TransfusionPipeline.

    python bench/bench_sampling.py [--model checkpoints/transfusion-tiny] [--threads 2] \\
        [--out results/bench_sampling.json]
    python bench/bench_sampling.py --preset paper-0.16B --device cuda --dtype bfloat16 --prompt-lengths 8 2048

1. Seconds per denoising step with a short vs a long prompt (default 8 and 256 tokens), with the prefix KV cache
   (the pipeline's way) and without it (the whole sequence recomputed every step). With the cache the cost of a step
   should hardly depend on the prompt length (target: ratio ≤ 1.3).
2. Wall time of one image (and of a batch of --batch-images) with DDPM-250 (the paper's sampler) vs DPM-Solver++-20
   and DDIM-20, guidance 3, decoded to PIL by the model's VAE.
Without --model (or when the folder is missing) a random model is used: of the bundled checkpoint's size, or of a
TransfusionConfig preset (--preset). On CUDA every timing synchronises the device first.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from modeling_transfusion import TransfusionConfig, TransfusionForCausalLM, build_tokenizer  # noqa: E402
from pipelines import TransfusionPipeline  # noqa: E402


def load(model_path: str | None, preset: str | None, max_prompt: int) -> tuple[TransfusionPipeline, str]:
    """The pipeline to time and the name the report gives it."""
    if model_path and not preset and (Path(model_path) / "model_index.json").exists():
        pipe, name = TransfusionPipeline.from_pretrained(model_path), model_path
    else:
        name = f"random ({preset or 'bundled size'})"
        room = max(1024, max_prompt + 512)
        if preset:
            config = TransfusionConfig.from_preset(preset, max_position_embeddings=room)
        else:
            config = TransfusionConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                                       num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                                       max_position_embeddings=room)
        model = TransfusionForCausalLM(config).eval()
        tokenizer = build_tokenizer(["a photo of a dress", "a red circle"] * 50, vocab_size=300)
        pipe = TransfusionPipeline(model, DDIMScheduler.from_config(config.scheduler_config()), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, name


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def step_seconds(pipe, prompt_tokens: int, cached: bool, repeats: int) -> float:
    """Median seconds of one guided denoising step (conditional + unconditional rows) after a prompt of n tokens."""
    model, c = pipe.transformer, pipe.transformer.config
    device, dtype = model.device, model.dtype
    prefix = torch.full((2, prompt_tokens), 20, device=device)
    prefix[:, 0], prefix[:, -1] = c.bos_token_id, c.boi_token_id
    slots = torch.full((2, c.image_slots), c.image_token_id, device=device)
    latents = torch.randn(2, c.latent_channels, c.latent_size, c.latent_size, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    times = []
    if cached:
        cache = DynamicCache(config=c)
        model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        length = cache.get_seq_length()
    for _ in range(repeats + 2):
        start = clock(device)
        if cached:
            model(input_ids=slots, past_key_values=cache, use_cache=True, image_latents=latents, image_timesteps=t,
                  logits_to_keep=1)
            model.crop_cache(cache, length)
        else:
            model(input_ids=torch.cat([prefix, slots], 1), image_latents=latents, image_timesteps=t, use_cache=False,
                  logits_to_keep=1)
        times.append(clock(device) - start)
    return statistics.median(times[2:])


def sampler_seconds(pipe, scheduler_class, steps: int, images: int = 1, **scheduler_kwargs) -> float:
    """Wall seconds of `images` images from one prompt (one call: the rows denoise as one batch)."""
    original, device = pipe.scheduler, pipe.transformer.device
    pipe.scheduler = scheduler_class.from_config(original.config, **scheduler_kwargs)
    start = clock(device)
    pipe("a photo of a dress", num_inference_steps=steps, guidance_scale=3.0, num_images_per_prompt=images,
         generator=torch.Generator().manual_seed(0))
    elapsed = clock(device) - start
    pipe.scheduler = original
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "transfusion-tiny"))
    parser.add_argument("--preset", default=None, help="a random model of this TransfusionConfig preset instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=(8, 256), metavar=("SHORT", "LONG"))
    parser.add_argument("--batch-images", type=int, default=0, help="also time this many images in one call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    short, long = args.prompt_lengths
    if not 2 <= short < long:
        parser.error(f"--prompt-lengths {short} {long}: need 2 ≤ SHORT < LONG")
    device = torch.device(args.device)
    pipe, model_name = load(args.model, args.preset, long)
    pipe = pipe.to(device, getattr(torch, args.dtype))
    sampler_seconds(pipe, DDIMScheduler, 2)  # warm-up: kernels, allocator, VAE

    per_step = {}
    for cached in (True, False):
        for n in (short, long):
            per_step[f"{'cached' if cached else 'uncached'}_{n}_tokens_ms"] = round(
                1000 * step_seconds(pipe, n, cached, args.repeats), 2
            )
    ratio = {
        kind: round(per_step[f"{kind}_{long}_tokens_ms"] / per_step[f"{kind}_{short}_tokens_ms"], 3)
        for kind in ("cached", "uncached")
    }
    samplers = {
        "ddpm_250": (DDPMScheduler, 250, {}),
        "dpmsolver++_20": (DPMSolverMultistepScheduler, 20, {"algorithm_type": "dpmsolver++"}),
        "ddim_20": (DDIMScheduler, 20, {}),
    }
    result = {
        "model": model_name,
        "parameters_M": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, 2),
        "image_slots": pipe.transformer.config.image_slots,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": args.threads,
        "step_ms": per_step,
        f"ratio_{long}_over_{short}_cached": ratio["cached"],
        f"ratio_{long}_over_{short}_uncached": ratio["uncached"],
        "one_image_seconds": {
            k: round(sampler_seconds(pipe, cls, n, 1, **kw), 3) for k, (cls, n, kw) in samplers.items()
        },
    }
    if args.batch_images:
        result[f"batch_of_{args.batch_images}_seconds"] = {
            k: round(sampler_seconds(pipe, cls, n, args.batch_images, **kw), 3) for k, (cls, n, kw) in samplers.items()
        }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
