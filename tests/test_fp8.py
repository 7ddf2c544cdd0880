"""Block-scaled FP8: our row-block dequantize/requantize == transformers' FP8 integration; models round-trip."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streammerge.errors import InputError
from streammerge.io.fp8 import (FP8_DTYPE, Fp8Format, aligned_block_rows, dequantize_rows, fp8_weight_scales,
                                quantize_rows, read_fp8_format, scale_grid_shape, scale_inv_name,
                                without_quantization_config)
from streammerge.io.reader import CheckpointReader, open_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMT = Fp8Format()
QUANT_CONFIG = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"}


def hf_quantizer(scale_fmt: str = "float"):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config
    config = FineGrainedFP8Config(weight_block_size=[128, 128], scale_fmt=scale_fmt)
    holder = types.SimpleNamespace(quantization_config=config)
    return Fp8Quantize(holder), Fp8Dequantize(holder)


def blockwise(values: torch.Tensor, start: int, step: int, fn) -> list:
    return [fn(values[s:s + step], s) for s in range(start, values.shape[0], step)]


def stream_quantize(values: torch.Tensor, fmt: Fp8Format = FMT, step: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    parts = blockwise(values, 0, step, lambda rows, s: quantize_rows(rows, s, fmt))
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def stream_dequantize(weight: torch.Tensor, scale: torch.Tensor, step: int = 128) -> torch.Tensor:
    return torch.cat([dequantize_rows(weight[s:s + step], scale[s // 128:(s + step + 127) // 128], s, FMT)
                      for s in range(0, weight.shape[0], step)])


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_and_dequantize_equal_transformers(scale_fmt: str) -> None:
    values = torch.randn(384, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    values[:128, :128] = 0  # an all-zero block keeps scale 1
    quantize, dequantize = hf_quantizer(scale_fmt)
    theirs = quantize.convert({"m.weight": values})
    fmt = Fp8Format(scale_fmt=scale_fmt)
    ours_q, ours_s = stream_quantize(values, fmt)
    assert ours_q.dtype == FP8_DTYPE and ours_s.dtype == theirs["m.weight_scale_inv"].dtype
    assert torch.equal(ours_q.view(torch.uint8), theirs["m.weight"].view(torch.uint8))
    assert torch.equal(ours_s.float(), theirs["m.weight_scale_inv"].float())
    reference = dequantize.convert({"weight": ours_q, "weight_scale_inv": ours_s.float()})["weight"]
    assert torch.equal(stream_dequantize(ours_q, ours_s), reference.float())


def test_edge_blocks_match_transformers_and_a_loop() -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(300, 200, generator=gen)
    weight, scale = stream_quantize(values, step=256)
    assert tuple(scale.shape) == scale_grid_shape((300, 200), FMT) == (3, 2)
    for i in range(3):  # an independent per-block reference, partial edge blocks included
        for j in range(2):
            block = values[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert scale[i, j] == pytest.approx(float(block.abs().max()) / 448, rel=1e-6)
    ours = stream_dequantize(weight, scale)
    torch.testing.assert_close(ours, _dequantize_fp8_weight(weight, scale, [128, 128], torch.float32),
                               rtol=0, atol=0)
    assert ((ours - values).abs() <= values.abs() / 16 + scale.max() * 2 ** -9).all()  # e4m3: 3 mantissa bits


def test_row_blocks_must_start_on_the_block_grid() -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_rows(torch.zeros(10, 10), 64, FMT)
    assert aligned_block_rows(1000, FMT) == 896 and aligned_block_rows(10, FMT) == 128


def test_format_and_pairs_are_checked() -> None:
    assert read_fp8_format({"quantization_config": QUANT_CONFIG}, "m") == FMT
    assert read_fp8_format({"quantization_config": {"quant_method": "bitsandbytes"}}, "m") is None
    with pytest.raises(InputError, match="per-tensor"):
        read_fp8_format({"quantization_config": {**QUANT_CONFIG, "weight_block_size": None}}, "m")
    with pytest.raises(InputError, match="expert_dtype='fp4'"):
        read_fp8_format({"quantization_config": {**QUANT_CONFIG, "expert_dtype": "fp4"}}, "m")
    assert without_quantization_config({"a": 1, "quantization_config": QUANT_CONFIG}) == {"a": 1}
    assert scale_inv_name("x.q_proj.weight") == "x.q_proj.weight_scale_inv"
    from streammerge.io.header import TensorInfo
    w = TensorInfo("m.weight", "F8_E4M3", (300, 200), 0, 60000)
    good = TensorInfo("m.weight_scale_inv", "F32", (3, 2), 0, 24)
    assert fp8_weight_scales({"m.weight": w, good.name: good}, FMT, "m") == {"m.weight": good.name}
    with pytest.raises(InputError, match=r"expected \[3, 2\]"):
        fp8_weight_scales({"m.weight": w, good.name: TensorInfo(good.name, "F32", (2, 2), 0, 16)}, FMT, "m")
    with pytest.raises(InputError, match="has no 'm.weight_scale_inv'"):
        fp8_weight_scales({"m.weight": w}, FMT, "m")
    with pytest.raises(InputError, match="no float8_e4m3fn weight"):
        fp8_weight_scales({good.name: good}, FMT, "m")


def save_fp8_llama(out: Path, layers: int = 1, scale_fmt: str = "float") -> Path:
    """A tiny Llama whose linear weights are block-scaled FP8 (quantized by transformers, scales in
    ``scale_fmt``), the rest bf16; intermediate 384 = 3 blocks, so edge blocks are partial."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    quantize, _ = hf_quantizer(scale_fmt)
    state = load_file(str(out / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        fp8.update(quantize.convert({name: tensor}) if name.endswith("proj.weight") else {name: tensor})
    save_file(fp8, str(out / "model.safetensors"), metadata={"format": "pt"})
    doc = json.loads((out / "config.json").read_text())
    quant = {**QUANT_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt != "float" else {})}
    (out / "config.json").write_text(json.dumps({**doc, "quantization_config": quant}))
    return out


def test_fp8_base_merge_round_trips_through_transformers(tmp_path: Path) -> None:
    """Read FP8 with our reader → dequantize → + LoRA → requantize (row blocks) == the whole-tensor reference."""
    from transformers import AutoModelForCausalLM
    base = save_fp8_llama(tmp_path / "base")
    layout = open_checkpoint(base)
    fmt = read_fp8_format(json.loads((base / "config.json").read_text()), str(base))
    assert fmt is not None
    pairs = fp8_weight_scales(layout.headers[layout.shards[0]].tensors, fmt, str(base))
    assert "model.layers.0.self_attn.q_proj.weight" in pairs and "model.embed_tokens.weight" not in pairs
    gen = torch.Generator().manual_seed(5)
    quantize, dequantize = hf_quantizer()
    out_fp8, out_bf16 = load_file(str(base / "model.safetensors")), {}
    with CheckpointReader(layout) as reader:
        for name, scale_name in pairs.items():
            rows, cols = layout.info(name).shape
            up, down = torch.randn(rows, 4, generator=gen) * 0.01, torch.randn(4, cols, generator=gen)
            scales = reader.read(scale_name)
            q_parts, s_parts, dense_parts = [], [], []
            for start in range(0, rows, 128):  # the streamed path: one 128-row block at a time
                stop = min(start + 128, rows)
                block = dequantize_rows(reader.read_rows(name, start, stop), scales[start // 128:(stop + 127) // 128],
                                        start, fmt) + up[start:stop] @ down
                dense_parts.append(block)
                q, s = quantize_rows(block, start, fmt)
                q_parts.append(q)
                s_parts.append(s)
            # Reference: transformers dequantizes the whole tensor, we add the whole delta, transformers requantizes.
            whole = dequantize.convert({"weight": reader.read(name), "weight_scale_inv": scales})["weight"].float()
            expected = quantize.convert({name: whole + up @ down})
            ours_q = torch.cat(q_parts)
            assert torch.equal(ours_q.view(torch.uint8), expected[name].view(torch.uint8)), name
            assert torch.equal(torch.cat(s_parts), expected[scale_name]), name
            out_fp8[name], out_fp8[scale_name] = ours_q, torch.cat(s_parts)
            out_bf16[name] = torch.cat(dense_parts).to(torch.bfloat16)
    config = json.loads((base / "config.json").read_text())
    for folder, tensors, doc in (("fp8", out_fp8, config), ("bf16", out_bf16, without_quantization_config(config))):
        (tmp_path / folder).mkdir()
        if folder == "bf16":
            tensors = {**{k: v for k, v in out_fp8.items() if k not in pairs and k not in pairs.values()}, **tensors}
        save_file(tensors, str(tmp_path / folder / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / folder / "config.json").write_text(json.dumps(doc))
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.bfloat16).state_dict()
        for name, scale_name in pairs.items():
            if folder == "fp8":  # transformers on CPU dequantizes FP8 to bf16 while loading
                want = dequantize_rows(out_fp8[name], out_fp8[scale_name], 0, fmt).to(torch.bfloat16)
            else:
                want = out_bf16[name]
            assert torch.equal(loaded[name], want), (folder, name)
        assert torch.equal(loaded["model.embed_tokens.weight"], out_fp8["model.embed_tokens.weight"])


def test_reader_reads_fp8_weights_and_ue8m0_scales(tmp_path: Path) -> None:
    values = torch.randn(256, 130, generator=torch.Generator().manual_seed(2))
    fmt = Fp8Format(scale_fmt="ue8m0")
    weight, scale = stream_quantize(values, fmt)
    save_file({"m.weight": weight, "m.weight_scale_inv": scale}, str(tmp_path / "model.safetensors"))
    layout = open_checkpoint(tmp_path)
    assert layout.info("m.weight").dtype == "F8_E4M3" and layout.info("m.weight_scale_inv").dtype == "F8_E8M0"
    assert fp8_weight_scales({n: layout.info(n) for n in layout.tensor_names}, fmt, "m") == {
        "m.weight": "m.weight_scale_inv"}
    with CheckpointReader(layout) as reader:
        rows = reader.read_rows("m.weight", 128, 256)
        assert torch.equal(rows.view(torch.uint8), weight[128:].view(torch.uint8))
        got = dequantize_rows(rows, reader.read_rows("m.weight_scale_inv", 1, 2), 128, fmt)
    torch.testing.assert_close(got, stream_dequantize(weight, scale)[128:], rtol=0, atol=0)
    assert torch.equal(torch.log2(scale.float()), torch.log2(scale.float()).round())  # powers of two
