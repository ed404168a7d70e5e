"""Tests for `gere-hf data long-sequence` (gere_hf.continual.benchmarks).

The Hugging Face Hub cannot be reached here: small local copies of each task's Hub dataset, in the Hub's schema
(tests/continual/benchmark_utils.py: the Hub's parquet shards with their ClassLabel names, jsonl, save_to_disk, and
Zhang et al.'s header-less CSVs), stand in for it through `--from`. The builder's output is checked row by row against
prompts written out here from O-LoRA's and GeRe's formats (docs/paper.md), not from the builder's own tables.
"""

from __future__ import annotations

import json
import os
import shutil

import datasets
import pytest
import yaml
from benchmark_utils import LAYOUTS, make_rows, source_rows, write_all, write_local_copy

from gere_hf.cli import main
from gere_hf.continual.benchmarks import (
    LONG_SEQUENCE_TASKS,
    BenchmarkDataError,
    build_long_sequence,
    stage_entries,
)
from gere_hf.continual.recipe import apply_overrides, load_recipe

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_ROWS, EVAL_ROWS = 30, 12

# O-LoRA's instruction texts (configs/instruction_config.json), written out again here.
SC = "What is the sentiment of the following paragraph? Choose one from the option.\n"
TC = "What is the topic of the following paragraph? Choose one from the option.\n"
NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.\n'
STARS = ["very negative", "negative", "neutral", "positive", "very positive"]
DBPEDIA = ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
           "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"]
YAHOO = ["Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
         "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships", "Politics & Government"]

# task: (instruction or None, Option list as O-LoRA's labels.json orders it, label word of each Hub id, text of a row)
EXPECTED = {
    "yelp": (SC, STARS, STARS, lambda r: f"Text: {r['text']}\n"),
    "amazon": (SC, STARS, STARS, lambda r: f"Title: {r['title']}\nText: {r['content']}\n"),
    "mnli": (NLI, ["neutral", "entailment", "contradiction"], ["entailment", "neutral", "contradiction"],
             lambda r: f"sentence 1: {r['premise']}\nsentence 2: {r['hypothesis']}"),
    "cb": (NLI, ["entailment", "contradiction", "neutral"], ["entailment", "contradiction", "neutral"],
           lambda r: f"sentence 1: {r['premise']}\nsentence 2: {r['hypothesis']}"),
    "copa": (None, ["A", "B"], ["A", "B"],
             lambda r: f'Which sentence is the {r["question"]} of "{r["premise"]}"? Choose one between A and B.\n'
                       f"A: {r['choice1']}\nB: {r['choice2']}"),
    "qqp": ('Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the '
            "option.\n", ["False", "True"], ["False", "True"],
            lambda r: f"first sentence: {r['question1']}\nsecond sentence: {r['question2']}"),
    "rte": (NLI, ["contradiction", "entailment"], ["entailment", "contradiction"],  # not_entailment -> contradiction
            lambda r: f"sentence 1: {r['sentence1']}\nsentence 2: {r['sentence2']}"),
    "imdb": (SC, ["Good", "Bad"], ["Bad", "Good"], lambda r: r["text"]),
    "sst2": (SC, ["Good", "Bad"], ["Bad", "Good"], lambda r: f"Text: {r['sentence']}"),
    "dbpedia": (TC, DBPEDIA, DBPEDIA, lambda r: f"Title: {r['title']}\nText: {r['content']}\n"),
    "agnews": (TC, ["World", "Sports", "Business", "Science or Technology"],
               ["World", "Sports", "Business", "Science or Technology"],
               lambda r: f"Title: {r['title']}\nText: {r['description']}\n"),  # Zhang's CSV keeps them apart
    "yahoo": (TC, YAHOO, YAHOO, lambda r: "".join(
        f"{k}: {r[c]}\n" for k, c in (("Title", "question_title"), ("Question", "question_content"),
                                      ("Answer", "best_answer")) if r[c])),
    "multirc": ("According to the following passage and question, is the candidate answer true or false? Choose one "
                "from the option.\n", ["False", "True"], ["False", "True"],
                lambda r: f"paragraph: {r['paragraph']}\nquestion: {r['question']}\ncandidate answer: {r['answer']}"),
    "boolq": ("According to the following passage, is the question true or false? Choose one from the option.\n",
              ["True", "False"], ["False", "True"], lambda r: f"question: {r['question']}\npassage: {r['passage']}"),
    "wic": ("Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose "
            "one from the option.\n", ["True", "False"], ["False", "True"],
            lambda r: f"word: {r['word']}\n{r['sentence1']}\n{r['sentence2']}"),
}


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _label_key(name):
    return "topic" if name == "yahoo" else "label"


