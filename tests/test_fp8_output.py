"""FP8 output (``--dtype float8_e4m3fn`` on a block-scaled FP8 base) and full fine-tunes onto an FP8 base.

Oracle: transformers' own ``Fp8Dequantize`` of the whole base weight, the merge in fp32, and
transformers' ``Fp8Quantize`` of the whole merged weight, compared bit for bit with what the engine
streams row block by row block; the output loads in transformers (which dequantizes FP8 on the CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streammerge import InputSpec, Recipe, build_plan, merge, run_plan
from streammerge.errors import PlanError
from streammerge.io.fp8 import Fp8Format, dequantize_rows, quantize_rows
from streammerge.io.reader import open_checkpoint
from streammerge.jobs.verify import verify_output
from tests.test_fp8 import hf_quantizer, save_fp8_llama
from tests.test_resume import assert_same_output, killed_run
from tools.synthetic import write_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALE = "weight_scale_inv"


def save_fp8_model(out: Path, scale_fmt: str = "float") -> Path:
    """A tiny 2-layer Llama, linear weights block-scaled FP8 (transformers' quantizer), edge blocks partial
    (intermediate 384 = 3 blocks: transformers quantizes only whole blocks); embeddings, norms, lm_head bf16."""
    return save_fp8_llama(out, layers=2, scale_fmt=scale_fmt)


def whole_dequantized(stored: dict[str, torch.Tensor], name: str, scale_fmt: str = "float") -> torch.Tensor:
    """transformers' whole-tensor dequantization of FP8 weight ``name``."""
    _, dequantize = hf_quantizer(scale_fmt)
    weight = {"weight": stored[name], SCALE: stored[name.removesuffix("weight") + SCALE].float()}
    return dequantize.convert(weight)["weight"].float()


def lora_delta(adapters: list[Path], weights: tuple[float, ...], name: str) -> torch.Tensor | None:
    """Σ w_i · s_i · B_i A_i as one fp32 product of the stacked factors (Task Arithmetic of LoRAs); s = 2."""
    ups, downs = [], []
    for adapter, w in zip(adapters, weights):
        factors = load_file(str(adapter / "adapter_model.safetensors"))
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" in factors:
            ups.append(factors[key + ".lora_B.weight"].float() * (2.0 * w))
            downs.append(factors[key + ".lora_A.weight"].float())
    return torch.cat(ups, 1) @ torch.cat(downs) if ups else None


def assert_fp8_output(out: Path, base: Path, expected: dict[str, torch.Tensor], scale_fmt: str = "float") -> None:
    """FP8 weights in ``expected`` (fp32 merged values) == transformers' Fp8Quantize of them, bit for bit; every
    other tensor (untouched FP8 weights with their scales, bf16 tensors) == the base's bytes."""
    quantize, _ = hf_quantizer(scale_fmt)
    ours, stored = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(stored)
    for name, tensor in ours.items():
        if name in expected:
            want = quantize.convert({name: expected[name]})
            assert torch.equal(tensor.view(torch.uint8), want[name].view(torch.uint8)), name
            scale = name.removesuffix("weight") + SCALE
            assert ours[scale].dtype == stored[scale].dtype, scale
            assert torch.equal(ours[scale].float(), want[scale].float()), scale
        elif not name.endswith(SCALE) or name.removesuffix(SCALE) + "weight" not in expected:
            assert tensor.dtype == stored[name].dtype and torch.equal(tensor.view(torch.uint8),
                                                                       stored[name].view(torch.uint8)), name


@pytest.fixture(scope="module")
def fp8_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_out")
    base = save_fp8_model(root / "base")
    adapters = [write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
                write_adapter(base, root / "a2", rank=2, seed=2, b_std=0.05, targets=("q_proj", "down_proj"))]
    return {"root": root, "base": base, "adapters": adapters}


def test_fp8_output_equals_dequantize_merge_requantize(fp8_world, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    base, adapters = fp8_world["base"], fp8_world["adapters"]
    out = tmp_path / "out"
    merge(Recipe(base=str(base), inputs=(InputSpec(str(adapters[0])), InputSpec(str(adapters[1]), weight=0.5)),
                 device="cpu", dtype="float8_e4m3fn"), str(out))
    stored = load_file(str(base / "model.safetensors"))
    expected = {}
    for name in stored:
        delta = lora_delta(adapters, (1.0, 0.5), name) if stored[name].dtype == torch.float8_e4m3fn else None
        if delta is not None:
            expected[name] = whole_dequantized(stored, name) + delta
    assert len(expected) == 14  # 7 projections × 2 layers
    assert_fp8_output(out, base, expected)
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((base / "config.json").read_text())  # quantization_config and dtype kept
    assert config["quantization_config"]["quant_method"] == "fp8"
    infos = open_checkpoint(out).headers[out / "model.safetensors"].tensors
    for name in expected:  # each fresh scale is laid out right after its weight (the writer streams in file order)
        assert infos[name.removesuffix("weight") + SCALE].begin == infos[name].end, name
    assert verify_output(out).ok
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()  # CPU: dequantizes
    ours = load_file(str(out / "model.safetensors"))
    for name in expected:
        want = dequantize_rows(ours[name], ours[name.removesuffix("weight") + SCALE], 0, Fp8Format())
        assert torch.equal(loaded[name], want.to(torch.bfloat16)), name
    assert torch.equal(loaded["model.norm.weight"], stored["model.norm.weight"])


def test_ue8m0_scales_stay_ue8m0(tmp_path: Path) -> None:
    """DeepSeek-style power-of-two scales (scale_fmt: ue8m0, stored float8_e8m0fnu) are written as such."""
    base = save_fp8_model(tmp_path / "base", "ue8m0")
    adapter = write_adapter(base, tmp_path / "a", rank=4, seed=3, b_std=0.05, targets=("o_proj", "up_proj"))
    merge(Recipe(base=str(base), inputs=(InputSpec(str(adapter)),), device="cpu", dtype="float8_e4m3fn"),
          str(tmp_path / "out"))
    stored = load_file(str(base / "model.safetensors"))
    expected = {name: whole_dequantized(stored, name, "ue8m0") + delta for name in stored
                if (delta := lora_delta([adapter], (1.0,), name)) is not None}
    assert len(expected) == 4
    assert_fp8_output(tmp_path / "out", base, expected, "ue8m0")


def test_bf16_scales_are_rounded_before_quantizing() -> None:
    values = torch.randn(256, 200, generator=torch.Generator().manual_seed(4))
    q, scale = quantize_rows(values, 0, Fp8Format(), torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    back = dequantize_rows(q, scale, 0, Fp8Format())
    assert ((back - values).abs() <= values.abs() / 16 + scale.float().amax() * 2 ** -8).all()


def test_fp8_output_resumes_to_identical_bytes(fp8_world, tmp_path: Path) -> None:
    """Several shards, fresh scales in each; killed inside a shard, after a shard and after the last one."""
    base, adapters = fp8_world["base"], fp8_world["adapters"]
    out = tmp_path / "out"
    plan = build_plan(Recipe(base=str(base), inputs=tuple(InputSpec(str(a)) for a in adapters), device="cpu",
                             dtype="float8_e4m3fn", max_shard_size=200_000, out=str(out)))
    run_plan(plan, out)
    reference = tmp_path / "reference"
    out.rename(reference)
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) >= 3
    for name in shards:  # every fresh scale shares a shard with its weight
        with safe_open(str(reference / name), "pt") as f:
            keys = set(f.keys())
        assert all(k.removesuffix(SCALE) + "weight" in keys for k in keys if k.endswith(SCALE)), name
    for spec in ("bytes:150000", "shard:2", "record:3"):
        killed_run(plan, out, spec)
        assert not verify_output(out).ok
        report = run_plan(plan, out)
        assert not report.already_complete
        assert_same_output(reference, out)
        assert verify_output(out).ok
        shutil.rmtree(out)


def dequantized_finetune(base: Path, out: Path, seed: int) -> Path:
    """A bf16 full fine-tune of an FP8 base: its dequantized weights plus seeded noise, no quantization_config."""
    out.mkdir()
    stored = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE):
            continue
        value = whole_dequantized(stored, name) if tensor.dtype == torch.float8_e4m3fn else tensor.float()
        tensors[name] = (value + torch.randn(value.shape, generator=gen) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", None], ids=["fp8", "bf16"])
def test_full_finetune_onto_an_fp8_base(fp8_world, tmp_path: Path, dtype: str | None) -> None:
    """Task vector = FT − dequantized base, row block by row block; merged with a LoRA (Task Arithmetic)."""
    base, adapter = fp8_world["base"], fp8_world["adapters"][1]
    tune = dequantized_finetune(base, tmp_path / "ft", seed=9)
    out = tmp_path / "out"
    merge(Recipe(base=str(base), inputs=(InputSpec(str(tune), kind="model", weight=0.5), InputSpec(str(adapter))),
                 device="cpu", dtype=dtype), str(out))
    stored, ft = load_file(str(base / "model.safetensors")), load_file(str(tune / "model.safetensors"))
    merged = {}
    for name, value in ft.items():
        w0 = whole_dequantized(stored, name) if stored[name].dtype == torch.float8_e4m3fn else stored[name].float()
        delta = lora_delta([adapter], (1.0,), name)
        merged[name] = w0 + ((value.float() - w0) * 0.5 + (delta if delta is not None else 0))
    if dtype is None:
        ours = load_file(str(out / "model.safetensors"))
        assert not [n for n in ours if n.endswith(SCALE)]
        for name, value in merged.items():
            torch.testing.assert_close(ours[name].float(), value.to(torch.bfloat16).float(), rtol=0, atol=0,
                                       msg=lambda m, n=name: f"{n}: {m}")
        return
    fp8_names = {n for n in merged if stored[n].dtype == torch.float8_e4m3fn}
    ours = load_file(str(out / "model.safetensors"))
    quantize, _ = hf_quantizer()
    for name in fp8_names:
        want = quantize.convert({name: merged[name]})
        assert torch.equal(ours[name].view(torch.uint8), want[name].view(torch.uint8)), name
        assert torch.equal(ours[name.removesuffix("weight") + SCALE], want[name.removesuffix("weight") + SCALE])
    for name in set(merged) - fp8_names:  # bf16 tensors the FP8 format left alone stay bf16
        assert ours[name].dtype == torch.bfloat16
        torch.testing.assert_close(ours[name].float(), merged[name].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_fp8_refusals_name_the_field(fp8_world, tmp_path: Path) -> None:
    base, adapter = fp8_world["base"], fp8_world["adapters"][0]
    bf16 = dequantized_finetune(base, tmp_path / "bf16", seed=1)
    with pytest.raises(PlanError, match="float8_e4m3fn output needs a block-scaled FP8 base.*quantization_config"):
        build_plan(Recipe(base=str(bf16), inputs=(InputSpec(str(adapter)),), device="cpu", dtype="float8_e4m3fn"))
    with pytest.raises(PlanError, match="only written with output_format 'model'"):
        build_plan(Recipe(base=str(base), inputs=(InputSpec(str(adapter)),), device="cpu", dtype="float8_e4m3fn",
                          output_format="adapter", rank=4))
    with pytest.raises(PlanError, match="is F8_E4M3; a full fine-tune merged into an FP8 base must be stored "
                                        "unquantized"):
        fp8_finetune = shutil.copytree(base, tmp_path / "fp8-finetune")  # the base itself would only add its weight
        build_plan(Recipe(base=str(base), inputs=(InputSpec(str(fp8_finetune), kind="model"),), device="cpu"))
