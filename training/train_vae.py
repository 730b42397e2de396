"""Train the image VAE: a diffusers AutoencoderKL mapping 32×32 RGB in [-1, 1] to 8×8×4 latents.

Trains on a mixture of Fashion-MNIST train and shapes-world train images with L1 + a finite-difference edge term
(keeps edges and textures sharp) + a small KL, under bf16 autocast on CPU. The weights kept are an exponential
moving average. Resumable: a state file in --run-dir is written every few minutes and read back with --resume.
At the end the latent scaling factor (1 / std of latent_dist.mode() over training images) goes into the config and
the VAE is saved with save_pretrained, followed by reconstruction MSE on Fashion-MNIST test and held-out shapes.

    python -m training.train_vae --minutes 25 --threads 1
    python -m training.train_vae --minutes 15 --resume      # continue the same run
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from training.datasets import fashion_to_tensor, load_fashion_mnist, rgb_to_tensor, shapes_images
from evaluation.metrics import reconstruct
from training.safe_state import load_state, save_state

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    # 8 groups, not 32: with 32 groups a 32-channel layer is normalised channel by channel, and the decoder's last
    # GroupNorm then erases each channel's absolute level — exactly what the colour of a flat object on black is
    # stored in. With 32 groups the shapes world's colours were still wrong after 1,000 steps (see the report).
    norm_num_groups=8,
    sample_size=32,
)


def build_vae(**overrides) -> AutoencoderKL:
    """The project's VAE architecture (override fields for tiny test models)."""
    return AutoencoderKL(**{**VAE_CONFIG, **overrides})


def edge_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences of two image batches (B, C, H, W)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 250) -> float:
    """1 / std of the posterior-mode latents of `x`, so scaled latents have unit variance for the diffusion model."""
    zs = [vae.encode(x[i : i + batch_size]).latent_dist.mode() for i in range(0, len(x), batch_size)]
    return float(1.0 / torch.cat(zs).float().std())


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """Mean squared error in [-1, 1] pixel units between `x` and its reconstruction."""
    return float(F.mse_loss(reconstruct(vae, x), x))


class MixedImages:
    """Fashion-MNIST train + pre-rendered shapes-world train images; batches drawn by a step-seeded RNG."""

    def __init__(self, n_shapes: int, fashion_fraction: float, seed: int):
        self.fashion, _ = load_fashion_mnist("train")
        self.shapes, _ = shapes_images(n_shapes, "train", seed=seed)
        self.fashion_fraction, self.seed = fashion_fraction, seed

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])  # a pure function of the step: resuming replays nothing
        n_fashion = int(round(batch_size * self.fashion_fraction))
        f = fashion_to_tensor(self.fashion[rng.integers(len(self.fashion), size=n_fashion)])
        s = rgb_to_tensor(self.shapes[rng.integers(len(self.shapes), size=batch_size - n_fashion)])
        return torch.cat([f, s])  # (B, 3, 32, 32)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """A fixed mixed set of n images (for the scaling factor)."""
        rng = np.random.default_rng([self.seed, seed, 1])
        n_fashion = int(round(n * self.fashion_fraction))
        f = fashion_to_tensor(self.fashion[rng.choice(len(self.fashion), size=n_fashion, replace=False)])
        s = rgb_to_tensor(self.shapes[rng.choice(len(self.shapes), size=n - n_fashion, replace=False)])
        return torch.cat([f, s])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/vae", help="folder for the trained VAE (diffusers save_pretrained)")
    p.add_argument("--run-dir", default="runs/vae", help="folder for the resumable training state")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of this invocation")
    p.add_argument("--steps", type=int, default=None, help="stop at this total step count (default: budget only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--edge-weight", type=float, default=0.5, help="weight of the finite-difference L1 term")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--fashion-fraction", type=float, default=0.6, help="share of Fashion-MNIST in each batch")
    p.add_argument("--n-shapes", type=int, default=60_000, help="shapes-world training scenes to pre-render")
    p.add_argument("--save-every-minutes", type=float, default=2.0)
    p.add_argument("--n-eval", type=int, default=10_000, help="Fashion-MNIST test images for the final MSE")
    p.add_argument("--n-scale", type=int, default=4096, help="training images for the latent scaling factor")
    p.add_argument("--norm-num-groups", type=int, default=VAE_CONFIG["norm_num_groups"],
                   help="GroupNorm groups (must divide 32 and 64)")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/state.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "1")))
    return p.parse_args(argv)


