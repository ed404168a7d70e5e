"""The 15-task "long sequence" continual-learning benchmark (Progressive Prompts; O-LoRA's CL_Benchmark; the GeRe
paper's task sequence) built from its Hub datasets, or from local copies, into the files a recipe's stages read.

``gere-hf data long-sequence --out DIR`` writes, for every task, ``DIR/<task>/train.jsonl`` and ``test.jsonl`` (one
JSON object a line: ``prompt``, ``completion``, ``label``, ``label_id``, ``index``) and ``manifest.json``; then
``DIR/orders.json`` (task orders 4, 5 and 6) and ``DIR/stages_order{4,5,6}.yaml`` (a recipe's ``stages:`` list for
each order). The pieces, each a registry:

* :data:`LONG_SEQUENCE_TASKS`: one :class:`BenchmarkTask` per task: its Hub source (id, config, splits), the columns
  of its schema, how they are joined into the task text, its label ids → O-LoRA's label words, and its local-file
  variants (the header-less CSVs of Zhang et al., 2015).
* :data:`SAMPLING_PROTOCOLS`: which rows are kept: ``o-lora`` (the default: what O-LoRA's CL_Benchmark files hold,
  which GeRe's official code ships for yelp) or ``progressive-prompts`` (Razdaibiedina et al., 2023, as their code
  samples).
* :data:`PROMPT_STYLES`: how the task text becomes a prompt: ``gere`` (the default: the official GeRe demo's
  prompt) or ``o-lora`` (O-LoRA's, with its ``Task:``/``Dataset:`` prefix).

Rows are ranked by a 64-bit hash of (seed, protocol, task, split, row index) and sampled in that order, so a build is
the same on every machine and NumPy version. Every task is written atomically and recorded in its manifest; a task
whose files match their manifest is skipped on the next call (a build resumes where it stopped). Sources, sizes,
label words and orders are documented, with their references, in docs/paper.md.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..fileio import atomic_open, file_sha256, write_json, write_jsonl
from ..replay import TABLE_FILE_BUILDERS, ExcludedTexts, read_error_text
from .fingerprints import sources_fingerprint

logger = logging.getLogger(__name__)

BUILDER_VERSION = 2
"""Bumped whenever the same settings would give other files: a manifest of another version is rebuilt.
2: test rows that overlap a training row by content are passed over (version 1 kept them)."""

MANIFEST_FILE = "manifest.json"
ORDERS_FILE = "orders.json"
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}


class BenchmarkDataError(ValueError):
    """A benchmark source that is missing or does not have the schema the builder reads."""


# ----------------------------------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """Where a task's rows come from on the Hugging Face Hub (``datasets.load_dataset(path, name, split=...)``)."""

    path: str
    name: str | None
    train_split: str
    eval_split: str


@dataclass(frozen=True)
class TextFormat:
    """How a row's text columns become the task text: ``render(row)``, reading ``columns``."""

    columns: tuple[str, ...]
    render: Callable[[dict], str] = field(compare=False)
    required: tuple[str, ...] | None = None
    """Columns that must be non-empty for a row to be usable (default: all of ``columns``)."""

    @property
    def required_columns(self) -> tuple[str, ...]:
        return self.columns if self.required is None else self.required


def template(text: str, columns: Sequence[str], required: Sequence[str] | None = None) -> TextFormat:
    """A :class:`TextFormat` from a Python format string over ``columns``."""
    return TextFormat(tuple(columns), lambda row: text.format(**row), None if required is None else tuple(required))


def labelled_lines(*pairs: tuple[str, str]) -> TextFormat:
    """``"Key: value\\n"`` per ``(key, column)``, leaving out the lines of empty values (Yahoo! Answers' questions
    without a body, answers without a title); a row is usable when one value is non-empty."""

    def render(row: dict) -> str:
        return "".join(f"{key}: {row[column]}\n" for key, column in pairs if _non_empty(row.get(column)))

    return TextFormat(tuple(c for _, c in pairs), render, required=())


@dataclass(frozen=True)
class BenchmarkTask:
    """One task of a benchmark: where its rows come from, how a row becomes text, and its label words.

    Attributes:
        name: the stage name and folder (``mnli``, ``sst2``, ...).
        dataset_name: O-LoRA's name of the dataset (its CL_Benchmark folder; the ``Dataset:`` line of its prompt).
        group: O-LoRA's task group (``SC``, ``TC``, ``NLI``, ...): picks the instruction; the ``Task:`` line.
        hub: the Hub source, or None where there is no official Hub copy (amazon).
        label_column: the column of the integer label ids.
        label_words: the answer word of each label id (O-LoRA's ``labels.json`` words).
        options: the label words in the order O-LoRA's prompt lists them (``Option: ...``).
        hub_label_names: the names of the Hub's ``ClassLabel``, by id: a source whose ``ClassLabel`` names differ
            would be mislabelled, so it is refused.
        formats: how the text columns become the task text; the first whose columns the source has is used.
        csv_columns: the columns of the header-less CSV of Zhang et al. (2015) for this task (labels 1-based there),
            accepted as a local copy; None where there is none.
        source: the dataset's reference, for manifests and docs.
    """

    name: str
    dataset_name: str
    group: str
    hub: HubSource | None
    label_column: str
    label_words: tuple[str, ...]
    options: tuple[str, ...]
    hub_label_names: tuple[str, ...]
    formats: tuple[TextFormat, ...]
    csv_columns: tuple[str, ...] | None = None
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    @property
    def splits(self) -> dict[str, str]:
        """Our split → the source split it is drawn from."""
        hub = self.hub or _AMAZON_SPLITS
        return {"train": hub.train_split, "test": hub.eval_split}

    def schema(self) -> str:
        """The columns a source must have, as error messages and docs give them."""
        texts = " or ".join("(" + ", ".join(f.columns) + ")" for f in self.formats)
        ids = ", ".join(f"{i} = {n!r}" for i, n in enumerate(self.hub_label_names))
        return f"{self.label_column} (integer ids: {ids}) and the text columns {texts}"


