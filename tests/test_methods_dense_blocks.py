"""Dense methods as row blocks: bit-identical to the whole tensor for any blocking; exact-k trims
against PEFT's merge_utils on task vectors between bf16 models; TIES ``scope: global``."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from peft.utils import merge_utils

from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, TaskUpdate, get_method
from streammerge.methods.base import RowBlock
from streammerge.methods.common import row_grid
from streammerge.methods.rows import ModelThresholds, ModelTrim, merge_by_blocks
from streammerge.methods.selection import TopKSelect, keep_rows
from streammerge.methods.sparsify import MASK_CHUNK, MagnitudeTrim, RandomDrop, as_rows, keep_count

pytestmark = pytest.mark.usefixtures("one_torch_thread", "small_grid")


@pytest.fixture
def small_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 8 Ki-entry grid step, so that small tensors span many steps (the real one is 256 Ki)."""
    from streammerge.methods import common

    monkeypatch.setattr(common, "GRID_ELEMENTS", 1 << 13)

DENSE_METHODS = ("ties", "magnitude_prune", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")


def bf16_task_vector(base: torch.Tensor, seed: int, scale: float = 0.02) -> torch.Tensor:
    """``W_ft − W0`` between two bf16 models, in fp32: few distinct magnitudes, many ties."""
    g = torch.Generator().manual_seed(seed)
    fine_tuned = (base + scale * base.abs().mean() * torch.randn(base.shape, generator=g)).bfloat16().float()
    return fine_tuned - base


def lora(d_out: int, d_in: int, rank: int, seed: int) -> LowRankUpdate:
    g = torch.Generator().manual_seed(seed)
    return LowRankUpdate(up=0.1 * torch.randn(d_out, rank, generator=g), down=torch.randn(rank, d_in, generator=g))


def bf16_base(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).bfloat16().float()


def whole(method: str, base: torch.Tensor, updates: Sequence[TaskUpdate], weights: Sequence[float],
          params: dict, seed: int = 7, statistics: object = None) -> torch.Tensor:
    m = get_method(method)
    inputs = MergeInputs("w", base, tuple(updates), tuple(weights), torch.Generator().manual_seed(seed), statistics)
    return m.merge(inputs, params).update.dense()


def blocked(method: str, base: torch.Tensor, updates: Sequence[TaskUpdate], weights: Sequence[float],
            params: dict, block_rows: int, seed: int = 7, statistics: object = None) -> torch.Tensor:
    m = get_method(method)
    assert m.rows is not None and m.rows.supports(params)
    inputs = MergeInputs("w", base, tuple(updates), tuple(weights), torch.Generator().manual_seed(seed), statistics)
    return merge_by_blocks(m.rows, inputs, params, block_rows).view(base.shape)


def stable_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest, ties in index order (a stable descending sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


# ---- block-size invariance and the whole-tensor reference ----------------------------------------------

def _cases() -> dict[str, tuple[torch.Tensor, list[TaskUpdate]]]:
    base = bf16_base((200, 1000))
    dense = [DenseUpdate(bf16_task_vector(base, s)) for s in (1, 2)]
    loras: list[TaskUpdate] = [lora(200, 1000, 4, s) for s in (3, 4, 5)]
    return {"lora": (base, loras), "dense_bf16": (base, dense), "mixed": (base, [loras[0], dense[0], loras[1]])}


@pytest.mark.parametrize("case", ["lora", "dense_bf16", "mixed"])
@pytest.mark.parametrize("method", DENSE_METHODS)
def test_row_blocks_are_bit_identical_for_any_blocking(method: str, case: str) -> None:
    base, updates = _cases()[case]
    weights = [1.0, 0.7, -1.3][:len(updates)]
    params = get_method(method).resolve_params({"density": 0.3, "lambda": 0.9})
    reference = whole(method, base, updates, weights, params)
    grid = row_grid(tuple(base.shape))
    assert grid < base.shape[0], "the case must span several grid steps"
    for block_rows in (grid, 3 * grid, 4 * base.shape[0]):
        assert torch.equal(blocked(method, base, updates, weights, params, block_rows), reference), block_rows


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_row_blocks_add_into_the_base_rows(method: str) -> None:
    base, updates = _cases()["mixed"]
    m = get_method(method)
    params = m.resolve_params({"density": 0.4})
    inputs = MergeInputs("w", base, tuple(updates), (1.0, 1.0, 1.0), torch.Generator().manual_seed(7))
    out = base.clone()
    assert m.rows is not None
    merge_by_blocks(m.rows, inputs, params, row_grid(tuple(base.shape)), out=out)
    assert torch.equal(out, base + whole(method, base, updates, (1.0, 1.0, 1.0), params))


def test_one_dimensional_tensors_are_one_row() -> None:
    base = bf16_base((3000,))
    updates = [DenseUpdate(bf16_task_vector(base, s)) for s in (8, 9)]
    for method in DENSE_METHODS:
        params = get_method(method).resolve_params({"density": 0.25})
        assert torch.equal(blocked(method, base, updates, (1.0, 2.0), params, row_grid((3000,))),
                           whole(method, base, updates, (1.0, 2.0), params)), method


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_row_blocks_on_the_real_grid(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from streammerge.methods import common

    monkeypatch.setattr(common, "GRID_ELEMENTS", 1 << 18)
    base = bf16_base((600, 1000))
    updates: list[TaskUpdate] = [lora(600, 1000, 8, 12), DenseUpdate(bf16_task_vector(base, 13))]
    params = get_method(method).resolve_params({"density": 0.2})
    grid = row_grid((600, 1000))
    assert grid == 256
    reference = whole(method, base, updates, (1.0, 1.0), params)
    for block_rows in (grid, 2 * grid, 3 * grid):
        assert torch.equal(blocked(method, base, updates, (1.0, 1.0), params, block_rows), reference)


def test_components_are_whole_tensor_only() -> None:
    m = get_method("ties")
    assert m.rows is not None
    assert m.rows.supports(m.resolve_params({}))
    assert not m.rows.supports(m.resolve_params({"decouple": True}))
    assert not m.rows.supports(m.resolve_params({"orthogonalize": True}))


# ---- exact k: the selection and PEFT as the oracle ------------------------------------------------------

@pytest.mark.parametrize("limit", [0, 1 << 22])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 0.9, 1.0])
def test_trims_keep_exactly_k_in_index_order(density: float, limit: int) -> None:
    base = bf16_base((96, 700))
    delta = bf16_task_vector(base, 11)
    magnitude = delta.abs()
    k = keep_count(density, delta.numel())
    expected = torch.zeros(delta.numel(), dtype=torch.bool)
    expected[stable_top_k(magnitude.flatten(), k)] = True
    whole_mask = keep_rows(as_rows(magnitude), 0, MagnitudeTrim(density).threshold(delta))
    select = TopKSelect(k, {"w": 96}, delta.numel(), candidate_limit=limit)
    passes = 0
    while select.needs_pass():
        for start in (64, 0, 32):  # any order
            select.observe("w", start, magnitude[start:start + 32])
        select.end_pass()
        passes += 1
    block_mask = torch.cat([keep_rows(magnitude[s:s + 40], s, select.threshold("w")) for s in range(0, 96, 40)])
    assert int(whole_mask.sum()) == k
    assert torch.equal(whole_mask.flatten(), expected)
    assert torch.equal(block_mask.flatten(), expected)
    assert passes <= (3 if limit == 0 else 1)


@pytest.mark.parametrize("one_pass", [False, True])
def test_selection_passes(one_pass: bool) -> None:
    values = torch.arange(1, 1001, dtype=torch.float32).reshape(10, 100)  # distinct: two passes
    ties = torch.full((10, 100), 0.5)  # one value in the bin: still two passes
    mixed = torch.cat([torch.full((5, 100), 0.5), torch.full((5, 100), 0.5000001)])  # one bin, two values
    for rows, k, passes in ((values, 10, 2), (ties, 10, 2), (mixed, 700, 3), (values, 0, 1), (values, 1000, 1)):
        select, count = TopKSelect(k, {"t": 10}, 1000, candidate_limit=1000 if one_pass else 0), 0
        while select.needs_pass():
            select.observe("t", 0, rows)
            select.end_pass()
            count += 1
        assert count == (1 if one_pass else passes) and int(keep_rows(rows, 0, select.threshold("t")).sum()) == k


def _tied_at_threshold(delta: torch.Tensor, density: float) -> torch.Tensor:
    magnitude = delta.abs().flatten()
    k = keep_count(density, magnitude.numel())
    return (magnitude == magnitude.sort(descending=True).values[k - 1]).view(delta.shape)


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_magnitude_prune_equals_peft(density: float, monkeypatch: pytest.MonkeyPatch) -> None:
    base = bf16_base((128, 512))
    deltas = [bf16_task_vector(base, s) for s in (21, 22)]
    weights = [1.0, 0.5]  # exact in fp32: trimming w·δ or δ selects the same entries
    params = get_method("magnitude_prune").resolve_params({"density": density})
    ours = whole("magnitude_prune", base, [DenseUpdate(d) for d in deltas], weights, params)
    assert torch.equal(blocked("magnitude_prune", base, [DenseUpdate(d) for d in deltas], weights, params, 64), ours)
    peft = merge_utils.magnitude_prune(deltas, torch.tensor(weights), density)
    # PEFT keeps exactly k too but picks among ties with torch.topk (unspecified order): equal
    # everywhere but at tied-with-the-threshold positions, and the same kept values there.
    tied = _tied_at_threshold(deltas[0], density) | _tied_at_threshold(deltas[1], density)
    assert int(tied.sum()) > 100, "the case must have many ties"
    torch.testing.assert_close(ours[~tied], peft[~tied], rtol=0, atol=0)
    for d in deltas:
        mine, theirs = MagnitudeTrim(density)(d.clone(), 0), merge_utils.magnitude_based_pruning(d, density)
        assert int((mine != 0).sum()) == int((theirs != 0).sum())
        assert torch.equal(mine.abs().flatten().sort().values, theirs.abs().flatten().sort().values)
    # With torch.topk's tie order fixed to index order, PEFT gives our bits everywhere.
    monkeypatch.setattr(torch, "topk", lambda t, k, largest=True: (None, stable_top_k(t, k)))
    torch.testing.assert_close(ours, merge_utils.magnitude_prune(deltas, torch.tensor(weights), density),
                               rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_equals_peft(density: float, monkeypatch: pytest.MonkeyPatch) -> None:
    base = bf16_base((64, 640))
    deltas = [bf16_task_vector(base, s) for s in (31, 32, 33)]
    weights = [1.0, 1.0, 1.0]  # PEFT elects on unweighted, we on weighted deltas: equal for equal weights
    params = get_method("ties").resolve_params({"density": density})
    ours = whole("ties", base, [DenseUpdate(d) for d in deltas], weights, params)
    assert torch.equal(blocked("ties", base, [DenseUpdate(d) for d in deltas], weights, params, 32), ours)
    peft = merge_utils.ties(deltas, torch.tensor(weights), density)
    tied = torch.stack([_tied_at_threshold(d, density) for d in deltas]).any(0)
    assert 0 < int(tied.sum()) < tied.numel() // 2
    torch.testing.assert_close(ours[~tied], peft[~tied])
    monkeypatch.setattr(torch, "topk", lambda t, k, largest=True: (None, stable_top_k(t, k)))
    torch.testing.assert_close(ours, merge_utils.ties(deltas, torch.tensor(weights), density))


# ---- DARE masks -------------------------------------------------------------------------------------------

def test_dare_mask_of_any_range_is_the_slice_of_the_whole_mask() -> None:
    drop = RandomDrop(0.3, torch.Generator().manual_seed(5), 2)
    n = 3 * MASK_CHUNK + 123
    full = drop.mask(torch.Size([n]), 1)
    for start, stop in ((0, 10), (MASK_CHUNK - 5, MASK_CHUNK + 5), (17, 2 * MASK_CHUNK + 99), (n - 7, n)):
        fresh = RandomDrop(0.3, torch.Generator().manual_seed(5), 2)
        assert torch.equal(fresh.mask_range(1, start, stop), full[start:stop])
    assert not torch.equal(full, drop.mask(torch.Size([n]), 0))
    assert abs(float(full.float().mean()) - 0.3) < 0.01
    reused = RandomDrop(0.3, torch.Generator().manual_seed(5), 2)
    for start, stop in ((17, 2 * MASK_CHUNK + 99), (2 * MASK_CHUNK + 99, n)):  # the reused buffer, range after range
        assert torch.equal(reused.mask_range(1, start, stop, reuse=True), full[start:stop])


def test_dare_mask_is_the_documented_pcg64_draw() -> None:
    """The spec in ``sparsify``'s docstring, written out independently: chunk c of input i keeps entry j when
    the j-th little-endian int32 half of PCG64(chunk_seed(seed_i, c))'s raw draws is below d·2^32 − 2^31."""
    import numpy as np

    from streammerge.methods.sparsify import chunk_seed

    for density in (0.1, 0.5, 0.9, 0.0, 1.0):
        drop = RandomDrop(density, torch.Generator().manual_seed(11), 3)
        mask = drop.mask(torch.Size([2 * MASK_CHUNK]), 2)
        for chunk in range(2):
            raw = np.random.PCG64(chunk_seed(drop.seeds[2], chunk)).random_raw(MASK_CHUNK // 2)
            halves = raw.astype("<u8").view("<u4").astype(np.int64)  # unsigned, then the signed reading
            signed = np.where(halves >= 2**31, halves - 2**32, halves)
            expected = (signed < round(density * 2**32) - 2**31) | (density >= 1.0)
            assert torch.equal(mask[chunk * MASK_CHUNK:(chunk + 1) * MASK_CHUNK],
                               torch.from_numpy(expected.astype(np.float32)))
        kept = float(mask.mean())
        assert abs(kept - density) <= 4 * (density * (1 - density) / mask.numel()) ** 0.5 + 1e-12


# ---- scope: global ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("hinted", [False, True])
def test_global_scope_equals_a_whole_model_reference(hinted: bool) -> None:
    shapes = {"a.weight": (64, 300), "b.weight": (40, 512), "c.bias": (300,)}
    bases = {name: bf16_base(shape, i) for i, (name, shape) in enumerate(shapes.items())}
    scales = {"a.weight": 0.01, "b.weight": 0.02, "c.bias": 0.2}  # tensors unlike each other
    deltas = [{name: bf16_task_vector(b, 40 + i, scales[name]) for i, (name, b) in enumerate(bases.items())},  # all
              {name: bf16_task_vector(b, 50 + i, scales[name]) for i, (name, b) in enumerate(list(bases.items())[:2])}]
    weights, density = [1.0, 2.0], 0.15
    params = {**get_method("ties").resolve_params({"density": density}), "scope": "global"}
    # reference: each input's top k over its concatenated, flattened (weighted) task vector
    trimmed: list[dict[str, torch.Tensor]] = []
    for per, w in zip(deltas, weights):
        flat = torch.cat([(w * d).flatten() for d in per.values()])
        kept = torch.zeros_like(flat)
        index = stable_top_k(flat.abs(), keep_count(density, flat.numel()))
        kept[index] = flat[index]
        trimmed.append(dict(zip(per, kept.split([d.numel() for d in per.values()]))))
    trim = ModelTrim(density, [{name: shapes[name] for name in per} for per in deltas])
    if hinted:  # a few rows of every tensor: the selection then finishes in one pass
        for name in shapes:
            ids = tuple(i for i, per in enumerate(deltas) if name in per)
            sample = [DenseUpdate(deltas[i][name].reshape(-1, shapes[name][-1])[::5]) for i in ids]
            trim.hint(name, shapes[name], sample, [weights[i] for i in ids], ids)
    passes = 0
    while trim.needs_pass():
        passes += 1
        for name in reversed(shapes):  # any order of tensors and blocks
            ids = tuple(i for i, per in enumerate(deltas) if name in per)
            base = bases[name]
            rows = base.reshape(-1, base.shape[-1])
            step = row_grid(shapes[name])
            for start in range(0, rows.shape[0], step):
                updates = tuple(DenseUpdate(deltas[i][name].reshape(rows.shape)[start:start + step]) for i in ids)
                trim.observe(RowBlock(name, shapes[name], start, updates, tuple(weights[i] for i in ids), ids))
        trim.end_pass()
    # the first tensor seen (c.bias) predicts the threshold badly: the window pass misses, 3 exact passes follow
    assert passes == (1 if hinted else 4)
    result = ModelThresholds.from_record(trim.result().record())
    for name, base in bases.items():
        ids = [i for i, per in enumerate(deltas) if name in per]
        parts = torch.stack([trimmed[i][name].view(base.shape) for i in ids])
        sign = torch.where(parts.sum(0) >= 0, 1.0, -1.0)
        agree = (parts != 0) & (torch.sign(parts) == sign)
        expected = (parts * agree).sum(0) / agree.sum(0).clamp(min=1)
        updates = [DenseUpdate(deltas[i][name]) for i in ids]
        given = result.for_tensor(name, ids)
        got = whole("ties", base, updates, [weights[i] for i in ids], params, statistics=given)
        torch.testing.assert_close(got, expected)
        step = row_grid(shapes[name])
        assert torch.equal(blocked("ties", base, updates, [weights[i] for i in ids], params, step, statistics=given),
                           got)


def test_global_scope_without_thresholds_is_refused() -> None:
    from streammerge.errors import MethodParameterError

    base = bf16_base((8, 8))
    params = {**get_method("ties").resolve_params({}), "scope": "global"}
    with pytest.raises(MethodParameterError, match="whole-model thresholds"):
        whole("ties", base, [DenseUpdate(bf16_task_vector(base, 1))], [1.0], params)
