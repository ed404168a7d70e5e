# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Tests for the reference store (gere_hf.reference), checked against independent computations.

The reference for every label and statistic is a plain ``model(..., output_hidden_states=True)`` forward of each
replay sample on its own (no padding, no hook, fp32), reduced with float64 numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPLAY_TEXTS, TINY_HIDDEN, make_tiny_model, tree_snapshot

from gere_hf.fileio import file_blake2b
from gere_hf.losses import threshold_labels
from gere_hf.models import ensure_pad_token, find_final_norm
from gere_hf.reference import (
    BUILDING,
    FINGERPRINT_FIELDS,
    MANIFEST,
    ReferenceStates,
    ReferenceStatesError,
    ReferenceStatesMismatch,
    compute_fingerprint,
    pack_labels,
    unpack_labels,
)
from gere_hf.reference import builder as builder_module
from gere_hf.replay import ReplaySet

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
MAX_LENGTH = 48


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def build(model, replay, path, **kwargs):
    kwargs.setdefault("progress", False)
    return ReferenceStates.build(model, replay, str(path), **kwargs)


def direct_states(model, replay) -> list[np.ndarray]:
    """hidden_states[-1] of each sample alone, fp32, from the model's own output (not the store's hook)."""
    out = []
    with torch.no_grad():
        for ids in replay.input_ids:
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
            assert hs.dtype == torch.float32
            out.append(hs[0].numpy())
    return out


def data_files(path) -> dict[str, bytes]:
    """Every file of a store except the manifest, by name."""
    return {
        name: open(os.path.join(path, name), "rb").read()
        for name in sorted(os.listdir(path))
        if os.path.isfile(os.path.join(path, name)) and name != MANIFEST
    }


def manifest_without_build(path) -> dict:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    manifest.pop("build")
    return manifest


