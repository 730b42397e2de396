"""Training throughput: TransfusionForCausalLM on a mixed text+image batch vs transformers' LlamaForCausalLM with the
same sizes and the same total sequence length, measured side by side (alternating steps) in one process.

    python bench/bench_training.py [--hidden 256 --layers 6 --heads 8 --batch 16 --seq 256 --steps 12 --threads 2]

Reports tokens/s (median over steps after warm-up) for each and the ratio Transfusion / Llama. On a GPU, `--device
cuda --dtype bfloat16` and `--preset paper-0.16B` measure the paper sizes (and MFU from the parameter count).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from modeling_transfusion import TransfusionConfig, TransfusionDiffusionObjective, TransfusionForCausalLM  # noqa: E402


def mixed_batch(config: TransfusionConfig, batch: int, seq: int, images_per_row: int, device):
    """Rows of `seq` tokens: <bos> text [<boi> slots <eoi> text] × images_per_row, padded with text."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        row = [config.bos_token_id]
        for _ in range(images_per_row):
            row += torch.randint(10, config.vocab_size, (8,), generator=g).tolist()
            row += [config.boi_token_id] + [config.image_token_id] * config.image_slots + [config.eoi_token_id]
        row += torch.randint(10, config.vocab_size, (seq - len(row),), generator=g).tolist()
        rows.append(row[:seq])
    ids = torch.tensor(rows, device=device)
    n_images = int((ids == config.image_token_id).sum()) // config.image_slots
    latents = torch.randn(n_images, config.latent_channels, config.latent_size, config.latent_size, generator=g)
    return ids, latents.to(device)


def step_time(loss_of, optimizer, inputs, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = loss_of(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="a TransfusionConfig preset instead of the size flags")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--patch-encoder", default="linear", choices=["linear", "unet"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--images-per-row", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--out", default=None, help="optional JSON output path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    if args.preset:
        config = TransfusionConfig.from_preset(args.preset, max_position_embeddings=max(args.seq, 4096))
    else:
        config = TransfusionConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(args.seq, 512),
            patch_encoder=args.patch_encoder,
            caption_drop_prob=0.0,
        )
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters),
        tie_word_embeddings=config.tie_word_embeddings,
    )
    models = {
        "transfusion": TransfusionForCausalLM(config).to(device, dtype).train(),
        "llama": LlamaForCausalLM(llama_config).to(device, dtype).train(),
    }
    ids, latents = mixed_batch(config, args.batch, args.seq, args.images_per_row, device)
    inputs = {
        "transfusion": {"input_ids": ids, "labels": ids, "image_latents": latents.to(dtype)},
        "llama": {"input_ids": ids, "labels": ids},
    }
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }
    # Transfusion's training step includes the objective's noising and diffusion loss; Llama's is its own forward
    objective = TransfusionDiffusionObjective(config)
    loss_of = {"transfusion": lambda **inputs: objective(models["transfusion"], **inputs), "llama": models["llama"]}
    times = {k: [] for k in models}
    for step in range(args.warmup + args.steps):
        for name in models:  # alternate, so both see the same machine load
            elapsed = step_time(loss_of[name], optimizers[name], inputs[name], device)
            if step >= args.warmup:
                times[name].append(elapsed)

    tokens = args.batch * args.seq
    result = {
        "config": {k: getattr(args, k) for k in vars(args)},
        "parameters_M": {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for k, m in models.items()},
        "tokens_per_s": {k: round(tokens / statistics.median(v), 1) for k, v in times.items()},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "torch": torch.__version__,
    }
    result["ratio_transfusion_over_llama"] = round(
        result["tokens_per_s"]["transfusion"] / result["tokens_per_s"]["llama"], 3
    )
    if device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    # Model FLOPs per token: 6·N for the trained weights' matmuls (embeddings excluded) + 12·layers·seq·width for
    # causal attention scores (counted over the full square, as is customary), forward and backward.
    n_params = sum(
        p.numel() for n, p in models["transfusion"].named_parameters() if p.requires_grad and "embed_tokens" not in n
    )
    flops_per_token = 6 * n_params + 12 * config.num_hidden_layers * args.seq * config.hidden_size
    result["model_tflops"] = round(flops_per_token * result["tokens_per_s"]["transfusion"] / 1e12, 2)
    if args.peak_tflops:
        result["mfu"] = round(result["model_tflops"] / args.peak_tflops, 3)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