def _usable(name, row):
    """Which stand-in rows the builder must keep (benchmark_utils marks the others)."""
    label_ok = row[_label_key(name)] >= 0
    if name == "boolq":
        return label_ok and row["passage"].strip() != ""
    if name == "yahoo":
        return label_ok and any(row[c] for c in ("question_title", "question_content", "best_answer"))
    return label_ok


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("hub_standin"), TRAIN_ROWS, EVAL_ROWS)


@pytest.fixture(scope="module")
def built(local_copies, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("long_sequence"))
    return out, build_long_sequence(out, from_dir=local_copies, progress=False)


def test_every_task_row_by_row_gere_prompts(built):
    """All 15 tasks from local copies in each Hub schema: every row written is the source row's text in GeRe's demo
    prompt, with O-LoRA's label word; rows without a label or text are passed over."""
    out, manifests = built
    assert sorted(manifests) == sorted(EXPECTED)
    for name, (instruction, options, words, text) in EXPECTED.items():
        for split, n in (("train", TRAIN_ROWS), ("test", EVAL_ROWS)):
            rows = _read_jsonl(os.path.join(out, name, f"{split}.jsonl"))
            sources = source_rows(name, split, n)
            expected_indices = [i for i, r in enumerate(sources) if _usable(name, r)]
            assert [r["index"] for r in rows] == expected_indices, (name, split)
            for row in rows:
                src = sources[row["index"]]
                word = words[src[_label_key(name)]]
                head = "" if instruction is None else f"{instruction}Option: {', '.join(options)}\n"
                assert row["prompt"] == f"{head}{text(src)}\nAnswer:", (name, split, row["index"])
                assert row["completion"] == " " + word and row["label"] == word
                assert row["label_id"] == src[_label_key(name)]
            manifest = manifests[name]
            assert manifest["status"] == "complete" and manifest["files"][split]["rows"] == len(rows)
            assert sum(manifest["files"][split]["classes"].values()) == len(rows)
    skipped = manifests["mnli"]["files"]["train"]["skipped"]
    assert skipped == {"unlabelled": 1, "empty_text": 0}
    assert manifests["yahoo"]["files"]["train"]["skipped"]["empty_text"] == 1
    assert manifests["amazon"]["label_base"] == 1 and manifests["yelp"]["label_base"] == 0  # Zhang's CSV is 1-based
    # A literal row, with no help from the tables above: GeRe's demo prompt on yelp.
    first = _read_jsonl(os.path.join(out, "yelp", "train.jsonl"))[0]
    assert first == {
        "prompt": "What is the sentiment of the following paragraph? Choose one from the option.\nOption: very "
                  "negative, negative, neutral, positive, very positive\nText: yelp train 0 text\n\nAnswer:",
        "completion": " very negative", "label": "very negative", "label_id": 0, "index": 0}


def test_orders_and_stage_files(built):
    out, _ = built
    with open(os.path.join(out, "orders.json"), encoding="utf-8") as f:
        orders = json.load(f)["orders"]
    assert orders["4"][:3] == ["mnli", "cb", "wic"] and orders["5"][0] == "multirc" and orders["6"][:2] == ["yelp",
                                                                                                          "amazon"]
    for order, names in orders.items():
        assert sorted(names) == sorted(LONG_SEQUENCE_TASKS)
        with open(os.path.join(out, f"stages_order{order}.yaml"), encoding="utf-8") as f:
            stages = yaml.safe_load(f)
        assert [s["name"] for s in stages] == names
        assert stages[0]["dataset"] == {"path": "json", "data_files": {
            "train": os.path.join(out, names[0], "train.jsonl"), "test": os.path.join(out, names[0], "test.jsonl")}}


