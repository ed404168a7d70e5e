from __future__ import annotations

import importlib.util
from collections import Counter

import datasets
import pytest

from gere_hf.replay import (
    WIKI_REPLAY_POOL,
    replay_heldout_texts,
    wiki_articles,
    wiki_disjoint_indices,
    wiki_replay_indices,
)
from gere_hf.tasks import BUILTIN_TASKS, Task, TaskDataError, load_builtin_task, task_from_dataset, trivia_pairs


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
    assert trivia.choices is None and trivia.scoring == "exact_match"
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
