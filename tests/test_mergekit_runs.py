"""mergekit configs with per-model densities, per-tensor normalization and chat templates, run through the
CLI on a tiny synthetic Llama, against mergekit 0.1.5's formulas computed here from the files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_model, run_cli
from tests.test_mergekit_cli import LAYERS, t_of, world, write_config
from tests.test_mergekit_config import mk_evaluate
from tests.test_mergekit_conventions import mk_combine, mk_magnitude

__all__ = ["world"]


def merge(config: Path, out: Path, check: bool = True):
    return run_cli("merge", str(config), "--out", str(out), "--no-progress", "--device", "cpu", check=check)


def test_ties_with_a_density_per_model_gradient_and_filter_equals_mergekit_bit_for_bit(world, tmp_path) -> None:
    density1 = [0.2, 0.7]
    density2 = [{"filter": "mlp", "value": 0.6}, {"value": [0.5, 0.1]}]
    weight2 = [{"filter": "self_attn", "value": 0.4}, {"value": 0.8}]
    doc = {"merge_method": "ties", "base_model": str(world["base"]), "dtype": "float32",
           "models": [{"model": str(world["ft1"]), "parameters": {"weight": 0.5, "density": density1}},
                      {"model": str(world["ft2"]), "parameters": {"weight": weight2, "density": density2}}]}
    merge(write_config(tmp_path / "mk.yml", doc), tmp_path / "out")
    merged, base = read_model(tmp_path / "out"), read_model(world["base"])
    fts = [read_model(world["ft1"]), read_model(world["ft2"])]
    for name, w0 in base.items():
        t = t_of(name)
        densities = [mk_evaluate(name, density1, t), mk_evaluate(name, density2, t)]
        weights = [0.5, mk_evaluate(name, weight2, t)]
        sparse = [mk_magnitude(ft[name] - w0, k) for ft, k in zip(fts, densities)]
        assert torch.equal(merged[name], w0 + mk_combine(sparse, weights, True, True)), name


def test_normalize_true_with_gradient_weights_divides_by_every_models_weight(world, tmp_path) -> None:
    """A LoRA changes 7 projections per layer; on every other tensor its weight still divides (mergekit's
    task vector of the LoRA model is 0 there)."""
    w_lora, w_ft = [0.2, 1.0], [{"filter": "mlp", "value": 0.5}, {"value": 0.25}]
    doc = {"merge_method": "task_arithmetic", "base_model": str(world["base"]), "parameters": {"normalize": True},
           "models": [{"model": f"{world['base']}+{world['lora']}", "parameters": {"weight": w_lora}},
                      {"model": str(world["ft1"]), "parameters": {"weight": w_ft}}]}
    merge(write_config(tmp_path / "mk.yml", doc), tmp_path / "out")
    merged, base, ft = read_model(tmp_path / "out"), read_model(world["base"]), read_model(world["ft1"])
    factors = load_file(str(world["lora"] / "adapter_model.safetensors"))
    touched = 0
    for name, w0 in base.items():
        a, b = mk_evaluate(name, w_lora, t_of(name)), mk_evaluate(name, w_ft, t_of(name))
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        lora = torch.zeros_like(w0)
        if a_key in factors:
            lora = 2.0 * factors[a_key.replace("lora_A", "lora_B")] @ factors[a_key]  # lora_alpha = 2r
            touched += 1
        expected = w0 + (a * lora + b * (ft[name] - w0)) / (a + b)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert touched == 7 * LAYERS


def test_linear_with_gradient_weights_averages_every_model_the_base_included(world, tmp_path) -> None:
    w_base, w1, w2 = 0.5, [0.2, 0.8], [{"filter": "mlp", "value": 1.0}, {"value": 0.3}]
    doc = {"merge_method": "linear", "base_model": str(world["base"]),
           "models": [{"model": str(world["base"]), "parameters": {"weight": w_base}},
                      {"model": str(world["ft1"]), "parameters": {"weight": w1}},
                      {"model": str(world["ft2"]), "parameters": {"weight": w2}}]}
    merge(write_config(tmp_path / "mk.yml", doc), tmp_path / "out")
    merged, base = read_model(tmp_path / "out"), read_model(world["base"])
    fts = [read_model(world["ft1"]), read_model(world["ft2"])]
    for name, w0 in base.items():
        weights = [w_base, mk_evaluate(name, w1, t_of(name)), mk_evaluate(name, w2, t_of(name))]
        models = [w0, fts[0][name], fts[1][name]]
        expected = sum(w * m for w, m in zip(weights, models)) / sum(weights)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7, msg=name)


# --- chat templates ----------------------------------------------------------------------------

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
OTHER = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def with_tokenizer(src: Path, dst: Path, template: str | None, jinja: bool = False) -> Path:
    shutil.copytree(src, dst)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}
    if template is not None and not jinja:
        config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja and template is not None:
        (dst / "chat_template.jinja").write_text(template)
    return dst


@pytest.fixture(scope="module")
def chat_world(world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    return {"base": with_tokenizer(world["base"], root / "base", OTHER),
            "ft1": with_tokenizer(world["ft1"], root / "ft1", "  " + CHATML + "\n"),
            "ft2": with_tokenizer(world["ft2"], root / "ft2", CHATML, jinja=True)}


def chat_doc(w: dict[str, Path], template, base: Path | None = None) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base or w["base"]), "chat_template": template,
            "tokenizer_source": "base",
            "models": [{"model": str(w["ft1"]), "parameters": {"weight": 0.5}},
                       {"model": str(w["ft2"]), "parameters": {"weight": 0.5}}]}


def test_chat_template_auto_takes_the_most_common_stripped_template(chat_world, tmp_path) -> None:
    merge(write_config(tmp_path / "mk.yml", chat_doc(chat_world, "auto")), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML  # ft1 and ft2 (one stored in chat_template.jinja) against the base
    assert config["model_max_length"] == 128


def test_chat_template_text_is_written_and_base_keeps_the_files(chat_world, tmp_path) -> None:
    merge(write_config(tmp_path / "a.yml", chat_doc(chat_world, CHATML)), tmp_path / "a")
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    native = {"base": str(chat_world["base"]), "method": "task_arithmetic", "chat_template": "base",
              "inputs": [{"path": str(chat_world["ft1"]), "kind": "model"}]}
    merge(write_config(tmp_path / "b.yml", native), tmp_path / "b")
    assert ((tmp_path / "b" / "tokenizer_config.json").read_bytes()
            == (chat_world["base"] / "tokenizer_config.json").read_bytes())


def test_chat_template_replaces_a_bases_chat_template_jinja(chat_world, tmp_path) -> None:
    merge(write_config(tmp_path / "mk.yml", chat_doc(chat_world, OTHER, base=chat_world["ft2"])), tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == OTHER
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == OTHER


def test_chat_template_without_a_base_tokenizer_config_is_refused(world, tmp_path) -> None:
    doc = chat_doc({"base": world["base"], "ft1": world["ft1"], "ft2": world["ft2"]}, CHATML)
    proc = merge(write_config(tmp_path / "mk.yml", doc), tmp_path / "out", check=False)
    assert proc.returncode == 2 and "chat_template: the base" in proc.stderr and "tokenizer_config.json" in proc.stderr