def test_olora_prompt_style(local_copies, tmp_path):
    build_long_sequence(str(tmp_path), from_dir=local_copies, tasks=["sst2", "copa"], prompt_style="o-lora",
                        progress=False)
    sst2 = _read_jsonl(tmp_path / "sst2" / "train.jsonl")[1]
    assert sst2["prompt"] == ("Task:SC\nDataset:SST-2\n" + SC + "Option: Good, Bad \nText: sst2 train 1 sentence"
                              "\nAnswer:")
    copa = _read_jsonl(tmp_path / "copa" / "test.jsonl")[0]
    assert copa["prompt"].startswith('Task:COPA\nDataset:COPA\nWhich sentence is the effect of "copa test 0 premise"')


def _sst2_copy(root, train_rows, eval_rows):
    shutil.rmtree(os.path.join(root, "sst2"), ignore_errors=True)
    return write_local_copy(root, "sst2", train_rows, eval_rows, layout="jsonl")


def test_olora_sampling_sizes_seeded_and_deterministic(tmp_path):
    """O-LoRA: 1,000 x classes random training rows, at most 7,600 test rows; the same files for the same seed
    (byte for byte, in another folder), another selection for another seed."""
    src = tmp_path / "src"
    _sst2_copy(src, 2500, 8000)
    a, b, c = (str(tmp_path / x) for x in "abc")
    build_long_sequence(a, from_dir=str(src), tasks=["sst2"], seed=3, progress=False)
    build_long_sequence(b, from_dir=str(src), tasks=["sst2"], seed=3, progress=False)
    build_long_sequence(c, from_dir=str(src), tasks=["sst2"], seed=4, progress=False)
    train, test = _read_jsonl(os.path.join(a, "sst2", "train.jsonl")), _read_jsonl(os.path.join(a, "sst2", "test.jsonl"))
    assert len(train) == 2000 and len(test) == 7600
    indices = [r["index"] for r in train]
    assert indices == sorted(set(indices)) and indices[-1] < 2500 and indices != list(range(2000))
    for split in ("train", "test"):
        with open(os.path.join(a, "sst2", f"{split}.jsonl"), "rb") as f1, \
                open(os.path.join(b, "sst2", f"{split}.jsonl"), "rb") as f2:
            assert f1.read() == f2.read()
    assert [r["index"] for r in _read_jsonl(os.path.join(c, "sst2", "train.jsonl"))] != indices
    sources = make_rows("sst2", "train", 2500)
    assert all(r["prompt"].endswith(f"Text: {sources[r['index']]['sentence']}\nAnswer:") for r in train)


def test_progressive_prompts_sampling(tmp_path):
    """Progressive Prompts: 1,000 training rows per class; 400 evaluation rows per class for SST-2, shuffled and cut
    in half (the second half is the test set); CB: the whole training set, the validation set halved."""
    src = tmp_path / "src"
    _sst2_copy(src, 2600, 1000)
    write_local_copy(src, "cb", 40, 11)
    out = str(tmp_path / "out")
    manifests = build_long_sequence(out, from_dir=str(src), tasks=["sst2", "cb"], protocol="progressive-prompts",
                                    progress=False)
    files = manifests["sst2"]["files"]
    assert files["train"]["rows"] == 2000 and files["train"]["classes"] == {"Bad": 1000, "Good": 1000}
    assert files["test"]["rows"] == 400  # (400 + 400) // 2 ... the second half
    assert manifests["cb"]["files"]["train"]["rows"] == 40 and manifests["cb"]["files"]["test"]["rows"] == 11 - 11 // 2
    assert manifests["sst2"]["settings"]["protocol"] == "progressive-prompts"


