"""LoRA extraction (rank-K SVD of FT − B) against an exact SVD reference and PEFT loading the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streammerge.errors import MethodParameterError
from streammerge.inputs.lora import load_lora_adapter
from streammerge.io.reader import open_checkpoint
from streammerge.methods.extraction import below_energy_threshold, extract_low_rank
from tests.helpers import load_causal_lm, read_model, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_spectrum(d_out: int, d_in: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(σ) Vᵀ`` with random orthonormal ``U``, ``V``: the exact singular values are known."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, sigma.numel(), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, sigma.numel(), generator=gen, dtype=torch.float64))
    return ((u * sigma.double()) @ v.T).float()


SIGMA = torch.logspace(0, -3, 60)  # slowly decaying, like a real fine-tune's delta


def test_exact_route_is_the_eckart_young_optimum() -> None:
    delta = with_spectrum(80, 70, SIGMA, seed=0)
    out = extract_low_rank(delta, 10)
    assert out.rank == 10
    torch.testing.assert_close(out.singular_values, SIGMA[:10], rtol=1e-4, atol=1e-6)
    expected_error = float((SIGMA[10:].double() ** 2).sum().sqrt() / (SIGMA.double() ** 2).sum().sqrt())
    direct = float(torch.linalg.vector_norm(delta - out.up @ out.down) / torch.linalg.vector_norm(delta))
    assert out.relative_error == pytest.approx(expected_error, rel=1e-3)
    assert direct == pytest.approx(expected_error, rel=1e-3)
    assert out.kept_energy == pytest.approx(1 - expected_error ** 2, rel=1e-5)
    # Balanced factors: both sides carry √σ.
    torch.testing.assert_close(out.up.norm(dim=0), out.down.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_randomized_route_matches_the_exact_reference() -> None:
    delta = with_spectrum(300, 200, SIGMA, seed=1)
    exact = extract_low_rank(delta, 16)
    sketched = extract_low_rank(delta, 16, randomized=True, generator=torch.Generator().manual_seed(3))
    direct = float(torch.linalg.vector_norm(delta - sketched.up @ sketched.down) / torch.linalg.vector_norm(delta))
    assert sketched.relative_error == pytest.approx(direct, rel=1e-3, abs=1e-5)  # the projection identity
    assert exact.relative_error <= sketched.relative_error <= exact.relative_error * 1.02
    again = extract_low_rank(delta, 16, randomized=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.up, sketched.up)  # seeded: reproducible


def test_energy_target_and_numerical_rank() -> None:
    delta = with_spectrum(50, 40, SIGMA[:30], seed=2)
    out = extract_low_rank(delta, 25, energy_target=0.9)
    energy = torch.cumsum(SIGMA[:30].double() ** 2, 0) / (SIGMA[:30].double() ** 2).sum()
    assert out.rank == int((energy < 0.9).sum()) + 1 and out.kept_energy >= 0.9
    low_rank = with_spectrum(50, 40, torch.tensor([3.0, 2.0, 1.0]), seed=3)
    out = extract_low_rank(low_rank, 8, sv_rtol=1e-5)
    assert out.rank == 3 and out.relative_error < 1e-3
    zero = extract_low_rank(torch.zeros(6, 5), 4)
    assert zero.rank == 0 and zero.relative_error == 0 and zero.kept_energy == 1


def test_bad_options_are_refused() -> None:
    with pytest.raises(MethodParameterError, match="2-D"):
        extract_low_rank(torch.zeros(2, 2, 2), 2)
    with pytest.raises(MethodParameterError, match="rank=0"):
        extract_low_rank(torch.zeros(2, 2), 0)
    with pytest.raises(MethodParameterError, match="energy_target=1.5"):
        extract_low_rank(torch.zeros(2, 2), 1, energy_target=1.5)
    assert below_energy_threshold(0.0, 5.0, 0.0) and not below_energy_threshold(0.1, 5.0, 0.01)


def test_extracted_adapter_loads_in_peft(tmp_path: Path) -> None:
    """FT = base + (rank-6 change + noise); the rank-4 extraction as a PEFT adapter merges to base + UΣVᵀ."""
    from peft import PeftModel
    base = save_tiny_llama(tmp_path / "base", torch.float32)
    weights = read_model(base)
    gen = torch.Generator().manual_seed(7)
    targets = [n for n in weights if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    tensors, errors = {}, {}
    for name in targets:
        d_out, d_in = weights[name].shape
        delta = (torch.randn(d_out, 6, generator=gen) @ torch.randn(6, d_in, generator=gen) * 0.01
                 + torch.randn(d_out, d_in, generator=gen) * 1e-4)
        out = extract_low_rank(delta, 4)
        module = "base_model.model." + name[: -len(".weight")]
        tensors[module + ".lora_A.weight"] = out.down.contiguous()
        tensors[module + ".lora_B.weight"] = out.up.contiguous()
        exact = torch.linalg.svdvals(delta.double())
        errors[name] = (out, delta, float((exact[4:] ** 2).sum().sqrt() / (exact ** 2).sum().sqrt()))
    adapter = tmp_path / "extracted"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}))
    problems: list[str] = []
    parsed = load_lora_adapter(adapter, open_checkpoint(base).tensor_names, problems)
    assert problems == [] and {m.scale for m in parsed.modules} == {1.0}
    merged = PeftModel.from_pretrained(load_causal_lm(base, torch.float32), adapter).merge_and_unload().state_dict()
    for name, (out, delta, exact_error) in errors.items():
        torch.testing.assert_close(merged[name], weights[name] + out.up @ out.down, rtol=1e-6, atol=1e-6)
        residual = merged[name] - weights[name] - delta
        achieved = float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(delta))
        assert out.relative_error == pytest.approx(exact_error, rel=1e-3)
        assert achieved == pytest.approx(exact_error, rel=1e-2)


@pytest.mark.slow
def test_reported_error_is_accurate_on_a_full_size_matrix() -> None:
    """An 8B MLP-sized delta (14336×4096): a whole-matrix fp32 vector_norm is ~1% low there; ours is not."""
    gen = torch.Generator().manual_seed(0)
    delta = (torch.randn(14336, 64, generator=gen) * torch.logspace(0, -2, 64)) @ torch.randn(64, 4096, generator=gen)
    delta += torch.randn(delta.shape, generator=gen) * 1e-3
    out = extract_low_rank(delta, 32, randomized=True)
    total = float(delta.double().square().sum())
    direct = float((delta - out.up @ out.down).double().square().sum() / total) ** 0.5
    assert out.relative_error == pytest.approx(direct, rel=1e-4)
    assert out.kept_energy == pytest.approx(1 - direct ** 2, rel=1e-4)
