"""Evaluation metrics: the Fréchet distance between feature sets, and the VAE reconstruction reports
(Fashion-MNIST classifier accuracy on originals vs reconstructions; the shapes detector on held-out scenes).

    python -m evaluation.metrics --vae checkpoints/vae --classifier checkpoints/fmnist-classifier --n 10000
"""

import argparse
import json
import os

import numpy as np
import torch

from training.datasets import (
    fashion_to_tensor,
    load_fashion_mnist,
    render_scene,
    rgb_to_tensor,
    shapes_scene,
    tensor_to_rgb,
)
from evaluation.detector import detect, detection_matches_scene


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Encode with the posterior mode and decode, in batches: (N, 3, 32, 32) → (N, 3, 32, 32), clamped to [-1, 1]."""
    out = []
    for i in range(0, len(x), batch_size):
        z = vae.encode(x[i : i + batch_size]).latent_dist.mode()  # (b, 4, 8, 8)
        out.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(out)


def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((S_a S_b)^(1/2)) for covariance matrices, through symmetric eigendecompositions.

    S_a S_b is similar to S_a^(1/2) S_b S_a^(1/2), which is symmetric positive semi-definite, so the trace is the
    sum of the square roots of its (real, non-negative) eigenvalues. Unlike scipy.linalg.sqrtm of the product this
    neither returns complex round-off nor fails on the singular covariances that ReLU features give (dead units).
    """
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))  (the FID formula, on our classifier's features)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected feature arrays (N_a, D) and (N_b, D), got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * _trace_sqrt_product(cov_a, cov_b)
    return float(max(fd, 0.0))


@torch.no_grad()
def vae_reconstruction_report(vae, classifier, n: int = 10_000, batch_size: int = 250) -> dict:
    """Classifier accuracy on the first `n` Fashion-MNIST test images vs on their VAE reconstructions
    (posterior mode, fp32), with the reconstruction MSE and the FD between the two feature sets."""
    images, labels = load_fashion_mnist("test")
    x = fashion_to_tensor(images[:n])
    y = torch.from_numpy(np.array(labels[:n]))
    vae.eval()
    classifier.eval()
    rec = reconstruct(vae, x, batch_size)
    acc_orig = float((classifier.predict(x) == y).float().mean())
    acc_rec = float((classifier.predict(rec) == y).float().mean())
    return {
        "n": len(x),
        "accuracy_original": acc_orig,
        "accuracy_reconstruction": acc_rec,
        "accuracy_gap_points": round(100 * (acc_orig - acc_rec), 2),
        "mse": float(torch.nn.functional.mse_loss(rec, x)),
        "fd_original_vs_reconstruction": frechet_distance(classifier.embed(x), classifier.embed(rec)),
    }


@torch.no_grad()
def shapes_reconstruction_report(vae, n: int = 1000, seed: int = 0) -> dict:
    """How well held-out shapes scenes survive the VAE: the detector's exact-match rate on originals vs
    reconstructions (same objects, colours and shapes, centroids inside their boxes) and the MSE."""
    specs = [shapes_scene(i, "heldout", seed) for i in range(n)]
    originals = np.stack([render_scene(s) for s in specs])
    x = rgb_to_tensor(originals)
    vae.eval()
    rec = reconstruct(vae, x)
    rec_images = tensor_to_rgb(rec)

    def exact_rate(images: np.ndarray) -> float:
        return float(np.mean([detection_matches_scene(s, detect(im)) for s, im in zip(specs, images)]))

    return {
        "n": n,
        "detector_exact_original": exact_rate(originals),
        "detector_exact_reconstruction": exact_rate(rec_images),
        "mse": float(torch.nn.functional.mse_loss(rec, x)),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="checkpoints/vae", help="AutoencoderKL folder (save_pretrained)")
    p.add_argument("--classifier", default="checkpoints/fmnist-classifier")
    p.add_argument("--n", type=int, default=10_000, help="Fashion-MNIST test images")
    p.add_argument("--n-shapes", type=int, default=1000, help="held-out shapes scenes")
    p.add_argument("--out", default=None, help="optional JSON file for the report")
    p.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "1")))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL  # noqa: PLC0415

    from evaluation.classifier import load_classifier  # noqa: PLC0415

    vae, classifier = AutoencoderKL.from_pretrained(args.vae), load_classifier(args.classifier)
    report = {
        "fashion_test": vae_reconstruction_report(vae, classifier, args.n),
        "shapes_heldout": shapes_reconstruction_report(vae, args.n_shapes),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    else:
        print("(report printed only; pass --out to write it)")
    return report


if __name__ == "__main__":
    main()
