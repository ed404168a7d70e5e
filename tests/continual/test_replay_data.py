"""Tests for `gere-hf data replay` (gere_hf.continual.replay_data).

The Hub cannot be reached here: small local files in SlimPajama's schemas stand in for it (cerebras/SlimPajama-627B's
jsonl rows `{"text", "meta": {"redpajama_set_name"}}`, DKYoon/SlimPajama-6B's parquet with `text`, the `meta` struct
and `__index_level_0__`), and for the Hub-id path a stand-in for `datasets.load_dataset` that serves local rows as a
stream and records how it was called. The output is checked row by row against the source rows.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import datasets
import pytest

from gere_hf.cli import main
from gere_hf.continual.replay_data import ReplayBuildError, build_replay_data, texts_hash
from gere_hf.replay import ExcludedTexts, load_replay_texts, normalize_text, select_heldout_texts

SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaArXiv",
        "RedPajamaWikipedia", "RedPajamaStackExchange"]


def slimpajama_rows(n: int) -> list[dict]:
    """Made-up documents in SlimPajama's record schema, with what the builder must pass over planted in them."""
    rows = [{"text": f"Document {i} about topic {i % 13}: " + " ".join(f"w{(i * 31 + j) % 997}" for j in range(40)),
             "meta": {"redpajama_set_name": SETS[i % len(SETS)]}} for i in range(n)]
    rows[2]["text"] = "   "                      # empty: passed over
    rows[5]["text"] = rows[1]["text"]            # a duplicate of a replay text: passed over
    rows[9]["text"] = "Quoted: " + rows[3]["text"] + " (end)"  # contains a replay text: not held out
    return rows


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _expected(rows, num, heldout):
    """The selection written out plainly: the first `num` non-empty distinct texts, then the next `heldout` that
    overlap none of them (or each other)."""
    replay, held = [], []
    for row in rows:
        text = row["text"]
        if not text.strip() or text in replay or text in held:
            continue
        if len(replay) < num:
            replay.append(text)
        elif len(held) < heldout and not any(r in text or text in r for r in replay + held):
            held.append(text)
    return replay, held


def test_slimpajama_jsonl_row_by_row(tmp_path):
    rows = slimpajama_rows(60)
    source = tmp_path / "slimpajama.jsonl"  # stands in for cerebras/SlimPajama-627B's jsonl
    _write_jsonl(source, rows)
    out = tmp_path / "out"
    manifest = build_replay_data(str(source), str(out), num=6, heldout=5, progress=False)
    replay, held = _expected(rows, 6, 5)
    assert _texts(out / "replay.jsonl") == replay == [rows[i]["text"] for i in (0, 1, 3, 4, 6, 7)]
    assert _texts(out / "heldout.jsonl") == held == [rows[i]["text"] for i in (8, 10, 11, 12, 13)]
    assert manifest["counts"] == {"examined": 14, "empty": 1, "duplicate": 1, "overlap_replay": 1, "overlap_heldout": 0}
    files = manifest["files"]
    assert files["replay.jsonl"]["rows"] == 6 and files["replay.jsonl"]["texts_sha256"] == texts_hash(replay)
    assert files["replay.jsonl"]["redpajama_set_name"] == dict(Counter(SETS[i % 7] for i in (0, 1, 3, 4, 6, 7)))
    # What the runner does with them: all replay texts in file order, and the held-out texts disjoint from them.
    assert load_replay_texts(str(out / "replay.jsonl"), 6) == replay
    selection = select_heldout_texts(5, 0, str(out / "heldout.jsonl"), exclude=ExcludedTexts({"replay": replay}))
    assert sorted(selection.texts) == sorted(held) and sum(selection.dropped.values()) == 0