def save_vae_state(path: Path, vae, ema, optimizer, step: int, elapsed_s: float, args) -> None:
    save_state(path, {"vae": vae.state_dict(), "ema": ema.state_dict()}, {"optimizer": optimizer.state_dict()},
               {"step": step, "elapsed_s": elapsed_s, "args": vars(args)})  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir, out_dir = Path(args.run_dir), Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.safetensors"

    vae = build_vae(norm_num_groups=args.norm_num_groups)
    ema = copy.deepcopy(vae).requires_grad_(False)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed_before = 0, 0.0
    if args.resume:
        if not state_path.exists():
            legacy = (" (a state.pt of an older version is a pickle and is never loaded)"
                      if (run_dir / "state.pt").exists() else "")
            raise FileNotFoundError(f"--resume given but {state_path} does not exist{legacy}")
        modules, optimizers, meta = load_state(state_path)
        if meta["args"]["norm_num_groups"] != args.norm_num_groups:
            raise ValueError(
                f"{state_path} was trained with --norm-num-groups {meta['args']['norm_num_groups']}, "
                f"got {args.norm_num_groups}"
            )
        vae.load_state_dict(modules["vae"])
        ema.load_state_dict(modules["ema"])
        optimizer.load_state_dict(optimizers["optimizer"])
        step, elapsed_before = meta["step"], meta["elapsed_s"]
        print(f"resumed {state_path} at step {step} ({elapsed_before / 60:.1f} min trained)")

    data = MixedImages(args.n_shapes, args.fashion_fraction, args.seed)
    print(f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, {args.threads} thread(s)")

    start = time.time()
    last_save = start
    budget_s = args.minutes * 60
    vae.train()
    bar = tqdm(total=args.steps, initial=step, desc="vae", mininterval=30, dynamic_ncols=True)
    running = None
    while (args.steps is None or step < args.steps) and time.time() - start < budget_s:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
        x = data.batch(step, args.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        loss = l1 + args.edge_weight * edge_loss(rec, x) + args.kl_weight * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))  # short warm-up so early EMA is not stale
            for pe, p in zip(ema.parameters(), vae.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        running = l1.item() if running is None else 0.98 * running + 0.02 * l1.item()
        bar.update(1)
        bar.set_postfix(l1=f"{running:.4f}", refresh=False)
        if time.time() - last_save > args.save_every_minutes * 60:
            save_vae_state(state_path, vae, ema, optimizer, step, elapsed_before + time.time() - start, args)
            last_save = time.time()
    bar.close()
    trained_s = elapsed_before + time.time() - start
    save_vae_state(state_path, vae, ema, optimizer, step, trained_s, args)
    print(f"trained {step} steps in {trained_s / 60:.1f} min total; state in {state_path}")

    ema.eval()
    scale = latent_scaling_factor(ema, data.sample(args.n_scale, seed=1))
    ema.register_to_config(scaling_factor=scale)
    ema.save_pretrained(out_dir)

    fashion_test = fashion_to_tensor(load_fashion_mnist("test")[0][: args.n_eval])
    heldout_shapes = rgb_to_tensor(shapes_images(2000, "heldout", seed=args.seed)[0])
    report = {
        "steps": step,
        "minutes": round(trained_s / 60, 2),
        "batch_size": args.batch_size,
        "scaling_factor": scale,
        "mse_fashion_test": reconstruction_mse(ema, fashion_test),
        "mse_shapes_heldout": reconstruction_mse(ema, heldout_shapes),
        "n_fashion_test": len(fashion_test),
        "n_shapes_heldout": len(heldout_shapes),
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote the VAE to {out_dir}/ (config.json, diffusion_pytorch_model.safetensors, training_report.json)")
    return report


if __name__ == "__main__":
    main()
