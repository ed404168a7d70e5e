# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""The device-resident store build (gere_hf.reference): what it computes, what it keeps where, and how it resumes.

Every expected value comes from an independent computation: the build as it was before it moved onto the device
(fp32 states copied to the host, float64 numpy sums row by row, labels of the fp32 states), written out plainly here,
or ``threshold_labels`` of the final norm's output captured by the test's own hook.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from safetensors.numpy import load_file
from test_reference import build, data_files, manifest_without_build

from gere_hf import reference as reference_module
from gere_hf.losses import threshold_labels
from gere_hf.models import find_final_norm
from gere_hf.reference import BUILDING, ChunkPlan, ReferenceStates, pack_labels
from gere_hf.reference import builder as builder_module

pytestmark = pytest.mark.usefixtures("one_thread")


def store_the_previous_way(model, replay, batch_size: int, chunk_size: int, k: float = 1.0):
    """The statistics and labels.bin of the host-side build this one replaced, computed without gere_hf's builder."""
    plan = ChunkPlan.make(replay.lengths, batch_size, chunk_size)
    h = model.config.hidden_size
    captured = []
    handle = find_final_norm(model)[1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    states, chunk_sums = {}, []
    try:
        with torch.no_grad():
            for c in range(len(plan.chunks)):
                total, total_sq, count = np.zeros(h), np.zeros(h), 0
                for batch in plan.batches(c):
                    lengths = [replay.lengths[i] for i in batch]
                    ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for row, i in enumerate(batch):
                        ids[row, : lengths[row]] = torch.tensor(replay.input_ids[i])
                        mask[row, : lengths[row]] = 1
                    model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
                    hidden = captured[-1].float().cpu()
                    for row, i in enumerate(batch):
                        x = hidden[row, : lengths[row]]
                        states[i] = x
                        x64 = x.double()
                        total += x64.sum(0).numpy()
                        total_sq += (x64 * x64).sum(0).numpy()
                        count += lengths[row]
                chunk_sums.append((total, total_sq, count))
    finally:
        handle.remove()
    total, total_sq, count = np.zeros(h), np.zeros(h), 0
    for s, sq, n in chunk_sums:
        total, total_sq, count = total + s, total_sq + sq, count + n
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    std = np.sqrt(var)
    lower, upper = (mean - k * std).astype(np.float32), (mean + k * std).astype(np.float32)
    labels = b"".join(
        pack_labels(threshold_labels(states[i], torch.from_numpy(lower), torch.from_numpy(upper))).tobytes()
        for i in range(len(replay))
    )
    stats = {"count": np.array([count], dtype=np.int64), "sum": total, "sumsq": total_sq, "mean": mean, "var": var,
             "std": std, "lower": lower, "upper": upper}
    return stats, labels


@pytest.mark.parametrize("hidden_size, batch_size, chunk_size, k",
                         [(32, 8, 16, 1.0), (32, 3, 5, 0.5), (30, 4, 7, 1.0)])  # H = 30: samples packed one by one
def test_the_store_is_byte_identical_to_the_host_side_build(replay, tmp_path, hidden_size, batch_size, chunk_size, k):
    """On the CPU with an fp32 model: every float64 statistic and every label byte of the previous build."""
    model = make_tiny_model(hidden_size=hidden_size)
    expected_stats, expected_labels = store_the_previous_way(model, replay, batch_size, chunk_size, k)
    store = build(model, replay, tmp_path / "s", batch_size=batch_size, chunk_size=chunk_size, k=k)
    stats = load_file(os.path.join(store.path, "stats.safetensors"))
    assert sorted(stats) == sorted(expected_stats)
    for name, value in expected_stats.items():
        assert stats[name].dtype == value.dtype and np.array_equal(stats[name], value), name
    assert data_files(store.path)["labels.bin"] == expected_labels


def _chunk_state_bytes(replay, batch_size, chunk_size, hidden, itemsize=4) -> list[int]:
    plan = ChunkPlan.make(replay.lengths, batch_size, chunk_size)
    return [sum(replay.lengths[i] for i in chunk) * hidden * itemsize for chunk in plan.chunks]


def test_states_kept_on_the_device_or_forwarded_again_give_the_same_store(tiny_model, replay, tmp_path):
    """keep_states_bytes decides which chunks wait on the device for their labels and which are forwarded a second
    time; the store is the same either way."""
    sizes = _chunk_state_bytes(replay, 4, 5, tiny_model.config.hidden_size)
    num_chunks = len(sizes)
    kept = build(tiny_model, replay, tmp_path / "kept", batch_size=4, chunk_size=5)
    none = build(tiny_model, replay, tmp_path / "none", batch_size=4, chunk_size=5, keep_states_bytes=0)
    first = build(tiny_model, replay, tmp_path / "first", batch_size=4, chunk_size=5, keep_states_bytes=sizes[0])
    batches = [len(ChunkPlan.make(replay.lengths, 4, 5).batches(c)) for c in range(num_chunks)]
    assert kept.manifest["build"]["forwards"] == {"statistics": sum(batches), "labels": 0, "padding": 0}
    assert none.manifest["build"]["forwards"] == {"statistics": sum(batches), "labels": sum(batches), "padding": 0}
    # Only the first (longest) chunk fits: it is kept, the others are forwarded again.
    assert first.manifest["build"]["forwards"]["labels"] == sum(batches[1:])
    for other in (none, first):
        assert data_files(other.path) == data_files(kept.path)
        assert manifest_without_build(other.path) == manifest_without_build(kept.path)


def test_a_build_stopped_while_labelling_resumes_with_the_unlabelled_chunks(tiny_model, replay, tmp_path):
    """Stopped after every chunk was recorded, during pass 2: the resumed build forwards only the chunks that have
    no labels yet (their states were on the device only), none for statistics."""
    out = tmp_path / "s"
    real = builder_module.threshold_labels
    labelled = []

    def fail_on_third_chunk(*args):
        labelled.append(1)
        if len(labelled) == 3:
            raise RuntimeError("injected failure")
        return real(*args)

    builder_module.threshold_labels = fail_on_third_chunk
    try:
        with pytest.raises(RuntimeError, match="injected"):
            build(tiny_model, replay, out, batch_size=4, chunk_size=4)
    finally:
        builder_module.threshold_labels = real
    work = out / BUILDING
    num_chunks = len(replay) // 4
    assert len(list(work.glob("chunk-*.stats.safetensors"))) == num_chunks
    assert len(list(work.glob("chunk-*.labels.safetensors"))) == 2  # one piece per chunk here
    resumed = build(tiny_model, replay, out, batch_size=4, chunk_size=4)
    assert resumed.manifest["build"]["forwards"] == {"statistics": 0, "labels": num_chunks - 2, "padding": 0}
    fresh = build(make_tiny_model(), replay, tmp_path / "fresh", batch_size=4, chunk_size=4)
    assert data_files(resumed.path) == data_files(fresh.path)


def test_temporary_disk_stays_below_the_final_store(tiny_model, replay, tmp_path, monkeypatch):
    """What the build writes besides the final files (chunk labels and extras, copied into the final files, and each
    chunk's float64 sums with its file headers) stays within the finished store's size plus that bookkeeping: no
    hidden states go to disk, not even one chunk's in half precision (the issue's bound)."""
    out = tmp_path / "s"
    work = out / BUILDING
    finals = set(reference_module.STORE_FILES) | {n for names in reference_module.EXTRA_FILES.values() for n in names}
    peaks = []
    real = builder_module.atomic_write_bytes

    def measuring_write(path, data):
        real(path, data)
        if work.is_dir():
            peaks.append(sum(p.stat().st_size for p in work.iterdir() if p.name not in finals))

    monkeypatch.setattr(builder_module, "atomic_write_bytes", measuring_write)
    store = build(tiny_model, replay, out, batch_size=4, chunk_size=4, extras=("hidden",))
    assert len(peaks) > len(replay) // 4  # a measurement after every chunk file
    h, chunks = store.hidden_size, -(-len(replay) // 4)
    bookkeeping = chunks * (2 * 8 * h + 1024)  # float64 sum and sum of squares, safetensors headers; plan.json
    one_chunk_half_states = max(_chunk_state_bytes(replay, 4, 4, h, itemsize=2))
    assert bookkeeping < one_chunk_half_states  # the bound below would catch a chunk's states written to disk
    assert max(peaks) <= store.manifest["bytes_on_disk"] + bookkeeping, (max(peaks), store.manifest["bytes_on_disk"])


def _captured_states(model, replay, batch_size, chunk_size, **build_kwargs):
    """The build's own batches' final-norm outputs, per sample, captured by a second hook during ``build``."""
    plan = ChunkPlan.make(replay.lengths, batch_size, chunk_size)
    order = [i for c in range(len(plan.chunks)) for batch in plan.batches(c) for i in batch]
    batches = [batch for c in range(len(plan.chunks)) for batch in plan.batches(c)]
    outputs = []
    handle = find_final_norm(model)[1].register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
    try:
        store = build(model, replay, build_kwargs.pop("path"), batch_size=batch_size, chunk_size=chunk_size,
                      **build_kwargs)
    finally:
        handle.remove()
    states = {}
    for batch, out in zip(batches, outputs):
        for row, i in enumerate(batch):
            states[i] = out[row, : replay.lengths[i]]
    assert sorted(states) == sorted(order)
    return store, states


@pytest.mark.parametrize("precision", ["bf16 weights", "fp32 weights, bf16 autocast"])
def test_labels_of_a_half_precision_forward(replay, tmp_path, precision, capsys):
    """The build labels the states exactly as the forward produced them (never rounded on the way): equal to the
    labels of the captured states, element for element. Against an unpadded forward of each sample alone, labels
    differ only where padding moved a state across a threshold, i.e. within rounding of it; their share is printed."""
    model = make_tiny_model()
    dtype = None
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    else:
        dtype = "bf16"
    store, states = _captured_states(model, replay, 8, 16, path=tmp_path / "s", dtype=dtype)
    assert store.fingerprint["precision"] == "bfloat16"
    flips = near = total = 0
    for i in range(len(replay)):
        got = store.labels(i)
        assert torch.equal(got, threshold_labels(states[i], store.lower, store.upper)), i
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            alone = model(input_ids=torch.tensor([replay.input_ids[i]]), output_hidden_states=True).hidden_states[-1][0]
        alone_labels = threshold_labels(alone, store.lower, store.upper)
        differ = got != alone_labels
        flips += int(differ.sum())
        total += got.numel()
        if differ.any():
            batched, single = states[i].float()[differ], alone.float()[differ]
            low, high = torch.minimum(batched, single), torch.maximum(batched, single)
            columns = differ.nonzero()[:, 1]
            between = [((low <= t[columns]) & (t[columns] <= high)) for t in (store.lower, store.upper)]
            near += int((between[0] | between[1]).sum())
    assert near == flips  # every differing label has a threshold between its padded and its unpadded state
    with capsys.disabled():
        print(f"\n[{precision}] labels differing from an unpadded forward: {flips} of {total} ({flips / total:.2e}), "
              "all within rounding of a threshold")


def test_the_build_calls_the_module_so_its_own_hooks_run(replay, tmp_path, request):
    """Inside train() accelerate wraps ``model.forward`` in autocast and keeps ``_original_forward``; the build must
    call the module itself (FSDP2 gathers parameters in forward pre-hooks on it), at the precision it was asked for,
    and leave the wrapper in place afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    plain = build(make_tiny_model(), replay, tmp_path / "plain", batch_size=8)
    # AcceleratorState is a process-wide singleton: a Trainer built by an earlier test fixed its precision already.
    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    model = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(make_tiny_model())
    wrapped = model.forward
    assert "_original_forward" in model.__dict__
    pre_hooks = []
    model.register_forward_pre_hook(lambda _m, _a: pre_hooks.append(1))
    store = build(model, replay, tmp_path / "wrapped", batch_size=8)
    assert len(pre_hooks) == store.manifest["build"]["forwards"]["statistics"] > 0
    assert model.forward is wrapped
    # fp32 weights, no dtype asked: recorded at fp32, not under accelerate's bf16 autocast.
    assert data_files(store.path) == data_files(plain.path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_build_on_cuda_matches_the_cpu_build(replay, tmp_path):
    """The same fp32 model on a GPU: statistics within float32 rounding, labels equal except within rounding of a
    threshold (cuBLAS and CPU kernels round differently), packed bytes in the same layout."""
    cpu = build(make_tiny_model(), replay, tmp_path / "cpu", batch_size=8)
    model = make_tiny_model().cuda()
    gpu, states = _captured_states(model, replay, 8, 16, path=tmp_path / "gpu")
    np.testing.assert_allclose(gpu.mean.numpy(), cpu.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gpu.std.numpy(), cpu.std.numpy(), rtol=1e-4, atol=1e-5)
    for i in range(len(replay)):
        assert torch.equal(gpu.labels(i), threshold_labels(states[i].cpu(), gpu.lower, gpu.upper))
    assert ReferenceStates.open(gpu.path).num_tokens == cpu.num_tokens


def test_keep_states_bytes_must_not_be_negative(tiny_model, replay, tmp_path):
    with pytest.raises(reference_module.ReferenceStatesError, match="keep_states_bytes must be ≥ 0"):
        build(tiny_model, replay, tmp_path / "s", keep_states_bytes=-1)
    assert not (tmp_path / "s").exists()
