"""A user's own data through Hugging Face ``datasets``: ``--dataset NAME=PATH`` (repeatable), weighted in ``--mix`` by
NAME like the built-in worlds.

PATH may be
- a folder of images with ``metadata.jsonl`` or ``metadata.csv`` holding a caption column (``datasets``'
  ``imagefolder``, the layout diffusers' training scripts read): ``file_name,text``;
- a JSONL, JSON, CSV or Parquet file of rows with a caption column and an image column (a path relative to the file,
  or an ``imagefolder``-style image); rows without an image are text rows, a source of their own named NAME_text;
- a JSONL/JSON file of interleaved rows: a ``content`` column (``--content-column``) holding a list of
  ``{"type": "text", "text": …}`` and ``{"type": "image", "image": path}`` parts in their order (paths relative to the
  file), trained as one sequence each, every image diffused and every text token predicted;
- a JSONL/JSON file of conversations: a ``messages`` column (``--messages-column``) holding
  ``{"role": "user" | "assistant", "content": …}`` turns, a content being a string or such a list of parts (your own
  edits: the source image and the instruction from the user, the edited image from the assistant); the user's images
  stay clean inputs, the last assistant image is diffused (the processor's conversation layout);
- a folder of images each with its caption in a same-name ``.txt`` beside it (``000.png`` + ``000.txt``);
- a folder of ``.txt`` files, or one ``.txt`` file: text, one row per line (``datasets``' ``text`` builder);
- a folder written by ``Dataset.save_to_disk``, or any other folder ``datasets.load_dataset`` reads.
A source with an image column gives (image, caption) pairs, one without gives text rows. Images of any size and mode
are fitted to the model's resolution as the processor fits images at inference (``--image-fit pad``: keep the whole
image, pad it square) or centre-cropped (``--image-fit crop``). ``--streaming`` reads the data in passes without holding
it in memory (the latents are cached once, so training itself never rereads it).
"""

import argparse
import copy
import hashlib
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from modeling_transfusion.processing_transfusion import prepare_image

from .base import DATASETS, ImageCaptionSource, Source, TextSource, register_dataset

TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """User data that cannot be trained on; the message names the file or row and what is expected."""


def parse_dataset_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its file or folder stem) → (name, path)."""
    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path = Path(path).expanduser()
    name = name or path.stem
    if not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"--dataset {spec!r}: a dataset name is letters, digits, '-' and '_' (NAME=PATH)")
    if not path.exists():
        raise DataError(
            f"--dataset {spec!r}: {path} does not exist (a folder or a .jsonl/.json/.csv/.parquet/.txt file)"
        )
    return name, path


def load_user_dataset(path: Path, streaming: bool = False):
    """`path` through the matching ``datasets`` loader (its train split)."""
    import datasets

    if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        data = datasets.load_from_disk(str(path))
        data = data["train"] if isinstance(data, datasets.DatasetDict) else data
        return data.to_iterable_dataset() if streaming else data
    if path.is_file():
        builder = TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: a data file is one of {sorted(TABLE_BUILDERS)}, got {path.suffix or 'no suffix'}")
        kwargs = {"data_files": str(path)}
    elif not any(path.glob("metadata.*")) and _sidecar_images(path):
        images = _sidecar_images(path)
        missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise DataError(f"{path}: the images {missing[:5]} have no caption file beside them (same name, .txt)")
        rows = {"image": [str(p.resolve()) for p in images],
                "text": [p.with_suffix(".txt").read_text().strip() for p in images]}
        data = datasets.Dataset.from_dict(rows)
        return data.to_iterable_dataset() if streaming else data
    elif any(path.glob("metadata.*")) or not any(path.rglob("*.txt")):
        builder, kwargs = "imagefolder", {"data_dir": str(path)}
    elif all(p.suffix == ".txt" for p in path.rglob("*") if p.is_file()):
        builder, kwargs = "text", {"data_dir": str(path)}
    else:
        builder, kwargs = str(path), {}
    try:
        return datasets.load_dataset(builder, split="train", streaming=streaming, **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets' builders raise many kinds (even StopIteration on an empty file)
        raise DataError(f"{path} cannot be read as a dataset ({type(err).__name__}: {err})") from None


def _sidecar_images(folder: Path) -> list[Path]:
    """The images of a folder in the caption-beside-image layout (images and .txt files side by side), sorted."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return images if images and any(p.with_suffix(".txt").is_file() for p in images) else []


