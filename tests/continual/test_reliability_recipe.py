"""Reliability of ``gere-hf run``: bad recipes fail before any work, a SIGKILL mid-stage resumes to the same result,
runs are deterministic, only the main process writes, and a Hub token never reaches a file or a log.

The catalogue of cases is docs/reliability.md; tests/test_reliability.py covers the trainer and the store. The runs
use the shipped tiny recipe made smaller (tests/recipe_utils.py): a random 2-layer Llama, two built-in tasks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import tree_snapshot
from recipe_utils import REPO_ROOT, FakeHub, all_text_under, one_thread, read_json, tiny_recipe
from safetensors.torch import load_file

from gere_hf import cli
from gere_hf.continual import parse_recipe
from gere_hf.continual.recipe import apply_overrides, recipe_hash

# Every run here is the same recipe (checkpoints every step, so a kill finds some), in another output_dir.
RUN = ("training.max_steps=4", "training.save_strategy=steps", "training.save_steps=1")
STAGE2 = os.path.join("stages", "2-trivia")
FAKE_TOKEN = "hf_FAKEtoken1234567890"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", **extra}


def _write_recipe(path, out, *overrides) -> str:
    path.write_text(yaml.safe_dump(tiny_recipe(out, *RUN, *overrides)))
    return str(path)


def _files(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, n), path) for root, _, names in os.walk(path) for n in names)


def _log_history(run, stage) -> list[dict]:
    history = read_json(os.path.join(run, "stages", stage, "metrics.json"))["log_history"]
    return [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k} for h in history]


def _final_adapter(run) -> dict:
    return load_file(os.path.join(run, STAGE2, "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: `gere-hf run` exits 2 with the problem and the fix, before anything is written
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def user_dir(tmp_path):
    """An output_dir that already holds a user's file, which a refused run must leave as it was."""
    out = tmp_path / "run"
    (out / "gere_store").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's notes")
    (out / "gere_store" / "prebuilt.txt").write_text("a store the user put where the run looks for one")
    return out


def test_fresh_run_never_deletes_files_it_did_not_write(tmp_path, user_dir, capsys):
    """No run_state.json, but files named like a run's outputs: they are someone else's; refuse, touch nothing."""
    (user_dir / "report.md").write_text("# my own report")
    (user_dir / "stages").mkdir()
    (user_dir / "stages" / "plan.txt").write_text("my stage plan")
    message = _refused(tmp_path, user_dir, capsys)
    assert f"{user_dir} holds stages, report.md but no run_state.json" in message
    assert "Choose another output_dir, move them away, or set overwrite_output_dir: true" in message


def _refused(tmp_path, out, capsys, *overrides) -> str:
    """Run the recipe through the CLI; assert exit status 2 and that nothing was written. Returns the message."""
    before = tree_snapshot(out)
    path = _write_recipe(tmp_path / "recipe.yaml", out, *overrides)
    with one_thread():
        assert cli.main(["run", path]) == 2
    err = capsys.readouterr().err
    assert tree_snapshot(out) == before, "a refused run wrote into output_dir"
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("override, expected", [
    ("training.lerning_rate=0.1", "Unknown key 'lerning_rate' in training. Did you mean 'learning_rate'?"),
    ("gere.replay_sorce=wiki", "Unknown key 'replay_sorce' in gere. Did you mean 'replay_source'?"),
])
def test_misspelt_key_suggests_the_closest(tmp_path, user_dir, capsys, override, expected):
    assert expected in _refused(tmp_path, user_dir, capsys, override)


def test_missing_dataset_file(tmp_path, user_dir, capsys):
    message = _refused(tmp_path, user_dir, capsys, "stages.1.dataset=data/trivia_missing.jsonl")
    assert "stages[1] (trivia): the dataset file 'data/trivia_missing.jsonl' does not exist" in message
    assert "looked in the working directory and next to the recipe" in message