def test_resume_skips_complete_tasks_rebuilds_partial_ones(local_copies, tmp_path):
    out = str(tmp_path / "out")
    build_long_sequence(out, from_dir=local_copies, tasks=["cb", "wic"], progress=False)
    cb_train = os.path.join(out, "cb", "train.jsonl")
    before = os.stat(cb_train).st_mtime_ns
    with open(os.path.join(out, "wic", "test.jsonl"), "rb") as f:
        wic_test = f.read()
    # wic as a build stopped half way leaves it: manifest still "writing", the test file not there yet.
    manifest_path = os.path.join(out, "wic", "manifest.json")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["status"] = "writing"
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    os.remove(os.path.join(out, "wic", "test.jsonl"))
    results = build_long_sequence(out, from_dir=local_copies, tasks=["cb", "wic"], progress=False)
    assert results["cb"]["status"] == "skipped" and os.stat(cb_train).st_mtime_ns == before
    assert results["wic"]["status"] == "complete"
    with open(os.path.join(out, "wic", "test.jsonl"), "rb") as f:
        assert f.read() == wic_test
    # Other settings would replace complete tasks: refused, nothing touched; --overwrite rebuilds.
    with pytest.raises(BenchmarkDataError, match=r"cb: built with other settings.*--overwrite"):
        build_long_sequence(out, from_dir=local_copies, tasks=["cb"], seed=1, progress=False)
    assert os.stat(cb_train).st_mtime_ns == before
    assert build_long_sequence(out, from_dir=local_copies, tasks=["cb"], seed=1, overwrite=True,
                               progress=False)["cb"]["settings"]["seed"] == 1
    # Files this builder did not write are not replaced either.
    os.makedirs(os.path.join(out, "qqp"))
    with open(os.path.join(out, "qqp", "train.jsonl"), "w", encoding="utf-8") as f:
        f.write('{"mine": 1}\n')
    with pytest.raises(BenchmarkDataError, match="qqp: holds train/test files this builder did not write"):
        build_long_sequence(out, from_dir=local_copies, tasks=["qqp"], progress=False)


def test_missing_local_copy_stops_before_anything_is_written(local_copies, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(local_copies, src)
    shutil.rmtree(src / "rte")
    out = tmp_path / "out"
    with pytest.raises(BenchmarkDataError) as err:
        build_long_sequence(str(out), from_dir=str(src), progress=False)
    message = str(err.value)
    assert "Task 'rte'" in message and str(src / "rte") in message and "train.{parquet,jsonl,json,csv}" in message
    assert "sentence1, sentence2" in message and "0 = 'entailment'" in message
    assert not out.exists()
    # A copy without one split's file: named, with what the folder holds.
    os.remove(src / "mnli" / "validation_matched-00000-of-00001.parquet")
    with pytest.raises(BenchmarkDataError, match=r"Task 'mnli'.*no file for the split\(s\) \['validation_matched'\]"):
        build_long_sequence(str(out), from_dir=str(src), tasks=["mnli"], progress=False)


def test_malformed_sources_name_task_file_and_columns(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    os.makedirs(src / "mnli")
    rows = make_rows("mnli", "train", 6)
    datasets.Dataset.from_list([{"sentence": r["premise"], "label": r["label"]} for r in rows]).to_json(
        str(src / "mnli" / "train.jsonl"))
    datasets.Dataset.from_list(rows).to_json(str(src / "mnli" / "validation_matched.jsonl"))
    write_local_copy(src, "cb", 6, 3)
    with pytest.raises(BenchmarkDataError) as err:
        build_long_sequence(str(out), from_dir=str(src), tasks=["cb", "mnli"], progress=False)
    message = str(err.value)
    assert "Task 'mnli'" in message and str(src / "mnli" / "train.jsonl") in message
    assert "['sentence', 'label']" in message and "(premise, hypothesis)" in message
    assert not (out / "mnli").exists() and (out / "cb" / "train.jsonl").exists()  # cb came first and is complete

    # ClassLabel names in another order than the Hub's would mislabel every row: refused.
    shutil.rmtree(src / "mnli")
    os.makedirs(src / "mnli")
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neutral", "entailment", "contradiction"])})
    for split in ("train", "validation_matched"):
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(src / "mnli" / f"{split}.parquet"))
    with pytest.raises(BenchmarkDataError, match="every row would get another label"):
        build_long_sequence(str(out), from_dir=str(src), tasks=["mnli"], progress=False)

    # Label names instead of ids.
    shutil.rmtree(src / "mnli")
    os.makedirs(src / "mnli")
    for split in ("train", "validation_matched"):
        datasets.Dataset.from_list([{**r, "label": "neutral"} for r in rows]).to_json(
            str(src / "mnli" / f"{split}.jsonl"))
    with pytest.raises(BenchmarkDataError, match="'label' values of type string; expected one integer id a row"):
        build_long_sequence(str(out), from_dir=str(src), tasks=["mnli"], progress=False)
    assert not (out / "mnli").exists()


def test_amazon_from_the_hub_is_explained_and_bad_arguments_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BenchmarkDataError, match=r"'amazon'.*no official copy on the Hugging Face Hub.*--from DIR"):
        build_long_sequence(str(out), progress=False)  # every task from the Hub: amazon is refused first
    assert not out.exists()
    with pytest.raises(BenchmarkDataError, match="Unknown long-sequence task 'sst-2'; did you mean 'sst2'"):
        build_long_sequence(str(out), tasks=["sst-2"], progress=False)
    with pytest.raises(BenchmarkDataError, match="Unknown --protocol 'olora'"):
        build_long_sequence(str(out), protocol="olora", progress=False)
    with pytest.raises(BenchmarkDataError, match="--hub-dataset 'amazon' is not TASK=ID"):
        build_long_sequence(str(out), hub_datasets=["amazon"], progress=False)


