"""The generated tasks of the offline benchmark: deterministic, distinct, correct answers, disjoint splits."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from gere_hf.evaluation.generated_tasks import CHOICES, GENERATORS
from gere_hf.evaluation.tasks import BUILTIN_TASKS, load_builtin_task


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_generators_are_deterministic_and_distinct(kind):
    pairs = GENERATORS[kind](500, seed=3)
    assert pairs == GENERATORS[kind](500, seed=3) and pairs != GENERATORS[kind](500, seed=4)
    assert len({p for p, _ in pairs}) == 500
    assert kind in BUILTIN_TASKS


def test_the_answers_are_right():
    for prompt, answer in GENERATORS["arithmetic"](300):
        a, op, b = re.match(r"What is (\d+) (.) (\d+)\?", prompt).groups()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
    for prompt, answer in GENERATORS["comparison"](300):
        a, b = map(int, re.match(r"Is (\d+) greater than, less than or equal to (\d+)\?", prompt).groups())
        assert answer == (" greater" if a > b else " less" if a < b else " equal")
    for prompt, answer in GENERATORS["spelling"](300):
        word = re.match(r"Spell the word: (\w+)\n", prompt).group(1)
        assert answer == " " + "-".join(word)
    for prompt, answer in GENERATORS["word_problems"](300):
        start = int(re.search(r"has (\d+) ", prompt).group(1))
        change = int(re.search(r"(?:finds|gives) (\d+)", prompt).group(1))
        assert int(answer) == (start + change if "finds" in prompt else start - change) >= 0


def test_comparison_is_a_balanced_closed_task():
    counts = Counter(a for _, a in GENERATORS["comparison"](1200))
    assert set(counts) == set(CHOICES["comparison"]) and min(counts.values()) > 350
    task = load_builtin_task("comparison", 50, 20)
    assert task.choices == CHOICES["comparison"] and task.scoring == "loglik"


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_a_task_has_disjoint_splits_and_passes_over_excluded_texts(kind):
    task = load_builtin_task(kind, 300, 200, seed=1)
    assert len(task.train) == 300 and len(task.eval) == 200
    assert not set(task.train["prompt"]) & set(task.eval["prompt"])
    excluded = task.eval["prompt"][0]
    again = load_builtin_task(kind, 300, 200, seed=1, exclude=[excluded])
    assert excluded not in again.eval["prompt"] and again.meta["eval_dropped_overlap"] == 1
    assert again.eval["prompt"][:5] == task.eval["prompt"][1:6]