# O-LoRA's instructions (configs/instruction_config.json); each ends with a newline. COPA has none: its text carries
# the question and both alternatives.
INSTRUCTIONS = {
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the '
           "option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the '
           "option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? Choose one "
               "from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose one "
           "from the option.\n",
    "COPA": None,
}

_STARS = ("very negative", "negative", "neutral", "positive", "very positive")
_AMAZON_SPLITS = HubSource("", None, "train", "test")
_NLI_TEXT = template("sentence 1: {premise}\nsentence 2: {hypothesis}", ("premise", "hypothesis"))
_ZHANG = "Zhang, Zhao and LeCun (2015), Character-level Convolutional Networks for Text Classification"
_DBPEDIA_HUB = ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
                "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork")
_YAHOO = ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
          "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships", "Politics & Government")


def _task(name, dataset_name, group, hub, label_words, options, hub_label_names, formats, label_column="label",
          csv_columns=None, source=""):
    return BenchmarkTask(name, dataset_name, group, hub, label_column, tuple(label_words), tuple(options),
                         tuple(hub_label_names), tuple(formats), None if csv_columns is None else tuple(csv_columns),
                         source)


LONG_SEQUENCE_TASKS: dict[str, BenchmarkTask] = {t.name: t for t in (
    _task("yelp", "yelp", "SC", HubSource("Yelp/yelp_review_full", "yelp_review_full", "train", "test"),
          _STARS, _STARS, ("1 star", "2 star", "3 stars", "4 stars", "5 stars"),
          [template("Text: {text}\n", ["text"])], csv_columns=["label", "text"], source=f"Yelp reviews, {_ZHANG}"),
    _task("amazon", "amazon", "SC", None, _STARS, _STARS, ("1", "2", "3", "4", "5"),
          [template("Title: {title}\nText: {content}\n", ["title", "content"], required=["content"])],
          csv_columns=["label", "title", "content"], source=f"Amazon Review Full (5 classes), {_ZHANG}"),
    _task("mnli", "MNLI", "NLI", HubSource("nyu-mll/glue", "mnli", "train", "validation_matched"),
          ("entailment", "neutral", "contradiction"), ("neutral", "entailment", "contradiction"),
          ("entailment", "neutral", "contradiction"), [_NLI_TEXT], source="MultiNLI (GLUE), Williams et al. (2018)"),
    _task("cb", "CB", "NLI", HubSource("aps/super_glue", "cb", "train", "validation"),
          ("entailment", "contradiction", "neutral"), ("entailment", "contradiction", "neutral"),
          ("entailment", "contradiction", "neutral"), [_NLI_TEXT],
          source="CommitmentBank (SuperGLUE), de Marneffe et al. (2019)"),
    _task("copa", "COPA", "COPA", HubSource("aps/super_glue", "copa", "train", "validation"),
          ("A", "B"), ("A", "B"), ("choice1", "choice2"),
          [template('Which sentence is the {question} of "{premise}"? Choose one between A and B.\nA: {choice1}\n'
                    "B: {choice2}", ["premise", "choice1", "choice2", "question"])],
          source="COPA (SuperGLUE), Roemmele et al. (2011)"),
    _task("qqp", "QQP", "QQP", HubSource("nyu-mll/glue", "qqp", "train", "validation"),
          ("False", "True"), ("False", "True"), ("not_duplicate", "duplicate"),
          [template("first sentence: {question1}\nsecond sentence: {question2}", ["question1", "question2"])],
          source="Quora Question Pairs (GLUE)"),
    _task("rte", "RTE", "NLI", HubSource("nyu-mll/glue", "rte", "train", "validation"),
          ("entailment", "contradiction"), ("contradiction", "entailment"), ("entailment", "not_entailment"),
          [template("sentence 1: {sentence1}\nsentence 2: {sentence2}", ["sentence1", "sentence2"]), _NLI_TEXT],
          source="RTE (GLUE), Dagan et al. (2005) and successors"),
    _task("imdb", "IMDB", "SC", HubSource("stanfordnlp/imdb", "plain_text", "train", "test"),
          ("Bad", "Good"), ("Good", "Bad"), ("neg", "pos"), [template("{text}", ["text"])],
          source="Large Movie Review Dataset, Maas et al. (2011)"),
    _task("sst2", "SST-2", "SC", HubSource("nyu-mll/glue", "sst2", "train", "validation"),
          ("Bad", "Good"), ("Good", "Bad"), ("negative", "positive"), [template("Text: {sentence}", ["sentence"])],
          source="SST-2 (GLUE), Socher et al. (2013)"),
    _task("dbpedia", "dbpedia", "TC", HubSource("fancyzhx/dbpedia_14", "dbpedia_14", "train", "test"),
          ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
           "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"),
          ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
           "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"),
          _DBPEDIA_HUB, [template("Title: {title}\nText: {content}\n", ["title", "content"], required=["content"])],
          csv_columns=["label", "title", "content"], source=f"DBpedia-14, {_ZHANG}"),
    _task("agnews", "agnews", "TC", HubSource("fancyzhx/ag_news", None, "train", "test"),
          ("World", "Sports", "Business", "Science or Technology"),
          ("World", "Sports", "Business", "Science or Technology"), ("World", "Sports", "Business", "Sci/Tech"),
          # The Hub joins title and description into `text`; Zhang et al.'s CSV keeps them apart, as O-LoRA shows.
          [template("Title: {title}\nText: {description}\n", ["title", "description"], required=["description"]),
           template("Text: {text}\n", ["text"])],
          csv_columns=["label", "title", "description"], source=f"AG News, {_ZHANG}"),
    _task("yahoo", "yahoo", "TC", HubSource("community-datasets/yahoo_answers_topics", None, "train", "test"),
          _YAHOO, _YAHOO, _YAHOO,
          [labelled_lines(("Title", "question_title"), ("Question", "question_content"), ("Answer", "best_answer"))],
          label_column="topic", csv_columns=["topic", "question_title", "question_content", "best_answer"],
          source=f"Yahoo! Answers topics, {_ZHANG}"),
    _task("multirc", "MultiRC", "MultiRC", HubSource("aps/super_glue", "multirc", "train", "validation"),
          ("False", "True"), ("False", "True"), ("False", "True"),
          [template("paragraph: {paragraph}\nquestion: {question}\ncandidate answer: {answer}",
                    ["paragraph", "question", "answer"])], source="MultiRC (SuperGLUE), Khashabi et al. (2018)"),
    _task("boolq", "BoolQA", "BoolQA", HubSource("aps/super_glue", "boolq", "train", "validation"),
          ("False", "True"), ("True", "False"), ("False", "True"),
          [template("question: {question}\npassage: {passage}", ["question", "passage"])],
          source="BoolQ (SuperGLUE), Clark et al. (2019)"),
    _task("wic", "WiC", "WiC", HubSource("aps/super_glue", "wic", "train", "validation"),
          ("False", "True"), ("True", "False"), ("False", "True"),
          [template("word: {word}\n{sentence1}\n{sentence2}", ["word", "sentence1", "sentence2"])],
          source="WiC (SuperGLUE), Pilehvar and Camacho-Collados (2019)"),
)}
"""The 15 tasks, keyed by stage name."""