def count_forwards(model) -> list:
    """Record the batch shape of every forward through the final norm; returns the list and keeps the hook."""
    calls = []
    _, norm = find_final_norm(model)
    norm.register_forward_hook(lambda _m, _i, out: calls.append(tuple(out.shape[:2])))
    return calls


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One store of the tiny model (batch 8, several chunks), shared read-only by the tests that copy it."""
    from transformers import ByT5Tokenizer

    torch.set_num_threads(1)
    replay = ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(), max_length=MAX_LENGTH)
    path = tmp_path_factory.mktemp("store") / "store"
    build(make_tiny_model(), replay, path, batch_size=8, chunk_size=16)
    return path, replay


@pytest.fixture
def store_copy(built, tmp_path):
    path, replay = built
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst, replay


# ----------------------------------------------------------------------------------------------------------------------
# 2-bit packing
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 31, 32, 1001])
def test_pack_unpack_roundtrip(numel):
    labels = torch.randint(-1, 2, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.int8)
    packed = pack_labels(labels)
    assert packed.dtype == np.uint8 and packed.size == (numel + 3) // 4
    # Independent decoding: element j lives in bits 2*(j % 4) of byte j // 4; code 3 is −1.
    decoded = [((int(packed[j // 4]) >> (2 * (j % 4))) & 3) for j in range(numel)]
    assert [{0: 0, 1: 1, 3: -1}[c] for c in decoded] == labels.tolist()
    assert torch.equal(unpack_labels(torch.from_numpy(packed), numel), labels)


# ----------------------------------------------------------------------------------------------------------------------
# What is stored
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_labels_and_statistics_match_direct_forward(tiny_model, replay, tmp_path, k):
    store = build(tiny_model, replay, tmp_path / "s", k=k, batch_size=1)
    states = direct_states(tiny_model, replay)

    # Statistics: float64 numpy over all non-padding tokens, population std as sqrt(E[x²] − mean²).
    flat = np.concatenate(states).astype(np.float64)
    assert flat.shape == (replay.num_tokens, TINY_HIDDEN)
    mean = flat.mean(0)
    std = np.sqrt((flat * flat).mean(0) - mean * mean)
    assert store.count == replay.num_tokens
    np.testing.assert_allclose(store.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(store.std.numpy(), std, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(store.std.numpy(), flat.std(0), rtol=1e-6)  # the two-pass population std
    np.testing.assert_allclose(store.lower.numpy(), (mean - k * std).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(store.upper.numpy(), (mean + k * std).astype(np.float32), rtol=1e-6)
    assert store.k == k and store.manifest["k"] == k

    # Labels: threshold_labels of the direct fp32 states with the store's own thresholds, for every sample.
    assert len(store) == len(replay)
    counts = np.zeros(3)
    for i, h in enumerate(states):
        expected = threshold_labels(torch.from_numpy(h), store.lower, store.upper)
        got = store.labels(i)
        assert got.dtype == torch.int8 and got.shape == (replay.lengths[i], TINY_HIDDEN)
        assert torch.equal(got, expected), f"sample {i}: {(got != expected).sum()} labels differ"
        assert store.input_ids(i).tolist() == replay.input_ids[i]
        counts += np.bincount((got.reshape(-1).long() + 1).numpy(), minlength=3)
    fractions = store.manifest["label_fractions"]
    np.testing.assert_allclose(
        [fractions["negative"], fractions["neutral"], fractions["positive"]], counts / counts.sum(), atol=1e-12
    )
    assert 0 < fractions["negative"] < 0.5 and 0 < fractions["positive"] < 0.5


def test_extras_hidden_and_topk_match_direct_forward(tiny_model, replay, tmp_path):
    store = build(tiny_model, replay, tmp_path / "s", batch_size=8, extras=("hidden", "topk"), topk=5)
    with torch.no_grad():
        for i, ids in enumerate(replay.input_ids):
            out = tiny_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            h = out.hidden_states[-1][0]
            torch.testing.assert_close(store.hidden(i).float(), h.half().float(), atol=2e-3, rtol=2e-3)
            lp_direct = torch.log_softmax(out.logits[0].float(), dim=-1)
            lp, idx = store.topk_teacher(i)
            assert lp.shape == idx.shape == (len(ids), 5)
            torch.testing.assert_close(lp, lp_direct.topk(5, dim=-1).values, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lp, lp_direct.gather(-1, idx), atol=1e-5, rtol=1e-5)


def test_bytes_on_disk_bound(store_copy):
    """Bound: bytes(all files) ≤ ⌈2·T·H/8⌉ + N + 2·T + 24·(N+1) + 64·H + 16 KiB.

    The labels take 2 bits per (token, hidden) element, rounded up to a byte per sample (≤ N bytes); the token ids
    take 2 bytes per token (uint16: the tiny vocabulary has 384 entries); the index 3 int64 per sample; the statistics 8 arrays of H values; the manifest and the
    safetensors headers fit in 16 KiB. The 2-bit part is the only one that grows with T·H.
    """
    path, replay = store_copy
    store = ReferenceStates.open(str(path))
    t, h, n = replay.num_tokens, TINY_HIDDEN, len(replay)
    sizes = {name: os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)}
    assert sizes["labels.bin"] == sum((length * h + 3) // 4 for length in replay.lengths)
    assert sizes["labels.bin"] <= -(-2 * t * h // 8) + n
    assert sizes["tokens.bin"] == 2 * t and store.manifest["token_dtype"] == "uint16"
    total = sum(sizes.values())
    assert total <= -(-2 * t * h // 8) + n + 2 * t + 24 * (n + 1) + 64 * h + 16 * 1024, sizes
    assert store.manifest["bytes_on_disk"] == total - sizes[MANIFEST]
    assert store.manifest["official_fp32_bytes"] == 4 * t * h
    assert store.manifest["bits_per_element"] == pytest.approx(8 * sizes["labels.bin"] / (t * h))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_build_equals_batch_size_one(replay, tmp_path, attn):
    """Right padding changes nothing but float32 rounding, with either attention (no need to force eager)."""
    tiny_model = make_tiny_model(attn_implementation=attn)
    assert tiny_model.config._attn_implementation == attn
    one = build(tiny_model, replay, tmp_path / "bs1", batch_size=1)
    eight = build(tiny_model, replay, tmp_path / "bs8", batch_size=8)
    a, b = data_files(one.path), data_files(eight.path)
    for name in ("labels.bin", "tokens.bin", "index.safetensors"):
        assert a[name] == b[name], name
    for name in ("mean", "std", "lower", "upper"):
        np.testing.assert_allclose(getattr(one, name).numpy(), getattr(eight, name).numpy(), rtol=0, atol=1e-6)
    assert one.count == eight.count


def test_existing_store_is_reused_without_forwards(built, tiny_model):
    path, replay = built
    calls = count_forwards(tiny_model)
    store = build(tiny_model, replay, path, batch_size=8, chunk_size=16)
    assert calls == [] and len(store) == len(replay)


# ----------------------------------------------------------------------------------------------------------------------
# Resumable, atomic build
# ----------------------------------------------------------------------------------------------------------------------

_KILL_SCRIPT = """
import os, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import torch
torch.set_num_threads(1)
from transformers import ByT5Tokenizer
from conftest import REPLAY_TEXTS, make_tiny_model
from gere_hf.models import find_final_norm
from gere_hf.reference import ReferenceStates
from gere_hf.replay import ReplaySet

