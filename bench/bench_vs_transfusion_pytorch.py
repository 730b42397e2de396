"""This project's Transfusion vs `transfusion-pytorch` (PyPI) at the same width, depth, heads, FFN width, vocabulary
and latent shape, on the same machine in one run.

    python bench/bench_vs_transfusion_pytorch.py [--tp-python /path/to/python] [--threads 1] [--out results/....json]

1. Training step (forward + backward + AdamW) on the same batch mix: each row `<bos>` prompt text, one image
   (4×8×8 latents, 2×2 patches → 16 tokens), a short text. Target: ours ≤ 0.7× theirs.
2. One image after an 8-token text prompt at an equal number of model evaluations N: ours `TransfusionPipeline` with
   `DDIMScheduler` N steps and guidance 1 (one evaluation per step); theirs `Transfusion.sample_one` with a fixed-grid
   Euler ODE over N + 1 times (one evaluation per interval), no guidance. Both return latents (their model has no
   VAE). Target: ours ≤ 0.5× theirs.

Our side runs in this process; theirs in a subprocess (bench/_tp_worker.py) with its own interpreter, so their
package never enters the project's environment. Without --tp-python that interpreter is a venv at
<repo>/.bench-venvs/transfusion-pytorch, created on first use with
`pip install torch==<our version> transfusion-pytorch==0.20.0`.
Repetitions alternate between the two sides (and which side goes first), with the same thread count on both, so
both see the same machine load; each figure is the median after warm-up.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]

from diffusers import DDIMScheduler  # noqa: E402

from modeling_transfusion import (  # noqa: E402
    TransfusionConfig,
    TransfusionDiffusionObjective,
    TransfusionForCausalLM,
    build_tokenizer,
)
from pipelines import TransfusionPipeline  # noqa: E402

TP_VERSION = "0.20.0"
DEFAULT_VENV = ROOT / ".bench-venvs" / "transfusion-pytorch"
WORKER = Path(__file__).resolve().parent / "_tp_worker.py"
PROMPT = "a photo of a circle on a dress"


# -- their interpreter ------------------------------------------------------------------------------------------------
def has_their_package(python: Path) -> bool:
    check = "import transfusion_pytorch, importlib.metadata as m; print(m.version('transfusion-pytorch'))"
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == TP_VERSION


def ensure_their_python(tp_python: str | None) -> Path:
    """The interpreter that has transfusion-pytorch: --tp-python as given, else the benchmark's own venv (created
    when missing, with our torch version pinned so both sides run the same kernels)."""
    if tp_python:
        python = Path(tp_python)
        if not has_their_package(python):
            raise SystemExit(
                f"--tp-python {python} has no transfusion-pytorch=={TP_VERSION}; install it there or omit the flag"
            )
        return python
    python = DEFAULT_VENV / "bin" / "python"
    if has_their_package(python):
        return python
    torch_version = torch.__version__.split("+")[0]
    print(f"Creating {DEFAULT_VENV} with torch=={torch_version} transfusion-pytorch=={TP_VERSION} ...", flush=True)
    DEFAULT_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(DEFAULT_VENV)], check=True)
    packages = [f"torch=={torch_version}", f"transfusion-pytorch=={TP_VERSION}"]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    if not has_their_package(python):
        raise SystemExit(f"{python} still lacks transfusion-pytorch=={TP_VERSION} after pip install")
    return python


class TheirSide:
    """transfusion-pytorch in a subprocess, driven one JSON line at a time (see bench/_tp_worker.py)."""

    def __init__(self, python: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        env.pop("PYTHONPATH", None)  # nothing of this repository on their side
        self.process = subprocess.Popen(
            [str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/"
        )

    def __call__(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the transfusion-pytorch worker exited (code {self.process.wait()}) during {op!r}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=30)


# -- our side ---------------------------------------------------------------------------------------------------------
def our_config(args) -> TransfusionConfig:
    return TransfusionConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        latent_channels=4,
        latent_size=8,
        patch_size=2,
        patch_encoder="linear",
        caption_drop_prob=0.0,  # theirs: prob_uncond = 0
        max_position_embeddings=512,
    )


def their_config(args, config: TransfusionConfig, sample_prompt_tokens: int) -> dict:
    # Their FeedForward is GEGLU of inner width int(dim · expansion · 2/3): expansion = 1.5 · ours / dim matches.
    expansion = 1.5 * config.intermediate_size / config.hidden_size
    if int(config.hidden_size * expansion * 2 / 3) != config.intermediate_size:
        raise SystemExit(
            f"--intermediate {config.intermediate_size} has no exact GEGLU match at width {config.hidden_size}"
        )
    return {
        "threads": args.threads,
        "seed": args.seed,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "ff_expansion_factor": expansion,
        "latent_channels": config.latent_channels,
        "latent_size": config.latent_size,
        "patch_size": config.patch_size,
        # Switch off what has a switch and ours lacks (value gates, qk RMSNorm). Their U-Net skips stay: with
        # unet_skips=False 0.20.0 fails its own `assert len(skips) == 0`. AdaLN-Zero and the attention residual
        # over all layers have no switch.
        "transformer_overrides": {"qk_rmsnorm": False, "attn_kwargs": {"gate_values": False}},
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "suffix_tokens": args.suffix_tokens,
        "sample_prompt_tokens": sample_prompt_tokens,
    }


def our_batch(config: TransfusionConfig, args):
    """`<bos>` prompt `<boi>` 16 × `<image>` `<eoi>` suffix, for every row; one latent per row."""
    g = torch.Generator().manual_seed(args.seed)
    special = (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.boi_token_id,
               config.eoi_token_id, config.image_token_id)
    first_text = 1 + max(special)
    rows = []
    for _ in range(args.batch):
        prompt = torch.randint(first_text, config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        suffix = torch.randint(first_text, config.vocab_size, (args.suffix_tokens,), generator=g).tolist()
        image = [config.boi_token_id] + [config.image_token_id] * config.image_slots + [config.eoi_token_id]
        rows.append([config.bos_token_id, *prompt, *image, *suffix])
    ids = torch.tensor(rows)
    latents = torch.randn(args.batch, config.latent_channels, config.latent_size, config.latent_size, generator=g)
    return ids, latents


class OurSide:
    def __init__(self, config: TransfusionConfig, args):
        torch.manual_seed(args.seed)
        self.model = TransfusionForCausalLM(config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.ids, self.latents = our_batch(config, args)
        tokenizer = build_tokenizer([PROMPT, "a photo of a dress", "a red circle"] * 50, vocab_size=300)
        scheduler = DDIMScheduler.from_config(config.scheduler_config())
        self.pipe = TransfusionPipeline(transformer=self.model, scheduler=scheduler, tokenizer=tokenizer)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt_tokens = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
        self.calls = 0
        self.model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        self.objective = TransfusionDiffusionObjective(config)

    def train(self) -> float:
        self.model.train()
        start = time.perf_counter()
        loss = self.objective(self.model, input_ids=self.ids, labels=self.ids, image_latents=self.latents).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def sample(self, steps: int) -> tuple[float, int]:
        self.model.eval()
        self.calls = 0
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, generator=generator, output_type="latent")
        return time.perf_counter() - start, self.calls


# -- the run ----------------------------------------------------------------------------------------------------------
def interleaved(our_fn, their_fn, warmup: int, repeats: int, label: str) -> tuple[list, list]:
    """Run both `warmup + repeats` times, alternating which goes first; keep the seconds after warm-up."""
    our_times, their_times = [], []
    for i in tqdm(range(warmup + repeats), desc=label, file=sys.stderr):
        if i % 2 == 0:
            ours, theirs = our_fn(), their_fn()
        else:
            theirs, ours = their_fn(), our_fn()
        if i >= warmup:
            our_times.append(ours)
            their_times.append(theirs)
    return our_times, their_times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp-python", help=f"an interpreter that has transfusion-pytorch=={TP_VERSION}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on each side (default 1: shared machine)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768, help="SwiGLU width; theirs gets an equal GEGLU width")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text before the image in a training row")
    parser.add_argument("--suffix-tokens", type=int, default=16, help="text after the image in a training row")
    parser.add_argument("--steps", type=int, default=20, help="model evaluations per sampled image")
    parser.add_argument("--train-repeats", type=int, default=12)
    parser.add_argument("--sample-repeats", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_vs_transfusion_pytorch.json"))
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    python = ensure_their_python(args.tp_python)
    config = our_config(args)
    ours = OurSide(config, args)
    theirs = TheirSide(python, args.threads)
    try:
        info = theirs("init", config=their_config(args, config, ours.prompt_tokens))

        def their_train():
            return theirs("train")["seconds"]

        train_times = interleaved(ours.train, their_train, args.warmup, args.train_repeats, "train step")

        samples = {}

        def our_sample():
            seconds, samples["ours_calls"] = ours.sample(args.steps)
            return seconds

        def their_sample():
            answer = theirs("sample", steps=args.steps)
            samples["theirs_calls"], samples["theirs_shapes"] = answer["model_calls"], answer["image_shapes"]
            return answer["seconds"]

        sample_times = interleaved(our_sample, their_sample, args.warmup, args.sample_repeats, "sample")
    finally:
        theirs.close()
    if samples["theirs_shapes"] != [[config.latent_channels, config.latent_size, config.latent_size]]:
        raise RuntimeError(f"their sampler returned images of shapes {samples['theirs_shapes']}, expected one latent")
    if samples["theirs_calls"] != args.steps or samples["ours_calls"] != args.steps + 1:
        raise RuntimeError(f"model calls per image: ours {samples['ours_calls']}, theirs {samples['theirs_calls']}")

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "their_side": info["versions"],
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tp_python")},
        "parameters": {
            "ours_trainable": sum(p.numel() for p in ours.params),
            "ours_total_with_frozen_vae": sum(p.numel() for p in ours.model.parameters()),
            "theirs": info["parameters"],
        },
        "tokens_per_row": {"ours": int(ours.ids.shape[1]), "theirs": info["train_tokens_per_row"]},
        "train_step": summary(*train_times, target=0.7),
        "sample_one_image": {
            "model_evaluations": args.steps,
            "model_calls": {"ours": samples["ours_calls"], "theirs": samples["theirs_calls"]},
            "prompt_tokens": ours.prompt_tokens,
            **summary(*sample_times, target=0.5),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + markdown_table(result))
    print(f"\nWrote {out}")


def summary(our_seconds: list, their_seconds: list, target: float) -> dict:
    ours, theirs = 1000 * statistics.median(our_seconds), 1000 * statistics.median(their_seconds)
    return {
        "ours_ms": round(ours, 1),
        "theirs_ms": round(theirs, 1),
        "ratio_ours_over_theirs": round(ours / theirs, 3),
        # each repetition ran both sides back to back: the ratio within a pair shares its moment's machine load
        "ratio_median_of_pairs": round(statistics.median(o / t for o, t in zip(our_seconds, their_seconds)), 3),
        "target_ratio": target,
        "ours_runs_ms": [round(1000 * t, 1) for t in our_seconds],
        "theirs_runs_ms": [round(1000 * t, 1) for t in their_seconds],
    }


def markdown_table(result: dict) -> str:
    s, t, p = result["settings"], result["train_step"], result["sample_one_image"]
    rows = [
        (f"training step, batch {s['batch']} (ms)", t),
        (f"one image, {p['model_evaluations']} model evaluations (ms)", p),
    ]
    lines = [
        f"| median, {s['threads']} thread(s) | ours | transfusion-pytorch {TP_VERSION} | ours / theirs | target |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        ratio, target = r["ratio_ours_over_theirs"], r["target_ratio"]
        lines.append(f"| {name} | {r['ours_ms']} | {r['theirs_ms']} | {ratio} | ≤ {target} |")
    n = result["parameters"]
    lines.append(f"| parameters (M) | {n['ours_trainable'] / 1e6:.2f} (+ frozen VAE) | {n['theirs'] / 1e6:.2f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
