"""Training examples for Transfusion: a seeded mixture of the registered datasets (:mod:`training.datasets`:
image–caption sources and text sources), and the collator that turns a list of examples into one model batch through
the processor.

The example stream
------------------
Example ``i`` of the stream is a pure function of ``(seed, i)`` (:class:`MixtureDataset`): a source drawn by the
mixture weights, an item of that source drawn uniformly (with replacement), and for an image the direction
(caption→image with probability ``1 - image_first_prob``, else image→caption; one probability for every image source
or one per source). Any position of the stream can be
produced without replaying what came before, which is what makes resuming exact and sharding free.

Rows (DESIGN §1, §5)
--------------------
- caption→image: ``<|bos|> caption <|boi|> <|image|>×n <|eoi|> <|eos|>``
- image→caption: ``<|bos|> <|boi|> <|image|>×n <|eoi|> caption <|eos|>``
- text:          ``<|bos|> text <|eos|>``; a chunk longer than ``max_text_tokens`` is cut to a window of that length
  at an offset drawn with the example (only a window that reaches the end keeps the ``<|eos|>``).
- interleaved:   ``<|bos|> text <|boi|> … <|eoi|> text <|boi|> … <|eoi|> … <|eos|>``, a user's row of text and images
  in its own order (never cut: rows longer than the positions are refused when the data is read).

Images travel as precomputed, scaled VAE latents (:func:`load_or_encode_latents`), so training never runs the VAE
encoder; the processor lays out the tokens, pads and writes the labels (its latent path: ``images_as_latents=True``),
and the collator hands the latents on as ``image_latents``.

Micro-batches
-------------
:class:`MicroBatchSampler` cuts the stream into micro-batches of ``batch_size`` examples: micro-batch ``m`` holds
examples ``m·B … m·B + B − 1``. Optimizer step ``s`` consumes micro-batches ``s·A·W … (s+1)·A·W − 1`` (A gradient
accumulation steps, W processes); process ``r`` takes those with ``m ≡ r (mod W)``. One process with ``A·W``
accumulation steps therefore sees exactly the same micro-batches as ``W`` processes with ``A`` each.
"""

import errno
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from training.datasets import DEFAULT_MIX, DataError, ImageCaptionSource, builtin_names

KINDS = ("caption_image", "image_caption", "text", "interleaved")


def parse_named_numbers(text: str, flag: str, expected: str) -> dict[str, float]:
    """``"a=0.4,b=0.6"`` → ``{"a": 0.4, "b": 0.6}``; anything else is a ValueError naming `flag` and what it takes."""
    pairs = [p.split("=", 1) for p in text.replace(" ", "").split(",") if p]
    try:
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return {k: float(v) for k, v in pairs}
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected {expected}") from None


def parse_mix(mix, names=None) -> dict[str, float]:
    """Mixture weights over `names` (default: the built-in datasets) from a dict or a string
    ``"fashion=0.4,shapes=0.4,text=0.2"``; normalised to sum 1, in the order of `names`."""
    names = builtin_names() if names is None else list(names)
    if isinstance(mix, str):
        mix = parse_named_numbers(
            mix, "--mix", "comma-separated name=weight pairs, e.g. fashion=0.4,shapes=0.4,text=0.2"
        )
    if not isinstance(mix, dict):
        raise ValueError(f"--mix {mix!r}: expected name=weight pairs, e.g. fashion=0.4,shapes=0.4,text=0.2")
    unknown = sorted(set(mix) - set(names))
    if unknown:
        raise ValueError(
            f"unknown mixture source(s) {unknown}; allowed: {tuple(names)} (your own data: --dataset NAME=PATH)"
        )
    try:
        weights = {k: float(mix.get(k, 0.0)) for k in names}
    except (TypeError, ValueError):
        raise ValueError(f"--mix {mix!r}: weights must be numbers, e.g. fashion=0.4,shapes=0.4,text=0.2") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"--mix {weights}: mixture weights must be finite numbers ≥ 0, not all 0")
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def parse_image_first(value, image_names=None) -> dict[str, float]:
    """Image→caption probability per image source (`image_names`, default: the built-in ones), from one number (every
    source) or a dict or string ``"fashion=0.4,shapes=0.3"`` (sources not named keep the paper's 0.2)."""
    image_names = builtin_names("image") if image_names is None else list(image_names)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = parse_named_numbers(
                value,
                "--image-first-prob",
                "a probability or name=probability pairs, e.g. 0.2 or fashion=0.4,shapes=0.3",
            )
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise ValueError(
            f"image_first_prob {value!r}: expected a probability or name=probability pairs, "
            "e.g. 0.2 or fashion=0.4,shapes=0.3"
        )
    if isinstance(value, (int, float)):
        probs = dict.fromkeys(image_names, float(value))
    else:
        unknown = sorted(set(value) - set(image_names))
        if unknown:
            raise ValueError(f"image_first_prob names unknown image source(s) {unknown}; allowed: {image_names}")
        try:
            probs = {k: float(value.get(k, 0.2)) for k in image_names}
        except (TypeError, ValueError):
            raise ValueError(f"image_first_prob {value!r}: expected probabilities in [0, 1]") from None
    bad = {k: p for k, p in probs.items() if not 0.0 <= p <= 1.0}
    if bad:
        raise ValueError(f"image_first_prob {bad}: expected probabilities in [0, 1]")
    return probs


