"""A real English text corpus that needs no download, with a byte-level encoding.

Recipes, benchmarks and tests need language-model training data that behaves like text (so the
loss curve means something) but must run on machines without network access. The Python
standard library ships hundreds of kilobytes of hand-written English documentation: the
docstrings of its modules, classes and functions. This module collects them from a fixed, sorted
list of modules, in a fixed order, so the same interpreter always yields the same corpus.

Tokenization is the identity on UTF-8 bytes (vocabulary 256): no tokenizer files, no training, an
exact round trip, and a vocabulary small enough for a tiny model's embedding.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import warnings
from typing import Callable

VOCAB_SIZE = 256

#: Standard-library modules whose docstrings form the corpus. Sorted; chosen because they import
#: quickly on every platform without side effects (no GUI, no easter eggs, no network).
DEFAULT_MODULES: tuple[str, ...] = tuple(sorted((
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath",
    "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookies", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "numbers",
    "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "symtable", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
)))

DOC_SEPARATOR = "\n\n"


def _public_members(obj, module_name: str):
    """(name, member) pairs defined by ``obj`` itself (not re-exported), sorted by name."""
    for name in sorted(vars(obj)):
        if name.startswith("_"):
            continue
        member = vars(obj)[name]
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        if getattr(member, "__module__", module_name) != module_name:
            continue
        yield name, member


def _module_docstrings(module_name: str) -> list[str]:
    """Docstrings of a module, its public classes and functions, and their public methods."""
    with warnings.catch_warnings():  # deprecated modules/aliases warn on import and access
        warnings.simplefilter("ignore")
        return _collect(module_name)


def _collect(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing on this build of Python (e.g. no sqlite3): skip it
        return []
    docs = [inspect.cleandoc(module.__doc__)] if module.__doc__ else []
    for _, member in _public_members(module, module.__name__):
        # the object's own __doc__ only: inspect.getdoc would repeat inherited docstrings
        if member.__doc__:
            docs.append(inspect.cleandoc(member.__doc__))
        if inspect.isclass(member):
            for _, method in _public_members(member, member.__module__):
                if method.__doc__:
                    docs.append(inspect.cleandoc(method.__doc__))
    return docs


@functools.lru_cache(maxsize=8)
def build_corpus(modules: tuple[str, ...] = DEFAULT_MODULES) -> str:
    """The corpus text: every distinct docstring, in module order, separated by blank lines.

    Deterministic for a given Python build (docstrings change between Python versions).
    Duplicates (shared base-class docstrings, aliases) are kept once.
    """
    seen: set[str] = set()
    parts: list[str] = []
    for name in modules:
        for doc in _module_docstrings(name):
            doc = doc.strip()
            if len(doc) < 20 or doc in seen:  # skip one-word stubs
                continue
            seen.add(doc)
            parts.append(doc)
    return DOC_SEPARATOR.join(parts) + "\n"


def encode(text: str) -> list[int]:
    """Token ids of ``text``: its UTF-8 bytes (each in 0..255)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Inverse of :func:`encode` (invalid UTF-8, e.g. a block cut mid-character, is replaced)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def pack_blocks(ids: list[int], block_size: int) -> list[list[int]]:
    """Cut a token stream into consecutive non-overlapping blocks; the incomplete tail is dropped.

    Every block is a full causal-LM example: no padding, so no attention mask is needed and the
    loss counts every position.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    n = len(ids) // block_size
    return [ids[i * block_size:(i + 1) * block_size] for i in range(n)]


def lm_datasets(block_size: int = 128, eval_fraction: float = 0.05, seed: int = 0,
                max_blocks: int | None = None, modules: tuple[str, ...] = DEFAULT_MODULES,
                tokenize: Callable[[str], list[int]] | None = None):
    """``datasets.DatasetDict`` with ``"train"`` and ``"eval"`` splits of ``input_ids``/``labels``.

    Blocks are shuffled with ``seed`` before splitting, so both splits sample the whole corpus;
    ``labels`` equal ``input_ids`` (Hugging Face causal-LM models shift them internally).
    ``max_blocks`` caps the total number of blocks (for fast smoke tests). ``tokenize`` replaces
    the byte encoding (e.g. a pretrained model's tokenizer).
    """
    import datasets

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    blocks = pack_blocks((tokenize or encode)(build_corpus(modules)), block_size)
    random.Random(seed).shuffle(blocks)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    n_eval = max(1, round(len(blocks) * eval_fraction))
    if len(blocks) - n_eval < 1:
        raise ValueError(f"corpus too small: {len(blocks)} blocks of {block_size} bytes")

    def split(rows):
        return datasets.Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})

    return datasets.DatasetDict({"train": split(blocks[n_eval:]), "eval": split(blocks[:n_eval])})


__all__ = ["VOCAB_SIZE", "DEFAULT_MODULES", "build_corpus", "encode", "decode", "pack_blocks",
           "lm_datasets"]