@pytest.mark.parametrize("case", ["num_train_0", "empty_file"])
def test_empty_stage(tmp_path, user_dir, capsys, case):
    if case == "num_train_0":
        message = _refused(tmp_path, user_dir, capsys, "stages.0.num_train=0")
        assert "stages[0] (polarity): the task has no training examples; raise num_train or give more data" in message
    else:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        message = _refused(tmp_path, user_dir, capsys, f"stages.0.dataset={empty}")
        assert f"stages[0] (polarity): the dataset file {str(empty)!r} is empty" in message


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty_file", "blank_lines"])
def test_empty_replay_source(tmp_path, user_dir, capsys, content):
    source = tmp_path / "replay.txt"
    source.write_text(content)
    message = _refused(tmp_path, user_dir, capsys, f"gere.replay_source={source}")
    assert message.startswith("gere-hf run: error: gere.replay_source: ")
    assert (f"The replay file {str(source)!r} is empty. Give a file with general texts" in message if not content
            else "The replay source holds no non-empty texts in column 'text' (2 rows). Give a source" in message)


@pytest.mark.parametrize("weight, expected", [
    ("-1", "gere: The replay weight must be a non-negative finite number or 'dy', got '-1'"),
    (".nan", "gere: The replay weight must be a non-negative finite number or 'dy', got 'nan'"),
    ("heavy", "gere: Unknown weight 'heavy'; give a non-negative number, 'dy', or 'dy:C' (dynamic, at most C)"),
])
def test_negative_nan_or_unknown_replay_weight(tmp_path, user_dir, capsys, weight, expected):
    assert expected in _refused(tmp_path, user_dir, capsys, f"gere.weight={weight}")


def test_a_fixed_numeric_weight_is_accepted(tmp_path):
    assert parse_recipe(tiny_recipe(tmp_path, "gere.weight=0.5")).gere.weight_value == 0.5


def test_replay_per_step_below_one_is_refused(tmp_path, user_dir, capsys):
    message = _refused(tmp_path, user_dir, capsys, "gere.replay_per_step=0")
    assert "gere.replay_per_step must be ≥ 1 (or None), got 0" in message


# Values the libraries accept and misuse later (a traceback, or a silently wrong run), each refused before any work
# with its recipe key: docs/reliability.md, "Bad input" 30-52.
BAD_VALUES = [
    ("training.learning_rate=fast", "training.learning_rate must be float, got 'fast' (str)."),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps must be at least 1, got 0."),
    ('training.max_steps="4"', "training.max_steps must be int, got '4' (str)."),
    ("training.max_steps=-3", "training.max_steps must be a number of optimizer steps ≥ 1, or -1 to train "
                              "num_train_epochs, got -3."),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size must be at least 1, got 0."),
    ("training.learning_rate=-1", "training.learning_rate must be a finite number ≥ 0 (e.g. 2e-4), got -1."),
    ("training.lr_scheduler_type=bogus", "training.lr_scheduler_type: bogus is not a valid SchedulerType"),
    ("stages.0.learning_rate=-2", "stages[0] (polarity).learning_rate must be a finite number ≥ 0"),
    ("peft.r=four", "peft.r must be int, got 'four' (str)."),
    ("peft.r=0", "peft.r must be a rank ≥ 1 (e.g. 8 or 16), got 0."),
    ("peft.peft_type=IA3", "peft.peft_type: recipes train LoRA or OSF adapters (adapters.strategy continues or "
                           "stacks them across stages), got 'IA3'. Remove peft_type"),
    ("peft.target_modules=[qq_proj]", "peft.target_modules: ['qq_proj'] name no module of tiny-random-llama; its "
                                      "linear layers are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj,"
                                      " up_proj, v_proj."),
    ("model={name_or_path: tiny-random-llama, dtype: float8}", "model.dtype 'float8' is not a dtype a model loads in;"
                                                               " use float32 (the default), bfloat16, float16 or auto"),
    ("evaluation.general_texts=-1", "evaluation.general_texts must be at least 0 (0: no general texts measured), "
                                    "got -1."),
    ("gere.replay_per_step=1000", "gere.replay_per_step=1000 is more than the 8 replay texts: every step would replay "
                                  "the same texts several times. Lower gere.replay_per_step to at most 8"),
    ("gere.replay_max_length=3000", "gere.replay_max_length=3000 is longer than the 1024 positions tiny-random-llama "
                                    "was built for"),
    ("gere.replay_num_samples=5000", "gere.replay_num_samples=5000, but gere.replay_source (wiki) holds 4000 non-empty "
                                     "texts. Lower gere.replay_num_samples to at most 4000"),
    ("seed=abc", "seed must be int, got 'abc' (str)."),
    ("training.max_length=72", "stages[0] (polarity): training.max_length=72 leaves 1 of its 8 training examples: TRL "
                               "drops the 7 whose prompt fills max_length"),
    ("training.max_length=8", "stages[0] (polarity): training.max_length=8 leaves 0 of its 8 training examples"),
]


