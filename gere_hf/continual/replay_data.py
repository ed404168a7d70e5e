"""The replay texts of a run and a held-out slice disjoint from them, taken from the head of a text source.

``gere-hf data replay --source HUB_ID_OR_FILE --num 1000 --heldout 200 --out DIR`` streams the source in its own order
(``datasets.load_dataset(..., streaming=True)``: a Hub dataset such as SlimPajama is never downloaded whole; a local
jsonl/json/parquet/csv/txt file or folder is read the same way) and writes:

* ``DIR/replay.jsonl``: the first ``num`` non-empty, distinct documents (``{"text": ...}`` a line): GeRe's replay set
  is the head of SlimPajama (the official ``slimpajama_6B_chunk0_head1k.jsonl``), so no seed is involved;
* ``DIR/heldout.jsonl``: the next ``heldout`` documents that overlap no replay text by content
  (:class:`gere_hf.replay.ExcludedTexts`: equal after normalisation, or one containing the other) nor each other
  (the same rule);
* ``DIR/manifest.json``: the source (for a local one, a fingerprint of its content: a changed or other source is not
  taken for this build), the counts (documents examined, passed over and why), each file's SHA-256 and a hash of its
  texts, and, where the source has SlimPajama's ``meta.redpajama_set_name``, the mix of sets per file.

A recipe then reads ``gere.replay_source: DIR/replay.jsonl`` and ``evaluation.general_source: DIR/heldout.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..fileio import file_sha256, write_json, write_jsonl
from ..replay import (
    DATA_FILE_BUILDERS,
    MIN_CONTAINED_CHARS,
    ExcludedTexts,
    looks_like_path,
    normalize_text,
    text_key,
)
from .fingerprints import sources_fingerprint

MANIFEST_FILE = "manifest.json"
REPLAY_FILE = "replay.jsonl"
HELDOUT_FILE = "heldout.jsonl"
BUILDER_VERSION = 2  # 2: held-out documents contained in one another are passed over


class ReplayBuildError(ValueError):
    """A replay source that cannot give the documents asked for, or an output folder that would be damaged."""


def _stream(source: str, name: str | None, split: str):
    """The source as a ``datasets.IterableDataset``, in its own order."""
    import datasets

    path = os.fspath(source)
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in DATA_FILE_BUILDERS:
            raise ReplayBuildError(f"--source {path}: unknown file type {suffix!r}; use one of "
                                   f"{sorted(DATA_FILE_BUILDERS)}.")
        if os.path.getsize(path) == 0:
            raise ReplayBuildError(f"--source {path} is empty. Give a file of general texts.")
        return datasets.load_dataset(DATA_FILE_BUILDERS[suffix], data_files=path, split="train", streaming=True)
    if os.path.isdir(path):
        files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                       if os.path.splitext(n)[1].lower() in DATA_FILE_BUILDERS)
        if not files:
            raise ReplayBuildError(f"--source {path} holds no {', '.join(sorted(DATA_FILE_BUILDERS))} files.")
        kinds = {DATA_FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
        if len(kinds) > 1:
            raise ReplayBuildError(f"--source {path} mixes file kinds {sorted(kinds)}; keep one kind per folder.")
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train", streaming=True)
    if looks_like_path(path):
        raise ReplayBuildError(f"--source {path} does not exist. Give an existing file or folder, or a Hub id.")
    try:
        return datasets.load_dataset(path, name, split=split, streaming=True)
    except Exception as err:  # offline, a wrong id or split: name the source and the way out
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ReplayBuildError(
            f"--source {path}: datasets.load_dataset({path!r}, {name!r}, split={split!r}, streaming=True) failed "
            f"({type(err).__name__}: {detail}). Without Hub access give a local copy of the source (a jsonl/parquet "
            "file or folder)."
        ) from None


def _rows(source: str, name: str | None, split: str, text_column: str) -> Iterator[dict]:
    stream = _stream(source, name, split)
    first = True
    try:
        for row in stream:
            if first and text_column not in row:
                raise ReplayBuildError(
                    f"--source {source}: the rows have no column {text_column!r}; they have {sorted(row)}. Pass "
                    "--text-column with the one holding the document text."
                )
            first = False
            yield row
    except ReplayBuildError:
        raise
    except Exception as err:  # a malformed line or shard half way through the stream
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ReplayBuildError(f"--source {source}: reading it failed ({type(err).__name__}: {detail}).") from None


def _set_name(row: dict) -> str | None:
    meta = row.get("meta")
    if isinstance(meta, str):  # some copies keep meta as a JSON string
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    value = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def texts_hash(texts: list[str]) -> str:
    """SHA-256 over the texts in order (length-prefixed): the same texts give the same hash, however written."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _local_files(source: str) -> list[str]:
    if os.path.isfile(source):
        return [source]
    return sorted(os.path.join(root, n) for root, _, names in os.walk(source) for n in names
                  if os.path.splitext(n)[1].lower() in DATA_FILE_BUILDERS)


def _settings(source: str, name: str | None, split: str, text_column: str, num: int, heldout: int) -> dict:
    local = os.path.exists(source)
    return {"source": os.path.abspath(source) if local else source, "config": name, "split": None if local else split,
            "text_column": text_column, "num": num, "heldout": heldout, "builder_version": BUILDER_VERSION,
            "source_fingerprint": sources_fingerprint(_local_files(source)) if local else None}


def _why_other(previous: dict, settings: dict) -> str:
    old = previous.get("settings") or {}
    if {k: v for k, v in old.items() if k != "source_fingerprint"} == \
            {k: v for k, v in settings.items() if k != "source_fingerprint"}:
        return (f"were built from {settings['source']} when its content was different (fingerprint "
                f"{str(old.get('source_fingerprint'))[:12]}…, now {str(settings['source_fingerprint'])[:12]}…)")
    return f"were built from other settings ({json.dumps(old)})"