def _fingerprint(path: Path, *options) -> str:
    """A short hash of every file's name, size and modification time under `path`, and the reading options."""
    h = hashlib.sha256(json.dumps([str(path.resolve()), *map(str, options)]).encode())
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            stat = p.stat()
            h.update(f"{p.relative_to(path) if p != path else p.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def fit_image(image: PIL.Image.Image, size: int, fit: str) -> PIL.Image.Image:
    """An RGB `size`² image: the processor's fit (EXIF, transparency, aspect-keeping pad) or a centre crop first."""
    if fit == "crop" and image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return prepare_image(image, size)[0]


class _UserRows:
    """The rows of one user dataset, read in passes (every pass starts from the first row)."""

    def __init__(self, name: str, path: Path, args: argparse.Namespace):
        self.name, self.path, self.streaming = name, path, bool(args.streaming)
        self.caption_column, self.image_column = args.caption_column, args.image_column
        self.data = load_user_dataset(path, self.streaming)
        columns = list(self.data.column_names or next(iter(self.data)).keys())
        self.has_images = self.image_column in columns
        self.content_column = args.content_column
        self.messages_column = getattr(args, "messages_column", "messages")
        self.conversations = self.messages_column in columns and self.content_column not in columns
        self.interleaved = self.content_column in columns or self.conversations
        if self.interleaved:
            self.length = None if self.streaming else len(self.data)
            return
        if self.caption_column not in columns:
            raise DataError(f"{path} has no caption column {self.caption_column!r} (its columns: {columns}); name the "
                            "column that holds the captions or text with --caption-column")  # fmt: skip
        if self.has_images:
            import datasets

            feature = (self.data.features or {}).get(self.image_column)
            if isinstance(feature, datasets.Value):  # paths in a JSONL/CSV: relative to that file
                base = path.parent if path.is_file() else path
                self.data = self.data.map(lambda row: {self.image_column: str(base / row[self.image_column])}
                                          if row[self.image_column] else row)  # fmt: skip
            self.data = self.data.cast_column(self.image_column, datasets.Image(decode=False))
            column = self.image_column
            self.text_data = self.data.filter(lambda row: row[column] is None)  # rows without an image: text rows
            self.data = self.data.filter(lambda row: row[column] is not None)
        self.length = None if self.streaming else len(self.data)
        if (self.length == 0 or (self.streaming and next(iter(self.data), None) is None)) and not (
                self.has_images and next(iter(self.text_data), None) is not None):  # fmt: skip
            raise DataError(f"{path} holds no rows: a dataset needs at least one")

    def text_rows(self) -> "_UserRows | None":
        """The rows without an image, as a text dataset named NAME_text (None when there are none)."""
        if next(iter(self.text_data), None) is None:
            return None
        rows = copy.copy(self)
        rows.name, rows.data, rows.has_images, rows.length = f"{self.name}_text", self.text_data, False, None
        return rows

    def rows(self, columns: list[str]) -> Iterator[tuple[int, dict]]:
        data = self.data.select_columns(columns)
        return enumerate(data)

    def count(self) -> int:
        if self.length is None:
            self.length = sum(1 for _ in self.rows([self.caption_column]))
        return self.length

    def text(self, i: int, row: dict) -> str:
        text = row[self.caption_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{self.path} row {i}: column {self.caption_column!r} holds {text!r}, not a non-empty string"
            )
        return text

    def image(self, i: int, row: dict) -> PIL.Image.Image:
        item = row[self.image_column]
        where = item.get("path") if isinstance(item, dict) else None
        try:
            data = item.get("bytes") if isinstance(item, dict) else None
            image = PIL.Image.open(io.BytesIO(data)) if data else PIL.Image.open(where)
            image.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds; each is reported with its row
            raise DataError(
                f"{self.path} row {i}: the image {where or ''} cannot be read ({type(err).__name__}: {err})"
            ) from None
        return image


class UserImageSource(ImageCaptionSource):
    """(image, caption) pairs of a user dataset."""

    def __init__(self, rows: _UserRows, image_size: int, fit: str):
        self.name, self.rows_, self.image_size, self.fit = rows.name, rows, image_size, fit
        self.cache_tag = "u" + _fingerprint(rows.path, rows.caption_column, rows.image_column, fit, image_size)

    def __len__(self) -> int:
        return self.rows_.count()

    def captions(self, n: int) -> list[str]:
        r = self.rows_
        return [r.text(i, row) for i, row in itertools.islice(r.rows([r.caption_column]), n)]

    def pixels(self, n: int, chunk: int = 1000) -> Iterator[torch.Tensor]:
        r = self.rows_
        images = (r.image(i, row) for i, row in itertools.islice(r.rows([r.image_column]), n))
        return _pixel_chunks(images, self.image_size, self.fit, chunk)


def _pixel_chunks(images, size: int, fit: str, chunk: int) -> Iterator[torch.Tensor]:
    """PIL images → chunks of (k, 3, size, size) float in [-1, 1], fitted as `fit` says."""
    batch = []
    for image in images:
        image = fit_image(image, size, fit)
        batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
        if len(batch) == chunk:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


class UserTextSource(TextSource):
    """The text rows of a user dataset (one without an image column)."""

    def __init__(self, rows: _UserRows):
        self.name, self.rows_ = rows.name, rows

    def texts(self) -> list[str]:
        r = self.rows_
        blank = lambda value: isinstance(value, str) and not value.strip()  # noqa: E731 - blank lines of text files
        return [r.text(i, row) for i, row in r.rows([r.caption_column]) if not blank(row[r.caption_column])]


class UserInterleavedSource(Source):
    """Interleaved rows or conversations of a user dataset, kept in order. Its images are one image source (`images`,
    captioned by their paths for the latent cache's check); `rows(latents)` puts their latents in place."""

    modality = "interleaved"

    def __init__(self, rows: _UserRows, image_size: int, fit: str):
        self.name, base = rows.name, rows.path.parent if rows.path.is_file() else rows.path
        self.conversations = rows.conversations
        column = rows.messages_column if self.conversations else rows.content_column
        self.parts, paths = [], []  # per row: [(role, parts)], parts ("text", str) or ("image", index into paths)
        for i, row in rows.rows([column]):
            where = f"{rows.path} row {i}"
            if self.conversations:
                messages = row[column] if isinstance(row[column], list) else [None]
                turns = [self._turn(m, where, j, base, paths) for j, m in enumerate(messages)]
            else:
                turns = [(None, self._parts(row[column], where, column, base, paths))]
            if not turns or not all(parts for _, parts in turns):
                raise DataError(f"{where}: {column!r} holds no parts")
            self.parts.append(turns)
        self.images = _PathImages(f"{self.name}_images", rows.path, paths, image_size, fit)

    @staticmethod
    def _turn(message, where, j, base, paths) -> tuple[str, list]:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise DataError(f'{where}: message {j} is {message!r}; a message is {{"role": "user" | "assistant", '
                            '"content": a string or a list of parts}')  # fmt: skip
        content = message.get("content")
        content = [{"type": "text", "text": content}] if isinstance(content, str) else content
        return message["role"], UserInterleavedSource._parts(content, f"{where} message {j}", "content", base, paths)

    @staticmethod
    def _parts(content, where, column, base, paths) -> list:
        parts = []
        for j, part in enumerate(content if isinstance(content, list) else [None]):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str) and part["text"].strip():
                parts.append(("text", part["text"]))
            elif kind == "image" and isinstance(part.get("image"), str):
                parts.append(("image", len(paths)))
                paths.append(str(base / part["image"]))
            else:
                raise DataError(f"{where}: part {j} of {column!r} is {part!r}; each part "
                                'is {"type": "text", "text": "…"} or {"type": "image", "image": "path"}')
        return parts

    def __len__(self) -> int:
        return len(self.parts)

    def rows(self, latents: torch.Tensor) -> list[list]:
        """The rows with the images' latents (N, C, h, w) in place: lists of strings and (C, h, w) tensors, or
        conversations of such contents."""
        def place(parts):
            return [value if kind == "text" else latents[value] for kind, value in parts]

        if self.conversations:
            return [[{"role": role, "content": place(parts)} for role, parts in turns] for turns in self.parts]
        return [place(turns[0][1]) for turns in self.parts]


