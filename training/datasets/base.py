"""Training data behind one registry: every dataset is one file here, and the training script, the LoRA script and
the collator only ever see the two kinds of source this module defines.

- :class:`ImageCaptionSource` — N (image, caption) pairs: `captions(n)` and `pixels(n)`, chunks of (k, 3, S, S) in
  [-1, 1]; the collator encodes them once into a VAE latent cache (``training.collate.load_or_encode_latents``).
- :class:`TextSource` — text chunks for next-token rows.

A dataset class is registered under its name with :func:`register_dataset`; it may add its own command-line options
(``add_arguments``) and is built from the parsed arguments (``from_args``). Built in: ``fashion``
(:mod:`.fashion_mnist`), ``shapes`` (:mod:`.shapes`), ``text`` (:mod:`.text`); a user's own data comes in through
Hugging Face ``datasets`` (:mod:`.user_data`, ``--dataset NAME=PATH``).
"""

import argparse
from collections.abc import Iterator

import numpy as np
import torch

DATASETS: dict[str, type] = {}


def register_dataset(cls):
    """Class decorator: make `cls` (with a `name`) selectable by that name in ``--mix``."""
    DATASETS[cls.name] = cls
    return cls


class Source:
    """What every registered dataset class has: a name, a modality, its options and how it is built from them."""

    name: str = ""
    modality = ""

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Command-line options of this dataset (none by default)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, image_size: int = 32) -> list["Source"]:
        """The sources this dataset gives for the parsed arguments (`image_size`: the model's resolution)."""
        return [cls()]


class ImageCaptionSource(Source):
    """(image, caption) pairs for training. Subclasses set `name` and implement `__len__`, `captions` and `pixels`."""

    modality = "image"
    # a latent cache of this source is keyed by its name, size, this tag and the VAE: change it when the content does
    cache_tag = "s0"
    # whether a cached latent file's captions are compared with `captions(n)` before use (cheap unless generated)
    verify_cached_captions = True

    def __len__(self) -> int:
        raise NotImplementedError

    def captions(self, n: int) -> list[str]:
        """The captions of the first `n` pairs."""
        raise NotImplementedError

    def pixels(self, n: int, chunk: int = 1000) -> Iterator[torch.Tensor]:
        """The first `n` images in chunks of (k, 3, S, S) float in [-1, 1], read lazily (a pass over the data)."""
        raise NotImplementedError


class TextSource(Source):
    """Text chunks for next-token rows. Subclasses set `name` and implement `texts`."""

    modality = "text"

    def texts(self) -> list[str]:
        raise NotImplementedError


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Every registered dataset's options, in one argument group."""
    group = parser.add_argument_group("datasets", f"built in: {', '.join(DATASETS)}; --mix weights any of them")
    for cls in DATASETS.values():
        cls.add_arguments(group)


def build_sources(args: argparse.Namespace, names, image_size: int = 32, strict: bool = True) -> dict[str, "Source"]:
    """The sources `names` asks for (those --mix weights above zero), built from the parsed arguments, in registry
    order (built-in worlds first, then --dataset sources as given). User datasets are read even when unweighted, so
    a bad --dataset is named at once."""
    sources = {}
    for cls in DATASETS.values():
        if cls.modality != "any" and cls.name not in names:
            continue  # a built-in world nobody asked for is not loaded
        for source in cls.from_args(args, image_size):
            sources[source.name] = source
    missing = sorted(set(names) - set(sources))
    if missing and strict:  # (not strict: those of `names` that exist, e.g. a NAME_text only where there are text rows)
        raise ValueError(f"--mix names dataset(s) {missing} that are neither built in ({', '.join(DATASETS)}) "
                         "nor given with --dataset NAME=PATH")  # fmt: skip
    return {name: source for name, source in sources.items() if name in names}


def builtin_names(modality: str | None = None) -> list[str]:
    """The built-in datasets' names (of one modality), in registry order."""
    return [name for name, cls in DATASETS.items() if cls.modality != "any" and modality in (None, cls.modality)]


def source_names(args: argparse.Namespace) -> list[str]:
    """Every dataset name --mix may weight: the built-in ones, then the --dataset ones."""
    from .user_data import parse_dataset_spec

    user = [parse_dataset_spec(spec)[0] for spec in getattr(args, "dataset", None) or []]
    # NAME_text: its rows without an image
    return builtin_names() + [n for name in user for n in (name, f"{name}_text")]


def rgb_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(127.5).sub_(1.0)
    return x.permute(0, 3, 1, 2).contiguous()


def tensor_to_rgb(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) or (3, H, W) in [-1, 1] → uint8 (N, H, W, 3) (or (H, W, 3))."""
    single = x.ndim == 3
    if single:
        x = x[None]
    out = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out[0] if single else out
