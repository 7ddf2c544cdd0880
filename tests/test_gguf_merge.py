"""Merge straight into GGUF == merge into an HF directory, then llama.cpp's pinned converter.

A SmolLM2-shaped Llama carrying SmolLM2's real tokenizer and two PEFT adapters: ``--output-format
gguf`` against ``convert_hf_to_gguf.py`` run on our HF output; every tensor (name, type, shape,
offset, bytes) and every key outside ``general.*`` equal.  And the GGUF output job resumes,
verifies and re-runs as a no-op like every other output format.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from streammerge import InputSpec, Recipe, build_plan, merge, run_plan
from streammerge.jobs.verify import verify_output
from tests.gguf_oracle import llamacpp_tree, run_converter
from tests.helpers import save_peft_adapter
from tests.test_gguf_output import _read, _save_model
from tests.test_resume import killed_run

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    llamacpp_tree()
    root = tmp_path_factory.mktemp("gguf-merge")
    base = _save_model("smollm2", root / "base", torch.bfloat16)
    adapters = [save_peft_adapter(base, root / f"a{i}", torch.bfloat16, seed=i, r=4, lora_alpha=8,
                                  target_modules=["q_proj", "v_proj", "down_proj"]) for i in (1, 2)]
    recipe = Recipe(base=str(base), inputs=tuple(InputSpec(str(a), weight=w) for a, w in zip(adapters, (1.0, 0.5))),
                    method="task_arithmetic", device="cpu")
    merge(recipe, str(root / "hf"))
    run_converter([[str(root / "hf"), "--outtype", t, "--outfile", str(root / f"ref-{t}.gguf")]
                   for t in ("bf16", "q8_0")])
    return root, recipe


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_merge_to_gguf_equals_converter_on_the_hf_merge(merged, gguf_type):
    root, recipe = merged
    out = root / f"gguf-{gguf_type}"
    merge(replace(recipe, output_format="gguf", gguf_type=gguf_type), str(out))
    (kv, infos, data), (ref_kv, ref_infos, ref_data) = _read(out / "model.gguf"), _read(root / f"ref-{gguf_type}.gguf")
    assert sorted(kv) == sorted(ref_kv) and [k for k in kv if kv[k] != ref_kv[k]] == []
    assert infos == ref_infos
    assert data == ref_data
    assert verify_output(out).ok


def test_gguf_job_resumes_to_identical_bytes_and_reruns_as_a_no_op(merged, tmp_path):
    root, recipe = merged
    plan = build_plan(replace(recipe, output_format="gguf", gguf_type="q8_0"))
    reference = tmp_path / "ref"
    run_plan(plan, reference)
    out = tmp_path / "out"
    killed_run(plan, out, "record:1")
    assert not verify_output(out).ok
    report = run_plan(plan, out)
    assert not report.already_complete
    assert (out / "model.gguf").read_bytes() == (reference / "model.gguf").read_bytes()
    assert run_plan(plan, out).already_complete
    assert verify_output(out).ok
