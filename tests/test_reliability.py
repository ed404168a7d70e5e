"""Reliability of GeReTrainer and the reference store: bad input fails before any work, faults leave usable state.

Every case here is listed in docs/reliability.md with what the user sees and what is kept on disk. The recipe-level
cases (``gere-hf run``) are in tests/test_reliability_recipe.py. Tiny random Llama + ByT5 tokenizer, CPU only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tree_snapshot
from datasets import Dataset
from transformers import ByT5Tokenizer, DataCollatorForLanguageModeling, LlamaForCausalLM, TrainingArguments

from gere_hf import GeReConfig, GeReTrainer, GeReTrainingError, ReferenceStates, ReplaySet
from gere_hf.models import UnsupportedModelError, find_final_norm, tiny_llama
from gere_hf.reference import MANIFEST, ReferenceStatesError, ReferenceStatesMismatch
from gere_hf.reference import builder as builder_module
from gere_hf.replay import ReplayDataError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
PACKAGE_DIR = os.path.join(REPO_ROOT, "gere_hf")
TOK = ByT5Tokenizer()
REPLAY_TEXTS = [
    f"Replay text {i}. " + "general knowledge about rivers and stars " * (1 + i % 4) for i in range(16)
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: a shared 2-core machine, and run-to-run identical float sums."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(seed=0, **overrides):
    return tiny_llama(hidden_size=32, seed=seed, attn_implementation="eager", **overrides)


def _lm_dataset(n=24):
    ds = Dataset.from_dict({"text": [f"Q: {i} plus {i}? A: {2 * i}." for i in range(n)]})
    return ds.map(lambda b: TOK(b["text"]), batched=True, remove_columns=["text"])


def _args(out, steps=3, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(
        str(out), per_device_train_batch_size=4, max_steps=steps, logging_steps=1, report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, learning_rate=1e-3, **kw,
    )


def _trainer(out, model=None, steps=3, args=None, **kw):
    return GeReTrainer(model=model if model is not None else _model(), args=args or _args(out, steps),
                       train_dataset=_lm_dataset(), data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                       processing_class=kw.pop("tokenizer", TOK), **kw)


def _replay_file(path, texts=REPLAY_TEXTS, column="text"):
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def data_files(path) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, n)) and n != MANIFEST}


def manifest_without_build(path) -> dict:
    manifest = json.loads(open(os.path.join(path, MANIFEST), encoding="utf-8").read())
    manifest.pop("build")
    return manifest


def count_forwards(model) -> list:
    calls = []
    find_final_norm(model)[1].register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def replay():
    return ReplaySet.from_texts(REPLAY_TEXTS, TOK, max_length=48)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, replay):
    """A store of ``_model()`` over ``replay``, built once; tests copy it before touching it."""
    path = tmp_path_factory.mktemp("reliability") / "store"
    ReferenceStates.build(_model(), replay, str(path), batch_size=4, chunk_size=4, progress=False)
    return str(path)


@pytest.fixture
def workdir(tmp_path, store_path):
    """An output directory that already holds a user's file, and a private copy of the store."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")
    store = tmp_path / "store"
    shutil.copytree(store_path, store)
    return out, str(store)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any work (no training step, no store forward), nothing on disk damaged
# ----------------------------------------------------------------------------------------------------------------------