def test_slimpajama_6b_parquet_and_resume(tmp_path):
    rows = [{**r, "__index_level_0__": i} for i, r in enumerate(slimpajama_rows(40))]
    source = tmp_path / "train-00000-of-00001.parquet"  # stands in for DKYoon/SlimPajama-6B's parquet shard
    datasets.Dataset.from_list(rows).to_parquet(str(source))
    out = tmp_path / "out"
    first = build_replay_data(str(source), str(out), num=4, heldout=3, progress=False)
    assert _texts(out / "replay.jsonl") == _expected(rows, 4, 3)[0]
    mtime = os.stat(out / "replay.jsonl").st_mtime_ns
    again = build_replay_data(str(source), str(out), num=4, heldout=3, progress=False)
    assert again["skipped"] and os.stat(out / "replay.jsonl").st_mtime_ns == mtime
    assert again["files"] == first["files"]
    # Other settings would replace a finished build: refused, nothing touched; --overwrite replaces it.
    with pytest.raises(ReplayBuildError, match="built from other settings.*--overwrite"):
        build_replay_data(str(source), str(out), num=5, heldout=3, progress=False)
    assert os.stat(out / "replay.jsonl").st_mtime_ns == mtime
    assert build_replay_data(str(source), str(out), num=5, heldout=3, overwrite=True,
                             progress=False)["files"]["replay.jsonl"]["rows"] == 5
    # A file edited since is rebuilt (it is ours: the manifest says so).
    with open(out / "heldout.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "added by hand"}\n')
    assert "skipped" not in build_replay_data(str(source), str(out), num=5, heldout=3, progress=False)
    assert _texts(out / "heldout.jsonl") == _expected(rows, 5, 3)[1]


def test_hub_source_is_streamed_and_read_only_as_far_as_needed(monkeypatch, tmp_path):
    """A Hub id goes to datasets.load_dataset(..., streaming=True), and the stream is read no further than needed.
    The Hub is out of reach: a stand-in serves SlimPajama-schema rows as an IterableDataset and counts reads."""
    rows = slimpajama_rows(1000)
    calls, served = [], []

    def generate():
        for row in rows:
            served.append(1)
            yield row

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return datasets.IterableDataset.from_generator(generate)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    build_replay_data("DKYoon/SlimPajama-6B", str(tmp_path), num=10, heldout=4, progress=False)
    assert calls == [("DKYoon/SlimPajama-6B", None, "train", True)]
    assert len(served) < 30  # 17 rows give the 14 documents; nothing like the 1,000 of the stream
    assert _texts(tmp_path / "replay.jsonl") == _expected(rows, 10, 4)[0]


def test_text_files_and_folders(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("first line of a\nsecond line of a\n\n", encoding="utf-8")
    (folder / "b.txt").write_text("a line of b\n", encoding="utf-8")
    build_replay_data(str(folder), str(tmp_path / "out"), num=2, heldout=1, progress=False)
    assert _texts(tmp_path / "out" / "replay.jsonl") == ["first line of a", "second line of a"]
    assert _texts(tmp_path / "out" / "heldout.jsonl") == ["a line of b"]


def test_bad_sources_stop_before_anything_is_written(tmp_path):
    source = tmp_path / "s.jsonl"
    _write_jsonl(source, slimpajama_rows(12))
    out = tmp_path / "out"
    with pytest.raises(ReplayBuildError) as err:
        build_replay_data(str(source), str(out), num=6, heldout=10, progress=False)
    assert "6 replay and 10 held-out documents were asked, but its 12 documents gave 6 and 3" in str(err.value)
    assert "1 empty, 1 duplicates, 1 overlapping a replay text" in str(err.value) and not out.exists()
    with pytest.raises(ReplayBuildError, match=r"no column 'content'; they have \['meta', 'text'\]"):
        build_replay_data(str(source), str(out), num=2, heldout=1, text_column="content", progress=False)
    with pytest.raises(ReplayBuildError, match="does not exist"):
        build_replay_data(str(tmp_path / "missing.jsonl"), str(out), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ReplayBuildError, match="is empty"):
        build_replay_data(str(empty), str(out), progress=False)
    with pytest.raises(ReplayBuildError, match="--num must be at least 1"):
        build_replay_data(str(source), str(out), num=0, progress=False)
    assert not out.exists()
    # Files of someone else's in the output folder are not replaced.
    out.mkdir()
    (out / "replay.jsonl").write_text('{"text": "mine"}\n', encoding="utf-8")
    with pytest.raises(ReplayBuildError, match="were not written by this builder"):
        build_replay_data(str(source), str(out), num=2, heldout=1, progress=False)
    assert (out / "replay.jsonl").read_text(encoding="utf-8") == '{"text": "mine"}\n'


def test_cli(tmp_path, capsys):
    source = tmp_path / "s.jsonl"
    _write_jsonl(source, slimpajama_rows(30))
    out = tmp_path / "slim"
    assert main(["data", "replay", "--source", str(source), "--num", "5", "--heldout", "2", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"gere.replay_source: {out}/replay.jsonl" in printed and f"general_source: {out}/heldout.jsonl" in printed
    assert len(_texts(out / "replay.jsonl")) == 5
    assert main(["data", "replay", "--source", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "gere-hf data: error: --source" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Reliability II (docs/reliability.md): a changed source is not "already complete", held-out texts disjoint from each
# other, an --out that is a file
# ----------------------------------------------------------------------------------------------------------------------


def test_a_source_whose_content_changed_is_not_complete(tmp_path, capsys):
    source, out = tmp_path / "source.jsonl", tmp_path / "out"
    _write_jsonl(source, slimpajama_rows(20))
    build_replay_data(str(source), str(out), num=5, heldout=3, progress=False)
    rows = slimpajama_rows(20)
    rows[0]["text"] = "An edited first document, about something else entirely, long enough to matter here."
    _write_jsonl(source, rows)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert main(["data", "replay", "--source", str(source), "--out", str(out), "--num", "5", "--heldout", "3",
                 "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert f"which were built from {source} when its content was different (fingerprint" in message
    assert "or --overwrite to replace them" in message and "already complete" not in message
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    rebuilt = build_replay_data(str(source), str(out), num=5, heldout=3, overwrite=True, progress=False)
    assert _texts(out / "replay.jsonl")[0] == rows[0]["text"] and not rebuilt.get("skipped")
    assert build_replay_data(str(source), str(out), num=5, heldout=3, progress=False)["skipped"]


def test_held_out_documents_contained_in_one_another_are_passed_over(tmp_path):
    rows = slimpajama_rows(20)
    rows[13]["text"] = "Preface. " + rows[12]["text"] + " Afterword."  # held-out 12 inside held-out 13
    source = tmp_path / "source.jsonl"
    _write_jsonl(source, rows)
    manifest = build_replay_data(str(source), str(tmp_path / "out"), num=5, heldout=6, progress=False)
    held = _texts(tmp_path / "out" / "heldout.jsonl")
    assert rows[12]["text"] in held and rows[13]["text"] not in held and manifest["counts"]["overlap_heldout"] == 1
    keys = [normalize_text(t) for t in held]
    assert not any(a != b and (a in b) for a in keys for b in keys)


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    source, out = tmp_path / "source.jsonl", tmp_path / "out"
    _write_jsonl(source, slimpajama_rows(20))
    out.write_text("mine")
    assert main(["data", "replay", "--source", str(source), "--out", str(out), "--num", "5", "--heldout", "3",
                 "--no-progress"]) == 2
    assert f"--out {out} is a file. Give a folder" in capsys.readouterr().err and out.read_text() == "mine"
