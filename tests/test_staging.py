"""The worker's transfers (``execution.staging``): stored bytes in, merged blocks out, one code path.

On the CPU the staged path must give the bytes of the plain one (convert each row block from the
memory map into a fresh fp32 tensor, add the update, cast); host buffers are reused only once
nobody holds them.  On CUDA (``gpu``) the device path must equal the CPU's within fp32 rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from streammerge import InputSpec, Recipe, build_plan, run_plan
from streammerge.execution import dense_rows, staging, worker
from streammerge.io.reader import CheckpointReader, open_checkpoint
from streammerge.io.writer import save_tensors
from streammerge.methods import LowRankUpdate
from tests.helpers import read_model
from tools.synthetic import PRESETS, write_adapter, write_model


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("staging")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=120_000)
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "up_proj"))]
    return root, base, adapters


def _plain_blocks(merger: worker.TensorMerger, job) -> list[torch.Tensor]:
    """The worker's blocks as computed before staging: fresh fp32 rows from the map, addmm_, cast."""
    result, base, transposed = merger.merge_update(job)
    assert base is None and not transposed
    update = result.update
    assert isinstance(update, LowRankUpdate)
    reader = merger.readers.get(job.source_file)
    blocks = []
    for start, stop in worker.row_blocks(job.shape):
        block = reader.read_rows(job.source, start, stop, torch.float32)
        block.addmm_(update.up[start:stop], update.down)
        blocks.append(block.to(torch.bfloat16))
    return blocks


@pytest.mark.parametrize("method", ["task_arithmetic", "do_merging"])
def test_cpu_staging_gives_the_bytes_of_the_plain_path(world, method, monkeypatch):
    root, base, adapters = world
    monkeypatch.setattr(dense_rows, "rows_per_block", lambda shape: 5)  # many blocks, one work buffer
    plan = build_plan(Recipe(base=str(base), inputs=tuple(InputSpec(str(a)) for a in adapters), method=method,
                             params=(("steps", 20),) if method == "do_merging" else (), device="cpu"))
    readers = worker.Readers()
    merger = worker.TensorMerger(plan, torch.device("cpu"), readers)
    merged = [job for job in plan.tensors if job.contributions]
    assert len(merged) >= 6
    try:
        for job in merged:
            staged, _ = merger.merged_blocks(job)
            ours = [b.clone() for b in staged]  # the pool reuses buffers once a block is dropped
            expected = _plain_blocks(merger, job)
            assert len(ours) == len(expected) > 1
            for a, b in zip(ours, expected):
                assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16)), job.name
    finally:
        readers.close()


def test_host_buffers_are_reused_only_once_released():
    pool = staging.HostBufferPool(capacity=1024, size=2)
    a = pool.empty((4, 8), torch.float32)
    a_ptr = a.data_ptr()
    b = pool.empty((4, 8), torch.bfloat16)
    assert b.data_ptr() != a_ptr
    c = pool.empty((2, 2), torch.float32)  # both busy, pool full: a fresh tensor
    assert c.data_ptr() not in (a_ptr, b.data_ptr())
    held = a.view(-1)[3:].numpy()  # the writer's NumPy view of a block keeps its buffer busy
    del a
    assert pool.empty((4, 8), torch.float32).data_ptr() != a_ptr
    del held
    again = pool.empty((4, 8), torch.float32)
    assert again.data_ptr() == a_ptr, "released: reused"
    assert pool.empty((2048,), torch.uint8).numel() == 2048, "larger than a buffer: a fresh tensor"
    assert pool.empty((0, 8), torch.float32).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_load_converts_the_stored_bytes_like_the_reader(tmp_path, dtype):
    values = (torch.randn(7, 5) * 3).to(dtype)
    save_tensors(tmp_path / "t.safetensors", {"w": values})
    stage = staging.Staging(torch.device("cpu"))
    with CheckpointReader(open_checkpoint(tmp_path / "t.safetensors")) as reader:
        with reader.stored_rows("w", 2, 6) as view:
            assert view.dtype == dtype
            rows = stage.load(view, work=True)
        assert torch.equal(rows, reader.read_rows("w", 2, 6, torch.float32))
        with reader.stored_rows("w", 0) as view:
            whole = stage.load(view)
        assert torch.equal(whole, values.float())
    out = stage.unload(whole, torch.bfloat16).result()
    assert torch.equal(out, whole.to(torch.bfloat16))
    assert list(stage.host_blocks([staging.Pending(out)])) == [out]


