"""Per-row order statistics (Breadcrumbs' band bounds): bit-identical to a descending sort per row on
continuous, tied, zero-heavy, outlier and bf16-derived rows, on rows that take ``topk`` and on chunks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from streammerge.methods import row_ranks
from streammerge.methods.row_ranks import SHORTEST_ROW, largest_per_row
from streammerge.methods.sparsify import Band, keep_count

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sorted_reference(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest per row from a full descending sort (an independent oracle)."""
    return magnitude.sort(dim=1, descending=True).values[:, k - 1:k]


def lora_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 16, generator=g) @ torch.randn(16, columns, generator=g)).abs()


def bf16_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    """``|W_ft − W0|`` between two bf16 matrices: few distinct magnitudes, many ties and exact zeros."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, columns, generator=g).bfloat16().float()
    tuned = (base + 0.02 * torch.randn(rows, columns, generator=g)).bfloat16().float()
    return (tuned - base).abs()


def zero_heavy(rows: int, columns: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).abs()
    return x.masked_fill_(x < 1.7, 0.0)  # ~91 % zeros: the lower bound is often 0


def outliers(rows: int, columns: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).abs()
    x[::2, columns // 2] = 1e30  # every other row's maximum 30 decades above the rest: answers in bucket 0
    x[rows // 2, columns - 1] = float("inf")
    return x


CASES: dict[str, Callable[[int, int, int], torch.Tensor]] = {
    "lora": lora_rows,
    "bf16": bf16_rows,
    "zeros": zero_heavy,
    "outliers": outliers,
    "few_values": lambda r, c, s: torch.randint(0, 4, (r, c), generator=torch.Generator().manual_seed(s)).float(),
    "constant": lambda r, c, s: torch.full((r, c), 0.25),
    "all_zero": lambda r, c, s: torch.zeros(r, c),
}
SHAPES = [(128, 2048), (37, 4096), (3, SHORTEST_ROW), (5, SHORTEST_ROW - 1), (9, 7), (1, 1), (300, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_a_sort_per_row(case: str, shape: tuple[int, int]) -> None:
    magnitude = CASES[case](*shape, 5)
    columns = shape[1]
    for density, gamma in ((0.1, 0.01), (0.3, 0.0), (0.9, 0.1), (1e-4, 0.0), (1.0, 0.0)):
        ranks = [keep_count(gamma, columns) + 1, keep_count(gamma, columns) + max(1, keep_count(density, columns))]
        ranks = [min(k, columns) for k in ranks]
        for k, got in zip(ranks, largest_per_row(magnitude, ranks)):
            want = sorted_reference(magnitude, k)
            assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32)), (k, case)


def test_rows_spanning_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_ranks, "CHUNK_ENTRIES", 3 * 1024 + 5)  # 3 rows a chunk, the last one short
    magnitude = torch.cat([lora_rows(10, 1024, 1), outliers(4, 1024, 2)])
    for k, got in zip((11, 113), largest_per_row(magnitude, (11, 113))):
        assert torch.equal(got, sorted_reference(magnitude, k))


def test_rows_whose_bucket_misses_take_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 buckets per row almost every answer lies in the shared bottom bucket: those rows, and only
    those, take ``topk``, with the same answer."""
    magnitude = lora_rows(64, 2048, 3)
    magnitude[5, 9] = 1e6  # row 5's maximum far above its band: misses even with the usual buckets
    calls: list[int] = []
    real = row_ranks.largest_by_topk

    def counted(keys: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
        calls.append(keys.shape[0])
        return real(keys, ranks)

    monkeypatch.setattr(row_ranks, "largest_by_topk", counted)
    ranks = (21, 224)
    for k, got in zip(ranks, largest_per_row(magnitude, ranks)):
        assert torch.equal(got, sorted_reference(magnitude, k))
    assert calls == [1]  # row 5 alone
    calls.clear()
    monkeypatch.setattr(row_ranks, "BUCKETS", 2)
    for k, got in zip(ranks, largest_per_row(magnitude, ranks)):
        assert torch.equal(got, sorted_reference(magnitude, k))
    assert calls and sum(calls) < magnitude.shape[0] + 1


@pytest.mark.parametrize("gamma", [0.01, 0.0])
def test_band_bounds_equal_the_topk_bounds(gamma: float) -> None:
    """``Band.bounds`` (row scope) against the previous form: one unsorted ``topk`` of drop + keep per row."""
    delta = torch.randn(300, 16) @ torch.randn(16, 2048)
    delta[7] = 0.0
    delta[8, ::3] = 0.0
    low, high = Band(0.1, gamma).bounds(delta)
    drop, keep = keep_count(gamma, 2048), keep_count(0.1, 2048)
    top = delta.abs().topk(drop + keep, dim=-1, sorted=False).values
    assert torch.equal(low, top.amin(dim=-1, keepdim=True))
    assert torch.equal(high, top.topk(drop + 1, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True))


def test_band_tensor_scope_is_one_selection_over_the_tensor() -> None:
    delta = torch.randn(64, 1024, generator=torch.Generator().manual_seed(4))
    low, high = Band(0.1, 0.01, scope="tensor").bounds(delta)
    ordered = delta.abs().flatten().sort(descending=True).values
    drop, keep = keep_count(0.01, delta.numel()), keep_count(0.1, delta.numel())
    assert low.shape == high.shape == (1, 1)
    assert float(low) == float(ordered[drop + keep - 1]) and float(high) == float(ordered[drop])


def old_keep(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    magnitude = rows.abs()
    return rows.mul_((magnitude >= low) & (magnitude <= high))


@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_between_gives_the_bytes_of_the_bool_mask(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_ranks, "CHUNK_ENTRIES", 5 * 1000)  # several chunks
    g = torch.Generator().manual_seed(6)
    rows = CASES[case](40, 1000, 7) * torch.where(torch.rand(40, 1000, generator=g) < 0.5, -1.0, 1.0)
    rows[3, :7] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45])
    low, high = largest_per_row(rows, (300, 11))
    low[4], high[4] = 0.0, float("inf")
    low[5], high[5] = float("inf"), float("inf")
    want = old_keep(rows.clone(), low, high)
    got = row_ranks.keep_between_(rows.clone(), low, high)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    for odd in ((float("inf"), -float("inf")), (-float("inf"), float("inf")), (float("nan"), 1.0)):  # the bool mask
        low[6], high[6] = odd
        want = old_keep(rows.clone(), low, high)
        assert torch.equal(row_ranks.keep_between_(rows.clone(), low, high).view(torch.int32), want.view(torch.int32))


def test_strided_rows_are_read_in_place() -> None:
    """A transposed (Conv1D) task vector reaches ``Band.bounds`` strided."""
    delta = lora_rows(1000, 600, 8).T * -1.0  # [600, 1000], column-major
    assert not delta.is_contiguous()
    for k, got in zip((11, 111), largest_per_row(delta, (11, 111))):
        assert torch.equal(got, sorted_reference(delta.abs(), k))
    low, high = Band(0.1, 0.01).bounds(delta)
    want = old_keep(delta.contiguous(), low, high)
    assert torch.equal(row_ranks.keep_between_(delta.clone(), low, high), want)
