"""DoRA task vectors streamed in row blocks == PEFT's own merge_and_unload (Linear, Embedding, Conv1D)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streammerge.errors import UnsupportedAdapterError
from streammerge.inputs.dora import dora_task_vector, iter_dora_task_blocks, lora_delta_rows
from streammerge.inputs.lora import LoraModule, load_lora_adapter
from streammerge.inputs.peft_config import parse_lora_settings
from streammerge.io.reader import CheckpointReader, open_checkpoint
from streammerge.methods import DenseUpdate, MergeInputs, get_method
from tests.helpers import (assert_close_to_reference, load_adapter_file, load_causal_lm, peft_merged_state,
                           save_tiny_gpt2, save_tiny_llama)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
BLOCK_ROWS = 7  # divides none of the tiny shapes: edge blocks are exercised


def save_dora_adapter(base: Path, out: Path, dtype: torch.dtype, seed: int, **lora_kwargs) -> Path:
    """A real PEFT DoRA adapter: random A, B and a magnitude moved away from its initial ‖W0‖."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(load_causal_lm(base, dtype), LoraConfig(use_dora=True, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen).to(param.dtype)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                param.copy_(noise * 0.05)
    model.save_pretrained(out)
    return out


def dora_merged(base: Path, adapter: Path, block_rows: int = BLOCK_ROWS) -> tuple[dict[str, torch.Tensor], list]:
    """Our W0 + τ for every DoRA module, in fp32, computed block by block from the files."""
    layout = open_checkpoint(base)
    problems: list[str] = []
    parsed = load_lora_adapter(adapter, layout.tensor_names, problems, accept=("use_dora",))
    assert problems == []
    factors = load_adapter_file(adapter)
    merged: dict[str, torch.Tensor] = {}
    with CheckpointReader(layout) as reader:
        for module in parsed.modules:
            assert module.magnitude_key is not None
            info = layout.info(module.target)
            blocks = iter_dora_task_blocks(
                lambda a, b, t=module.target: reader.read_rows(t, a, b, torch.float32),
                factors[module.a_key].float(), factors[module.b_key].float() * module.scale,
                factors[module.magnitude_key].float(), info.shape[0], block_rows, module.transposed)
            task = torch.cat([rows for _, _, rows in blocks])
            merged[module.target] = reader.read(module.target, torch.float32) + task
    return merged, list(parsed.modules)


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("dora") / "base", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_dora_adapter_equals_peft_merge_and_unload(tmp_path: Path, dtype: torch.dtype) -> None:
    base = save_tiny_llama(tmp_path / "base", dtype)
    adapter = save_dora_adapter(base, tmp_path / "dora", dtype, seed=1, r=4, lora_alpha=8,
                                target_modules=LLAMA_TARGETS)
    reference = peft_merged_state(base, adapter, dtype)
    ours, modules = dora_merged(base, adapter)
    assert {m.embedding for m in modules} == {True, False}
    for target, merged in ours.items():
        assert_close_to_reference(merged.to(dtype), reference[target], target)


def test_dora_conv1d_fan_in_fan_out_equals_peft(tmp_path: Path) -> None:
    base = save_tiny_gpt2(tmp_path / "gpt2")
    adapter = save_dora_adapter(base, tmp_path / "dora", torch.float32, seed=2, r=4, lora_alpha=4,
                                target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_rslora=True)
    reference = peft_merged_state(base, adapter, torch.float32)
    ours, modules = dora_merged(base, adapter)
    assert all(m.transposed for m in modules)
    for target, merged in ours.items():
        assert_close_to_reference(merged, reference[target], target)