TASK_ORDERS: dict[str, tuple[str, ...]] = {
    "4": ("mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst2", "dbpedia", "agnews",
          "multirc", "yahoo"),
    "5": ("multirc", "boolq", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "yelp",
          "amazon", "yahoo"),
    "6": ("yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "yahoo",
          "multirc", "boolq", "wic"),
}
"""The long-sequence task orders 4, 5 and 6 (Progressive Prompts' numbering; O-LoRA's scripts, docs/paper.md)."""
ORDERS_SOURCE = ("Razdaibiedina et al. (2023), Progressive Prompts, orders 4-6 of the long sequence; as in the "
                 "order_4/5/6.sh scripts of O-LoRA derivatives (Hoilap/AS-LoRA @ b65d18e); O-LoRA's own long.sh "
                 "(cmnfriend/O-LoRA @ 07117e1) runs order 6")


# ----------------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------------


def gere_prompt(task: BenchmarkTask, text: str) -> str:
    """The official GeRe demo's prompt (train_demo.py): instruction, ``Option: ...``, the text, ``Answer:``."""
    instruction = INSTRUCTIONS[task.group]
    if instruction is None:
        return f"{text}\nAnswer:"
    return f"{instruction}Option: {', '.join(task.options)}\n{text}\nAnswer:"


def olora_prompt(task: BenchmarkTask, text: str) -> str:
    """O-LoRA's prompt (src/uie_dataset_lora.py with --add_task_name/--add_dataset_name, as all its scripts run):
    ``Task:``/``Dataset:`` lines, the instruction, ``Option: ... \\n`` (with its space), the text, ``Answer:``."""
    prefix = f"Task:{task.group}\nDataset:{task.dataset_name}\n"
    instruction = INSTRUCTIONS[task.group]
    if instruction is None:
        return f"{prefix}{text}\nAnswer:"
    return f"{prefix}{instruction}Option: {', '.join(task.options)} \n{text}\nAnswer:"


PROMPT_STYLES: dict[str, Callable[[BenchmarkTask, str], str]] = {"gere": gere_prompt, "o-lora": olora_prompt}
"""How a task text becomes a prompt; the answer (``completion``) is the label word after a space either way."""


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


def ranked(indices: np.ndarray, key: str, seed: int) -> np.ndarray:
    """``indices`` in the order of a 64-bit hash of (seed, key, index): a seeded shuffle that is the same on every
    machine and NumPy version (pure integer arithmetic; NumPy's generators may change their streams)."""
    salt = np.uint64((zlib.crc32(key.encode()) << 32) ^ (seed & 0xFFFFFFFF))
    with np.errstate(over="ignore"):  # splitmix64: wrap-around multiplication is the point
        z = indices.astype(np.uint64) + salt * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return indices[np.argsort(z, kind="stable")]