model = make_tiny_model()
_, norm = find_final_norm(model)
norm.register_forward_hook(lambda *_: time.sleep(0.4))  # slow enough to be killed between chunks
replay = ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(), max_length={max_length})
print("started", flush=True)
ReferenceStates.build(model, replay, {out!r}, batch_size=2, chunk_size=2, progress=False)
print("finished", flush=True)
"""


def test_build_killed_midway_resumes_byte_identical(tiny_model, replay, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "build.py"
    script.write_text(_KILL_SCRIPT.format(tests=TESTS_DIR, root=REPO_ROOT, max_length=MAX_LENGTH, out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    work = out / BUILDING
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            done = sorted(work.glob("chunk-*.stats.safetensors")) if work.is_dir() else []
            if len(done) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        output = proc.communicate()[0].decode()
    num_chunks = -(-len(replay) // 2)
    done = len(list(work.glob("chunk-*.stats.safetensors")))
    assert "finished" not in output and proc.returncode == -signal.SIGKILL, output
    assert 3 <= done < num_chunks, (done, output)

    # Killed: never opened as complete.
    assert not ReferenceStates.is_store(str(out))
    with pytest.raises(ReferenceStatesError, match="incomplete"):
        ReferenceStates.open(str(out))

    # No hidden states ever reach the disk: the recorded chunks left their statistics, nothing else.
    names = sorted(p.name for p in work.iterdir() if not p.name.endswith(".tmp"))
    assert names == [f"chunk-{c:05d}.stats.safetensors" for c in range(done)] + ["plan.json"]

    # Resume in-process: the missing chunks are forwarded for their statistics (and keep their states), the chunks
    # recorded before the kill once more for their labels (their states were on the device only). One batch each.
    calls = count_forwards(tiny_model)
    resumed = build(tiny_model, replay, out, batch_size=2, chunk_size=2)
    assert resumed.manifest["build"]["forwards"] == {"statistics": num_chunks - done, "labels": done, "padding": 0}
    assert len(calls) == num_chunks
    assert not (out / BUILDING).exists()

    fresh = build(make_tiny_model(), replay, tmp_path / "fresh", batch_size=2, chunk_size=2)
    assert data_files(resumed.path) == data_files(fresh.path)
    assert manifest_without_build(resumed.path) == manifest_without_build(fresh.path)


def test_build_failure_after_some_chunks_then_resume(tiny_model, replay, tmp_path):
    out = tmp_path / "s"
    _, norm = find_final_norm(tiny_model)
    seen = []

    def fail_on_fourth(*_):
        seen.append(1)
        if len(seen) == 4:
            raise RuntimeError("injected failure")

    handle = norm.register_forward_hook(fail_on_fourth)
    with pytest.raises(RuntimeError, match="injected"):
        build(tiny_model, replay, out, batch_size=4, chunk_size=4)
    handle.remove()
    assert (out / BUILDING).is_dir() and not (out / MANIFEST).exists()
    assert len(list((out / BUILDING).glob("chunk-*.stats.safetensors"))) == 3
    with pytest.raises(ReferenceStatesError, match="interrupted"):
        ReferenceStates.open(str(out))

    calls = count_forwards(tiny_model)
    resumed = build(tiny_model, replay, out, batch_size=4, chunk_size=4)
    num_chunks = len(replay) // 4
    assert resumed.manifest["build"]["forwards"] == {"statistics": num_chunks - 3, "labels": 3, "padding": 0}
    assert len(calls) == num_chunks
    fresh = build(make_tiny_model(), replay, tmp_path / "fresh", batch_size=4, chunk_size=4)
    assert data_files(resumed.path) == data_files(fresh.path)
    assert manifest_without_build(resumed.path) == manifest_without_build(fresh.path)


def test_interrupted_resume_with_other_settings_starts_afresh(tiny_model, replay, tmp_path):
    out = tmp_path / "s"
    _, norm = find_final_norm(tiny_model)

    def fail(*_):
        raise RuntimeError("injected failure")

    handle = norm.register_forward_hook(fail)
    with pytest.raises(RuntimeError):
        build(tiny_model, replay, out, batch_size=4, chunk_size=4)
    handle.remove()
    store = build(tiny_model, replay, out, batch_size=4, chunk_size=4, k=0.5)  # other k: the old plan is dropped
    fresh = build(make_tiny_model(), replay, tmp_path / "fresh", batch_size=4, chunk_size=4, k=0.5)
    assert data_files(store.path) == data_files(fresh.path)


def test_interrupted_assembly_of_a_rebuild_is_not_complete(store_copy, monkeypatch):
    """A rebuild that dies while moving the final files leaves no manifest: never an old/new mixture."""
    path, replay = store_copy
    before = data_files(path)
    real = builder_module.file_blake2b
    calls = []

    def die_on_second(p):
        calls.append(p)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of assembly
        return real(p)

    monkeypatch.setattr(builder_module, "file_blake2b", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        build(make_tiny_model(), replay, path, batch_size=8, chunk_size=16, rebuild=True)
    monkeypatch.setattr(builder_module, "file_blake2b", real)
    assert not ReferenceStates.is_store(str(path))
    with pytest.raises(ReferenceStatesError, match="incomplete"):
        ReferenceStates.open(str(path))
    resumed = build(make_tiny_model(), replay, path, batch_size=8, chunk_size=16)
    assert data_files(resumed.path) == before


# ----------------------------------------------------------------------------------------------------------------------
# Distributed build
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_torchrun_build_equals_single_process(tiny_model, replay, tmp_path):
    out, logs = tmp_path / "dist", tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(TESTS_DIR, "workers", "dist_build_worker.py"), "--out", str(out), "--log-dir", str(logs),
           "--max-length", str(MAX_LENGTH), "--batch-size", "3", "--chunk-size", "5"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)]

    single = build(tiny_model, replay, tmp_path / "single", batch_size=3, chunk_size=5)
    assert data_files(out) == data_files(single.path)
    assert manifest_without_build(out) == manifest_without_build(single.path)

    # The work was split (chunk c on rank c % 2), and only rank 0 wrote the manifest.
    num_chunks = -(-len(replay) // 5)
    for r, record in enumerate(ranks):
        assert record["world"] == 2 and record["num_samples"] == len(replay)
        assert record["fingerprint"] == single.fingerprint
        chunks = sorted({name.split("/")[1][:11] for name in record["writes"] if name.startswith(f"{BUILDING}/chunk-")})
        assert chunks == [f"chunk-{c:05d}" for c in range(num_chunks) if c % 2 == r]
    # 24 samples in chunks of 5: rank 0 has 3 chunks (6 batches of 3), rank 1 has 2 (4 batches); under a sharded
    # model (ZeRO-3, FSDP) every forward is collective, so rank 1 pads with 2 empty forwards.
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == 6
    assert MANIFEST in ranks[0]["writes"]
    assert not [name for name in ranks[1]["writes"] if not name.startswith(f"{BUILDING}/chunk-")]


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprint and integrity
# ----------------------------------------------------------------------------------------------------------------------


def _changed(field, tokenizer, replay):
    """(model, replay, k) that differ from the built store in ``field``, and the fields expected to differ."""
    from transformers import ByT5Tokenizer

    if field == "model_config":
        return make_tiny_model(rms_norm_eps=1e-3), replay, 1.0, {"model_config"}
    if field == "model_weights":
        return make_tiny_model(seed=1), replay, 1.0, {"model_weights"}
    if field == "tokenizer":  # the same ids, but another vocabulary: the tokens could differ, so does the replay hash
        other = ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(extra_ids=0), max_length=MAX_LENGTH)
        assert other.input_ids == replay.input_ids
        return make_tiny_model(), other, 1.0, {"tokenizer", "replay"}
    if field == "replay":
        return make_tiny_model(), ReplaySet.from_texts(REPLAY_TEXTS[1:], tokenizer, MAX_LENGTH), 1.0, {"replay"}
    if field == "max_length":
        return make_tiny_model(), ReplaySet.from_texts(REPLAY_TEXTS, tokenizer, MAX_LENGTH - 8), 1.0, {"max_length", "replay"}
    if field == "k":
        return make_tiny_model(), replay, 2.0, {"k"}
    if field == "precision":  # the same fp32 model, recorded under bf16 autocast as a bf16=True run trains
        return make_tiny_model(), replay, 1.0, {"precision"}
    raise AssertionError(field)


@pytest.mark.parametrize("field", [f for f in FINGERPRINT_FIELDS if f != "layer"])
def test_fingerprint_field_mismatch(store_copy, tokenizer, field):
    path, replay = store_copy
    model, other_replay, k, expected = _changed(field, tokenizer, replay)
    dtype = "bf16" if field == "precision" else None
    before = tree_snapshot(path)
    with pytest.raises(ReferenceStatesMismatch) as info:
        build(model, other_replay, path, k=k, batch_size=8, chunk_size=16, dtype=dtype)
    assert set(info.value.differences) == expected
    assert f"  {field}: store has" in str(info.value) and "rebuild" in str(info.value).lower()
    with pytest.raises(ReferenceStatesMismatch, match=field):
        ReferenceStates.open(str(path), compute_fingerprint(model, other_replay, k, precision=dtype))
    assert tree_snapshot(path) == before  # a refused build touches nothing


def test_fingerprint_layer_mismatch(store_copy):
    """No second architecture at hand has another final-norm path: fake it by editing the manifest."""
    path, replay = store_copy
    manifest_path = path / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["fingerprint"]["layer"] == "model.norm"
    manifest["fingerprint"]["layer"] = "transformer.ln_f"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ReferenceStatesMismatch) as info:
        ReferenceStates.open(str(path), compute_fingerprint(make_tiny_model(), replay, 1.0))
    assert set(info.value.differences) == {"layer"} and "layer" in str(info.value)


def test_fingerprint_fields_subset_skips_model_weights(store_copy):
    """The trainer opens `base` stores without model_weights: later stages fine-tune the weights."""
    path, replay = store_copy
    tuned = compute_fingerprint(make_tiny_model(seed=1), replay, 1.0)
    with pytest.raises(ReferenceStatesMismatch):
        ReferenceStates.open(str(path), tuned)
    fields = [f for f in FINGERPRINT_FIELDS if f != "model_weights"]
    assert len(ReferenceStates.open(str(path), tuned, fields=fields)) == len(replay)


def test_rebuild_replaces_a_mismatched_store(store_copy, tmp_path):
    path, replay = store_copy
    store = build(make_tiny_model(), replay, path, k=2.0, batch_size=8, chunk_size=16, rebuild=True)
    assert store.k == 2.0
    fresh = build(make_tiny_model(), replay, tmp_path / "fresh", k=2.0, batch_size=8, chunk_size=16)
    assert data_files(path) == data_files(fresh.path)


def test_truncated_file_is_reported(store_copy):
    path, _ = store_copy
    labels = path / "labels.bin"
    labels.write_bytes(labels.read_bytes()[:-1])
    for verify in (True, False):  # the size check needs no checksum
        with pytest.raises(ReferenceStatesError, match=r"labels\.bin is truncated or altered"):
            ReferenceStates.open(str(path), verify=verify)


def test_corrupted_byte_is_reported(store_copy):
    path, _ = store_copy
    labels = path / "labels.bin"
    data = bytearray(labels.read_bytes())
    data[len(data) // 2] ^= 0xFF
    labels.write_bytes(bytes(data))
    with pytest.raises(ReferenceStatesError, match=r"labels\.bin is corrupted: its checksum"):
        ReferenceStates.open(str(path))
    ReferenceStates.open(str(path), verify=False)  # documented: without verify only sizes are checked


def test_missing_file_and_not_a_store(store_copy, tmp_path):
    path, _ = store_copy
    os.remove(path / "tokens.bin")
    with pytest.raises(ReferenceStatesError, match="lacks tokens.bin"):
        ReferenceStates.open(str(path))
    with pytest.raises(ReferenceStatesError, match="not a reference store"):
        ReferenceStates.open(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------------------------------------------------
# PEFT: reference="base" records the base model under its adapters
# ----------------------------------------------------------------------------------------------------------------------


def test_peft_base_reference_records_the_base_model(replay, tmp_path):
    from peft import LoraConfig, get_peft_model

    plain = make_tiny_model()
    peft_model = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.eval()
    ids = torch.tensor([replay.input_ids[0]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        base = plain(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert (adapted - base).abs().max() > 1e-2  # the adapter really changes the activations

    plain_store = build(plain, replay, tmp_path / "plain", batch_size=8)
    peft_store = build(peft_model, replay, tmp_path / "peft", batch_size=8, reference="base")
    assert data_files(peft_store.path) == data_files(plain_store.path)
    assert peft_store.fingerprint == plain_store.fingerprint == compute_fingerprint(plain, replay, 1.0)
    with torch.no_grad():  # the adapters are back on after the build
        torch.testing.assert_close(peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1], adapted)

    current = build(peft_model, replay, tmp_path / "current", batch_size=8, reference="current")
    assert data_files(current.path)["labels.bin"] != data_files(plain_store.path)["labels.bin"]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any work, nothing on disk damaged
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k .* must be > 0"),
        ({"k": -1.0}, "k .* must be > 0"),
        ({"k": float("nan")}, "k .* must be > 0"),
        ({"batch_size": 0}, "batch_size and chunk_size must be ≥ 1"),
        ({"extras": ("logits",)}, "Unknown extras"),
        ({"reference": "teacher"}, "reference must be 'base' or 'current'"),
    ],
)
def test_bad_build_arguments(tiny_model, replay, tmp_path, kwargs, message):
    calls = count_forwards(tiny_model)
    with pytest.raises(ReferenceStatesError, match=message):
        build(tiny_model, replay, tmp_path / "s", **kwargs)
    assert calls == [] and not (tmp_path / "s").exists()


def test_model_without_final_norm(replay, tmp_path):
    from gere_hf.models import UnsupportedModelError

    class NoNormLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="NoNormLM"):
        build(NoNormLM(), replay, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_output_directory_holding_something_else(tiny_model, replay, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree_snapshot(out)
    calls = count_forwards(tiny_model)
    with pytest.raises(ReferenceStatesError, match="holds something other than a reference store.*notes.txt"):
        build(tiny_model, replay, out)
    assert calls == [] and tree_snapshot(out) == before and sorted(os.listdir(out)) == ["notes.txt", "sub"]


def test_empty_replay_set(tiny_model, replay, tmp_path):
    empty = ReplaySet([], [], MAX_LENGTH, replay.tokenizer_hash)
    with pytest.raises(ReferenceStatesError, match="empty"):
        build(tiny_model, empty, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_tokenizer_without_pad_token(tokenizer, tiny_model, tmp_path, caplog):
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    # The store pads internally and never needs the tokenizer's pad token.
    store = build(tiny_model, ReplaySet.from_texts(REPLAY_TEXTS[:6], tokenizer, MAX_LENGTH), tmp_path / "s")
    assert len(store) == 6
    with caplog.at_level("WARNING", logger="gere_hf.models"):
        ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert "no pad token" in caplog.text and "</s>" in caplog.text
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        ensure_pad_token(tokenizer)


# ----------------------------------------------------------------------------------------------------------------------
# Token width, format versions, KL extras
# ----------------------------------------------------------------------------------------------------------------------


def test_every_rank_plans_the_same_number_of_forwards():
    """The forward-count plan of a multi-process build (what sharded models need: every forward gathers weights)."""
    from gere_hf.reference import ChunkPlan, padding_forwards_per_rank

    plan = ChunkPlan.make([10] * 24, batch_size=3, chunk_size=5)  # 5 chunks: 5, 5, 5, 5, 4 samples -> 2 batches each
    todo = [[c for c in range(5) if c % 2 == r] for r in range(2)]
    assert padding_forwards_per_rank(plan, todo) == [0, 2]
    assert padding_forwards_per_rank(plan, [[0, 1], []]) == [0, 4]  # a rank whose chunks are all done (resumed)
    assert padding_forwards_per_rank(plan, [list(range(5))]) == [0]


def test_token_ids_use_the_narrowest_width_that_holds_the_vocabulary():
    from gere_hf.reference import token_dtype_for

    assert token_dtype_for(384) == np.uint16 and token_dtype_for(2**16) == np.uint16
    assert token_dtype_for(2**16 + 1) == np.int32 and token_dtype_for(128_256) == np.int32  # Llama-3


def test_a_format_1_store_still_opens(store_copy, caplog):
    """Stores written before format 2 hold int32 ids and no precision: they open, read the same ids, and say that
    their precision cannot be checked."""
    path, replay = store_copy
    manifest = json.loads((path / MANIFEST).read_text())
    ids = np.fromfile(path / "tokens.bin", dtype=np.uint16).astype(np.int32)
    ids.tofile(path / "tokens.bin")
    manifest["format_version"] = 1
    for key in ("token_dtype", "precision"):
        manifest.pop(key)
    manifest["fingerprint"].pop("precision")
    manifest["files"]["tokens.bin"] = {"bytes": ids.nbytes, "blake2b": file_blake2b(str(path / "tokens.bin"))}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        store = ReferenceStates.open(str(path), compute_fingerprint(make_tiny_model(), replay, 1.0))
    assert "does not record precision" in caplog.text
    assert [store.input_ids(i).tolist() for i in range(len(replay))] == replay.input_ids


@pytest.mark.parametrize("change", [{"topk": 4}, {"topk_temperature": 4.0}])
def test_kl_extras_built_for_another_topk_or_temperature_are_refused(tiny_model, replay, tmp_path, change):
    """A T=1 teacher is not a T=4 teacher: the store's top-k settings are checked like its fingerprint."""
    path = tmp_path / "kl"
    build(tiny_model, replay, path, extras=("topk",), topk=8, topk_temperature=1.0)
    before = tree_snapshot(path)
    settings = {"topk": 8, "topk_temperature": 1.0, **change}
    with pytest.raises(ReferenceStatesMismatch, match=next(iter(change))):
        build(tiny_model, replay, path, extras=("topk",), **settings)
    with pytest.raises(ReferenceStatesMismatch, match=next(iter(change))):
        ReferenceStates.open(str(path)).require_extras(("topk",), settings["topk"], settings["topk_temperature"])
    assert tree_snapshot(path) == before
    build(tiny_model, replay, path, extras=("topk",), rebuild=True, **settings)
    assert ReferenceStates.open(str(path)).topk == settings["topk"]