def test_engine_output_is_unchanged_by_the_pool_size(world, tmp_path, monkeypatch):
    """A pool too small to hold every block in flight falls back to fresh tensors: same bytes."""
    root, base, adapters = world
    recipe = Recipe(base=str(base), inputs=tuple(InputSpec(str(a)) for a in adapters), device="cpu")
    run_plan(build_plan(recipe), tmp_path / "pooled")
    monkeypatch.setattr(staging, "HOST_BUFFERS", 0)
    run_plan(build_plan(recipe), tmp_path / "fresh")
    pooled, fresh = read_model(tmp_path / "pooled"), read_model(tmp_path / "fresh")
    for name, tensor in fresh.items():
        assert np.array_equal(tensor.view(torch.int16).numpy(), pooled[name].view(torch.int16).numpy()), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_matches_the_cpu(world, tmp_path):
    root, base, adapters = world
    for device in ("cpu", "cuda"):
        recipe = Recipe(base=str(base), inputs=tuple(InputSpec(str(a)) for a in adapters), device=device)
        run_plan(build_plan(recipe), tmp_path / device)
    cpu, cuda = read_model(tmp_path / "cpu"), read_model(tmp_path / "cuda")
    for name, tensor in cpu.items():
        torch.testing.assert_close(cuda[name].float(), tensor.float(), rtol=1e-2, atol=1e-3, msg=name)


def test_do_merging_merges_tensors_ahead_in_batches(world, tmp_path, monkeypatch):
    """The engine hands the worker each unit's tensors; DO-Merging then merges several per call
    (``merge_many``), and the output equals one tensor per call up to fp32 reassociation."""
    root, base, adapters = world
    recipe = Recipe(base=str(base), inputs=tuple(InputSpec(str(a)) for a in adapters), method="do_merging",
                    params=(("steps", 30),), device="cpu")
    plan = build_plan(recipe)
    batches: list[int] = []
    method = worker.get_method("do_merging")
    original = method.merge_many

    def counting(batch, params):
        batches.append(len(batch))
        return original(batch, params)

    monkeypatch.setattr(worker, "get_method", lambda name: dataclasses.replace(method, merge_many=counting))
    run_plan(plan, tmp_path / "ahead")
    merged = sum(1 for job in plan.tensors if job.contributions)
    assert sum(batches) == merged and max(batches) > 4, batches
    batches.clear()
    monkeypatch.setattr(worker, "LOOKAHEAD_BYTES", 0)  # a window of one tensor
    run_plan(plan, tmp_path / "alone")
    assert batches == [1] * merged
    ahead, alone = read_model(tmp_path / "ahead"), read_model(tmp_path / "alone")
    for name, tensor in alone.items():
        torch.testing.assert_close(ahead[name].float(), tensor.float(), rtol=8e-3, atol=1e-6, msg=name)


def test_next_window_merges_on_the_lookahead_thread_with_the_same_bytes(world, tmp_path, monkeypatch):
    """While one window's tensors are written, the next window's ``merge_many`` runs on the lookahead
    thread; the windows and the bytes are those of merging every window in turn on the main thread."""
    import threading

    from streammerge.execution import lookahead

    root, base, adapters = world
    recipe = Recipe(base=str(base), inputs=tuple(InputSpec(str(a)) for a in adapters), method="do_merging",
                    params=(("steps", 30),), device="cpu")
    plan = build_plan(recipe)
    method = worker.get_method("do_merging")
    original = method.merge_many
    calls: list[tuple[str, tuple[str, ...]]] = []

    def recording(batch, params):
        calls.append((threading.current_thread().name, tuple(inputs.name for inputs in batch)))
        return original(batch, params)

    monkeypatch.setattr(worker, "get_method", lambda name: dataclasses.replace(method, merge_many=recording))
    monkeypatch.setattr(worker, "LOOKAHEAD_BYTES", 1)  # a window per tensor: many windows per unit
    run_plan(plan, tmp_path / "background")
    background = list(calls)
    calls.clear()
    monkeypatch.setattr(worker, "Lookahead", lambda _background: lookahead.Lookahead(background=False))
    run_plan(plan, tmp_path / "inline")
    assert [names for _, names in background] == [names for _, names in calls]  # the same windows
    assert {thread for thread, _ in calls} == {threading.main_thread().name}
    on_thread = [names for thread, names in background if thread.startswith("streammerge-lookahead")]
    assert len(on_thread) >= len(background) // 2 > 0 and len(background) > 8, background
    assert not any(t.name.startswith("streammerge-lookahead") for t in threading.enumerate())  # closed
    inline, ahead = read_model(tmp_path / "inline"), read_model(tmp_path / "background")
    for name, tensor in inline.items():
        assert torch.equal(ahead[name].view(torch.int16), tensor.view(torch.int16)), name