def _no_head_models():
    from transformers import BertConfig, BertModel, LlamaModel

    llama = LlamaModel(_model().config)  # what AutoModel.from_pretrained gives: the same body, no LM head
    bert = BertModel(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    return {"LlamaModel": llama, "BertModel": bert}


@pytest.mark.parametrize("name", ["LlamaModel", "BertModel"])
def test_model_without_lm_head_is_refused(workdir, name):
    out, _ = workdir
    before = tree_snapshot(out)
    with pytest.raises(UnsupportedModelError, match=rf"{name} is not a causal language model .*AutoModelForCausalLM"):
        _trainer(out, model=_no_head_models()[name], gere_config=GeReConfig(replay_source="wiki"))
    assert tree_snapshot(out) == before


def _other(field, store_dir):
    """(model, tokenizer, gere_config) that differ from the stored store in ``field``."""
    if field == "model_config":
        return _model(rms_norm_eps=1e-3), TOK, {}
    if field == "tokenizer":  # same ids for these texts, another vocabulary
        return _model(), ByT5Tokenizer(extra_ids=0), {}
    if field == "replay":
        return _model(), TOK, {"replay_num_samples": len(REPLAY_TEXTS) - 1}
    raise AssertionError(field)


@pytest.mark.parametrize("field", ["model_config", "tokenizer", "replay"])
def test_store_built_for_another_model_tokenizer_or_replay_set_is_refused(workdir, tmp_path, field):
    out, store = workdir
    model, tokenizer, extra = _other(field, store)
    cfg = {"replay_source": _replay_file(tmp_path / "replay.jsonl"), "replay_num_samples": len(REPLAY_TEXTS),
           "replay_max_length": 48, "store_dir": store, "replay_per_step": 4, **extra}
    forwards = count_forwards(model)
    before, store_before = tree_snapshot(out), tree_snapshot(store)
    trainer = _trainer(out, model=model, tokenizer=tokenizer, gere_config=GeReConfig(**cfg))
    with pytest.raises(ReferenceStatesMismatch) as info:
        trainer.train()
    message = str(info.value)
    assert f"  {field}: store has" in message and "rebuild" in message.lower() and store in message
    assert forwards == [] and trainer.state.global_step == 0
    assert tree_snapshot(store) == store_before and tree_snapshot(out) == before


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_store_file_is_refused_and_left_as_found(workdir, tmp_path, damage):
    out, store = workdir
    labels = os.path.join(store, "labels.bin")
    data = bytearray(open(labels, "rb").read())
    if damage == "truncate":
        data = data[:-1]
    else:
        data[len(data) // 2] ^= 0xFF
    open(labels, "wb").write(bytes(data))
    store_before = tree_snapshot(store)
    model = _model()
    forwards = count_forwards(model)
    trainer = _trainer(out, model=model, gere_config=GeReConfig(
        replay_source=_replay_file(tmp_path / "replay.jsonl"), replay_num_samples=len(REPLAY_TEXTS),
        replay_max_length=48, store_dir=store, replay_per_step=4))
    expected = r"labels\.bin is truncated or altered: \d+ bytes, the manifest records \d+\. Rebuild the store" \
        if damage == "truncate" else r"labels\.bin is corrupted: its checksum does not match the manifest\. Rebuild"
    with pytest.raises(ReferenceStatesError, match=expected):
        trainer.train()
    assert forwards == [] and trainer.state.global_step == 0
    assert tree_snapshot(store) == store_before  # kept for inspection, never silently rebuilt over


@pytest.mark.parametrize("case", ["empty_file", "blank_texts", "no_text_field", "missing_file"])
def test_bad_replay_source_is_refused_before_any_store_work(workdir, tmp_path, case):
    out, _ = workdir
    if case == "empty_file":
        (tmp_path / "empty.jsonl").write_text("")
        source, match = str(tmp_path / "empty.jsonl"), r"The replay file '.*empty\.jsonl' is empty\. Give a file"
    elif case == "blank_texts":
        source, match = _replay_file(tmp_path / "blank.jsonl", texts=["", "   "]), \
            r"holds no non-empty texts in column 'text' \(2 rows\)\. Give a source with general text"
    elif case == "no_text_field":
        source, match = _replay_file(tmp_path / "body.jsonl", column="body"), \
            r"has no column 'text'; its columns are \['body'\]\. Pass text_column= with one of them"
    else:
        source, match = str(tmp_path / "data" / "missing.jsonl"), r"does not exist\. Give an existing file or folder"
    store = tmp_path / "new_store"
    before = tree_snapshot(out)
    trainer = _trainer(out, gere_config=GeReConfig(replay_source=source, replay_num_samples=4, store_dir=str(store)))
    with pytest.raises(ReplayDataError, match=match):
        trainer.train()
    assert not store.exists() and trainer.state.global_step == 0 and tree_snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------------------
# A disk that fills up during the store build
# ----------------------------------------------------------------------------------------------------------------------


def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("when", ["chunks", "assembly"])
def test_disk_full_during_store_build_then_resume_equals_uninterrupted(replay, tmp_path, monkeypatch, when):
    """Fault injection on the store's writes (all go through ``_atomic_write_bytes``, or into memory maps whose space
    ``_preallocate`` reserves first): the completion mark of chunk 2, or the space of the assembled files."""
    out = tmp_path / "store"
    real_write = builder_module.atomic_write_bytes

    def failing_write(path, data):
        if when == "chunks" and os.path.basename(path) == "chunk-00002.stats.safetensors":
            open(f"{path}.tmp", "wb").write(data[: len(data) // 2])  # a partial file, as a full disk leaves
            raise _enospc(f"{path}.tmp")
        return real_write(path, data)

    monkeypatch.setattr(builder_module, "atomic_write_bytes", failing_write)
    if when == "assembly":
        monkeypatch.setattr(builder_module, "preallocate", lambda f, size: (_ for _ in ()).throw(_enospc(f.name)))
    with pytest.raises(ReferenceStatesError) as info:
        ReferenceStates.build(_model(), replay, str(out), batch_size=4, chunk_size=4, progress=False)
    message = str(info.value)
    assert re.search(r"The disk filled up while building the reference store in .*needs about \d+\.\d+ MiB in all",
                     message), message
    assert "Free space and run the build again to resume it" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert not (out / MANIFEST).exists() and (out / ".building").is_dir()  # marked incomplete
    with pytest.raises(ReferenceStatesError, match="incomplete"):
        ReferenceStates.open(str(out))
    monkeypatch.undo()

    resumed = ReferenceStates.build(_model(), replay, str(out), batch_size=4, chunk_size=4, progress=False)
    fresh = ReferenceStates.build(_model(), replay, str(tmp_path / "fresh"), batch_size=4, chunk_size=4,
                                  progress=False)
    assert data_files(resumed.path) == data_files(fresh.path)
    assert manifest_without_build(resumed.path) == manifest_without_build(fresh.path)


def test_too_little_free_space_is_refused_before_any_forward(replay, tmp_path, monkeypatch):
    """The precheck: the build needs more than is free, so it does not start (a fake 4 KiB of free space)."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(builder_module.shutil, "disk_usage", lambda _p: usage(1 << 30, (1 << 30) - 4096, 4096))
    model = _model()
    forwards = count_forwards(model)
    with pytest.raises(ReferenceStatesError, match=r"Not enough disk space for the reference store in .*: the build "
                       r"needs about 0\.0\d\d MiB more, 0\.004 MiB are free\. Free space or choose another store_dir"):
        ReferenceStates.build(model, replay, str(tmp_path / "store"), batch_size=4, chunk_size=4, progress=False)
    assert forwards == [] and os.listdir(tmp_path / "store") == []


def _mount_tmpfs(path, size="1m") -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_small_tmpfs(replay, tmp_path):
    """A 1 MiB tmpfs filled by another writer while the store is built (during the chunks, then during assembly).

    Run in a subprocess: writing into a memory-mapped file on a full tmpfs raises SIGBUS, which would kill pytest.
    """
    mnt = tmp_path / "tmpfs"
    if not _mount_tmpfs(mnt):
        pytest.skip("mounting a tmpfs needs root (the fault-injection test above covers the logic)")
    try:
        result = subprocess.run(
            [sys.executable, os.path.join(TESTS_DIR, "workers", "reliability_disk_full.py"), str(mnt)],
            capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        fresh = ReferenceStates.build(_model(), replay, str(tmp_path / "fresh"), batch_size=4, chunk_size=4,
                                      progress=False)
        for when in ("chunks", "assembly"):
            case = report[when]
            assert case["filled"] and case["error_type"] == "ReferenceStoreError", case
            assert re.search(r"filled up .*needs about \d+\.\d+ MiB in all", case["error"]), case
            assert case["manifest_after_error"] is False and case["building_after_error"] is True
            assert case["data_files"] == {k: hashlib.sha256(v).hexdigest() for k, v in data_files(fresh.path).items()}
            assert case["manifest"] == manifest_without_build(fresh.path)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------------------
# A NaN or inf loss
# ----------------------------------------------------------------------------------------------------------------------


class _NaNAtStep3(GeReTrainer):
    """Injects NaN into the final norm's output of the replay forward of optimizer step 3 (1-based)."""

    def __init__(self, *args, bad="nan", **kwargs):
        super().__init__(*args, **kwargs)
        self._in_replay = False
        value = float("nan") if bad == "nan" else float("inf")
        find_final_norm(self.model)[1].register_forward_hook(
            lambda _m, _i, out: out * value if self._in_replay and self.state.global_step == 2 else None)

    def _gere_replay_losses(self, model, replay):
        self._in_replay = True
        try:
            return super()._gere_replay_losses(model, replay)
        finally:
            self._in_replay = False


def _nan_trainer(out, store, nonfinite, loss, steps, bad="nan", **kw):
    args = _args(out, steps, **kw)
    return _NaNAtStep3(model=_model(), args=args, train_dataset=_lm_dataset(), bad=bad,
                       data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                       reference_states=ReferenceStates.open(store),
                       gere_config=GeReConfig(loss=loss, replay_per_step=4, nonfinite=nonfinite))


@pytest.mark.parametrize("loss,bad,terms", [("tm", "nan", "replay_ce, replay_term"), ("ce", "inf", "replay_ce")])
def test_nonfinite_replay_loss_stops_naming_step_and_term_and_keeps_last_checkpoint(workdir, loss, bad, terms):
    out, store = workdir
    trainer = _nan_trainer(out, store, "error", loss, steps=5, bad=bad, save_strategy="steps", save_steps=1)
    with pytest.raises(GeReTrainingError) as info:
        trainer.train()
    message = str(info.value)
    assert f"Non-finite loss at optimizer step 3 (micro-batch 1); offending term(s): {terms}." in message
    assert f"The last saved checkpoint in {out} is intact" in message and "nonfinite='skip'" in message
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    # The checkpoint from before the NaN loads, is finite, and is the weights the failed step started from.
    good = LlamaForCausalLM.from_pretrained(out / "checkpoint-2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    for (name, p), (_, q) in zip(good.named_parameters(), trainer.model.named_parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q.detach().cpu()), name


def test_nonfinite_skip_policy_counts_the_micro_batch_and_training_goes_on(workdir):
    out, store = workdir
    trainer = _nan_trainer(out, store, "skip", "tm", steps=4)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert [h.get("nonfinite_skipped", 0) for h in logs] == [0, 0, 1, 1]  # cumulative, like replay_samples_seen
    assert "replay_term" not in logs[2] and "replay_term" in logs[3]  # the skipped micro-batch logs no terms
    assert all(np.isfinite(h["loss"]) for h in logs) and trainer.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_replay_micro_batch_without_targets_is_not_a_nonfinite_loss(tmp_path):
    """One-token replay texts have no next-token target: their CE is 0/0, which is 0 by definition, not an error."""
    store = ReferenceStates.build(_model(), ReplaySet.from_texts(["x", "y"], TOK, max_length=48), str(tmp_path / "s"),
                                  progress=False)
    trainer = _trainer(tmp_path / "out", steps=2, reference_states=store,
                       gere_config=GeReConfig(loss="ce", replay_per_step=1))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["replay_ce"] for h in logs] == [0.0, 0.0] and "nonfinite_skipped" not in logs[-1]
    assert all(np.isfinite(h["loss"]) for h in logs)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_loss_logs_store_and_weights(tmp_path):
    """Two runs from scratch (store build included), TM loss, dynamic weight: bit-identical."""
    runs = []
    for name in ("a", "b"):
        trainer = _trainer(tmp_path / name, steps=3, gere_config=GeReConfig(
            replay_source=_replay_file(tmp_path / "replay.jsonl"), replay_num_samples=12, replay_max_length=48,
            replay_per_step=4, store_batch_size=4))
        trainer.train()
        logs = [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
                for h in trainer.state.log_history]
        runs.append((logs, trainer.model.state_dict(), data_files(tmp_path / name / "gere_store")))
    (logs_a, weights_a, store_a), (logs_b, weights_b, store_b) = runs
    assert len([h for h in logs_a if "replay_term" in h]) == 3
    assert logs_a == logs_b
    assert store_a == store_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# ----------------------------------------------------------------------------------------------------------------------
# A failing rank in a 2-process run
# ----------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_failing_rank_ends_every_process_within_60_seconds(tmp_path, store_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = {"out": str(out), "store": store_path, "fail_rank": 1, "fail_step": 2, "steps": 50}
    (out / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["timeout", "-s", "KILL", "200", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(TESTS_DIR, "workers", "reliability_worker.py"), str(out / "cfg.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output = proc.communicate(timeout=230)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ended = time.time()
    assert proc.returncode not in (0, -signal.SIGKILL, 137), output[-4000:]  # 137: `timeout` had to kill it
    failed = json.loads((out / "failed-rank1.json").read_text())
    assert ended - failed["time"] < 60, (ended - failed["time"], output[-4000:])
    assert "injected failure on rank 1 at step 3" in output
    # torchrun's failure table: both ranks ended with a non-zero exit code (rank 0 by SIGTERM or its own gloo error).
    codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*\n\s*exitcode\s*: (-?\d+)", output))
    assert set(codes) == {"0", "1"} and all(int(c) != 0 for c in codes.values()), (codes, output[-3000:])
    pids = [json.loads((out / f"pid-rank{r}.json").read_text())["pid"] for r in (0, 1)]
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a rank outlived the launcher"
    assert not (out / "finished-rank0.json").exists()  # rank 0 did not go on training alone


# ----------------------------------------------------------------------------------------------------------------------
# Safe loading: nothing gere_hf reads runs code
# ----------------------------------------------------------------------------------------------------------------------


def _package_sources() -> dict[str, str]:
    return {name: open(os.path.join(PACKAGE_DIR, name), encoding="utf-8").read()
            for name in sorted(os.listdir(PACKAGE_DIR)) if name.endswith(".py")}


def _calls(source: str, func: str) -> list[str]:
    """The argument text of every ``func(`` call in ``source`` (balanced parentheses)."""
    out = []
    for match in re.finditer(re.escape(func) + r"\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[match.end(): i - 1])
    return out


def test_package_source_never_unpickles_or_evaluates():
    sources = _package_sources()
    assert len(sources) > 10
    found = []
    for name, src in sources.items():
        code = "\n".join(line.split("#")[0] for line in src.splitlines())  # comments may mention pickle
        for pattern in (r"\bimport pickle\b", r"\bpickle\.", r"\bcloudpickle\b", r"\bdill\b", r"\bjoblib\b",
                        r"allow_pickle\s*=\s*True", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"\bmarshal\.",
                        r"trust_remote_code\s*=\s*True", r"\byaml\.unsafe_load\b", r"\byaml\.full_load\b",
                        r"Loader\s*=\s*yaml\.(Unsafe|Full)?Loader\b"):
            found += [f"{name}: {pattern}" for _ in re.finditer(pattern, code)]
        for args in _calls(code, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                found.append(f"{name}: torch.load({args}) without weights_only=True")
        for args in _calls(code, "yaml.load"):
            loader = re.search(r"Loader\s*=\s*([\w.]+)", args)
            if loader is None:
                found.append(f"{name}: yaml.load({args}) without a Loader")
                continue
            import importlib

            module = importlib.import_module(f"gere_hf.{name[:-3]}")
            import yaml

            cls = getattr(module, loader.group(1), None) or getattr(yaml, loader.group(1).split(".")[-1], None)
            if not (isinstance(cls, type) and issubclass(cls, yaml.SafeLoader)):
                found.append(f"{name}: yaml.load with {loader.group(1)}, not a yaml.SafeLoader")
    assert found == []


def test_trust_remote_code_is_off_unless_the_user_sets_it():
    import inspect

    from gere_hf import models
    from gere_hf.continual import adapters

    for func in (models.load_model_and_tokenizer, adapters.load_causal_lm, adapters.load_tokenizer):
        assert inspect.signature(func).parameters["trust_remote_code"].default is False, func
    for name, src in _package_sources().items():
        for func in ("from_pretrained", "AutoTokenizer.from_pretrained"):
            for args in _calls(src, func):
                tr = re.search(r"trust_remote_code\s*=\s*(\w+)", args)
                assert tr is None or tr.group(1) in ("trust_remote_code", "False"), (name, args)
