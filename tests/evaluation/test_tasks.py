from __future__ import annotations

import importlib.util
from collections import Counter

import datasets
import pytest

from gere_hf.evaluation.tasks import (
    BUILTIN_TASKS,
    Task,
    TaskDataError,
    load_builtin_task,
    task_from_dataset,
    trivia_pairs,
)
from gere_hf.replay import (
    WIKI_REPLAY_POOL,
    ExcludedTexts,
    load_replay_texts,
    replay_heldout_texts,
    text_key,
    wiki_articles,
    wiki_disjoint_indices,
    wiki_replay_indices,
)


def _pairs(ds):
    return list(zip(ds["prompt"], ds["completion"]))


# ----------------------------------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_deterministic_and_disjoint(name):
    a = load_builtin_task(name, num_train=40, num_eval=20, seed=0)
    b = load_builtin_task(name, num_train=40, num_eval=20, seed=0)
    c = load_builtin_task(name, num_train=40, num_eval=20, seed=1)
    assert _pairs(a.train) == _pairs(b.train) and _pairs(a.eval) == _pairs(b.eval)
    assert _pairs(a.eval) != _pairs(c.eval)
    assert len(a.train) == 40 and len(a.eval) == 20
    assert set(a.train["prompt"]).isdisjoint(a.eval["prompt"])
    assert a.train.column_names == ["prompt", "completion"]
    assert all(isinstance(p, str) and isinstance(c, str) and c.startswith(" ") for p, c in _pairs(a.eval))
    if a.choices is not None:
        assert set(a.eval["completion"]) <= set(a.choices)


def test_builtin_formats():
    wiki = load_builtin_task("wiki_topic", num_train=10, num_eval=25)
    assert wiki.scoring == "loglik" and 4 <= len(wiki.choices) <= 6
    assert all(p.startswith("Article: ") and p.endswith("\nTopic:") for p in wiki.eval["prompt"])
    assert all(len(p.split()) <= 64 for p in wiki.eval["prompt"])
    assert set(Counter(wiki.eval["completion"]).values()) == {5}  # class-balanced eval

    polarity = load_builtin_task("polarity", num_train=100, num_eval=100)
    assert polarity.choices == [" negative", " positive"]
    assert Counter(polarity.eval["completion"]) == {" negative": 50, " positive": 50}
    assert all(p.startswith("Review: ") and p.endswith("\nSentiment:") for p in polarity.eval["prompt"])
    assert any("é" in p for p in list(polarity.train["prompt"]) + list(polarity.eval["prompt"]))  # read as Windows-1252

    trivia = load_builtin_task("trivia", num_train=5, num_eval=5)
    assert trivia.choices is None and trivia.scoring == "generate"
    pairs = trivia_pairs()
    assert len(pairs) >= 250
    assert ("Who was the 37th President of the United States?", "Richard Nixon") in pairs
    assert ("A spinning disk, in which the orientation of this axis is unaffected by tilting or rotation of the "
            "mounting, is called what?", "A gyroscope") in pairs  # trailing period dropped
    assert len({q.lower() for q, _ in pairs}) == len(pairs)
    assert all(0 < len(a.split()) <= 6 for _, a in pairs)
    assert not any("bingo" in q for q, _ in pairs)  # the malformed entry of trivia.yml is skipped