@pytest.mark.parametrize("override, expected", BAD_VALUES, ids=[o.split("=")[0] + "=" + o.split("=")[1][:12]
                                                                for o, _ in BAD_VALUES])
def test_bad_values_are_refused_before_any_work_naming_the_key(tmp_path, user_dir, capsys, override, expected):
    message = _refused(tmp_path, user_dir, capsys, override)
    assert expected in message, message
    assert "Traceback" not in capsys.readouterr().err


def test_a_store_dir_that_is_a_file_is_refused(tmp_path, user_dir, capsys):
    (tmp_path / "store_file").write_text("not a store")
    message = _refused(tmp_path, user_dir, capsys, f"gere.store_dir={tmp_path / 'store_file'}")
    assert f"gere.store_dir: {tmp_path / 'store_file'} is a file. Give the path of a folder" in message
    assert (tmp_path / "store_file").read_text() == "not a store"


def test_a_refused_run_leaves_no_new_output_folder(tmp_path, capsys):
    out = tmp_path / "new_run"
    path = _write_recipe(tmp_path / "recipe.yaml", out, "peft.target_modules=[qq_proj]")
    assert cli.main(["run", path]) == 2
    assert "peft.target_modules" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("case", ["stage_not_utf8", "stage_malformed_jsonl", "general_not_utf8", "replay_not_utf8"])
def test_unreadable_data_files_are_named_with_the_fix(tmp_path, user_dir, capsys, case):
    bad = tmp_path / ("bad.jsonl" if case == "stage_malformed_jsonl" else "bad.csv" if case == "stage_not_utf8"
                      else "bad.txt")
    if case == "stage_not_utf8":
        bad.write_bytes("prompt,completion\ncaf\xe9 au lait?, yes\n".encode("latin-1"))
    elif case == "stage_malformed_jsonl":
        bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    else:
        bad.write_bytes("A general text about caf\xe9s and rivers.\n".encode("latin-1"))
    key = {"stage_not_utf8": "stages.0.dataset", "stage_malformed_jsonl": "stages.0.dataset",
           "general_not_utf8": "evaluation.general_source", "replay_not_utf8": "gere.replay_source"}[case]
    message = _refused(tmp_path, user_dir, capsys, f"{key}={bad}")
    if case == "stage_malformed_jsonl":
        assert (f"stages[0] (polarity): the dataset file {bad} could not be read (ArrowInvalid: JSON parse error"
                in message and "Fix the file: it must be valid JSON" in message and "Hub" not in message), message
    else:
        where = {"stage_not_utf8": f"stages[0] (polarity): the dataset file {bad}",
                 "general_not_utf8": f"evaluation.general_source: the general source {bad}",
                 "replay_not_utf8": f"gere.replay_source: the replay source {bad}"}[case]
        assert f"{where} is not UTF-8 text" in message and "iconv -f latin1 -t utf-8" in message, message


def test_too_many_replay_texts_name_the_recipe_key_not_an_api_argument(tmp_path, user_dir, capsys):
    source = tmp_path / "replay.jsonl"
    source.write_text("".join(json.dumps({"text": f"General text {i} about rivers and stars."}) + "\n"
                              for i in range(16)))
    message = _refused(tmp_path, user_dir, capsys, f"gere.replay_source={source}", "gere.replay_num_samples=100")
    assert (f"gere.replay_num_samples=100, but gere.replay_source ({source}) holds 16 non-empty texts. Lower "
            "gere.replay_num_samples to at most 16, or give a larger source." in message)
    assert "allow_fewer" not in message


