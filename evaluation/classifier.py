"""A small CNN that classifies Fashion-MNIST from (3, 32, 32) images in [-1, 1]; its penultimate features feed the
Fréchet distance ("FD") used to evaluate generated images.

    python -m evaluation.classifier --epochs 3 --threads 1     # trains and saves to checkpoints/fmnist-classifier/
"""

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.datasets import FASHION_CLASSES, fashion_to_tensor, load_fashion_mnist

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ClassifierConfig:
    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = len(FASHION_CLASSES)
    dropout: float = 0.2


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 convolutions with batch norm, then 2× max-pooling: (B, c_in, H, W) → (B, c_out, H/2, W/2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionClassifier(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] → logits (B, 10); `features` gives the (B, feature_dim) penultimate layer."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        c1, c2, c3 = self.config.channels
        self.blocks = nn.Sequential(_conv_block(3, c1), _conv_block(c1, c2), _conv_block(c2, c3))  # → (B, c3, 4, 4)
        self.proj = nn.Linear(c3, self.config.feature_dim)
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x).mean(dim=(2, 3))  # global average pool: (B, c3)
        return F.relu(self.proj(h))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Class ids (N,) for images (N, 3, 32, 32)."""
        return torch.cat([self(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """Penultimate features (N, feature_dim) as float64 numpy, for frechet_distance."""
        return torch.cat([self.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()

    def save(self, path: str | os.PathLike, **extra) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS_NAME)
        config = {**asdict(self.config), "classes": list(FASHION_CLASSES), **extra}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(path: str | os.PathLike = "checkpoints/fmnist-classifier") -> FashionClassifier:
    """Load a saved classifier folder (config.json + model.safetensors), in eval mode."""
    path = Path(path)
    if not (path / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{path / WEIGHTS_NAME} not found; train one with `python -m evaluation.classifier`")
    raw = json.loads((path / CONFIG_NAME).read_text())
    fields = ClassifierConfig.__dataclass_fields__
    config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
    model = FashionClassifier(config)
    model.load_state_dict(load_file(path / WEIGHTS_NAME))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: FashionClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = float((model.predict(x) == labels).float().mean())
    model.train(was_training)
    return acc


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and ±2 px shifts (the padding makes shifts free of cropping)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/fmnist-classifier", help="folder for config.json + model.safetensors")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--minutes", type=float, default=None, help="optional wall-clock budget (stops early)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("TRANSFUSION_THREADS", "1")))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    x_test, y_test = fashion_to_tensor(test_images), torch.from_numpy(np.array(test_labels))
    y_train = torch.from_numpy(np.array(train_labels))

    model = FashionClassifier()
    steps_per_epoch = len(train_labels) // args.batch_size
    total_steps = int(args.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.15)
    print(f"classifier {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {total_steps} steps")

    start = time.time()
    model.train()
    step, order = 0, torch.randperm(len(y_train), generator=generator)
    for step in tqdm(range(total_steps), desc="classifier", mininterval=10):
        if args.minutes is not None and time.time() - start > args.minutes * 60:
            print(f"time budget reached at step {step}")
            break
        pos = (step % steps_per_epoch) * args.batch_size
        if pos == 0 and step > 0:
            order = torch.randperm(len(y_train), generator=generator)
        idx = order[pos : pos + args.batch_size]
        x = _augment(fashion_to_tensor(train_images[idx.numpy()]), generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):  # ~4× faster on AMX CPUs
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    minutes = (time.time() - start) / 60
    model.save(args.out, test_accuracy=test_acc, train_steps=step + 1, train_minutes=round(minutes, 2))
    print(f"test accuracy {test_acc:.4f} after {step + 1} steps ({minutes:.1f} min)")
    print(f"wrote the classifier to {args.out}/ ({CONFIG_NAME}, {WEIGHTS_NAME})")
    return {"test_accuracy": test_acc, "steps": step + 1, "minutes": minutes}


if __name__ == "__main__":
    main()