@pytest.mark.parametrize("seed", [0, 3])
def test_wiki_topic_disjoint_from_replay_and_heldout(seed):
    task = load_builtin_task("wiki_topic", num_train=800, num_eval=200, seed=seed)
    used = set(task.meta["train_indices"]) | set(task.meta["eval_indices"])
    assert len(used) == 1000
    assert used.isdisjoint(wiki_replay_indices(WIKI_REPLAY_POOL, seed))
    assert used <= set(wiki_disjoint_indices(seed))
    articles = wiki_articles()
    heldout = set(replay_heldout_texts(len(wiki_disjoint_indices(seed)) // 2, seed))  # the most there can be
    assert not any(articles[i][2] in heldout for i in used)
    assert "Uncategorized" not in {articles[i][1] for i in used}


@pytest.mark.parametrize("name,available", [("polarity", 200), ("wiki_topic", 1005)])
def test_builtin_too_many(name, available):
    with pytest.raises(TaskDataError, match=f"has {available} examples"):
        load_builtin_task(name, num_train=available, num_eval=1)


def test_builtin_unknown_and_missing_package(monkeypatch):
    with pytest.raises(TaskDataError, match="built-in tasks are"):
        load_builtin_task("nope")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gensim" else real(n, *a))
    with pytest.raises(TaskDataError, match=r"pip install gere_hf\[demo\]"):
        load_builtin_task("polarity")


# ----------------------------------------------------------------------------------------------------------------------
# task_from_dataset
# ----------------------------------------------------------------------------------------------------------------------


def _reviews(n=30):
    return datasets.Dataset.from_dict(
        {"text": [f"review number {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["negative", "positive"])}),
    )


def test_task_from_dataset_template_and_classlabel():
    task = task_from_dataset("rev", _reviews(), template="Review: {text}\nSentiment:", seed=1)
    assert task.choices == [" negative", " positive"]  # ClassLabel names, space added, choices="auto"
    assert len(task.eval) == 6 and len(task.train) == 24
    assert set(task.train["prompt"]).isdisjoint(task.eval["prompt"])
    prompt, completion = task.eval[0]["prompt"], task.eval[0]["completion"]
    i = int(prompt.split()[-2])
    assert completion == (" positive" if i % 2 else " negative")
    again = task_from_dataset("rev", _reviews(), template="Review: {text}\nSentiment:", seed=1)
    assert _pairs(again.eval) == _pairs(task.eval)


def test_task_from_dataset_fields_sizes_and_choices():
    ds = datasets.Dataset.from_dict({"q": [f"What is {i}+{i}?" for i in range(60)], "a": [str(2 * i) for i in range(60)]})
    task = task_from_dataset("add", ds, prompt_field="q", completion_field="a", num_train=20, num_eval=10)
    assert task.choices is None  # 60 distinct answers > 20: free-form
    assert len(task.train) == 20 and len(task.eval) == 10
    assert task.eval[0]["completion"].startswith(" ")
    few = task_from_dataset("few", ds.select(range(10)), prompt_field="q", completion_field="a", eval_split=0.3)
    assert few.choices is not None and len(few.eval) == 3
    explicit = task_from_dataset("x", ds, prompt_field="q", completion_template="={a}", choices=None)
    assert explicit.eval[0]["completion"].startswith("=")
    dd = datasets.DatasetDict({"train": ds.select(range(40)), "test": ds.select(range(40, 60))})
    split = task_from_dataset("dd", dd, prompt_field="q", completion_field="a")
    assert len(split.train) == 40 and len(split.eval) == 20


def test_task_from_dataset_errors():
    ds = datasets.Dataset.from_dict({"question": ["a", "b", "c"], "answer": ["x", "y", "z"]})
    with pytest.raises(TaskDataError, match=r"no field\(s\) \['prompt'\].*its fields are \['question', 'answer'\]"):
        task_from_dataset("t", ds)
    with pytest.raises(TaskDataError, match=r"\['txt'\].*its fields are \['question', 'answer'\]"):
        task_from_dataset("t", ds, template="Q: {txt}", completion_field="answer")
    with pytest.raises(TaskDataError, match="empty label set"):
        task_from_dataset("t", ds, prompt_field="question", completion_field="answer", choices=[])
    empty = datasets.Dataset.from_dict({"question": ["a", "b", "c"], "answer": ["", " ", ""]})
    with pytest.raises(TaskDataError, match="empty label set"):
        task_from_dataset("t", empty, prompt_field="question", completion_field="answer")
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([])})
    with pytest.raises(TaskDataError, match="eval split is empty"):
        task_from_dataset("t", dd, prompt_field="question", completion_field="answer")
    with pytest.raises(TaskDataError, match="has no split 'dev'"):
        task_from_dataset("t", dd, prompt_field="question", completion_field="answer", eval_split="dev")
    with pytest.raises(TaskDataError, match="Ask for at most 2"):
        task_from_dataset("t", ds, prompt_field="question", completion_field="answer", num_eval=1, num_train=5)
    with pytest.raises(TaskDataError, match="not among the choices"):
        task_from_dataset("t", ds, prompt_field="question", completion_field="answer", choices=[" x"])


def test_task_checks_columns():
    bad = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(TaskDataError, match=r"lacks the column\(s\) \['prompt', 'completion'\]"):
        Task("t", bad, bad)


# ----------------------------------------------------------------------------------------------------------------------
# Eval examples disjoint from the replay texts (exclude=)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_without_overlap_is_the_task_without_exclusion(name):
    for num_eval in (20, 23):  # a multiple of the class count, and not
        plain = load_builtin_task(name, num_train=40, num_eval=num_eval, seed=3)
        excluded = load_builtin_task(name, num_train=40, num_eval=num_eval, seed=3, exclude=["no such text at all"])
        assert _pairs(excluded.train) == _pairs(plain.train) and _pairs(excluded.eval) == _pairs(plain.eval)
        assert excluded.meta["eval_dropped_overlap"] == 0 and "eval_dropped_overlap" not in plain.meta


def test_wiki_topic_eval_articles_exclude_the_replay_texts_of_another_seed():
    articles = wiki_articles()
    replay = set(load_replay_texts("wiki", 1000, seed=1))  # gere.replay_seed=1, seed=0
    plain = load_builtin_task("wiki_topic", num_train=400, num_eval=100, seed=0)
    assert len({articles[i][2] for i in plain.meta["eval_indices"]} & replay) > 0  # what exclude= is for
    task = load_builtin_task("wiki_topic", num_train=400, num_eval=100, seed=0, exclude={"replay": replay})
    eval_articles = {articles[i][2] for i in task.meta["eval_indices"]}
    assert len(task.eval) == 100 and not eval_articles & replay
    assert set(Counter(task.eval["completion"]).values()) == {20}  # still class-balanced
    assert task.meta["eval_dropped_overlap"] >= len({articles[i][2] for i in plain.meta["eval_indices"]} & replay)
    assert len(task.train) == 400 and set(task.meta["train_indices"]).isdisjoint(task.meta["eval_indices"])
    assert set(task.source_texts["eval"]) == eval_articles
    # Train may share articles with the replay texts (harmless: nothing of it is evaluated).
    assert {articles[i][2] for i in task.meta["train_indices"]} & replay


def test_builtin_eval_passes_over_excluded_reviews_and_questions():
    polarity = load_builtin_task("polarity", num_train=20, num_eval=10, seed=0)
    reviews = [p.removeprefix("Review: ").removesuffix("\nSentiment:") for p in polarity.eval["prompt"][:3]]
    again = load_builtin_task("polarity", num_train=20, num_eval=10, seed=0, exclude=reviews)
    assert len(again.eval) == 10 and Counter(again.eval["completion"]) == {" negative": 5, " positive": 5}
    assert not any(r in p for r in reviews for p in again.eval["prompt"])
    assert again.meta["eval_dropped_overlap"] == 3
    trivia = load_builtin_task("trivia", num_train=5, num_eval=5, seed=0)
    question = trivia.eval["prompt"][0].removeprefix("Question: ").removesuffix("\nAnswer:")
    again = load_builtin_task("trivia", num_train=5, num_eval=5, seed=0, exclude=[question.upper()])
    assert len(again.eval) == 5 and trivia.eval["prompt"][0] not in again.eval["prompt"]
    assert trivia.eval["prompt"][0] in again.train["prompt"]  # passed over for eval, left to train
    with pytest.raises(TaskDataError, match=r"num_eval=200 takes 100 eval examples of class '(negative|positive)', "
                                            r"but only 9[789] of its 100 are left after dropping [123] that overlap the "
                                            r"excluded texts. Lower num_eval to at most 19[4-9] \(eval stays"):
        load_builtin_task("polarity", num_train=0, num_eval=200, seed=0, exclude=reviews)


def _replay_file_rows(texts):
    labels = ["a", "b"]
    return datasets.Dataset.from_dict({"text": list(texts), "label": [labels[i % 2] for i in range(len(texts))]})


@pytest.mark.parametrize("layout", ["held-out", "eval-split"])
def test_task_built_from_the_replay_file_evaluates_none_of_the_replay_texts(layout):
    texts = [f"General text number {i}: a sentence long enough to be a replay text of its own." for i in range(60)]
    replay = load_replay_texts(datasets.Dataset.from_dict({"text": texts}), 20, seed=0)
    rows = _replay_file_rows(texts)
    data = rows if layout == "held-out" else datasets.DatasetDict({"train": rows.select(range(30)),
                                                                   "test": rows.select(range(30, 60))})
    kwargs = dict(template="Text: {text}\nLabel:", completion_field="label", num_eval=10, seed=0)
    plain = task_from_dataset("t", data, **kwargs)
    assert any(r in p for r in replay for p in plain.eval["prompt"])  # the prompt contains a replay text
    task = task_from_dataset("t", data, **kwargs, exclude={"replay": replay})
    assert len(task.eval) == 10 and not any(r in p for r in replay for p in task.eval["prompt"])
    assert not {text_key(t) for t in task.source_texts["eval"]} & {text_key(t) for t in replay}
    assert task.meta["eval_dropped_overlap"] > 0
    if layout == "held-out":  # passed-over rows stay in train: every row is used once
        assert len(task.train) + len(task.eval) == 60 and any(r in p for r in replay for p in task.train["prompt"])
    # Too few left: the counts and the fix.
    asked, pool = (50, 60) if layout == "held-out" else (30, 30)
    left = pool - sum(t in replay for t in (texts if layout == "held-out" else texts[30:]))
    with pytest.raises(TaskDataError, match=rf"Task 't': {asked} eval examples were asked, but only {left} of the "
                                            rf"{pool} eval candidates are left after dropping the {pool - left} whose "
                                            rf"prompt, completion or prompt fields overlap the excluded texts. Lower "
                                            rf"num_eval to at most {left}, or give eval data"):
        task_from_dataset("t", data, **{**kwargs, "num_eval": asked}, exclude={"replay": replay})


def test_task_texts_hold_prompts_completions_and_sources():
    task = load_builtin_task("wiki_topic", num_train=5, num_eval=5, seed=0)
    texts = task.texts()
    assert set(task.train["prompt"]) <= set(texts) and set(task.eval["completion"]) <= set(texts)
    articles = wiki_articles()
    assert {articles[i][2] for i in task.meta["eval_indices"]} <= set(texts)  # the whole article, not the snippet
    assert ExcludedTexts(texts).overlaps(articles[task.meta["eval_indices"][0]][2])