def test_block_size_does_not_change_the_result(llama_fp32: Path, tmp_path: Path) -> None:
    adapter = save_dora_adapter(llama_fp32, tmp_path / "dora", torch.float32, seed=3, r=2, lora_alpha=2,
                                target_modules=LLAMA_TARGETS)
    whole, _ = dora_merged(llama_fp32, adapter, block_rows=1 << 20)
    for block_rows in (1, 64):
        blocked, _ = dora_merged(llama_fp32, adapter, block_rows=block_rows)
        for target in whole:
            torch.testing.assert_close(blocked[target], whole[target], rtol=1e-6, atol=1e-6)


def test_two_dora_adapters_task_arithmetic(llama_fp32: Path, tmp_path: Path) -> None:
    """Task Arithmetic over two DoRA task vectors == W0 + Σ_i (merge_and_unload_i − W0)."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    adapters = [save_dora_adapter(llama_fp32, tmp_path / f"dora{i}", torch.float32, seed=10 + i, **kwargs)
                for i in range(2)]
    base_state = {k: v.detach().clone() for k, v in load_causal_lm(llama_fp32, torch.float32).state_dict().items()}
    references = [peft_merged_state(llama_fp32, a, torch.float32) for a in adapters]
    ours = [dora_merged(llama_fp32, a)[0] for a in adapters]
    method = get_method("task_arithmetic")
    params = method.resolve_params({"lambda": 1.0})
    for target in ours[0]:
        w0 = base_state[target]
        updates = tuple(DenseUpdate(o[target] - w0) for o in ours)
        inputs = MergeInputs(name=target, base=w0, updates=updates, weights=(1.0, 1.0),
                             generator=torch.Generator().manual_seed(0))
        merged = w0 + method.merge(inputs, params).update.dense()
        expected = w0 + sum(r[target] - w0 for r in references)
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6, msg=lambda m, t=target: f"{t}: {m}")


def test_row_norm_matches_an_independent_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    w0, a, b = (torch.randn(*s, generator=gen) for s in ((6, 5), (2, 5), (6, 2)))
    m = torch.rand(6, generator=gen) + 0.5
    merged = w0 + b @ a
    expected = m[:, None] * merged / merged.norm(dim=1, keepdim=True) - w0
    torch.testing.assert_close(dora_task_vector(w0, lora_delta_rows(a, b, 0, 6, False), m, False), expected)
    # Stored transposed ([d_in, d_out]): the same per-output norm, now over each column.
    got = dora_task_vector(w0.T.contiguous(), lora_delta_rows(a, b, 0, 5, True), m, True)
    torch.testing.assert_close(got, expected.T)


def test_zero_direction_row_stays_zero() -> None:
    w0 = torch.zeros(2, 3)
    w0[1] = 1.0
    out = dora_task_vector(w0, torch.zeros(2, 3), torch.tensor([5.0, 2.0]), False)
    assert torch.isfinite(out).all() and out[0].abs().sum() == 0


def test_dora_refused_unless_accepted() -> None:
    doc = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}
    with pytest.raises(UnsupportedAdapterError, match="use_dora=True"):
        parse_lora_settings(Path("/adapters/x"), doc)
    assert parse_lora_settings(Path("/adapters/x"), doc, accept=("use_dora",)).use_dora
    with pytest.raises(UnsupportedAdapterError, match="lora_bias"):
        parse_lora_settings(Path("/adapters/x"), {**doc, "lora_bias": True}, accept=("use_dora",))


def test_magnitude_without_use_dora_is_a_problem(llama_fp32: Path, tmp_path: Path) -> None:
    import json
    adapter = save_dora_adapter(llama_fp32, tmp_path / "dora", torch.float32, seed=4, r=2, lora_alpha=2,
                                target_modules=["q_proj"])
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": False}))
    problems: list[str] = []
    parsed = load_lora_adapter(adapter, open_checkpoint(llama_fp32).tensor_names, problems)
    assert parsed.modules == () and len(problems) >= 2
    assert all("lora_magnitude_vector although use_dora is not set" in p for p in problems if "module" in p)
    assert LoraModule.__dataclass_fields__["magnitude_key"].default is None
