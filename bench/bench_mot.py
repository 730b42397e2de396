"""Mixture-of-Transformers vs dense of the same width: training tokens/s on a mixed text+image batch and the cached
denoising step, measured side by side (alternating) in one process.

    python bench/bench_mot.py [--hidden 256 --layers 6 --heads 8 --batch 16 --seq 256 --steps 12 --threads 2]

MoT holds about twice the non-embedding parameters but runs each position through one expert, so its FLOPs per token
equal the dense model's; the ratio MoT / dense of tokens/s is the routing's overhead (gathering and scattering the
text and image positions). On a GPU: `--device cuda --dtype bfloat16 --preset paper-0.16B`.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_training import mixed_batch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from modeling_transfusion import TransfusionConfig, TransfusionDiffusionObjective, TransfusionForCausalLM  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, objective, optimizer, ids, latents, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    objective(model, input_ids=ids, labels=ids, image_latents=latents).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def denoise_step(model, prefix_ids, latents, device) -> float:
    """One cached denoising step of a batch: the image slots only, against a cached prefix."""
    c = model.config
    cache = DynamicCache(config=c)
    model(input_ids=prefix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    slots = torch.full((prefix_ids.shape[0], c.image_slots), c.image_token_id, device=device)
    t = torch.full((prefix_ids.shape[0],), 500.0, device=device)
    synchronize(device)
    start = time.perf_counter()
    model(input_ids=slots, past_key_values=cache, use_cache=True, image_latents=latents, image_timesteps=t,
          logits_to_keep=1)
    synchronize(device)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a TransfusionConfig preset instead of the size flags")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--images-per-row", type=int, default=2)
    p.add_argument("--prefix", type=int, default=64, help="prompt tokens before the image in the denoising step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None, help="optional JSON output path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    def config(experts):
        if args.preset:
            return TransfusionConfig.from_preset(args.preset, modality_experts=experts)
        return TransfusionConfig.from_preset(
            "tiny", hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
            max_position_embeddings=max(args.seq, args.prefix + 64), modality_experts=experts,
        )  # fmt: skip

    runs = {}
    for experts in ("shared", "mot"):
        torch.manual_seed(0)
        model = TransfusionForCausalLM(config(experts)).to(device, dtype).train()
        params = [q for q in model.parameters() if q.requires_grad]
        runs[experts] = {
            "model": model,
            "objective": TransfusionDiffusionObjective(model.config),
            "optimizer": torch.optim.AdamW(params, lr=1e-4),
            "params": sum(q.numel() for n, q in model.named_parameters() if not n.startswith("model.vae.")),
            "train": [],
            "denoise": [],
        }
    c = runs["shared"]["model"].config
    ids, latents = mixed_batch(c, args.batch, args.seq, args.images_per_row, device)
    latents = latents.to(dtype)
    prefix = torch.randint(10, c.vocab_size, (args.batch, args.prefix), device=device)
    step_latents = torch.randn(args.batch, c.latent_channels, c.latent_size, c.latent_size, device=device, dtype=dtype)
    for i in range(args.warmup + args.steps):  # alternate, so drift in machine load hits both alike
        for run in runs.values():
            train_s = train_step(run["model"], run["objective"], run["optimizer"], ids, latents, device)
            run["model"].eval()
            denoise_s = denoise_step(run["model"], prefix, step_latents, device)
            run["model"].train()
            if i >= args.warmup:
                run["train"].append(train_s)
                run["denoise"].append(denoise_s)

    tokens = ids.numel()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)",
              "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "images_per_row": args.images_per_row,
              "image_slots": c.image_slots, "hidden": c.hidden_size, "layers": c.num_hidden_layers}  # fmt: skip
    for name, run in runs.items():
        result[name] = {
            "parameters": run["params"],
            "train_tokens_per_s": round(tokens / statistics.median(run["train"]), 1),
            "denoise_step_ms": round(1000 * statistics.median(run["denoise"]), 2),
        }
    result["mot_over_dense_tokens_per_s"] = round(
        result["mot"]["train_tokens_per_s"] / result["shared"]["train_tokens_per_s"], 3
    )
    result["mot_over_dense_denoise_time"] = round(
        result["mot"]["denoise_step_ms"] / result["shared"]["denoise_step_ms"], 3
    )
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
