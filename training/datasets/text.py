"""English text for next-token rows: docstrings of Python's standard library and pydoc's help topics (always on the
machine), chunked by paragraph, with a hashed held-out split."""

import hashlib
import importlib
import inspect
import re
import unicodedata
import warnings
from functools import lru_cache

from torch.utils.data import Dataset

from .base import TextSource, register_dataset

# Fixed and sorted; modules with import side effects (antigravity, this, turtle, tkinter, idlelib) are left out.
STDLIB_MODULES = tuple(
    sorted(
        """abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs
        collections collections.abc colorsys compileall concurrent.futures configparser contextlib contextvars copy
        copyreg csv dataclasses datetime decimal difflib dis doctest email email.message email.utils enum filecmp
        fileinput fnmatch fractions ftplib functools gc getopt getpass gettext glob graphlib gzip hashlib heapq hmac
        html html.parser http http.client http.cookies http.server imaplib importlib importlib.metadata inspect io
        ipaddress itertools json keyword linecache locale logging logging.handlers lzma mailbox marshal math
        mimetypes multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pickletools pkgutil
        platform plistlib poplib pprint profile pstats queue quopri random re reprlib rlcompleter sched secrets
        select selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string
        stringprep struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time
        timeit token tokenize tomllib trace traceback tracemalloc types typing unicodedata unittest unittest.mock
        urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref wsgiref.simple_server
        xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client zipapp zipfile zlib zoneinfo""".split()
    )
)
CHUNK_CHARS = 600  # chunks are whole paragraphs joined up to about this many characters
MIN_CHUNK_CHARS = 40
HELDOUT_PERCENT = 5


def _clean(text: str) -> str:
    """ASCII-fold and normalise whitespace to single spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return " ".join(text.split())


def _docstrings(module_name: str) -> list[str]:
    """Docstrings of a module, its public classes and functions, and their public methods, in a sorted order."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing from this Python build (e.g. no _ssl) is simply skipped
        return []
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # skip private names and re-exports (they are collected in their home module)
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj))
            for member_name, member in sorted(vars(obj).items()):
                is_method = inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                if is_method and not member_name.startswith("_"):
                    docs.append(inspect.getdoc(member))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            docs.append(inspect.getdoc(obj))
    return [d for d in docs if d]


def _chunks(doc: str) -> list[str]:
    paragraphs = [_clean(p) for p in re.split(r"\n\s*\n", doc)]
    chunks, current = [], ""
    for p in paragraphs:
        if not p:
            continue
        if current and len(current) + 1 + len(p) > CHUNK_CHARS:
            chunks.append(current)
            current = p
        else:
            current = f"{current} {p}" if current else p
    if current:
        chunks.append(current)
    return [c for c in chunks if len(c) >= MIN_CHUNK_CHARS]


def text_split_of(chunk: str) -> str:
    """"heldout" for about HELDOUT_PERCENT% of chunks, chosen by a hash of the text (stable across runs)."""
    h = int.from_bytes(hashlib.sha1(chunk.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


@lru_cache(maxsize=1)
def _all_text_chunks() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # the language reference's help topics, shipped with pydoc

    with warnings.catch_warnings():  # importing and inspecting old modules (typing.io, ...) warns of deprecations
        warnings.simplefilter("ignore")
        docs = [doc for name in STDLIB_MODULES for doc in _docstrings(name)]
    docs += [topics[key] for key in sorted(topics)]
    seen, chunks = set(), []
    for doc in docs:
        for chunk in _chunks(doc):
            if chunk not in seen:
                seen.add(chunk)
                chunks.append(chunk)
    return tuple(chunks)


def text_corpus(split: str = "train") -> list[str]:
    """English text chunks (≤ ~600 chars each): docstrings of STDLIB_MODULES, then pydoc's help topics.

    `split` is "train" or "heldout" (~5%, by hash of the chunk text: deterministic and disjoint)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; expected 'train' or 'heldout'")
    return [c for c in _all_text_chunks() if text_split_of(c) == split]


class TextDataset(Dataset):
    """Text chunks of the standard-library corpus."""

    def __init__(self, split: str = "train"):
        self.texts = text_corpus(split)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


@register_dataset
class TextCorpusSource(TextSource):
    """The corpus's train split as a training source."""

    name = "text"

    def texts(self) -> list[str]:
        return text_corpus("train")