def test_hub_path_reads_the_registry_ids(monkeypatch, tmp_path):
    """Without --from every task is read with datasets.load_dataset(<Hub id>, <config>, split=...). The Hub is out of
    reach here: load_dataset is replaced by a stand-in that records the calls and returns local rows."""
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        task = next(t for t in LONG_SEQUENCE_TASKS.values() if t.hub and (t.hub.path, t.hub.name) == (path, name))
        rows = make_rows(task.name, "train" if split == task.hub.train_split else "test", 8)
        from benchmark_utils import features_of

        return datasets.Dataset.from_list(rows, features=features_of(task.name, rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    build_long_sequence(str(tmp_path), tasks=["mnli", "yahoo", "agnews"], progress=False)
    assert calls == [("nyu-mll/glue", "mnli", "train"), ("nyu-mll/glue", "mnli", "validation_matched"),
                     ("community-datasets/yahoo_answers_topics", None, "train"),
                     ("community-datasets/yahoo_answers_topics", None, "test"),
                     ("fancyzhx/ag_news", None, "train"), ("fancyzhx/ag_news", None, "test")]
    # The Hub's AG News joins title and description into `text`: O-LoRA's Title/Text split cannot be recovered.
    row = _read_jsonl(tmp_path / "agnews" / "train.jsonl")[0]
    assert row["prompt"].endswith("\nText: agnews train 0 text\n\nAnswer:")


def test_cli_prints_stages_that_a_recipe_reads(local_copies, tmp_path, capsys):
    out = str(tmp_path / "ls")
    assert main(["data", "long-sequence", "--from", local_copies, "--out", out, "--tasks", "yelp,copa",
                 "--order", "6", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    stages = yaml.safe_load(printed)["stages"]
    assert [s["name"] for s in stages] == ["yelp", "copa"]  # order 6 puts yelp first; only the tasks built
    assert stages == stage_entries(out, "6", ["yelp", "copa"])
    # The stages of an order replace a recipe's with --set, and the recipe reads the tasks as written.
    with open(os.path.join(out, "stages_order6.yaml"), encoding="utf-8") as f:
        text = f.read()
    recipe_data = apply_overrides(yaml.safe_load(open(os.path.join(REPO_ROOT, "recipes", "tiny_cpu.yaml"))),
                                  [f"stages={text}", f"output_dir={tmp_path / 'run'}"])
    # Only the tasks built are listed (a recipe given the file reads files that exist); a comment names the others.
    assert [s["name"] for s in recipe_data["stages"]] == ["yelp", "copa"]
    assert text.startswith("# Not built yet, so not listed: amazon, mnli, cb, qqp, rte, imdb, sst2, dbpedia, agnews, ")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data), encoding="utf-8")
    from gere_hf.continual import data as run_data

    tasks = run_data.load_stage_tasks(load_recipe(str(path)), None)
    assert tasks[0].choices == sorted(" " + w for w in STARS) and len(tasks[0].train) == TRAIN_ROWS
    assert tasks[1].eval[0]["prompt"].startswith('Which sentence is the effect of "copa test 0 premise"')
    # A bad option is an error with exit status 2, not a traceback.
    assert main(["data", "long-sequence", "--out", out, "--order", "7"]) == 2
    assert "Unknown --order '7'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["paper_llama31_8b_lora.yaml", "paper_llama31_8b_full_zero2.yaml"])
def test_paper_recipes_read_the_builders_files(recipe):
    """The paper recipes run on what the two `gere-hf data` commands write, with no conversion by hand."""
    path = os.path.join(REPO_ROOT, "recipes", recipe)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    data = yaml.safe_load(text)
    assert data["stages"] == stage_entries("data/long_sequence", "4")
    assert data["gere"]["replay_source"] == "data/slimpajama/replay.jsonl"
    assert data["evaluation"]["general_source"] == "data/slimpajama/heldout.jsonl"
    assert "gere-hf data long-sequence --out data/long_sequence" in text
    assert "gere-hf data replay --source DKYoon/SlimPajama-6B --num 1000 --heldout 200 --out data/slimpajama" in text
    assert set(LAYOUTS) == set(LONG_SEQUENCE_TASKS)


def test_amazon_local_then_the_rest_from_the_hub(local_copies, tmp_path, monkeypatch):
    """Amazon from a local copy, then a call without --from: amazon is complete and skipped (it has no Hub source),
    the others are read from the Hub (a stand-in here, recording the ids it is asked for)."""
    out = str(tmp_path / "out")
    build_long_sequence(out, from_dir=local_copies, tasks=["amazon"], progress=False)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append(path)
        task = next(t for t in LONG_SEQUENCE_TASKS.values() if t.hub and (t.hub.path, t.hub.name) == (path, name))
        return datasets.Dataset.from_list(make_rows(task.name, "train" if split == task.hub.train_split else "test", 4))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    results = build_long_sequence(out, tasks=["amazon", "wic"], progress=False)
    assert results["amazon"]["status"] == "skipped" and results["wic"]["status"] == "complete"
    assert calls == ["aps/super_glue", "aps/super_glue"]


# ----------------------------------------------------------------------------------------------------------------------
# Reliability II (docs/reliability.md): label schemes, stale builds, train/test overlap, unreadable files
# ----------------------------------------------------------------------------------------------------------------------


def _jsonl_copy(src, name, train, test):
    """A local copy of ``name`` as jsonl files of the given rows (no ClassLabel: ids as the file holds them)."""
    task = LONG_SEQUENCE_TASKS[name]
    folder = src / name
    os.makedirs(folder, exist_ok=True)
    for split, rows in ((task.splits["train"], train), (task.splits["test"], test)):
        datasets.Dataset.from_list(rows).to_json(str(folder / f"{split}.jsonl"))
    return folder


def test_one_based_labels_are_refused_with_the_counts(tmp_path):
    """yelp with ids 1..5 in a local jsonl: each row would shift one class and the 5s vanish (20 %), exit 0."""
    rows = {s: [{**r, "label": r["label"] + 1} for r in make_rows("yelp", s, 20)] for s in ("train", "test")}
    _jsonl_copy(tmp_path / "src", "yelp", rows["train"], rows["test"])
    with pytest.raises(BenchmarkDataError) as err:
        build_long_sequence(str(tmp_path / "out"), from_dir=str(tmp_path / "src"), tasks=["yelp"], progress=False)
    message = str(err.value)
    assert "Task 'yelp': 4 of 20 labelled rows of" in message and "have 'label' ids outside 0..4 (they run 1..5)" \
        in message
    assert "They look 1-based (1..5): subtract 1 from every id, or give Zhang et al.'s header-less CSV" in message
    assert not (tmp_path / "out" / "yelp").exists()


def test_labels_out_of_any_scheme_are_refused(tmp_path):
    train = make_rows("cb", "train", 12)
    train[3]["label"] = 7
    _jsonl_copy(tmp_path / "src", "cb", train, make_rows("cb", "test", 6))
    with pytest.raises(BenchmarkDataError, match=r"Task 'cb': 1 of 12 labelled rows of .* have 'label' ids outside "
                                                 r"0\.\.2 \(they run 0\.\.7\).*Give the ids in the Hub's scheme"):
        build_long_sequence(str(tmp_path / "out"), from_dir=str(tmp_path / "src"), tasks=["cb"], progress=False)


def test_another_local_copy_with_the_same_file_names_is_not_complete(local_copies, tmp_path):
    """--from a second copy whose files have the same names but other rows: not 'already complete' but refused,
    and rebuilt with --overwrite."""
    out = str(tmp_path / "out")
    build_long_sequence(out, from_dir=local_copies, tasks=["cb"], progress=False)
    other = tmp_path / "other_copy"
    write_local_copy(other, "cb", TRAIN_ROWS + 3, EVAL_ROWS)  # another copy: three more rows
    with pytest.raises(BenchmarkDataError) as err:
        build_long_sequence(out, from_dir=str(other), tasks=["cb"], progress=False)
    assert "cb: built from a source whose files held other content" in str(err.value)
    assert "Use another --out, the same settings, or --overwrite to rebuild them" in str(err.value)
    rebuilt = build_long_sequence(out, from_dir=str(other), tasks=["cb"], overwrite=True, progress=False)
    assert rebuilt["cb"]["files"]["train"]["source_rows"] == TRAIN_ROWS + 3
    again = build_long_sequence(out, from_dir=str(other), tasks=["cb"], progress=False)
    assert again["cb"]["status"] == "skipped"


def test_test_rows_that_are_training_rows_are_passed_over(tmp_path):
    """A validation file holding copies of training rows: those rows are not test rows (the project's content
    disjointness rule); identical files leave no test row, which is refused with the count."""
    train = make_rows("cb", "train", 12)
    test = [dict(train[i]) for i in range(4)] + make_rows("cb", "test", 6)
    _jsonl_copy(tmp_path / "src", "cb", train, test)
    manifest = build_long_sequence(str(tmp_path / "out"), from_dir=str(tmp_path / "src"), tasks=["cb"],
                                   progress=False)["cb"]
    assert manifest["files"]["test"]["rows"] == 6 and manifest["files"]["test"]["skipped"]["overlap_train"] == 4
    test_prompts = {r["prompt"] for r in _read_jsonl(tmp_path / "out" / "cb" / "test.jsonl")}
    assert not test_prompts & {r["prompt"] for r in _read_jsonl(tmp_path / "out" / "cb" / "train.jsonl")}
    _jsonl_copy(tmp_path / "same", "cb", train, train)
    with pytest.raises(BenchmarkDataError, match=r"no usable test rows .*'overlap_train': 12"):
        build_long_sequence(str(tmp_path / "out2"), from_dir=str(tmp_path / "same"), tasks=["cb"], progress=False)


@pytest.mark.parametrize("case", ["empty_split", "list_labels", "malformed_jsonl", "out_is_a_file"])
def test_unusable_inputs_are_named(tmp_path, case):
    src, out = tmp_path / "src", tmp_path / "out"
    rows = make_rows("cb", "train", 6)
    folder = _jsonl_copy(src, "cb", rows, make_rows("cb", "test", 3))
    if case == "empty_split":
        (folder / "validation.jsonl").write_text("")
        expected = f"Task 'cb': {folder / 'validation.jsonl'} is empty (0 bytes)"
    elif case == "list_labels":
        datasets.Dataset.from_list([{**r, "label": [r["label"]]} for r in rows]).to_json(str(folder / "train.jsonl"))
        expected = "Task 'cb': " + str(folder / "train.jsonl") + " has 'label' values of type List (a list per row)"
    elif case == "malformed_jsonl":
        with open(folder / "train.jsonl", "a", encoding="utf-8") as f:
            f.write('{"premise": "a", "label": \n')
        expected = "Task 'cb': the local copy (" + str(folder / "train.jsonl")
    else:
        out.write_text("a file")
        expected = f"--out {out} is a file. Give a folder"
    with pytest.raises(BenchmarkDataError) as err:
        build_long_sequence(str(out), from_dir=str(src), tasks=["cb"], progress=False)
    assert expected in str(err.value), str(err.value)
    if case == "malformed_jsonl":
        assert "could not be read (ArrowInvalid: JSON parse error" in str(err.value)
    assert "StopIteration" not in str(err.value) and "DatasetGenerationError" not in str(err.value)
