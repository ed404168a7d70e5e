# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Tests for the replay set (gere_hf.replay): sources, the built-in wiki split, tokens and the content hash."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
from conftest import REPLAY_TEXTS

from gere_hf.replay import (
    MIN_CONTAINED_CHARS,
    WIKI_REPLAY_POOL,
    ExcludedTexts,
    ReplayDataError,
    ReplaySet,
    load_replay_texts,
    normalize_text,
    replay_heldout_texts,
    select_heldout_texts,
    text_key,
    wiki_articles,
)

# Single-line texts (a .txt source has one text per line), with commas and quotes for the CSV writer to escape.
TEXTS = [t for t in REPLAY_TEXTS if "\n" not in t] + ['She said "hello, world", then left.']


def _expected_selection(texts, num_samples, seed):
    """The documented selection, written out: a seeded shuffle of positions, the first n kept in source order."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in sorted(order[:num_samples])]


def _write(path, kind, texts, column="text"):
    if kind == "jsonl":
        path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    elif kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([column, "id"])
            writer.writerows([t, i] for i, t in enumerate(texts))
    elif kind == "txt":
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    elif kind == "parquet":
        import datasets

        datasets.Dataset.from_dict({column: texts, "id": list(range(len(texts)))}).to_parquet(str(path))
    else:
        raise AssertionError(kind)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dataset", "jsonl", "csv", "txt", "parquet", "folder"])
def test_load_replay_texts_from_every_source(tmp_path, kind):
    import datasets

    if kind == "dataset":
        source = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    elif kind == "folder":  # two files, read in sorted name order
        (tmp_path / "data").mkdir()
        _write(tmp_path / "data" / "b.jsonl", "jsonl", TEXTS[10:])
        _write(tmp_path / "data" / "a.jsonl", "jsonl", TEXTS[:10])
        (tmp_path / "data" / "README.md").write_text("not a replay file")
        source = tmp_path / "data"
    else:
        source = _write(tmp_path / f"replay.{kind}", kind, TEXTS)
    assert load_replay_texts(source, num_samples=None) == TEXTS
    assert load_replay_texts(str(source) if not isinstance(source, datasets.Dataset) else source, None) == TEXTS
    picked = load_replay_texts(source, num_samples=7, seed=3)
    assert picked == _expected_selection(TEXTS, 7, 3)
    assert picked == load_replay_texts(source, num_samples=7, seed=3)  # deterministic
    assert picked != load_replay_texts(source, num_samples=7, seed=4)


def test_dataset_dict_split_and_text_column(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS})})
    assert load_replay_texts(dd, None, text_column="body") == TEXTS
    with pytest.raises(ReplayDataError, match=r"no split 'validation'.*\['train'\]"):
        load_replay_texts(dd, None, text_column="body", split="validation")


def test_empty_and_whitespace_texts_are_dropped():
    import datasets

    texts = ["", "  ", "kept one", "\n\t", "kept two", None]
    ds = datasets.Dataset.from_dict({"text": texts})
    assert load_replay_texts(ds, None) == ["kept one", "kept two"]


# ----------------------------------------------------------------------------------------------------------------------
# Bad sources: clear errors
# ----------------------------------------------------------------------------------------------------------------------


def test_only_empty_texts():
    import datasets

    with pytest.raises(ReplayDataError, match="no non-empty texts in column 'text' \\(3 rows\\)"):
        load_replay_texts(datasets.Dataset.from_dict({"text": ["", " ", "\n"]}), 2)


def test_empty_replay_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n   \n")
    with pytest.raises(ReplayDataError, match="no non-empty texts"):
        load_replay_texts(path, 2)


def test_missing_text_column_lists_existing_columns(tmp_path):
    path = _write(tmp_path / "r.jsonl", "jsonl", TEXTS, column="content")
    with pytest.raises(ReplayDataError, match=r"no column 'text'; its columns are \['content', 'id'\]"):
        load_replay_texts(path, 2)
    assert load_replay_texts(path, None, text_column="content") == TEXTS


def test_fewer_texts_than_num_samples(tmp_path):
    path = _write(tmp_path / "r.jsonl", "jsonl", TEXTS[:5])
    with pytest.raises(ReplayDataError, match="has 5 non-empty texts but num_samples=8.*allow_fewer"):
        load_replay_texts(path, 8)
    assert load_replay_texts(path, 8, allow_fewer=True) == TEXTS[:5]


@pytest.mark.parametrize("num_samples", [0, -3])
def test_bad_num_samples(num_samples):
    with pytest.raises(ReplayDataError, match="num_samples must be at least 1"):
        load_replay_texts(TEXTS, num_samples)


def test_bad_paths(tmp_path):
    (tmp_path / "r.xml").write_text("<a/>")
    with pytest.raises(ReplayDataError, match="unknown file type '.xml'"):
        load_replay_texts(tmp_path / "r.xml", 1)
    with pytest.raises(ReplayDataError, match="does not exist"):
        load_replay_texts(str(tmp_path / "missing.jsonl"), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayDataError, match="holds no replay files"):
        load_replay_texts(tmp_path / "empty", 1)
    (tmp_path / "mixed").mkdir()
    _write(tmp_path / "mixed" / "a.jsonl", "jsonl", TEXTS)
    _write(tmp_path / "mixed" / "b.csv", "csv", TEXTS)
    with pytest.raises(ReplayDataError, match="mixes file kinds"):
        load_replay_texts(tmp_path / "mixed", 1)


# ----------------------------------------------------------------------------------------------------------------------
# The built-in wiki source
# ----------------------------------------------------------------------------------------------------------------------


def _wiki_digest(texts):
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def test_wiki_is_deterministic_and_nested():
    a = load_replay_texts("wiki", 50, seed=0)
    assert len(a) == len(set(a)) == 50 and all(t.strip() for t in a)
    assert a == load_replay_texts("wiki", 50, seed=0)
    assert load_replay_texts("wiki", 20, seed=0) == a[:20]  # a larger selection extends a smaller one
    assert load_replay_texts("wiki", 50, seed=1) != a


def test_wiki_is_deterministic_across_processes():
    """The selection must not depend on PYTHONHASHSEED or on anything else of the process."""
    code = (
        "import hashlib; from gere_hf.replay import load_replay_texts as f; "
        "print(hashlib.sha256('\\x00'.join(f('wiki', 50, seed=0)).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _wiki_digest(load_replay_texts("wiki", 50, seed=0))


def test_wiki_heldout_is_disjoint_from_every_replay_selection():
    articles = wiki_articles()
    assert len(articles) > WIKI_REPLAY_POOL
    for seed in (0, 1):
        replay = set(load_replay_texts("wiki", WIKI_REPLAY_POOL, seed=seed))  # the largest selection holds them all
        assert len(replay) == WIKI_REPLAY_POOL
        heldout = replay_heldout_texts(200, seed=seed)
        assert len(heldout) == len(set(heldout)) == 200
        assert not replay & set(heldout)
        assert replay_heldout_texts(200, seed=seed) == heldout
        assert set(replay_heldout_texts(50, seed=seed)) <= set(heldout)


def test_wiki_limits():
    with pytest.raises(ReplayDataError, match=f"reserves {WIKI_REPLAY_POOL} articles"):
        load_replay_texts("wiki", WIKI_REPLAY_POOL + 1)
    assert len(load_replay_texts("wiki", WIKI_REPLAY_POOL + 1, allow_fewer=True)) == WIKI_REPLAY_POOL
    with pytest.raises(ReplayDataError, match="held-out texts are available"):
        replay_heldout_texts(10**6)
    with pytest.raises(ReplayDataError, match="only for the 'wiki' source"):
        replay_heldout_texts(10, source="other")


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation data disjoint from the replay texts
# ----------------------------------------------------------------------------------------------------------------------


def test_normalized_text_and_its_key():
    assert normalize_text("  The  ﬁrst\tLINE\n of  Café ") == "the first line of café"  # NFKC: ﬁ -> fi
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefolded, not lowercased
    assert text_key("The ﬁrst  line") == text_key("the first line\n") != text_key("the first line.")
    assert len(text_key("x")) == 16


def test_excluded_texts_rule():
    sentence = "Photosynthesis converts light energy into chemical energy stored in glucose."
    exclude = ExcludedTexts({"replay": [sentence, "Short."], "tasks": ["Paris is the capital and most populous city."]})
    assert exclude.sizes() == {"replay": 2, "tasks": 1} and len(exclude) == 3
    assert exclude.match(sentence.upper()) == "replay"  # equal after normalisation
    assert exclude.match("short.") == "replay"  # equal texts overlap whatever their length
    assert exclude.match(f"Review: {sentence}\nSentiment:") == "replay"  # contains a replay text
    assert exclude.match("converts light energy into chemical energy") == "replay"  # lies inside one
    assert exclude.match("It is a fact that Paris is the capital and most populous city. Really.") == "tasks"
    assert exclude.match(["unrelated", "Paris is the capital and most populous city."]) == "tasks"  # any of several
    assert exclude.match("A Short. text that mentions the word.") is None  # a short text inside a long one is no overlap
    assert exclude.match("light energy") is None  # nor a short candidate inside a long text
    assert len("converts light energy into chemical energy") >= MIN_CONTAINED_CHARS > len("light energy")
    assert ExcludedTexts.of(None) is None and ExcludedTexts.of(exclude) is exclude
    with pytest.raises(TypeError, match="not a single string"):
        ExcludedTexts("one text")


def test_general_texts_from_the_replay_file_share_no_text_with_the_replay_set(tmp_path):
    path = _write(tmp_path / "general.jsonl", "jsonl", TEXTS)
    replay = load_replay_texts(str(path), 8, seed=0)
    assert load_replay_texts(str(path), 8, seed=0, exclude=["nothing like it"]) == replay  # the replay set is fixed
    # The same file as held-out source: without exclusion it measures replay texts (as recipes did before).
    plain = load_replay_texts(str(path), 12, seed=1)
    assert set(plain) & set(replay)
    selection = select_heldout_texts(12, seed=1, source=str(path), exclude={"replay": replay})
    assert len(selection.texts) == 12 and not {text_key(t) for t in selection.texts} & {text_key(t) for t in replay}
    # The walk over the seeded order passes over at least the replay texts the plain selection took.
    assert selection.pool == len(TEXTS) and selection.dropped["replay"] >= len(set(plain) & set(replay)) > 0
    assert selection.examined == 12 + selection.dropped["replay"]
    assert selection.texts == [t for t in TEXTS if t in selection.texts]  # in file order, as without exclusion
    # Candidates are compared normalised: a case/spacing variant of a replay text is the same text.
    others = [t for t in TEXTS if t not in replay][:3]
    variant = _write(tmp_path / "variant.jsonl", "jsonl", ["  " + replay[0].upper() + "  ", *others])
    assert select_heldout_texts(3, seed=0, source=str(variant), exclude={"replay": replay}).texts == others
    # Too few left: the message names what was asked, what is left and how many overlapped.
    with pytest.raises(ReplayDataError) as err:
        select_heldout_texts(20, seed=1, source=str(path), exclude={"replay": replay})
    message = str(err.value)
    assert f"20 texts were asked from the general source {str(path)!r}, but only {len(TEXTS) - 8} of its " \
           f"{len(TEXTS)} candidate texts are left after dropping the 8 that overlap the excluded texts (8 replay)" \
           in message
    assert f"Ask for at most {len(TEXTS) - 8}" in message


def test_wiki_heldout_excludes_replay_texts_of_another_seed_and_source():
    replay = load_replay_texts("wiki", 1000, seed=1)
    # Held-out wiki texts of seed 0 are disjoint from the seed-0 replay pool, not from another seed's selection.
    plain = set(replay_heldout_texts(200, seed=0)) & set(replay)
    assert plain
    selection = select_heldout_texts(200, seed=0, exclude={"replay": replay})
    assert len(selection.texts) == 200 and not set(selection.texts) & set(replay)
    assert selection.dropped["replay"] >= len(plain) and selection.examined == 200 + selection.dropped["replay"]
    assert replay_heldout_texts(200, seed=0, exclude=replay) == selection.texts
    # Without an overlap the held-out texts are those of today's selection, in its order.
    assert replay_heldout_texts(200, seed=1, exclude=replay) == replay_heldout_texts(200, seed=1)


# ----------------------------------------------------------------------------------------------------------------------
# Tokens and the content hash
# ----------------------------------------------------------------------------------------------------------------------


def test_tokens_have_no_special_tokens_and_are_truncated(tokenizer):
    max_length = 24
    replay = ReplaySet.from_texts(["", "   "] + REPLAY_TEXTS, tokenizer, max_length=max_length, source="unit")
    assert replay.texts == REPLAY_TEXTS and len(replay) == len(REPLAY_TEXTS)
    for text, ids in zip(REPLAY_TEXTS, replay.input_ids):
        # ByT5, written out: byte b is id b + 3; no eos (id 1) appended.
        assert ids == [b + 3 for b in text.encode("utf-8")][:max_length]
        assert 1 not in ids and len(ids) <= max_length
    assert replay.lengths == [len(i) for i in replay.input_ids]
    assert replay.num_tokens == sum(replay.lengths)
    assert max(replay.lengths) == max_length and min(replay.lengths) == 1
    assert replay.meta == {"source": "unit"}
    assert tokenizer(REPLAY_TEXTS[0])["input_ids"][-1] == 1  # the tokenizer itself would add eos


def test_load_wiki_replay_set(tokenizer):
    replay = ReplaySet.load(tokenizer, "wiki", num_samples=5, max_length=64, seed=0)
    assert replay.texts == load_replay_texts("wiki", 5, seed=0)
    assert replay.meta == {"source": "wiki", "seed": 0}
    assert all(len(ids) == 64 for ids in replay.input_ids)  # wiki summaries are longer than 64 bytes


def test_content_hash(tokenizer):
    from transformers import ByT5Tokenizer

    base = ReplaySet.from_texts(REPLAY_TEXTS, tokenizer, max_length=32)
    assert base.content_hash == ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(), max_length=32).content_hash
    others = {
        "texts": ReplaySet.from_texts(REPLAY_TEXTS[:-1], tokenizer, max_length=32),
        "one character": ReplaySet.from_texts(REPLAY_TEXTS[:-1] + [REPLAY_TEXTS[-1] + "!"], tokenizer, 32),
        "order": ReplaySet.from_texts(REPLAY_TEXTS[::-1], tokenizer, max_length=32),
        "split point": ReplaySet.from_texts(["ab", "c"], tokenizer, 32),
        "tokenizer": ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(extra_ids=0), max_length=32),
        "max_length": ReplaySet.from_texts(REPLAY_TEXTS, tokenizer, max_length=33),
    }
    assert ReplaySet.from_texts(["a", "bc"], tokenizer, 32).content_hash != others["split point"].content_hash
    hashes = [base.content_hash] + [r.content_hash for r in others.values()]
    assert len(set(hashes)) == len(hashes), dict(zip(["base", *others], hashes))


def test_tokenizer_fingerprint_sees_special_tokens(tokenizer):
    from gere_hf.replay import tokenizer_fingerprint

    before = tokenizer_fingerprint(tokenizer)
    tokenizer.pad_token = None
    assert tokenizer_fingerprint(tokenizer) != before


def test_bad_replay_sets(tokenizer):
    with pytest.raises(ReplayDataError, match="every text was empty"):
        ReplaySet.from_texts([], tokenizer)
    with pytest.raises(ReplayDataError, match="every text was empty"):
        ReplaySet.from_texts(["", " \n"], tokenizer)
    for max_length in (1, 0, -5):
        with pytest.raises(ReplayDataError, match="max_length must be at least 2"):
            ReplaySet.from_texts(REPLAY_TEXTS, tokenizer, max_length=max_length)


def test_hub_ids_are_loaded_and_missing_paths_reported(monkeypatch, tmp_path):
    """'org/name' is a Hub id (given to datasets.load_dataset), not a missing file; the Hub cannot be reached here,
    so a stand-in for load_dataset records the call and returns local rows."""
    import datasets

    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_dict({"text": ["a general text", "another general text"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_replay_texts("DKYoon/SlimPajama-6B", 2) == ["a general text", "another general text"]
    assert calls == [("DKYoon/SlimPajama-6B", "train")]
    for missing in ("data/replay/texts", "./replay", str(tmp_path / "none"), "replay.jsonl"):
        with pytest.raises(ReplayDataError, match="does not exist"):
            load_replay_texts(missing, 1)
    assert len(calls) == 1
