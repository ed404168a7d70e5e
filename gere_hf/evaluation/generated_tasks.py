"""Tasks made by deterministic generators: as many examples as a benchmark needs, disjoint from any text by design.

Each generator returns ``(prompt, completion)`` pairs, all distinct by prompt, in a seeded order; the task layer
(:mod:`gere_hf.evaluation.tasks`) turns them into :class:`~gere_hf.evaluation.tasks.Task` objects. They are made of
numbers, names and a small closed vocabulary, so they overlap neither the replay texts nor the held-out general text
(the task layer still checks, as for every task). Kinds, for a sequence that exercises different skills:

* ``comparison``: is one number greater than, less than or equal to another ("Is 437 greater than, less than or equal
  to 80?" → " greater"): a closed task with three labels, scored by ranking them.
* ``arithmetic``: one operation on two numbers ("What is 37 + 45?" → " 82"): a short exact answer, generated.
* ``spelling``: a pseudo-word spelled out letter by letter ("Spell the word: tamoruki" → " t-a-m-o-r-u-k-i"): a long
  answer (every letter and hyphen a token) that must be generated exactly.
* ``word_problems``: arithmetic told as a short story ("Ana has 12 shells. Ana gives 5 to Ben. How many shells does
  Ana have now?" → " 7"): reasoning-like (the operation is in the words), generated.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["CHOICES", "GENERATORS", "arithmetic_pairs", "comparison_pairs", "spelling_pairs", "word_problem_pairs"]

# Pseudo-words to spell: consonant-vowel syllables, 3 or 4 of them (6 to 8 letters). No real word's spelling is
# remembered; the skill is the rule (copy the letters, hyphens between), learnable from examples.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

_NAMES = ["Ana", "Ben", "Carla", "Dev", "Elif", "Farid", "Greta", "Hugo", "Iris", "Jonas", "Kemal", "Lena", "Mateo",
          "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara"]
_OBJECTS = ["shells", "marbles", "stamps", "apples", "pencils", "coins", "stickers", "books", "cards", "buttons"]


def _unique(make: Callable[[random.Random], tuple[str, str]], n: int, seed: int, kind: str) -> list[tuple[str, str]]:
    """``n`` pairs with distinct prompts from ``make``, deterministic for ``(kind, seed)``."""
    rng = random.Random(f"gere-generated-{kind}-{seed}")
    pairs, seen = [], set()
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"The {kind} generator has fewer than {n} distinct examples; ask for fewer.")
        prompt, completion = make(rng)
        if prompt not in seen:
            seen.add(prompt)
            pairs.append((prompt, completion))
    return pairs


def comparison_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Two numbers below 10,000, compared; the three answers in equal shares (the label is drawn first, then a pair
    that has it)."""
    labels = [" greater", " less", " equal"]

    def make(rng: random.Random) -> tuple[str, str]:
        label = rng.choice(labels)
        a = rng.randint(10, 9999)
        b = {" greater": rng.randint(1, a - 1), " less": rng.randint(a + 1, 10000), " equal": a}[label]
        return f"Is {a} greater than, less than or equal to {b}?\nAnswer:", label

    return _unique(make, n, seed, "comparison")


def arithmetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sums and differences of numbers below 100, products of numbers below 13 (answers 0 to 198)."""

    def make(rng: random.Random) -> tuple[str, str]:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            value = a * b
        else:
            a, b = rng.randint(10, 99), rng.randint(1, 99)
            if op == "-" and b > a:
                a, b = b, a
            value = a + b if op == "+" else a - b
        return f"What is {a} {'×' if op == '*' else op} {b}?\nAnswer:", f" {value}"

    return _unique(make, n, seed, "arithmetic")


def spelling_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A pseudo-word of 3 or 4 consonant-vowel syllables, its letters joined by hyphens (15 to 23 characters)."""

    def make(rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(3, 4)))
        return f"Spell the word: {word}\nAnswer:", " " + "-".join(word)

    return _unique(make, n, seed, "spelling")


def word_problem_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A person has some objects and gains or gives away some: how many are left (always ≥ 0)."""

    def make(rng: random.Random) -> tuple[str, str]:
        person, friend = rng.sample(_NAMES, 2)
        thing = rng.choice(_OBJECTS)
        start = rng.randint(3, 60)
        if rng.random() < 0.5:
            change = rng.randint(2, 40)
            event, value = f"{person} finds {change} more", start + change
        else:
            change = rng.randint(1, start)
            event, value = f"{person} gives {change} to {friend}", start - change
        return f"{person} has {start} {thing}. {event}. How many {thing} does {person} have now?\nAnswer:", f" {value}"

    return _unique(make, n, seed, "word_problems")


GENERATORS: dict[str, Callable[[int, int], list[tuple[str, str]]]] = {
    "comparison": comparison_pairs,
    "arithmetic": arithmetic_pairs,
    "spelling": spelling_pairs,
    "word_problems": word_problem_pairs,
}
"""name → ``generator(n, seed)``: the generated tasks the task layer offers as built-in tasks."""

CHOICES: dict[str, list[str]] = {"comparison": [" greater", " less", " equal"]}
"""The closed answer set of the generated tasks that have one (the others are free-form, generated)."""