# ----------------------------------------------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSource:
    """The images of one source as scaled VAE latents (N, C, h, w) with their captions."""

    name: str
    latents: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def vae_fingerprint(vae) -> str:
    """A short hash of a VAE's config and weights: the key of its latent caches."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_pixels(encode_images, chunks: Iterator[torch.Tensor], batch_size: int = 250, device=None,
                  progress=None) -> torch.Tensor:
    """Scaled latents of all images in `chunks` with `encode_images` ((N, 3, H, W) → (N, C, h, w)), in float32."""
    out = []
    for pixels in chunks:
        for i in range(0, len(pixels), batch_size):
            x = pixels[i : i + batch_size]
            out.append(encode_images(x.to(device) if device is not None else x).float().cpu())
            if progress is not None:
                progress.update(len(x))
    return torch.cat(out)


class LatentCacheError(ValueError):
    """A latent cache file that cannot be used; the message names it and says to delete it."""


def _read_latent_cache(path: Path) -> tuple[torch.Tensor, list[str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            latents = f.get_tensor("latents")
            captions = json.loads((f.metadata() or {})["captions"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:  # truncated, empty or not a cache
        raise LatentCacheError(
            f"latent cache {path} is unreadable ({type(err).__name__}: {err}); delete it to re-encode"
        ) from None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise LatentCacheError(f"latent cache {path} holds no caption list; delete it to re-encode")
    if not torch.isfinite(latents).all():
        raise LatentCacheError(f"latent cache {path} holds NaN or infinite latents; delete it to re-encode")
    return latents, captions


def load_or_encode_latents(
    model, source: ImageCaptionSource, count: int | None, cache_dir: str | os.PathLike, device=None, log=print
) -> ImageSource:
    """The latents of a source's first `count` pairs (all when None), from
    ``<cache_dir>/latents-<name>-n<count>-<tag>-<vae hash>.safetensors`` (the latents as a tensor, the captions as JSON
    metadata) or encoded with `model.encode_images` and written there (atomically). The file is keyed by the source's
    content tag and the VAE's weights, so changed data or a retrained VAE never reads stale latents."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    name = source.name
    n = len(source) if count is None else min(count, len(source))
    key = f"latents-{name}-n{n}-{source.cache_tag}-{vae_fingerprint(model.model.vae)}.safetensors"
    path = Path(cache_dir) / key
    if path.exists():
        latents, captions = _read_latent_cache(path)
        stale = source.verify_cached_captions and captions != source.captions(n)
        if len(captions) != n or len(latents) != n or stale:
            raise LatentCacheError(f"latent cache {path} does not match the {n} {name} images; delete it to re-encode")
        log(f"latents of {n} {name} images from {path}")
        return ImageSource(name, latents, captions)
    captions, chunks = source.captions(n), source.pixels(n)
    log(f"encoding {len(captions)} {name} images with the VAE (once; cached in {path})")
    with tqdm(total=len(captions), desc=f"encode {name}", dynamic_ncols=True, mininterval=5) as bar:
        latents = encode_pixels(model.encode_images, chunks, device=device, progress=bar)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={"captions": json.dumps(captions)})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
        reason = "no space left on device" if full else f"{type(err).__name__}: {err}"
        raise LatentCacheError(f"could not write latent cache {path}: {reason}; nothing was cached, "
                               "pass --latent-cache a folder with room or free some space") from None  # fmt: skip
    return ImageSource(name, latents, captions)


