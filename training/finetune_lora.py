"""LoRA fine-tuning of a Transfusion checkpoint (PEFT + accelerate) on your own captioned images and text.

The adapter sits on the shared backbone: the attention and MLP projections of every layer by default, optionally also
the image patch encoder/decoder and the timestep embedder (trained in full through PEFT's `modules_to_save`). Both
objectives keep running: next-token prediction on the captions and text, diffusion on the images; a share of the image
rows put the image first (captioning), as in pre-training.

    python -m training.finetune_lora --data my_images/ --output runs/lora-mine
    python -m training.finetune_lora --data captions.jsonl --text notes.txt --steps 300 --rank 16 --train-patch-modules

Data comes through the readers `training.train` uses (`training/datasets/user_data.py`, Hugging Face `datasets`):
`--data PATH` (repeatable) is a folder of images each with a caption in the same-name `.txt`, an image folder with
`metadata.jsonl`/`metadata.csv`, or a JSONL/CSV/Parquet file of `{"image": path, "text": caption}` rows (paths
relative to the file; rows without an image are text rows); `--text FILE` adds a plain-text file, one example per
non-empty line; `--dataset NAME=PATH` and the column, fit and streaming flags are `training.train`'s. Images are
encoded once into the latent cache and rows are built by the same mixture stream and collator as pre-training
(each example equally likely, image rows captioned first with `--image-first-prob`).

Training runs through `training.train` (`--base --lora-rank …`, the one loop: same stream, collator, schedule,
checkpoints and `--resume`). The result is a PEFT adapter folder, OUTPUT/final (`adapter_config.json`,
`adapter_model.safetensors`), that loads with `TransfusionPipeline.load_lora_weights(path)` or
`model.load_adapter(path)`; OUTPUT holds `log.jsonl`, `loss.png` and `checkpoints/`.

The concept experiment (a shape the base model never saw) is `experiments/lora_concept.py`.
"""

import argparse
import os
import time
from pathlib import Path

from training.lora import DEFAULT_TARGETS, PATCH_MODULES

DEFAULT_BASE = "checkpoints/transfusion-tiny"


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from training.datasets import UserDataset

    p = argparse.ArgumentParser(
        prog="python -m training.finetune_lora",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", default=DEFAULT_BASE, help="pipeline or model folder to adapt (default: %(default)s)")
    p.add_argument("--data", action="append", default=[], help="image folder or JSONL file (repeatable)")
    p.add_argument("--text", action="append", default=[], help="plain-text file, one example per line (repeatable)")
    p.add_argument("--output", default="runs/lora",
                   help="run folder; the adapter lands in OUTPUT/final (default: %(default)s)")
    p.add_argument("--latent-cache", default="runs/latent-cache", help="folder of the images' cached VAE latents")
    g = p.add_argument_group("data (training.train's readers)")
    UserDataset.add_arguments(g)
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS), help="comma-separated layer names")
    g.add_argument("--train-patch-modules", action="store_true",
                   help=f"also train {', '.join(PATCH_MODULES)} in full (PEFT modules_to_save)")  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, linear warm-up then cosine to 10%%")
    g.add_argument("--warmup-steps", type=int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--image-first-prob", type=float, default=0.2, help="share of image rows that put the image first")
    g.add_argument("--max-text-tokens", type=int, default=128)
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "0")) or None,
                   help="torch CPU threads (default: torch's choice)")  # fmt: skip
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --output")
    return p


def train_argv(args) -> list[str]:
    """`training.train`'s command line for this LoRA run: the fine-tune runs through the one training loop (its
    readers, stream, collator, schedule, checkpoints and resume), with LoRA-friendly defaults."""
    data = ([f"data{i}={path}" for i, path in enumerate(args.data)]
            + [f"text{i}={path}" for i, path in enumerate(args.text)])
    argv = ["--base", str(args.base), "--output-dir", str(args.output), "--latent-cache", str(args.latent_cache),
            "--lora-rank", str(args.rank), "--lora-alpha", str(args.alpha), "--lora-dropout", str(args.dropout),
            "--lora-targets", args.target_modules, "--mix", "size", "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
            "--min-lr-ratio", "0.1", "--betas", "0.9", "0.95", "--weight-decay", str(args.weight_decay),
            "--clip", str(args.max_grad_norm), "--image-first-prob", str(args.image_first_prob),
            "--max-text-tokens", str(args.max_text_tokens), "--mixed-precision", args.mixed_precision,
            "--seed", str(args.seed), "--log-every", str(args.log_every), "--save-every", str(args.save_every),
            "--sample-every", "0", "--caption-column", args.caption_column, "--image-column", args.image_column,
            "--image-fit", args.image_fit]  # fmt: skip
    for spec in data + list(args.dataset):
        argv += ["--dataset", spec]
    for flag, on in (("--lora-train-patch-modules", args.train_patch_modules), ("--streaming", args.streaming),
                     ("--resume", args.resume)):  # fmt: skip
        argv += [flag] if on else []
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def train(args) -> Path:
    from training import train as training

    started = time.time()
    training.main(train_argv(args))
    output = Path(args.output)
    print(f"wrote the LoRA adapter to {output / 'final'} (adapter_config.json, adapter_model.safetensors; log.jsonl "
          f"and checkpoints/ in {output}) in {time.time() - started:.0f} s")  # fmt: skip
    return output / "final"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.data and not args.text and not args.dataset:
        build_parser().error("give training data with --data, --text and/or --dataset")
    return train(args)


if __name__ == "__main__":
    main()