def _per_class(labels: np.ndarray, ranked_idx: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """The first ``k`` rows of every class in ranked order (all of a class that has fewer)."""
    taken = [ranked_idx[labels[ranked_idx] == c][:k] for c in range(num_classes)]
    return np.concatenate(taken) if taken else ranked_idx[:0]


@dataclass(frozen=True)
class SamplingProtocol:
    """Which rows of a task's source splits are kept: ``select(task, train_labels, eval_labels, rank)`` returns
    ``(train rows, test rows)`` as source row indices; labels are the usable rows' ids (-1: unusable row)."""

    name: str
    description: str
    select: Callable[..., tuple[np.ndarray, np.ndarray]] = field(compare=False)


def _olora_select(task, train_labels, eval_labels, rank):
    """O-LoRA's CL_Benchmark: 1,000 × classes random training rows (CB and COPA: all), up to 7,600 random test rows
    of the evaluation split (all where it has fewer)."""
    train = rank(np.flatnonzero(train_labels >= 0), "train")[: 1000 * task.num_classes]
    test = rank(np.flatnonzero(eval_labels >= 0), "test")[:7600]
    return train, test


# Progressive Prompts trains on all of these (their code: k = -1 for k > 500, and always for cb/copa/wsc).
_PP_FULL_TRAIN = ("cb", "copa", "rte")


def _pp_select(task, train_labels, eval_labels, rank):
    """Progressive Prompts' code (t5_continual.py with --select_k_per_class 1000): 1,000 training rows per class
    (CB, COPA, RTE: all); 500 evaluation rows per class (SST-2: 400; CB, COPA, RTE: the whole split), shuffled and cut
    in half: the first half is their validation set, the second the test set written here."""
    usable_train, usable_eval = np.flatnonzero(train_labels >= 0), np.flatnonzero(eval_labels >= 0)
    if task.name in _PP_FULL_TRAIN:
        train = rank(usable_train, "train")
        pool = rank(usable_eval, "test")
    else:
        train = _per_class(train_labels, rank(usable_train, "train"), 1000, task.num_classes)
        k_val = 400 if task.name == "sst2" else 500
        pool = rank(_per_class(eval_labels, rank(usable_eval, "test"), k_val, task.num_classes), "test-halves")
    return train, pool[len(pool) // 2:]


SAMPLING_PROTOCOLS: dict[str, SamplingProtocol] = {p.name: p for p in (
    SamplingProtocol("o-lora", " ".join(_olora_select.__doc__.split()), _olora_select),
    SamplingProtocol("progressive-prompts", " ".join(_pp_select.__doc__.split()), _pp_select),
)}
DEFAULT_PROTOCOL = "o-lora"
DEFAULT_PROMPT_STYLE = "gere"


# ----------------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TaskSource:
    """Where one task's rows are read from: ``hub`` (a Hub dataset) or ``local`` (files or a save_to_disk folder)."""

    task: BenchmarkTask
    kind: str
    where: str
    files: dict[str, list[str]] = field(default_factory=dict)
    hub: HubSource | None = None
    disk: bool = False

    def identity(self) -> dict:
        """What must match for files built from another source to count as built from this one: the Hub dataset,
        or the local copy's files and their content (not the folder: a copy moved elsewhere is the same copy; another
        copy with the same file names is not)."""
        described = self.describe()
        if self.kind != "local":
            return described
        return {**{k: v for k, v in described.items() if k != "path"}, "content": self.content_fingerprint()}

    def content_fingerprint(self) -> str:
        """A fingerprint of the local copy's bytes (every data file, in a fixed order)."""
        if self.disk:
            files = sorted(os.path.join(root, n) for root, _, names in os.walk(self.where) for n in names)
        else:
            files = [f for split in sorted(self.files) for f in self.files[split]]
        return sources_fingerprint(files)

    def describe(self) -> dict:
        if self.kind == "hub":
            return {"kind": "hub", "path": self.hub.path, "name": self.hub.name,
                    "splits": {"train": self.hub.train_split, "test": self.hub.eval_split}}
        return {"kind": "local", "path": self.where, "save_to_disk": self.disk,
                "files": {s: [os.path.relpath(f, self.where) for f in fs] for s, fs in self.files.items()}}


def parse_hub_overrides(items: Sequence[str]) -> dict[str, HubSource]:
    """``TASK=ID[:CONFIG]`` (``--hub-dataset``): another Hub dataset for a task, in the task's schema and splits."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise BenchmarkDataError(f"--hub-dataset {item!r} is not TASK=ID[:CONFIG] (e.g. amazon=me/amazon_full).")
        task = _check_task_names([name.strip()])[0]
        path, _, config = value.strip().partition(":")
        splits = LONG_SEQUENCE_TASKS[task].splits
        out[task] = HubSource(path, config or None, splits["train"], splits["test"])
    return out


def _split_files(folder: str, split: str) -> list[str]:
    """Data files of ``split`` in ``folder``: ``<split>.<ext>``, ``<split>-*.<ext>`` (the Hub's parquet shards) or
    ``<split>/*.<ext>``."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, suffix = os.path.splitext(name)
        if os.path.isfile(path) and suffix.lower() in TABLE_FILE_BUILDERS and (stem == split or
                                                                          stem.startswith(f"{split}-")):
            found.append(path)
        elif os.path.isdir(path) and name == split:
            found += [os.path.join(path, n) for n in sorted(os.listdir(path))
                      if os.path.splitext(n)[1].lower() in TABLE_FILE_BUILDERS]
    return found


def locate_source(task: BenchmarkTask, from_dir: str | None, hub_overrides: dict[str, HubSource]) -> TaskSource:
    """Where ``task`` is read from, checked without reading its rows (a missing copy stops every task's build)."""
    if from_dir is None:
        hub = hub_overrides.get(task.name, task.hub)
        if hub is None:
            raise BenchmarkDataError(
                f"Task {task.name!r} ({task.source}) has no official copy on the Hugging Face Hub (amazon_polarity is "
                "the 2-class set, not this one). Give a local copy with --from DIR: DIR/amazon/train.csv and "
                "test.csv as distributed by Zhang et al. (amazon_review_full_csv: no header; label 1-5, title, "
                f"content), or parquet/jsonl files with the columns {task.schema()}; or name a Hub copy in that "
                "schema with --hub-dataset amazon=ID; or leave the task out with --tasks."
            )
        return TaskSource(task, "hub", f"{hub.path}" + (f" ({hub.name})" if hub.name else ""), hub=hub)
    folder = os.path.join(from_dir, task.name)
    expected = ", ".join(f"{s}.{{parquet,jsonl,json,csv}}" for s in task.splits.values())
    if not os.path.isdir(folder):
        raise BenchmarkDataError(
            f"Task {task.name!r}: the local copy {folder} does not exist. --from DIR needs a folder per task: "
            f"DIR/{task.name}/ holding a datasets save_to_disk() DatasetDict or the files {expected} (or "
            f"<split>-*.parquet shards, or <split>/ folders) with the columns {task.schema()}."
        )
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        return TaskSource(task, "local", folder, disk=True)
    files = {ours: _split_files(folder, split) for ours, split in task.splits.items()}
    missing = [task.splits[s] for s, fs in files.items() if not fs]
    if missing:
        present = sorted(os.listdir(folder))
        raise BenchmarkDataError(
            f"Task {task.name!r}: the local copy {folder} has no file for the split(s) {missing} (it holds "
            f"{present or 'nothing'}). Expected {expected} (or <split>-*.parquet shards, <split>/ folders, or a "
            f"save_to_disk() DatasetDict) with the columns {task.schema()}."
        )
    kinds = {TABLE_FILE_BUILDERS[os.path.splitext(f)[1].lower()] for fs in files.values() for f in fs}
    if len(kinds) > 1:
        raise BenchmarkDataError(f"Task {task.name!r}: {folder} mixes file kinds {sorted(kinds)}; keep one kind.")
    return TaskSource(task, "local", folder, files=files)


def _csv_has_header(path: str, columns: Sequence[str]) -> bool:
    with open(path, encoding="utf-8", newline="") as f:
        first = next(csv.reader(f), [])
    return set(columns) <= {c.strip() for c in first}


def load_source_splits(source: TaskSource) -> dict[str, Any]:
    """``{"train": Dataset, "test": Dataset}`` of a task, read through ``datasets``, with the schema checked."""
    import datasets

    task = source.task
    splits: dict[str, Any] = {}
    label_base = 0
    try:
        if source.kind == "hub":
            hub = source.hub
            for ours, split in task.splits.items():
                splits[ours] = datasets.load_dataset(hub.path, hub.name, split=split)
        elif source.disk:
            loaded = datasets.load_from_disk(source.where)
            wanted = list(task.splits.values())
            if not isinstance(loaded, datasets.DatasetDict) or any(s not in loaded for s in wanted):
                raise BenchmarkDataError(
                    f"Task {task.name!r}: {source.where} holds a save_to_disk() dataset without the splits {wanted} "
                    f"(it has {list(loaded) if isinstance(loaded, datasets.DatasetDict) else 'a single Dataset'})."
                )
            splits = {ours: loaded[split] for ours, split in task.splits.items()}
        else:
            empty = [f for fs in source.files.values() for f in fs if os.path.getsize(f) == 0]
            if empty:  # datasets would fail with a bare StopIteration
                raise BenchmarkDataError(f"Task {task.name!r}: {empty[0]} is empty (0 bytes). Give the split's rows "
                                         f"with the columns {task.schema()}, or leave the task out with --tasks.")
            kind = TABLE_FILE_BUILDERS[os.path.splitext(source.files["train"][0])[1].lower()]
            header = True
            if kind == "csv" and task.csv_columns is not None:
                header = _csv_has_header(source.files["train"][0], [task.label_column])
            for ours, files in source.files.items():
                kwargs: dict[str, Any] = {"data_files": files, "split": "train"}
                if not header:  # Zhang et al.'s header-less CSV: columns by position, labels 1-based
                    kwargs.update(column_names=list(task.csv_columns), header=None)
                splits[ours] = datasets.load_dataset(kind, **kwargs)
            label_base = 0 if header else 1
    except BenchmarkDataError:
        raise
    except Exception as err:  # the Hub offline, a broken file: say which task and what was read
        if source.kind != "hub":  # a file that does not parse or is not UTF-8: its cause, not datasets' wrapper
            files = ", ".join(f for fs in source.files.values() for f in fs) or source.where
            text = read_error_text(err, f"Task {task.name!r}: the local copy ({files})")
            raise BenchmarkDataError(text.format(kind=f"data with the columns {task.schema()}")) from None
        detail = str(err).splitlines()[0] if str(err) else ""
        raise BenchmarkDataError(
            f"Task {task.name!r}: reading {source.where} failed ({type(err).__name__}: {detail}). The Hub cannot be "
            "reached offline: give local copies with --from DIR."
        ) from None
    for ours, ds in splits.items():
        _check_schema(task, ds, source, ours)
    return {"splits": splits, "label_base": label_base}


def _source_file_text(source: TaskSource, split: str) -> str:
    if source.kind == "hub":
        return f"{source.where} split {source.task.splits[split]!r}"
    if source.disk:
        return f"{source.where} (save_to_disk) split {source.task.splits[split]!r}"
    return ", ".join(source.files[split])


def _check_schema(task: BenchmarkTask, ds, source: TaskSource, split: str) -> None:
    import datasets

    columns = ds.column_names
    where = _source_file_text(source, split)
    if task.label_column not in columns or _pick_format(task, columns) is None:
        raise BenchmarkDataError(
            f"Task {task.name!r}: {where} has the columns {columns}; expected {task.schema()}."
        )
    feature = ds.features.get(task.label_column)
    if isinstance(feature, datasets.ClassLabel) and tuple(feature.names) != task.hub_label_names:
        raise BenchmarkDataError(
            f"Task {task.name!r}: {where} labels its {task.label_column!r} ids {feature.names}, but the builder maps "
            f"the ids {list(task.hub_label_names)} (the Hub's) to {list(task.label_words)}: every row would get "
            "another label. Give the dataset in the Hub's label order."
        )
    if not isinstance(feature, datasets.ClassLabel) and not (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        kind = feature.dtype if isinstance(feature, datasets.Value) else f"{type(feature).__name__} (a list per row)" \
            if isinstance(feature, (datasets.Sequence, getattr(datasets, "List", datasets.Sequence))) \
            else type(feature).__name__
        raise BenchmarkDataError(
            f"Task {task.name!r}: {where} has {task.label_column!r} values of type {kind}; expected one integer id a "
            f"row: {task.schema()}."
        )


def _pick_format(task: BenchmarkTask, columns: Sequence[str]) -> TextFormat | None:
    return next((f for f in task.formats if set(f.columns) <= set(columns)), None)


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def usable_labels(task: BenchmarkTask, ds, label_base: int, fmt: TextFormat,
                  where: str = "the source") -> tuple[np.ndarray, dict]:
    """The label id of every row (``-1`` for a row that cannot be used: GLUE's -1 of unlabelled rows, or an empty
    required text), and the counts of what was left out. A label id outside the task's range is refused."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow")  # columns as Arrow arrays: no Python object per row for millions of rows
    raw = pc.fill_null(table[task.label_column].cast(pa.int64()), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    # -1 (or none) is "no label" (GLUE's unlabelled rows): passed over. Any other id outside the task's range means
    # another label scheme, in which every row would get a wrong label or vanish: refused.
    unlabelled = raw == -1
    labels = raw - label_base
    out_of_range = ~unlabelled & ((labels < 0) | (labels >= task.num_classes))
    if out_of_range.any():
        raise BenchmarkDataError(_label_range_message(task, raw[~unlabelled], int(out_of_range.sum()), label_base,
                                                      where))
    bad_label = unlabelled
    empty = np.zeros(len(labels), dtype=bool)
    any_text = np.zeros(len(labels), dtype=bool)
    for column in fmt.columns:
        values = table[column]
        if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
            raise BenchmarkDataError(f"Task {task.name!r}: the column {column!r} holds {values.type}, not text.")
        filled = pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(values, ""))).to_numpy(zero_copy_only=False) > 0
        any_text |= filled
        if column in fmt.required_columns:
            empty |= ~filled
    empty |= ~any_text
    out = np.where(bad_label | empty, -1, labels)
    return out, {"rows": int(len(labels)), "unlabelled": int(bad_label.sum()),
                 "empty_text": int((empty & ~bad_label).sum())}


def _label_range_message(task: BenchmarkTask, labelled: np.ndarray, bad: int, label_base: int, where: str) -> str:
    low, high = int(labelled.min()), int(labelled.max())
    expected = f"{label_base}..{label_base + task.num_classes - 1}"
    text = (f"Task {task.name!r}: {bad} of {len(labelled)} labelled rows of {where} have {task.label_column!r} ids "
            f"outside {expected} (they run {low}..{high}): the builder maps ids {expected} to "
            f"{list(task.label_words)}, so every row would get another label or be dropped.")
    if label_base == 0 and low == 1 and high == task.num_classes:
        text += (f" They look 1-based (1..{task.num_classes}): subtract 1 from every id, or give Zhang et al.'s "
                 "header-less CSV (label first), which the builder reads as 1-based.")
    else:
        text += f" Give the ids in the Hub's scheme: {task.schema()}."
    return text


# ----------------------------------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class BuildSettings:
    """What decides a task's files; a task built with other settings is not taken for this one."""

    protocol: str = DEFAULT_PROTOCOL
    prompt_style: str = DEFAULT_PROMPT_STYLE
    seed: int = 0

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "prompt_style": self.prompt_style, "seed": self.seed,
                "builder_version": BUILDER_VERSION}


def task_rows(task: BenchmarkTask, ds, indices: np.ndarray, label_ids: np.ndarray, fmt: TextFormat,
              prompt: Callable[[BenchmarkTask, str], str]) -> list[dict]:
    """The rows written for ``indices`` of ``ds``: prompt, completion (the label word after a space, as TRL joins
    prompt and completion), label word, label id, and the source row index."""
    out = []
    if len(indices) == 0:
        return out
    for index, row in zip(indices.tolist(), ds.select(indices.tolist())):
        label_id = int(label_ids[index])
        word = task.label_words[label_id]
        clean = {c: ("" if row.get(c) is None else row[c]) for c in fmt.columns}
        out.append({"prompt": prompt(task, fmt.render(clean)), "completion": " " + word, "label": word,
                    "label_id": label_id, "index": index})
    return out


def _class_counts(rows: list[dict], task: BenchmarkTask) -> dict[str, int]:
    counts = {w: 0 for w in task.label_words}
    for row in rows:
        counts[row["label"]] += 1
    return counts


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def task_status(folder: str, settings: BuildSettings, source: TaskSource | None = None) -> str:
    """``complete`` (files match a manifest of these settings), ``missing`` (nothing of ours or anyone's),
    ``partial`` (our build stopped half way, or its files changed since), ``other`` (built with other settings) or
    ``foreign`` (files we did not write)."""
    manifest = read_manifest(folder)
    present = [f for f in SPLIT_FILES.values() if os.path.exists(os.path.join(folder, f))]
    if manifest is None:
        return "foreign" if present else "missing"
    if manifest.get("settings") != settings.to_dict():
        return "other" if manifest.get("status") == "complete" else "partial"
    if source is not None and manifest.get("source_identity") != source.identity():
        return "other" if manifest.get("status") == "complete" else "partial"
    if manifest.get("status") != "complete":
        return "partial"
    for split, name in SPLIT_FILES.items():
        path = os.path.join(folder, name)
        info = (manifest.get("files") or {}).get(split) or {}
        if not os.path.isfile(path) or file_sha256(path) != info.get("sha256"):
            return "partial"
    return "complete"


def _test_disjoint_from_train(task, splits, fmt, labels, chosen, select_test) -> tuple[np.ndarray, int]:
    """The test rows, none overlapping a chosen training row by content (the project's rule,
    :class:`gere_hf.replay.ExcludedTexts`: equal after normalisation, or one containing the other): an overlapping
    test row is passed over and the protocol chooses again without it. Returns (test rows, rows passed over)."""

    def texts(split, indices):
        rows = splits[split].select(indices.tolist()) if len(indices) else []
        return [fmt[split].render({c: ("" if r.get(c) is None else r[c]) for c in fmt[split].columns}) for r in rows]

    excluded = ExcludedTexts({"train": texts("train", np.asarray(chosen["train"]))})
    test_labels, checked, dropped = labels["test"].copy(), set(), 0
    test = np.asarray(chosen["test"])
    while True:
        new = np.array([i for i in test.tolist() if i not in checked], dtype=np.int64)
        checked.update(new.tolist())
        overlapping = [i for i, t in zip(new.tolist(), texts("test", new)) if excluded.overlaps(t)]
        if not overlapping:
            return test, dropped
        dropped += len(overlapping)
        test_labels[overlapping] = -1
        test = np.asarray(select_test(test_labels))


def build_task(task: BenchmarkTask, source: TaskSource, out_dir: str, settings: BuildSettings) -> dict:
    """Read one task's source, sample it, and write ``out_dir/<task>/{train,test}.jsonl`` and ``manifest.json``.

    Everything is read and checked before the first byte is written; the manifest says ``writing`` until both files
    are in place, so a build that stops half way is rebuilt, never taken for complete.
    """
    protocol = SAMPLING_PROTOCOLS[settings.protocol]
    prompt = PROMPT_STYLES[settings.prompt_style]
    t0 = time.time()
    loaded = load_source_splits(source)
    splits, label_base = loaded["splits"], loaded["label_base"]
    fmt = {s: _pick_format(task, ds.column_names) for s, ds in splits.items()}
    labels, skipped = {}, {}
    for split, ds in splits.items():
        labels[split], skipped[split] = usable_labels(task, ds, label_base, fmt[split],
                                                      _source_file_text(source, split))

    def rank(indices: np.ndarray, key: str) -> np.ndarray:
        return ranked(indices, f"{settings.protocol}/{task.name}/{key}", settings.seed)

    chosen = dict(zip(("train", "test"), protocol.select(task, labels["train"], labels["test"], rank)))
    chosen["test"], skipped["test"]["overlap_train"] = _test_disjoint_from_train(
        task, splits, fmt, labels, chosen, lambda test_labels: protocol.select(task, labels["train"], test_labels,
                                                                               rank)[1])
    rows = {s: task_rows(task, splits[s], np.sort(chosen[s]), labels[s], fmt[s], prompt) for s in ("train", "test")}
    for split, split_rows in rows.items():
        if not split_rows:
            raise BenchmarkDataError(
                f"Task {task.name!r}: no usable {split} rows in {_source_file_text(source, split)} "
                f"({skipped[split]}). Expected {task.schema()}."
            )
    folder = os.path.join(out_dir, task.name)
    os.makedirs(folder, exist_ok=True)
    manifest = {
        "task": task.name, "benchmark": "long-sequence", "dataset_name": task.dataset_name, "group": task.group,
        "reference": task.source, "source": source.describe(), "source_identity": source.identity(),
        "settings": settings.to_dict(),
        "protocol": protocol.description, "label_words": list(task.label_words), "options": list(task.options),
        "text_columns": {s: list(f.columns) for s, f in fmt.items()}, "label_base": label_base,
        "status": "writing",
    }
    write_json(os.path.join(folder, MANIFEST_FILE), manifest)
    files = {}
    for split, name in SPLIT_FILES.items():
        path = os.path.join(folder, name)
        write_jsonl(path, rows[split])
        files[split] = {"file": name, "rows": len(rows[split]), "sha256": file_sha256(path),
                        "source_split": task.splits[split], "source_rows": skipped[split]["rows"],
                        "skipped": {k: v for k, v in skipped[split].items() if k != "rows"},
                        "classes": _class_counts(rows[split], task)}
    manifest.update(files=files, status="complete", seconds=round(time.time() - t0, 2),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(os.path.join(folder, MANIFEST_FILE), manifest)
    return manifest


def _other_build(manifest: dict, settings: BuildSettings, source: TaskSource | None) -> str:
    """Why a complete build is not this call's: other settings, or another source (or the same files changed)."""
    if manifest.get("settings") != settings.to_dict():
        return f"built with other settings ({json.dumps(manifest.get('settings'))})"
    built = manifest.get("source_identity") or {}
    if source is not None and built.get("content") and built.get("content") != source.identity().get("content"):
        return (f"built from a source whose files held other content ({built['content'][:12]}…, now "
                f"{source.identity()['content'][:12]}…: another copy, or the files changed since)")
    return f"built from another source ({json.dumps(manifest.get('source'))})"


def _check_task_names(names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        if name not in LONG_SEQUENCE_TASKS:
            close = difflib.get_close_matches(name, list(LONG_SEQUENCE_TASKS), n=1)
            raise BenchmarkDataError(
                f"Unknown long-sequence task {name!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
                + f" The tasks are {', '.join(LONG_SEQUENCE_TASKS)}."
            )
        if name not in out:
            out.append(name)
    return out


def stage_entries(out_dir: str, order: str, tasks: Sequence[str] | None = None) -> list[dict]:
    """A recipe's ``stages:`` for ``order``, pointing at the files under ``out_dir`` (only ``tasks`` if given)."""
    if order not in TASK_ORDERS:
        raise BenchmarkDataError(f"Unknown order {order!r}; the orders are {', '.join(TASK_ORDERS)}.")
    base = os.path.normpath(out_dir)
    return [{"name": name, "dataset": {"path": "json", "data_files": {
        split: os.path.join(base, name, file) for split, file in SPLIT_FILES.items()}}}
        for name in TASK_ORDERS[order] if tasks is None or name in tasks]


def stages_yaml(out_dir: str, order: str, tasks: Sequence[str] | None = None) -> str:
    """The ``stages`` list of ``order`` as YAML, one stage a line (``--set "stages=$(cat ...)"`` reads it too)."""
    import yaml

    return "".join(
        "- " + yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=float("inf"))
        for entry in stage_entries(out_dir, order, tasks)
    )


def _write_orders(out_dir: str, settings: BuildSettings) -> list[str]:
    """``orders.json`` and ``stages_order{4,5,6}.yaml``, the latter listing the tasks complete in ``out_dir`` only
    (a comment names those not built yet): a recipe given the file reads only files that exist. Returns the
    tasks not built yet."""
    write_json(os.path.join(out_dir, ORDERS_FILE), {"source": ORDERS_SOURCE,
                                                    "orders": {k: list(v) for k, v in TASK_ORDERS.items()}})
    built = [n for n in LONG_SEQUENCE_TASKS if task_status(os.path.join(out_dir, n), settings) == "complete"]
    missing = [n for n in LONG_SEQUENCE_TASKS if n not in built]
    for order in TASK_ORDERS:
        path = os.path.join(out_dir, f"stages_order{order}.yaml")
        with atomic_open(path) as f:
            if missing:
                f.write(f"# Not built yet, so not listed: {', '.join(n for n in TASK_ORDERS[order] if n in missing)}"
                        "\n")
            f.write(stages_yaml(out_dir, order, built))
    return missing


def build_long_sequence(
    out_dir: str,
    *,
    from_dir: str | None = None,
    tasks: Sequence[str] | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
    seed: int = 0,
    hub_datasets: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Build the long-sequence benchmark into ``out_dir`` (``gere-hf data long-sequence``); returns each task's
    manifest (``{"status": "skipped", ...}`` for those already complete).

    Every argument, and with ``from_dir`` every task's local copy, is checked before anything is written; each
    task's columns are checked when it is read, before anything is written for it.
    """
    from tqdm.auto import tqdm

    if protocol not in SAMPLING_PROTOCOLS:
        raise BenchmarkDataError(f"Unknown --protocol {protocol!r}; choose one of {', '.join(SAMPLING_PROTOCOLS)}.")
    if prompt_style not in PROMPT_STYLES:
        raise BenchmarkDataError(f"Unknown --prompt {prompt_style!r}; choose one of {', '.join(PROMPT_STYLES)}.")
    if from_dir is not None and not os.path.isdir(from_dir):
        raise BenchmarkDataError(f"--from {from_dir}: no such folder. Give the folder holding one folder per task.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BenchmarkDataError(f"--out {out_dir} is a file. Give a folder (it is created if missing).")
    names = _check_task_names(tasks if tasks else list(LONG_SEQUENCE_TASKS))
    settings = BuildSettings(protocol, prompt_style, seed)
    overrides = parse_hub_overrides(hub_datasets)
    sources: dict[str, TaskSource | None] = {}
    for n in names:
        try:
            sources[n] = locate_source(LONG_SEQUENCE_TASKS[n], from_dir, overrides)
        except BenchmarkDataError:
            # A task already built (e.g. amazon from a local copy, the rest from the Hub in a second call) needs no
            # source: it is skipped.
            if task_status(os.path.join(out_dir, n), settings) != "complete":
                raise
            sources[n] = None
    statuses = {n: task_status(os.path.join(out_dir, n), settings, sources[n]) for n in names}
    refused = {n: s for n, s in statuses.items() if s in ("other", "foreign")}
    if refused and not overwrite:
        detail = "; ".join(
            f"{n}: " + (_other_build(read_manifest(os.path.join(out_dir, n)) or {}, settings, sources[n])
                        if s == "other" else "holds train/test files this builder did not write")
            for n, s in refused.items())
        raise BenchmarkDataError(
            f"{out_dir} already holds tasks that this call would replace ({detail}). Use another --out, the same "
            "settings, or --overwrite to rebuild them."
        )
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict] = {}
    bar = tqdm(names, desc="long-sequence", unit="task", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        folder = os.path.join(out_dir, name)
        if statuses[name] == "complete":
            logger.info("Task %s: %s is complete; skipped.", name, folder)
            results[name] = {**(read_manifest(folder) or {}), "status": "skipped"}
            continue
        results[name] = build_task(LONG_SEQUENCE_TASKS[name], sources[name], out_dir, settings)
        files = results[name]["files"]
        logger.info("Task %s: %d train / %d test rows written to %s", name, files["train"]["rows"],
                    files["test"]["rows"], folder)
    _write_orders(out_dir, settings)
    return results


__all__ = [
    "BenchmarkDataError",
    "BenchmarkTask",
    "HubSource",
    "LONG_SEQUENCE_TASKS",
    "PROMPT_STYLES",
    "SAMPLING_PROTOCOLS",
    "TASK_ORDERS",
    "build_long_sequence",
    "stage_entries",
    "stages_yaml",
]