# ----------------------------------------------------------------------------------------------------------------
# The example stream
# ----------------------------------------------------------------------------------------------------------------


class MixtureDataset(Dataset):
    """An endless, index-addressable stream of training examples (see the module docstring).

    Each example is a dict: ``index`` (its position in the stream), ``kind`` (one of :data:`KINDS`), ``text`` (the
    caption or text chunk), ``latent`` ((C, h, w) or None), ``items`` (an interleaved row's strings and latents) and
    ``window`` (a uniform number in [0, 1) that places
    the window of a long text chunk).
    """

    CHUNK = 4096  # examples drawn together from one RNG

    def __init__(
        self,
        images: dict[str, ImageSource],
        texts: list[str] | dict[str, list[str]],
        mix: dict[str, float] | str | None = None,
        image_first_prob: float | dict[str, float] | str = 0.2,
        seed: int = 0,
        interleaved: dict[str, list[list]] | None = None,
    ):
        texts = {"text": texts} if isinstance(texts, list) else dict(texts)
        self.interleaved = dict(interleaved or {})  # name → rows, each a list of strings and (C, h, w) latents
        builtin = builtin_names()
        names = builtin + [k for k in [*images, *texts, *self.interleaved] if k not in builtin]
        first = parse_image_first(image_first_prob, [k for k in names if k in images or k in builtin_names("image")])
        weights = parse_mix(DEFAULT_MIX if mix is None else mix, names)
        sizes = {k: len(v) for k, v in {**images, **texts, **self.interleaved}.items()}
        for name, weight in weights.items():
            if weight > 0 and not sizes.get(name):
                raise ValueError(f"mixture weight {name}={weight:.3f} but the {name} source is empty or not loaded")
        self.sources = [k for k in names if weights[k] > 0]
        self.cumulative = np.cumsum([weights[k] for k in self.sources])
        self.cumulative[-1] = 1.0
        self.sizes = np.array([sizes[k] for k in self.sources])
        self.images, self.texts = images, texts
        self.image_first_prob, self.seed = first, seed
        self._first = np.array([first.get(k, 0.0) for k in self.sources])  # by source index; text rows ignore it

    @lru_cache(maxsize=8)
    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0x7F5, c])
        u = rng.random((4, self.CHUNK))
        source = np.searchsorted(self.cumulative, u[0], side="right").clip(max=len(self.sources) - 1)
        item = np.minimum((u[1] * self.sizes[source]).astype(np.int64), self.sizes[source] - 1)
        return source, item, u[2] < self._first[source], u[3]

    def __len__(self) -> int:
        return 2**62  # endless; read through MicroBatchSampler

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            raise IndexError(f"stream index {index} < 0")
        source, item, image_first, window = (a[index % self.CHUNK] for a in self._chunk(index // self.CHUNK))
        name, item = self.sources[source], int(item)
        if name in self.texts:
            return {"index": index, "kind": "text", "text": self.texts[name][item], "latent": None,
                    "window": float(window)}
        if name in self.interleaved:
            return {"index": index, "kind": "interleaved", "items": self.interleaved[name][item], "text": None,
                    "latent": None, "window": 0.0}  # fmt: skip
        src = self.images[name]
        kind = "image_caption" if image_first else "caption_image"
        return {"index": index, "kind": kind, "text": src.captions[item], "latent": src.latents[item], "window": 0.0}


class MicroBatchSampler(Sampler):
    """This process's micro-batches of stream indices, from optimizer step `start_step` on, forever.

    Step s, accumulation a, process r reads micro-batch m = (s·A + a)·W + r, i.e. examples m·B … m·B + B − 1.
    """

    def __init__(self, batch_size: int, grad_accum: int = 1, num_processes: int = 1, process_index: int = 0,
                 start_step: int = 0):
        if batch_size < 1 or grad_accum < 1 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"batch_size={batch_size}, grad_accum={grad_accum} must be ≥ 1 and process_index={process_index} in "
                f"[0, num_processes={num_processes})"
            )
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.num_processes, self.process_index, self.start_step = num_processes, process_index, start_step

    def micro_index(self, step: int, accum: int) -> int:
        return (step * self.grad_accum + accum) * self.num_processes + self.process_index

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for a in range(self.grad_accum):
                m = self.micro_index(step, a)
                yield list(range(m * self.batch_size, (m + 1) * self.batch_size))
            step += 1


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


class TransfusionCollator:
    """Examples → ``{"example_index": (B,), "parts": [part, ...]}``.

    A part is a model batch: ``input_ids``, ``attention_mask``, ``labels`` (right padded), ``image_latents``
    (N, C, h, w) for its images in row-major order and ``image_is_input`` (N,) (the images a conversation gives, kept
    clean; both absent when it has no image). With ``split_text`` (default) the text rows, the caption rows and the
    interleaved rows (conversations, edits) of the micro-batch are up to three parts in that order, each padded to its
    own longest row: a text row is two to three times longer than a caption row, an edit two to four times, and one
    padded batch would spend about half its compute on padding. Without it there is a single part.
    """

    def __init__(self, processor, max_text_tokens: int = 64, split_text: bool = True):
        if max_text_tokens < 2:
            raise ValueError(f"max_text_tokens={max_text_tokens}; need at least 2 (<|bos|> and one token)")
        self.processor, self.max_text_tokens, self.split_text = processor, max_text_tokens, split_text

    def rows(self, examples: list[dict]) -> list[list]:
        rows = []
        for ex in examples:
            if ex["kind"] not in KINDS:
                raise ValueError(f"example kind {ex['kind']!r}; expected one of {KINDS}")
            if ex["kind"] == "interleaved":
                rows.append(list(ex["items"]))
            elif ex["kind"] == "caption_image":
                rows.append([ex["text"], ex["latent"]])
            elif ex["kind"] == "image_caption":
                rows.append([ex["latent"], ex["text"]])
            else:
                rows.append([ex["text"]])
        return rows

    def _part(self, rows: list[list[int]], images: list[int], enc) -> dict[str, torch.Tensor]:
        """A model batch of token `rows` and the images `images` (their indices in the processor's output `enc`)."""
        input_ids, attention_mask = self.processor.pad(rows, padding_side="right")
        labels = self.processor.labels(input_ids, attention_mask)  # −100 on image slots, <|eoi|> and padding
        part = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if images:
            part["image_latents"] = enc["image_latents"][images].float()  # (N, C, h, w), row-major
            part["image_is_input"] = enc["image_is_input"][images]  # (N,)
        return part

    def __call__(self, examples: list[dict]) -> dict:
        enc = self.processor(self.rows(examples), add_eos=True, images_as_latents=True, return_image_inputs=True)
        ids, lengths = enc["input_ids"], enc["attention_mask"].sum(-1).tolist()
        counts = (ids == self.processor.special_ids["boi"]).sum(-1).tolist()  # images per row
        first = np.cumsum([0, *counts])
        images_of = [list(range(first[i], first[i + 1])) for i in range(len(examples))]
        kept = []  # the token ids of each row without padding, text rows cut to a window
        for i, ex in enumerate(examples):
            row_ids, n = ids[i, : lengths[i]], lengths[i]
            m = self.max_text_tokens
            if ex["kind"] == "text" and n > m:
                start = 1 + min(int(ex["window"] * (n - m + 1)), n - m)  # position after <|bos|>
                row_ids = torch.cat([row_ids[:1], row_ids[start : start + m - 1]])
            kept.append(row_ids.tolist())
        groups = [list(range(len(examples)))]
        if self.split_text:
            kind = {"text": 0, "interleaved": 2}
            groups = [[i for i, ex in enumerate(examples) if kind.get(ex["kind"], 1) == k] for k in range(3)]
            groups = [g for g in groups if g]
        parts = [self._part([kept[i] for i in g], [k for i in g for k in images_of[i]], enc) for g in groups]
        return {"example_index": torch.tensor([ex["index"] for ex in examples], dtype=torch.long), "parts": parts}


def check_row_lengths(processor, name: str, rows: list[list], positions: int) -> list[list]:
    """Interleaved rows are never cut: each must fit the model's positions (the processor lays them out)."""
    for i, row in enumerate(rows):
        length = int(processor([row], add_eos=True, images_as_latents=True)["attention_mask"].sum())
        if length > positions:
            raise DataError(f"{name} row {i} is {length} tokens long with its images; the model has {positions} "
                            "positions (max_position_embeddings): split the row")  # fmt: skip
    return rows


__all__ = [
    "ImageSource",
    "check_row_lengths",
    "MicroBatchSampler",
    "MixtureDataset",
    "TransfusionCollator",
    "encode_pixels",
    "load_or_encode_latents",
    "parse_mix",
    "vae_fingerprint",
]
