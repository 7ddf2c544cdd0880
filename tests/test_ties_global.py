"""TIES ``scope: global`` through the engine: each input keeps its top ``density`` over the whole model.

Oracle: per input, a stable descending sort of its concatenated weighted task vector (the plan's
tensor order) picks the kept entries; the thresholds that keep exactly those, handed to the
whole-tensor method, give the bytes the engine must write, and TIES' formula on the kept entries
gives the same values.  A job killed after the whole-model pass resumes without running it again.
"""

from __future__ import annotations


import pytest
import torch

from streammerge import InputSpec, Recipe, build_plan, run_plan
from streammerge.errors import MethodParameterError
from streammerge.execution import model_pass, worker
from streammerge.execution.worker import contributions_by_input
from streammerge.jobs.journal import read_journal
from streammerge.methods import REGISTRY, DenseUpdate, LowRankUpdate, MergeInputs
from streammerge.methods.common import gridded_dense
from streammerge.methods.selection import KEEP_ALL, Threshold
from streammerge.methods.sparsify import keep_count
from streammerge.planning import budget
from tests.helpers import load_adapter_file, read_model, read_raw
from tests.test_resume import killed_run
from tools.synthetic import PRESETS, write_adapter, write_finetune, write_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DENSITY = 0.3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties_global")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0)
    tunes = [write_finetune(base, root / f"ft{i}", seed=5 + i, std=0.01) for i in range(2)]
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "up_proj"))]
    return {"base": base, "model": tunes, "adapter": adapters}


def _recipe(world, kind: str, out) -> Recipe:
    return Recipe(base=str(world["base"]), inputs=tuple(InputSpec(str(p), kind=kind, weight=w)
                                                        for p, w in zip(world[kind], (1.0, 0.6))),
                  method="ties", params=(("density", DENSITY), ("scope", "global")), device="cpu", seed=3,
                  max_shard_size=90_000, out=str(out))


def _task_vectors(world, kind: str, plan) -> list[dict[str, torch.Tensor]]:
    """Per input, its weighted task vector of every tensor the plan gives it, in plan order (fp32, canonical;
    a LoRA product on the row grid with the weight folded into ``up``, as the engine forms it)."""
    base = read_model(world["base"])
    per: list[dict[str, torch.Tensor]] = [{} for _ in world[kind]]
    for job in plan.tensors:
        for i, contribs in contributions_by_input(job).items():
            w = contribs[0].weight
            if kind == "model":
                per[i][job.name] = w * (read_model(world[kind][i])[job.name].float() - base[job.name].float())
            else:
                f = load_adapter_file(world[kind][i])
                module = "base_model.model." + job.name.removesuffix(".weight")
                up, down = f[module + ".lora_B.weight"].float() * 2.0, f[module + ".lora_A.weight"].float()
                per[i][job.name] = gridded_dense(LowRankUpdate(up=up * w, down=down))  # the engine's GEMMs
    return per


def _reference_thresholds(vectors: dict[str, torch.Tensor]) -> dict[str, Threshold]:
    """What keeps, per tensor, the entries a stable top-k of the concatenation keeps (ties in flat order)."""
    flat = torch.cat([v.flatten() for v in vectors.values()]).abs()
    k = keep_count(DENSITY, flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[order[:k]] = True
    t = float(flat[order[k - 1]])
    out, offset = {}, 0
    for name, v in vectors.items():
        rows = v.reshape(-1, v.shape[-1]) if v.dim() else v.reshape(1, 1)
        mine, mag = kept[offset:offset + v.numel()], flat[offset:offset + v.numel()]
        offset += v.numel()
        ties = torch.nonzero(mag == t).flatten()
        kept_ties = ties[mine[ties]]
        if kept_ties.numel() == ties.numel():
            out[name] = Threshold(t, KEEP_ALL.tie_row)
        elif kept_ties.numel() == 0:
            out[name] = Threshold(t, -1)
        else:
            row = int(kept_ties[-1]) // rows.shape[-1]
            out[name] = Threshold(t, row, int((kept_ties // rows.shape[-1] == row).sum()))
        assert int((mag > t).sum()) + kept_ties.numel() == int(mine.sum())  # thresholds keep exactly the set
    return out


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_global_scope_equals_a_whole_model_reference(world, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(budget, "BLOCK_BYTES", 8 << 10)  # several row blocks per tensor
    plan = build_plan(_recipe(world, kind, tmp_path / "out"))
    run_plan(plan, tmp_path / "out")
    ours = read_model(tmp_path / "out")
    vectors = _task_vectors(world, kind, plan)
    thresholds = [_reference_thresholds(v) for v in vectors]
    params = dict(plan.method_params)
    base = read_model(world["base"])
    for job in plan.tensors:
        ids = [i for i in range(len(vectors)) if job.name in vectors[i]]
        w0 = base[job.name]
        if not ids:
            assert torch.equal(ours[job.name], w0)
            continue
        # the bytes: the whole-tensor method given the reference thresholds (weights already folded in)
        updates = tuple(DenseUpdate(vectors[i][job.name]) for i in ids)
        gen = torch.Generator().manual_seed(worker.tensor_seed(3, job.name))
        given = tuple(thresholds[i][job.name] for i in ids)
        merged = REGISTRY["ties"].merge(MergeInputs(job.name, w0.float(), updates, (1.0,) * len(ids), gen, given),
                                        params).update.dense()
        assert torch.equal(ours[job.name], (w0.float() + merged).to(w0.dtype)), job.name
        # the values: TIES' formula on the kept entries
        parts = []
        for i in ids:
            v = vectors[i][job.name]
            keep = torch.zeros(v.numel(), dtype=torch.bool)
            rows = v.reshape(-1, v.shape[-1]) if v.dim() else v.reshape(1, 1)
            th = thresholds[i][job.name]
            mag = rows.abs()
            keep = (mag > th.value) | ((mag == th.value) & (torch.arange(rows.shape[0])[:, None] < th.tie_row))
            if 0 <= th.tie_row < rows.shape[0] and th.tie_quota:
                cols = torch.nonzero(mag[th.tie_row] == th.value).flatten()[:th.tie_quota]
                keep[th.tie_row, cols] = True
            parts.append((rows * keep).view(v.shape))
        stack = torch.stack(parts)
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = (stack != 0) & (torch.sign(stack) == sign)
        expected = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(ours[job.name].float(), (w0.float() + expected).to(w0.dtype).float(),
                                   atol=0, rtol=2 ** -7)


def test_resume_reads_the_journaled_model_pass(world, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_plan(build_plan(_recipe(world, "model", reference)), reference)
    out = tmp_path / "out"
    plan = build_plan(_recipe(world, "model", out))
    killed_run(plan, out, "record:2")  # the job record, then the whole-model pass's record
    state = read_journal(out)
    assert state is not None and state.statistics is not None and not state.units

    def refuse(*args, **kwargs):
        raise AssertionError("the resumed job ran the whole-model pass again")

    monkeypatch.setattr(model_pass, "model_thresholds", refuse)
    run_plan(plan, out)
    assert read_raw(out) == read_raw(reference)


def test_global_scope_refuses_the_components():
    with pytest.raises(MethodParameterError, match="scope 'global'"):
        REGISTRY["ties"].resolve_params({"scope": "global", "decouple": True})