def test_tokenizer_without_pad_or_eos_token(tmp_path, user_dir, capsys):
    """A local model whose tokenizer has neither a pad nor an eos token (a pad-less one falls back to eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gere_hf.models import tiny_llama

    words = ["[UNK]"] + "the a of and is to in text general knowledge".split()
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "nopad_model"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(model_dir)
    tiny_llama().save_pretrained(model_dir)
    message = _refused(tmp_path, user_dir, capsys, f"model={model_dir}")
    assert "has neither a pad token nor an eos token to pad with. Set tokenizer.pad_token" in message


@pytest.mark.parametrize("where", ["file", "--set"])
def test_yaml_python_tags_run_no_code(tmp_path, user_dir, capsys, where):
    """Recipes and --set values go through a yaml.SafeLoader: a python/object tag never calls anything. In a file it
    is an error; a --set value that is not safe YAML is an error or plain text (here: an invalid run name)."""
    marker = tmp_path / "PWNED"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    path = _write_recipe(tmp_path / "recipe.yaml", user_dir)
    if where == "file":
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"overwrite_output_dir: {payload}\n")
        argv, expected = ["run", path], "is not valid YAML: could not determine a constructor for the tag"
    else:
        argv, expected = ["run", path, "--set", f"name={payload}"], "name '!!python/object/apply:os.system"
    before = tree_snapshot(user_dir)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err or "is not valid YAML: could not determine a constructor" in err, err
    assert not marker.exists() and tree_snapshot(user_dir) == before


# ----------------------------------------------------------------------------------------------------------------------
# Runs: uninterrupted (1 process), deterministic rerun with a Hub push, SIGKILL + --resume, 2 processes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The recipe run once through the CLI, in this process, uninterrupted."""
    root = tmp_path_factory.mktemp("reliability_recipe")
    out = root / "uninterrupted"
    with one_thread():
        assert cli.main(["run", _write_recipe(root / "a.yaml", out)]) == 0
    return out


@pytest.mark.slow
def test_resume_against_a_different_recipe_leaves_the_run_untouched(tmp_path, uninterrupted, capsys):
    before = tree_snapshot(uninterrupted)
    path = _write_recipe(tmp_path / "other.yaml", uninterrupted, "training.learning_rate=0.005")
    for extra in ([], ["--resume"]):
        assert cli.main(["run", path, *extra]) == 2
        message = capsys.readouterr().err
        assert ("already holds a run (2 finished stage(s): polarity, trivia). Pass --resume" in message if not extra
                else "training.learning_rate: 0.001 (run) vs 0.005 (recipe)" in message)
    assert tree_snapshot(uninterrupted) == before


@pytest.mark.slow
def test_store_built_for_another_base_model_is_refused_and_kept(tmp_path, capsys):
    from transformers import ByT5Tokenizer

    from gere_hf import ReferenceStates, ReplaySet
    from gere_hf.models import tiny_llama

    recipe = tiny_recipe(tmp_path / "run", *RUN)
    g = recipe["gere"]
    replay = ReplaySet.load(ByT5Tokenizer(), "wiki", g["replay_num_samples"], g["replay_max_length"], recipe["seed"])
    store = tmp_path / "store"
    ReferenceStates.build(tiny_llama(seed=recipe["seed"] + 1), replay, str(store), progress=False)
    before = tree_snapshot(store)
    path = _write_recipe(tmp_path / "r.yaml", tmp_path / "run", f"gere.store_dir={store}", "evaluation.enabled=false")
    with one_thread():
        assert cli.main(["run", path]) == 2
    message = capsys.readouterr().err
    assert f"The reference store at {store} was built from other base-model weights than tiny-random-llama" in message
    assert "gere.rebuild_store: true" in message
    assert tree_snapshot(store) == before
    stage1 = tmp_path / "run" / "stages" / "1-polarity"
    assert not (stage1 / "adapter_model.safetensors").exists() and not list(stage1.glob("checkpoints/checkpoint-*"))


