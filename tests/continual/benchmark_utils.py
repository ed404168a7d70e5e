"""Local copies of the long-sequence benchmark's Hub datasets, small, in each Hub dataset's schema.

They stand in for the Hugging Face Hub, which the test machines cannot reach: the same columns, label ids and (for the
parquet copies) the same ``ClassLabel`` names as the Hub datasets of :data:`gere_hf.continual.benchmarks
.LONG_SEQUENCE_TASKS`, written the ways ``--from`` accepts (the Hub's parquet shards, jsonl, a ``save_to_disk()``
folder, Zhang et al.'s header-less CSV). The texts are made up; row ``i`` of a split is recognisable by its text.
"""

from __future__ import annotations

import csv
import os

import datasets

from gere_hf.continual.benchmarks import LONG_SEQUENCE_TASKS

# How each task's local copy is written in the tests: the Hub parquet layout, jsonl, save_to_disk, or Zhang's CSV.
LAYOUTS = {"yelp": "parquet", "amazon": "zhang_csv", "mnli": "parquet", "cb": "jsonl", "copa": "parquet",
           "qqp": "jsonl", "rte": "parquet", "imdb": "disk", "sst2": "parquet", "dbpedia": "jsonl",
           "agnews": "zhang_csv", "yahoo": "parquet", "multirc": "jsonl", "boolq": "parquet", "wic": "jsonl"}


def make_rows(name: str, split: str, n: int) -> list[dict]:
    """``n`` rows of task ``name`` in its Hub schema; label of row i is i mod classes; text columns say task/split/i."""
    task = LONG_SEQUENCE_TASKS[name]
    fmt = task.formats[0] if name != "agnews" else task.formats[1]  # the Hub's AG News has one `text` column
    rows = []
    for i in range(n):
        row = {c: f"{name} {split} {i} {c}" for c in fmt.columns}
        if name == "copa":
            row["question"] = "cause" if i % 2 else "effect"
        if name == "yahoo":
            row["id"] = i
        if name == "multirc":
            row["idx"] = {"paragraph": i, "question": i, "answer": i}
        row[task.label_column] = i % task.num_classes
        rows.append(row)
    # Rows the builder must pass over or treat specially, as the Hub datasets have them:
    if name == "mnli" and split == "train" and n > 5:
        rows[5]["label"] = -1  # GLUE's "no label" id
    if name == "boolq" and split == "test" and n > 3:
        rows[3]["passage"] = " "  # an empty required text
    if name == "yahoo":
        for i, row in enumerate(rows):
            if i % 3 == 0:
                row["question_content"] = ""  # a question without a body: its line is left out
            if i == 4:
                row.update(question_title="", question_content="", best_answer="")  # nothing at all: passed over
    return rows


def source_rows(name: str, split: str, n: int) -> list[dict]:
    """The rows of ``name``'s local copy as :func:`write_local_copy` writes them (label ids 0-based)."""
    task = LONG_SEQUENCE_TASKS[name]
    if LAYOUTS[name] != "zhang_csv":
        return make_rows(name, split, n)
    return [{task.label_column: i % task.num_classes, **{c: f"{name} {split} {i} {c}" for c in task.csv_columns[1:]}}
            for i in range(n)]


def features_of(name: str, rows: list[dict]) -> datasets.Features:
    task = LONG_SEQUENCE_TASKS[name]
    ds = datasets.Dataset.from_list(rows[:1])
    features = ds.features.copy()
    features[task.label_column] = datasets.ClassLabel(names=list(task.hub_label_names))
    return features


def write_local_copy(root, name: str, train_rows: int = 30, eval_rows: int = 12, layout: str | None = None) -> str:
    """Write task ``name``'s local copy under ``root/<name>/``; returns the folder."""
    task = LONG_SEQUENCE_TASKS[name]
    layout = layout or LAYOUTS[name]
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    splits = {task.splits["train"]: make_rows(name, "train", train_rows),
              task.splits["test"]: make_rows(name, "test", eval_rows)}
    if layout == "zhang_csv":
        for split, rows in splits.items():
            with open(os.path.join(folder, f"{split}.csv"), "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, quoting=csv.QUOTE_ALL)
                for row in source_rows(name, "train" if split == task.splits["train"] else "test", len(rows)):
                    # Zhang et al.'s files: no header, the label 1-based first
                    writer.writerow([row[task.label_column] + 1, *(row[c] for c in task.csv_columns[1:])])
        return folder
    built = {s: datasets.Dataset.from_list(rows, features=features_of(name, rows)) for s, rows in splits.items()}
    if layout == "disk":
        datasets.DatasetDict(built).save_to_disk(folder)
    elif layout == "parquet":  # the Hub's parquet export: <split>-00000-of-00001.parquet, ClassLabel kept
        for split, ds in built.items():
            ds.to_parquet(os.path.join(folder, f"{split}-00000-of-00001.parquet"))
    else:
        for split, ds in built.items():
            ds.to_json(os.path.join(folder, f"{split}.jsonl"))
    return folder


def write_all(root, train_rows: int = 30, eval_rows: int = 12) -> str:
    for name in LONG_SEQUENCE_TASKS:
        write_local_copy(root, name, train_rows, eval_rows)
    return str(root)