class _PathImages(ImageCaptionSource):
    """The images of an interleaved dataset, by path, as an image source for the latent cache."""

    def __init__(self, name: str, path: Path, paths: list[str], image_size: int, fit: str):
        self.name, self.source, self.paths, self.image_size, self.fit = name, path, paths, image_size, fit
        self.cache_tag = "u" + _fingerprint(path, "interleaved", fit, image_size, *paths)

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self, n: int) -> list[str]:
        return self.paths[:n]

    def pixels(self, n: int, chunk: int = 1000) -> Iterator[torch.Tensor]:
        return _pixel_chunks((self._open(i, p) for i, p in enumerate(self.paths[:n])), self.image_size, self.fit, chunk)

    def _open(self, i: int, path: str) -> PIL.Image.Image:
        try:
            image = PIL.Image.open(path)
            image.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds; each is reported with its image
            raise DataError(f"{self.source}: image {i} ({path}) cannot be read ({type(err).__name__}: {err})") from None
        return image


@register_dataset
class UserDataset(Source):
    """The registry entry that turns each ``--dataset NAME=PATH`` into a source named NAME."""

    name = "user"
    modality = "any"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                           help="your own data (repeatable): an image folder with metadata.jsonl/csv, a .jsonl/.csv/"
                           ".parquet/.txt file, a folder of .txt files or a saved datasets folder; weight it in --mix "
                           "by NAME (default name: the file or folder stem)")  # fmt: skip
        group.add_argument("--caption-column", default="text", help="column of the captions or text (default: text)")
        group.add_argument("--image-column", default="image", help="column of the images (default: image)")
        group.add_argument("--content-column", default="content",
                           help="column of interleaved rows: lists of text and image parts (default: content)")
        group.add_argument("--messages-column", default="messages",
                           help="column of conversations: lists of user/assistant turns (default: messages)")
        group.add_argument("--image-fit", choices=("pad", "crop"), default="pad",
                           help="fit images to the model's resolution: pad to a square (keep all) or centre-crop")
        group.add_argument("--resolution", type=int, help="image side in pixels; must be the model's (its default)")
        group.add_argument("--streaming", action="store_true",
                           help="read --dataset data in passes, never all in memory")

    @classmethod
    def from_args(cls, args: argparse.Namespace, image_size: int = 32) -> list[ImageCaptionSource | TextSource]:
        specs = getattr(args, "dataset", None) or []
        resolution = getattr(args, "resolution", None)
        if specs and resolution is not None and resolution != image_size:
            raise DataError(
                f"--resolution {resolution}: this model takes {image_size}×{image_size} images (its image_size)"
            )
        sources = []
        for spec in specs:
            name, path = parse_dataset_spec(spec)
            if name in DATASETS or name in {s.name for s in sources}:
                raise DataError(f"--dataset {spec!r}: the name {name!r} is taken; give another as NAME=PATH")
            rows = _UserRows(name, path, args)
            if rows.interleaved:
                sources.append(UserInterleavedSource(rows, image_size, args.image_fit))
                continue
            if not rows.has_images:
                sources.append(UserTextSource(rows))
                continue
            if next(iter(rows.data), None) is not None:
                sources.append(UserImageSource(rows, image_size, args.image_fit))
            text_rows = rows.text_rows()
            if text_rows is not None:  # a file of image rows and text rows: the text rows are a source of their own
                sources.append(UserTextSource(text_rows))
        return sources
