"""Fashion-MNIST (Debian's ``dataset-fashion-mnist``): 60,000 training images of ten clothing classes, captioned
``a photo of a {class}``, padded from 28×28 to 32×32 and grey to RGB."""

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ImageCaptionSource, register_dataset

# The Debian package's folder; FASHION_MNIST_DIR points elsewhere (the same four idx .gz files, e.g. on a GPU host)
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def fashion_caption(label: int) -> str:
    """The caption of Fashion-MNIST class `label`: ``a photo of a {name}``."""
    return f"a photo of a {FASHION_CLASSES[int(label)]}"


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format): big-endian header of magic + dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ValueError(f"{path}: unsupported idx magic {magic:#x}; expected unsigned-byte data (0x0008nn)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def _load_fashion_cached(split: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(folder)
    prefix = FASHION_SPLIT_PREFIX[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{root}: inconsistent Fashion-MNIST {split} files: {images.shape} images, {labels.shape} labels"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str = "train", folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from the Debian package (or `folder`, or $FASHION_MNIST_DIR): uint8 images (N, 28, 28) and
    int64 labels (N,).

    `split` is "train" (60,000) or "test" (10,000). The arrays are cached and read-only; copy before editing.
    """
    if split not in FASHION_SPLIT_PREFIX:
        raise ValueError(f"split={split!r}; expected one of {sorted(FASHION_SPLIT_PREFIX)}")
    root = Path(folder) if folder is not None else FASHION_DIR
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} not found. "
            "Install the Debian package: apt-get install -y dataset-fashion-mnist "
            "(or set FASHION_MNIST_DIR to a folder holding its four idx .gz files)"
        )
    return _load_fashion_cached(split, str(root))



def fashion_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 3, 32, 32) in [-1, 1]: 2 px of background (0 → -1) padded, grey to RGB."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected uint8 images of shape (N, 28, 28), got {images.shape}")
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(127.5).sub_(1.0)  # (N, 28, 28)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 32, 32)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)


class FashionDataset(Dataset):
    """Fashion-MNIST as (image (3, 32, 32) in [-1, 1], caption). `labels` holds the class ids."""

    def __init__(self, split: str = "train"):
        self.images, self.labels = load_fashion_mnist(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return fashion_to_tensor(self.images[index])[0], fashion_caption(self.labels[index])




@register_dataset
class FashionMNISTSource(ImageCaptionSource):
    """The Fashion-MNIST train split as a training source."""

    name = "fashion"

    def __init__(self):
        self.images, self.labels = load_fashion_mnist("train")

    def __len__(self) -> int:
        return len(self.labels)

    def captions(self, n: int) -> list[str]:
        return [fashion_caption(c) for c in self.labels[:n]]

    def pixels(self, n: int, chunk: int = 1000):
        return (fashion_to_tensor(self.images[i : min(i + chunk, n)]) for i in range(0, n, chunk))
