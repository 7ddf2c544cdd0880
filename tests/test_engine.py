"""The engine executes methods faithfully: every registered method through the streaming engine
equals the method applied directly to the whole base tensor, and row-block streaming changes no byte."""

from __future__ import annotations

import pytest
import torch

from streammerge import InputSpec, Recipe, budget, build_plan, engine, run_plan
from streammerge.methods import REGISTRY, LowRankUpdate, MergeInputs, apply_update
from tests.helpers import load_adapter_file, read_model
from tools.synthetic import PRESETS, write_adapter, write_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = write_model(root / "base", PRESETS["tiny"], "F32", seed=0, max_shard_size=120_000)
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "up_proj"))]
    return base, adapters


def _reference(base_dir, adapters, method_name, weights):
    """Each tensor: the method on the real fp32 base and fp32 factors, W0 + update, no engine."""
    method = REGISTRY[method_name]
    params = method.resolve_params({})
    base = read_model(base_dir)
    factors = [load_adapter_file(a) for a in adapters]
    expected = {}
    for name, w0 in base.items():
        module = "base_model.model." + name.removesuffix(".weight")
        updates, ws = [], []
        for i, f in enumerate(factors):
            if module + ".lora_A.weight" in f:
                a, b = f[module + ".lora_A.weight"], f[module + ".lora_B.weight"]
                updates.append(LowRankUpdate(up=b * 2.0, down=a))  # synthetic adapters: alpha = 2r
                ws.append(weights[i])
        if not updates:
            expected[name] = w0
            continue
        gen = torch.Generator().manual_seed(engine.tensor_seed(0, name))
        result = method.merge(MergeInputs(name, w0.float(), tuple(updates), tuple(ws), gen), params)
        expected[name] = apply_update(w0.float(), result.update).to(w0.dtype)
    return expected


@pytest.mark.parametrize("method_name", sorted(REGISTRY))
def test_engine_equals_method_on_whole_tensors(world, method_name, tmp_path):
    base_dir, adapters = world
    weights = [1.0, 0.5]
    recipe = Recipe(base=str(base_dir), inputs=tuple(InputSpec(str(a), weight=w) for a, w in zip(adapters, weights)),
                    method=method_name, device="cpu")
    run_plan(build_plan(recipe), tmp_path / "out")
    ours = read_model(tmp_path / "out")
    expected = _reference(base_dir, adapters, method_name, weights)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_row_block_streaming_matches_whole_tensors(world, tmp_path, monkeypatch):
    base_dir, adapters = world
    recipe = Recipe(base=str(base_dir), inputs=tuple(InputSpec(str(a)) for a in adapters), device="cpu")
    run_plan(build_plan(recipe), tmp_path / "whole")
    monkeypatch.setattr(budget, "BLOCK_BYTES", 3 * 64 * 4)  # three rows of a 64-wide fp32 tensor
    blocks = list(engine.row_blocks((128, 64)))
    assert len(blocks) == 43 and blocks[-1] == (126, 128)
    calls = []
    read_rows = engine.CheckpointReader.read_rows
    monkeypatch.setattr(engine.CheckpointReader, "read_rows",
                        lambda self, *a, **k: calls.append(a) or read_rows(self, *a, **k))
    run_plan(build_plan(recipe), tmp_path / "blocks")
    assert len(calls) > 200, "merged tensors must have been streamed in many row blocks"
    # A GEMM over fewer rows may pick another BLAS kernel, so equality is to fp32 rounding, not bytes;
    # for a fixed block size the output is deterministic (resume relies on that).
    whole, blocked = read_model(tmp_path / "whole"), read_model(tmp_path / "blocks")
    assert set(whole) == set(blocked)
    for name, tensor in whole.items():
        torch.testing.assert_close(blocked[name], tensor, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