class _Contained:
    """Texts already taken, for the containment half of the overlap rule among themselves (equality is ``seen``)."""

    def __init__(self):
        self.texts: list[str] = []

    def overlaps(self, text: str) -> bool:
        n = normalize_text(text)
        if len(n) < MIN_CONTAINED_CHARS:
            return False
        return any((len(t) >= MIN_CONTAINED_CHARS) and (n in t or t in n) for t in self.texts)

    def add(self, text: str) -> None:
        self.texts.append(normalize_text(text))


def build_replay_data(
    source: str,
    out_dir: str,
    *,
    num: int = 1000,
    heldout: int = 200,
    name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``replay.jsonl``, ``heldout.jsonl`` and ``manifest.json`` into ``out_dir`` (``gere-hf data replay``).

    Returns the manifest (with ``"skipped": True`` when ``out_dir`` already holds this very build). Nothing is written
    until both slices are complete; a source with too few documents stops with the counts and nothing written.
    """
    from tqdm.auto import tqdm

    if num < 1 or heldout < 0:
        raise ReplayBuildError(f"--num must be at least 1 and --heldout at least 0 (got {num} and {heldout}).")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReplayBuildError(f"--out {out_dir} is a file. Give a folder (it is created if missing).")
    if not os.path.exists(source) and looks_like_path(source):  # before judging the output folder by it
        raise ReplayBuildError(f"--source {source} does not exist. Give an existing file or folder, or a Hub id.")
    settings = _settings(source, name, split, text_column, num, heldout)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    outputs = [os.path.join(out_dir, f) for f in (REPLAY_FILE, HELDOUT_FILE)]
    previous = None
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
    if previous is not None and previous.get("settings") == settings and previous.get("status") == "complete" and all(
            os.path.isfile(p) and file_sha256(p) == previous["files"][os.path.basename(p)]["sha256"] for p in outputs):
        return {**previous, "skipped": True}
    ours = previous is not None and previous.get("status") in ("writing", "complete") and \
        (previous.get("settings") == settings or previous.get("status") == "writing")
    present = [p for p in outputs if os.path.exists(p)]
    if present and not ours and not overwrite:
        what = _why_other(previous, settings) if previous is not None else "were not written by this builder"
        raise ReplayBuildError(
            f"{out_dir} already holds {', '.join(os.path.basename(p) for p in present)}, which {what}. Use another "
            "--out, the same settings and source, or --overwrite to replace them."
        )

    replay: list[str] = []
    held: list[str] = []
    sets: dict[str, Counter] = {REPLAY_FILE: Counter(), HELDOUT_FILE: Counter()}
    counts = {"examined": 0, "empty": 0, "duplicate": 0, "overlap_replay": 0, "overlap_heldout": 0}
    seen: set[str] = set()
    excluded: ExcludedTexts | None = None
    taken = _Contained()
    bar = tqdm(total=num + heldout, desc="replay documents", unit="doc", disable=not progress)
    for row in _rows(source, name, split, text_column):
        if len(replay) >= num and len(held) >= heldout:
            break
        counts["examined"] += 1
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            counts["empty"] += 1
            continue
        key = text_key(text)
        if key in seen:
            counts["duplicate"] += 1
            continue
        if len(replay) < num:
            replay.append(text)
            seen.add(key)
            sets[REPLAY_FILE][_set_name(row) or "-"] += 1
            bar.update(1)
            continue
        if excluded is None:  # the replay texts are fixed from here on
            excluded = ExcludedTexts({"replay": replay})
        if excluded.overlaps(text):
            counts["overlap_replay"] += 1
            continue
        if taken.overlaps(text):  # one held-out document inside another: not two independent texts
            counts["overlap_heldout"] += 1
            continue
        held.append(text)
        taken.add(text)
        seen.add(key)
        sets[HELDOUT_FILE][_set_name(row) or "-"] += 1
        bar.update(1)
    bar.close()
    if len(replay) < num or len(held) < heldout:
        raise ReplayBuildError(
            f"--source {source}: {num} replay and {heldout} held-out documents were asked, but its "
            f"{counts['examined']} documents gave {len(replay)} and {len(held)} (passed over: {counts['empty']} "
            f"empty, {counts['duplicate']} duplicates, {counts['overlap_replay']} overlapping a replay text, "
            f"{counts['overlap_heldout']} contained in or containing another held-out one). Ask for "
            f"fewer, or give a larger source. Nothing was written."
        )
    os.makedirs(out_dir, exist_ok=True)
    manifest: dict[str, Any] = {"settings": settings, "status": "writing", "streamed": True,
                                "selection": "the first documents of the source in its own order: replay, then held-out "
                                             "documents disjoint from the replay texts"}
    write_json(manifest_path, manifest)
    files = {}
    for file, texts in ((REPLAY_FILE, replay), (HELDOUT_FILE, held)):
        path = os.path.join(out_dir, file)
        write_jsonl(path, ({"text": t} for t in texts))
        files[file] = {"rows": len(texts), "sha256": file_sha256(path), "texts_sha256": texts_hash(texts),
                       "characters": sum(len(t) for t in texts)}
        if any(k != "-" for k in sets[file]):
            files[file]["redpajama_set_name"] = dict(sorted(sets[file].items()))
    manifest.update(status="complete", counts=counts, files=files, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(manifest_path, manifest)
    return manifest


__all__ = ["ReplayBuildError", "build_replay_data"]
