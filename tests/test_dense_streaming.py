"""Dense methods through the engine in row blocks: the bytes do not depend on the block size, and equal the
whole-tensor method (the reference kept in the methods: ``MergeMethod.merge`` on whole fp32 tensors).

Inputs: LoRA adapters and full fine-tunes (bf16 task vectors: many tied magnitudes), so both kinds of
row-block update (factor rows and dense delta rows) go through pass 1 and pass 2.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from streammerge import InputSpec, Recipe, build_plan, run_plan
from streammerge.execution import worker
from streammerge.jobs.journal import read_journal
from streammerge.methods import REGISTRY, DenseUpdate, LowRankUpdate, MergeInputs, common
from streammerge.planning import budget
from streammerge.planning.budget import streams_method_rows
from tests.helpers import load_adapter_file, read_model, read_raw
from tests.test_resume import killed_run
from tools.synthetic import PRESETS, write_adapter, write_finetune, write_model

DENSE = ["ties", "magnitude_prune", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_rows")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0)
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "up_proj"))]
    tunes = [write_finetune(base, root / f"ft{i}", seed=5 + i, std=0.01) for i in range(2)]
    return {"root": root, "base": base, "adapters": adapters, "tunes": tunes}


def _recipe(world, method: str, kind: str) -> Recipe:
    paths = world["adapters"] if kind == "adapter" else world["tunes"]
    return Recipe(base=str(world["base"]), inputs=tuple(InputSpec(str(p), kind=kind, weight=w)
                                                        for p, w in zip(paths, (1.0, 0.6))),
                  method=method, params=(("density", 0.3),), device="cpu", seed=3)


@pytest.mark.parametrize("kind", ["adapter", "model"])
@pytest.mark.parametrize("method", DENSE)
def test_block_size_does_not_change_the_bytes(world, tmp_path, monkeypatch, method, kind):
    plan = build_plan(_recipe(world, method, kind))
    assert any(streams_method_rows(t, REGISTRY[method], dict(plan.method_params)) for t in plan.tensors)
    outputs = []
    for block_bytes in (8 << 10, 40 << 10, 64 << 20):  # a few rows, tens of rows, whole tensors at once
        monkeypatch.setattr(budget, "BLOCK_BYTES", block_bytes)
        out = tmp_path / f"out-{block_bytes}"
        run_plan(plan, out)
        outputs.append(read_raw(out))
    assert outputs[0] == outputs[1] == outputs[2]


def _whole_tensor_reference(world, method: str, kind: str) -> dict[str, torch.Tensor]:
    impl = REGISTRY[method]
    plan = build_plan(_recipe(world, method, kind))
    params = dict(plan.method_params)
    base = read_model(world["base"])
    expected = {}
    for name, w0 in base.items():
        updates: list = []
        weights = []
        for path, w in zip(world["adapters"] if kind == "adapter" else world["tunes"], (1.0, 0.6)):
            if kind == "adapter":
                f = load_adapter_file(path)
                module = "base_model.model." + name.removesuffix(".weight")
                if module + ".lora_A.weight" not in f:
                    continue
                updates.append(LowRankUpdate(up=f[module + ".lora_B.weight"].float() * 2.0,
                                             down=f[module + ".lora_A.weight"].float()))
            else:
                delta = read_model(path)[name].float() - w0.float()
                if not delta.any():
                    continue
                updates.append(DenseUpdate(delta))
            weights.append(w)
        if not updates:
            expected[name] = w0
            continue
        gen = torch.Generator().manual_seed(worker.tensor_seed(3, name))
        result = impl.merge(MergeInputs(name, w0.float(), tuple(updates), tuple(weights), gen), params)
        expected[name] = (w0.float() + result.update.dense()).to(w0.dtype)
    return expected


@pytest.mark.parametrize("kind", ["adapter", "model"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_row_blocks_equal_the_whole_tensor_method(world, tmp_path, method, kind):
    run_plan(build_plan(_recipe(world, method, kind)), tmp_path / "out")
    ours = read_model(tmp_path / "out")
    for name, tensor in _whole_tensor_reference(world, method, kind).items():
        assert torch.equal(ours[name], tensor), name


def test_plan_predicts_the_row_form(world):
    plan = build_plan(_recipe(world, "ties", "model"))
    _, reason = budget.tensor_working_set(plan.tensors[0], REGISTRY["ties"], dict(plan.method_params))
    assert "two passes over row blocks" in reason


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_killed_in_the_second_pass_resumes_to_the_same_bytes(world, tmp_path, monkeypatch, method):
    """Killed after some merged row blocks of a tensor (its first pass done, its shard half written),
    the re-run keeps the finished shards, merges that tensor again and writes the bytes of an uninterrupted run."""
    monkeypatch.setattr(budget, "BLOCK_BYTES", 8 << 10)  # blocks of 32 rows of 64 columns on a grid of 16
    monkeypatch.setattr(common, "GRID_ELEMENTS", 1 << 10)
    recipe = replace(_recipe(world, method, "model"), max_shard_size=90_000)
    reference = tmp_path / "reference"
    run_plan(build_plan(replace(recipe, out=str(reference))), reference)
    out = tmp_path / "out"
    plan = build_plan(replace(recipe, out=str(out)))
    for spec in ("rows:5", "rows:30", "rows:30"):  # inside the embedding (16 blocks), then in later tensors and shards
        killed_run(plan, out, spec)
        state = read_journal(out)
        assert state is None or state.complete is None
    report = run_plan(plan, out)
    assert report.resumed_units >= 1
    assert read_raw(out) == read_raw(reference)