@pytest.mark.slow
def test_same_seed_same_results_and_the_hub_token_appears_nowhere(tmp_path, uninterrupted, monkeypatch):
    """A second run, in another process, pushing every stage to a local fake Hub with a fake token: the same losses,
    weights and evaluation as the first run; the token is sent to the Hub but is in no file, log or pushed file."""
    out = tmp_path / "again"
    with FakeHub(token=FAKE_TOKEN) as hub:
        path = _write_recipe(tmp_path / "b.yaml", out, f"hub={{push: true, endpoint: '{hub.url}'}}")
        proc = subprocess.run(["gere-hf", "run", path], capture_output=True, text=True, timeout=300,
                              env=_env(HF_TOKEN=FAKE_TOKEN, HF_HOME=str(tmp_path / "hf_home")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Determinism: bit-identical logs, store, weights and evaluation.
    for stage in ("1-polarity", "2-trivia"):
        assert _log_history(out, stage) == _log_history(uninterrupted, stage)
    a, b = _final_adapter(uninterrupted), _final_adapter(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for name in ("manifest.json",):
        ma, mb = read_json(uninterrupted / "gere_store" / name), read_json(out / "gere_store" / name)
        assert ma["files"] == mb["files"] and ma["fingerprint"] == mb["fingerprint"]
    ra, rb = read_json(uninterrupted / "results.json"), read_json(out / "results.json")
    assert ra["matrix"] == rb["matrix"] and ra["general"] == rb["general"]
    # The token: used (both stages pushed) ...
    assert sorted(hub.repos) == ["tester/tiny_cpu-polarity", "tester/tiny_cpu-trivia"] and not hub.unhandled
    # ... and nowhere else: stdout/stderr, every file of the run (run_state.json, results.json, model cards,
    # metrics, logs), every pushed file.
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert FAKE_TOKEN not in all_text_under(str(out))
    for repo in hub.repos.values():
        for files in repo["branches"].values():
            assert not any(FAKE_TOKEN.encode() in content for content in files.values())
    assert "hub" not in read_json(out / "run_state.json")["recipe"]


@pytest.mark.slow
def test_sigkill_during_stage_2_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    path = _write_recipe(tmp_path / "k.yaml", out)
    checkpoints = out / STAGE2 / "checkpoints"
    proc = subprocess.Popen(["gere-hf", "run", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (checkpoints / "checkpoint-1").is_dir():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    state = read_json(out / "run_state.json")
    assert [s["status"] for s in state["stages"]] == ["finished", "running"], "killed too late"
    # The worst moment to die is while a checkpoint is written: make sure the newest checkpoint is a partial one
    # (the kill above often lands there by itself: the folder exists before its files).
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    partial = checkpoints / f"checkpoint-{steps[-1] + 1}"
    partial.mkdir()
    if (checkpoints / f"checkpoint-{steps[0]}" / "adapter_model.safetensors").exists():
        shutil.copy(checkpoints / f"checkpoint-{steps[0]}" / "adapter_model.safetensors", partial)

    with one_thread():
        assert cli.main(["run", path, "--resume"]) == 0
    state = read_json(out / "run_state.json")
    assert state["finished"] and [s["status"] for s in state["stages"]] == ["finished", "finished"]
    for stage in ("1-polarity", "2-trivia"):
        got, want = _log_history(out, stage), _log_history(uninterrupted, stage)
        assert [h.get("step") for h in got] == [h.get("step") for h in want]
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for k in w:
                assert g[k] == pytest.approx(w[k], abs=1e-6, rel=0), (stage, k, g, w)
    a, b = _final_adapter(uninterrupted), _final_adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    ra, rb = read_json(uninterrupted / "results.json"), read_json(out / "results.json")
    assert ra["matrix"] == rb["matrix"]
    for x, y in zip(ra["general"], rb["general"]):
        assert y["nll"] == pytest.approx(x["nll"], abs=1e-6, rel=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_only_the_main_process_writes_in_a_two_process_run(tmp_path, uninterrupted):
    """torchrun, 2 processes: the output tree holds exactly the files of the 1-process run (no per-rank extras)."""
    out = tmp_path / "ddp"
    path = _write_recipe(tmp_path / "d.yaml", out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "gere_hf", "run", path]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert read_json(out / "run_state.json")["world_size"] == 2
    assert _files(out) == _files(uninterrupted)


# ----------------------------------------------------------------------------------------------------------------------
# Resume exact at any kill point: one run killed at every file a stage writes, resumed after each kill
# ----------------------------------------------------------------------------------------------------------------------

KILL_WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workers", "kill_worker.py")
S1, S2 = os.path.join("stages", "1-polarity"), os.path.join("stages", "2-trivia")
# max_steps 3 with 2 steps an epoch (8 examples, batch 4): the last step ends an epoch in its middle, where resuming
# from the final checkpoint trained a 4th step.
KILL_RUN = ("training.max_steps=3",)
# In the order a run writes them; each resumed run goes on to the next. (target, "before" it is written, or "after")
KILL_POINTS = [
    (os.path.join("gere_store", "manifest.json"), "before"),  # the store build, its last file
    (os.path.join(S1, "checkpoints", "checkpoint-2", "trainer_state.json"), "before"),  # a partial checkpoint
    (os.path.join(S1, "checkpoints", "checkpoint-3", "trainer_state.json"), "after"),  # the final checkpoint
    (os.path.join(S1, "adapter_model.safetensors"), "after"),  # the stage's saved model ...
    (os.path.join(S1, "trainer_state.json"), "after"),  # ... its trainer state
    (os.path.join(S1, "metrics.json"), "before"),  # row 1 evaluated and recorded, the stage not yet finished
    (os.path.join(S1, "README.md"), "before"),  # the model card (PEFT's, from the checkpoint, is replaced)
    (os.path.join(S1, "checkpoints"), "before"),  # finished, its checkpoints not yet removed
    (os.path.join(S2, "checkpoints", "checkpoint-1", "adapter_model.safetensors"), "after"),  # no complete checkpoint
    (os.path.join(S2, "checkpoints", "checkpoint-2", "trainer_state.json"), "after"),  # resumes mid-epoch
    (os.path.join(S2, "adapter_config.json"), "before"),  # the adapter saved, its config not yet
    ("results.json", "before"),  # every stage finished, the report not yet written
    ("report.md", "after"),
]


def _step_logs(run, stage) -> list[dict]:
    """The per-step entries of a stage's log history (not the Trainer's end-of-train summary, whose train_loss covers
    the steps of one train() call), without two running counts that restart at 0 after a resume: TRL's num_tokens (its
    count is not in the checkpoint) and replay_samples_seen (test_replay_samples_seen_continues_after_resume)."""
    restart = ("num_tokens", "replay_samples_seen")
    return [{k: v for k, v in h.items() if k not in restart} for h in _log_history(run, stage) if "loss" in h]


@pytest.fixture(scope="module")
def killed_at_every_file(tmp_path_factory):
    """The KILL_RUN recipe run uninterrupted, and run again killed at every file of KILL_POINTS in turn, each kill
    followed by `gere-hf run --resume` (in a new process) until the next kill point, the last one to the end."""
    root = tmp_path_factory.mktemp("kill_points")
    with one_thread():
        assert cli.main(["run", _write_recipe(root / "u.yaml", root / "uninterrupted", *KILL_RUN)]) == 0
    out = root / "killed"
    path = _write_recipe(root / "k.yaml", out, *KILL_RUN)
    reached = []
    for i, (target, when) in enumerate(KILL_POINTS):
        argv = ["run", path] + (["--resume"] if i else [])
        proc = subprocess.run([sys.executable, KILL_WORKER, str(out), target, when, *argv], capture_output=True,
                              text=True, timeout=300, env=_env())
        assert proc.returncode == -signal.SIGKILL, (target, when, proc.returncode, proc.stderr[-3000:])
        reached.append((target, when, read_json(out / "run_state.json")))
    proc = subprocess.run(["gere-hf", "run", path, "--resume"], capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "uninterrupted", out, reached, proc.stderr


@pytest.mark.slow
def test_resume_after_a_kill_at_every_file_equals_the_uninterrupted_run(killed_at_every_file):
    uninterrupted, out, reached, _ = killed_at_every_file
    state = read_json(out / "run_state.json")
    assert state["finished"] and [s["status"] for s in state["stages"]] == ["finished", "finished"]
    assert not (out / S1 / "checkpoints").exists() and not (out / S2 / "checkpoints").exists()
    for stage in ("1-polarity", "2-trivia"):
        # The final checkpoint is the finished stage: 3 steps, not a 4th one trained on --resume.
        assert read_json(out / "stages" / stage / "trainer_state.json")["global_step"] == 3
        got, want = _step_logs(out, stage), _step_logs(uninterrupted, stage)
        assert [h["step"] for h in got] == [h["step"] for h in want] == [1, 2, 3]
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for k in w:
                assert g[k] == pytest.approx(w[k], abs=1e-6, rel=0), (stage, k, g, w)
        a = load_file(os.path.join(uninterrupted, "stages", stage, "adapter_model.safetensors"))
        b = load_file(os.path.join(out, "stages", stage, "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a), stage
    ma, mb = read_json(uninterrupted / "gere_store" / "manifest.json"), read_json(out / "gere_store" / "manifest.json")
    assert ma["files"] == mb["files"] and ma["fingerprint"] == mb["fingerprint"]
    ra, rb = read_json(uninterrupted / "results.json"), read_json(out / "results.json")
    assert ra["matrix"] == rb["matrix"]
    for x, y in zip(ra["general"], rb["general"]):
        assert y["nll"] == pytest.approx(x["nll"], abs=1e-6, rel=0)
    assert _files(out) == _files(uninterrupted)  # no partial file, no lock, nothing extra left behind


@pytest.mark.slow
def test_each_kill_point_was_reached_where_it_was_meant(killed_at_every_file):
    """Where each kill left the run: the state the next --resume started from."""
    _, _, reached, log = killed_at_every_file
    status = {os.path.join(t, "") if w == "before" and t.endswith("checkpoints") else t: [s["status"] for s in
              st["stages"]] for t, w, st in reached}
    assert status[os.path.join("gere_store", "manifest.json")] == ["running", "pending"]
    assert status[os.path.join(S1, "metrics.json")] == ["running", "pending"]
    assert status[os.path.join(S1, "checkpoints", "")] == ["finished", "pending"]
    assert status[os.path.join(S2, "adapter_config.json")] == ["finished", "running"]
    assert status["results.json"] == ["finished", "finished"]
    assert "1" in reached[5][2]["evaluation"]  # row 1 was recorded before the kill at metrics.json


@pytest.mark.slow
def test_replay_samples_seen_continues_after_resume(killed_at_every_file):
    uninterrupted, out, _, _ = killed_at_every_file
    seen = [h["replay_samples_seen"] for h in _log_history(out, "2-trivia") if "loss" in h]
    assert seen == [h["replay_samples_seen"] for h in _log_history(uninterrupted, "2-trivia") if "loss" in h]


# ----------------------------------------------------------------------------------------------------------------------
# Locks: a run folder in use is refused naming its holder; runs sharing a store build it once
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    """A live `gere-hf run` (another process) holds its output_dir: a second run and a --resume beside it are both
    refused, naming its pid and host, and change nothing; after it ends the folder is free."""
    out = tmp_path / "run"
    path = _write_recipe(tmp_path / "r.yaml", out)
    first = subprocess.Popen(["gere-hf", "run", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not (out / "run_state.json").exists():
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be met"
        for extra in ([], ["--resume"]):
            assert cli.main(["run", path, *extra]) == 2
            message = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"{out} is in use by pid {first.pid} on host {socket.gethostname()} (gere-hf run, since" in message
            assert "Wait until it ends, stop it, or choose another folder." in message
        output = first.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output[-3000:]
    assert read_json(out / "run_state.json")["finished"] and not (out / ".gere.lock").exists()


@pytest.mark.slow
def test_two_runs_sharing_a_store_started_together_both_finish(tmp_path):
    """Two runs with one gere.store_dir, launched at once: one builds the store, the other waits for it and uses it;
    both finish with the same store (before the store lock, one try in two left a store of a lone manifest.json)."""
    store = tmp_path / "shared_store"
    paths = [_write_recipe(tmp_path / f"{n}.yaml", tmp_path / n, f"gere.store_dir={store}") for n in ("a", "b")]
    procs = [subprocess.Popen(["gere-hf", "run", p], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
             for p in paths]
    outputs = [p.communicate(timeout=400)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    manifest = read_json(store / "manifest.json")
    assert sorted(os.listdir(store)) == sorted([*manifest["files"], "manifest.json"])
    for n in ("a", "b"):
        assert read_json(tmp_path / n / "run_state.json")["finished"]
    assert _final_adapter(tmp_path / "a").keys() == _final_adapter(tmp_path / "b").keys()


# ----------------------------------------------------------------------------------------------------------------------
# Runs that stopped before training, and --resume against files that changed
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_stopped_before_its_first_stage_reruns_with_the_corrected_recipe(tmp_path, capsys):
    """A store of another base model is found when stage 1 loads the model, after run_state.json and row 0: the
    corrected recipe (another store_dir) runs without overwrite_output_dir, and --resume is not needed either."""
    from transformers import ByT5Tokenizer

    from gere_hf import ReferenceStates, ReplaySet
    from gere_hf.models import tiny_llama

    recipe = tiny_recipe(tmp_path / "run", *RUN)
    g = recipe["gere"]
    replay = ReplaySet.load(ByT5Tokenizer(), "wiki", g["replay_num_samples"], g["replay_max_length"], recipe["seed"])
    wrong = tmp_path / "wrong_store"
    ReferenceStates.build(tiny_llama(seed=recipe["seed"] + 1), replay, str(wrong), progress=False)
    small = ("training.max_steps=1", "evaluation.general_texts=2")
    with one_thread():
        path = _write_recipe(tmp_path / "r.yaml", tmp_path / "run", f"gere.store_dir={wrong}", *small)
        assert cli.main(["run", path]) == 2
        assert "was built from other base-model weights" in capsys.readouterr().err
        state = read_json(tmp_path / "run" / "run_state.json")
        assert "0" in state["evaluation"] and [s["status"] for s in state["stages"]] == ["pending", "pending"]
        path = _write_recipe(tmp_path / "r.yaml", tmp_path / "run", f"gere.store_dir={tmp_path / 'right'}", *small)
        assert cli.main(["run", path]) == 0, capsys.readouterr().err[-3000:]
    assert read_json(tmp_path / "run" / "run_state.json")["finished"]


@pytest.fixture
def finished_copy(tmp_path, uninterrupted):
    """A copy of the uninterrupted run (times kept) whose stage 2 is marked unfinished, as a kill would leave it."""
    copy = tmp_path / "run"
    shutil.copytree(uninterrupted, copy)
    state = read_json(copy / "run_state.json")
    state["stages"][1]["status"] = "running"
    state["finished"] = False
    state["recipe"]["output_dir"] = str(copy)  # the copy's own recipe (output_dir is part of the recipe's hash)
    state["recipe_hash"] = recipe_hash(tiny_recipe(copy, *RUN))
    (copy / "run_state.json").write_text(json.dumps(state))
    return copy


@pytest.mark.slow
def test_resume_on_a_changed_base_model_is_refused_with_both_hashes(tmp_path, finished_copy, capsys):
    from safetensors.torch import save_file

    weights = finished_copy / "base_model" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    before = tree_snapshot(finished_copy)
    path = _write_recipe(tmp_path / "r.yaml", finished_copy)
    assert cli.main(["run", path, "--resume"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    recorded = read_json(finished_copy / "run_state.json")["model"]["weights"]["digest"]
    assert f"--resume: the base model at {finished_copy / 'base_model'} changed since the run started: its files " \
           f"hash {recorded} in the run's record and " in message
    assert "model.safetensors: its SHA-256 is" in message and "put them back, or start a new run" in message
    assert tree_snapshot(finished_copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "another_runs_adapter"])
def test_resume_over_a_damaged_or_swapped_finished_stage_is_refused(tmp_path, finished_copy, capsys, damage):
    adapter = finished_copy / "stages" / "1-polarity" / "adapter_model.safetensors"
    if damage == "truncated":
        adapter.write_bytes(adapter.read_bytes()[:-64])
    else:
        shutil.copy(finished_copy / "stages" / "2-trivia" / "adapter_model.safetensors", adapter)
    before = tree_snapshot(finished_copy)
    path = _write_recipe(tmp_path / "r.yaml", finished_copy)
    assert cli.main(["run", path, "--resume"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--resume: stage 1 (polarity) in {finished_copy / 'stages' / '1-polarity'} is not what the run saved " \
           "(adapter_model.safetensors: " in message
    assert "Restore the stage folder from a copy, or start the run over" in message
    assert tree_snapshot(finished_copy) == before


def test_rebuilding_a_store_is_no_other_recipe():
    """gere.rebuild_store says how to get the store, not what it is: a --resume may set it (a shared store left
    damaged by a crash is rebuilt without starting the run over)."""
    raw = tiny_recipe("/tmp/x")
    assert recipe_hash(apply_overrides(raw, ["gere.rebuild_store=true"])) == recipe_hash(raw)
    assert recipe_hash(apply_overrides(raw, ["gere.replay_num_samples=9"])) != recipe_hash(raw)


@pytest.mark.slow
def test_examples_that_max_length_drops_are_counted_in_the_results(tmp_path):
    """training.max_length=150 keeps 4 of polarity's 8 examples (half: a warning, not a refusal); results.json says
    how many were given, kept and trained, not only num_train."""
    out = tmp_path / "run"
    with one_thread():
        assert cli.main(["run", _write_recipe(tmp_path / "r.yaml", out, "training.max_length=150",
                                              "training.max_steps=1", "evaluation.general_texts=2")]) == 0
    stages = read_json(out / "results.json")["run"]["stages"]
    assert stages[0]["examples"] == {"given": 8, "kept_by_max_length": 4, "longest_tokens": 241, "trained": 4}
    assert stages[1]["examples"]["trained"] == stages[1]["examples"]["given"] == 8
