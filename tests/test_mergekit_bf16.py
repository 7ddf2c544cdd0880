"""``compute_dtype: bfloat16 / float16`` against mergekit 0.1.5's ``merge_group`` written here in that dtype.

mergekit with ``dtype: bfloat16`` runs every op on bf16 tensors (``generalized_task_arithmetic.py``,
``sparsify.py``): ``deltas = stack(M_i − W0)``, sparsified (``argsort`` / ``sort`` of the flattened
``|δ|`` in fp32, a mask of the tensor's dtype), ``deltas *= tensor(weights, dtype)``, the sign mask,
``sum(dim=0)`` of the stack, the divide, ``λ``, ``W0 + mixed``.  The reference below is that code
path (stacked tensors, torch's own reductions), not ours (fp32 accumulators one input at a time).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from streammerge.conventions import convention_defaults
from streammerge.errors import MethodParameterError
from streammerge.mergekit_config import translate_mergekit
from streammerge.methods import DenseUpdate, LowRankUpdate, MergeInputs, get_method
from streammerge.methods.sparsify import RandomDrop
from tests.helpers import read_model, run_cli
from tests.test_mergekit_cli import t_of, world as fp32_world, write_config
from tests.test_mergekit_config import mk_evaluate
from tools.synthetic import PRESETS, write_finetune, write_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (48, 40)
NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --- mergekit's merge_group in a narrow dtype -------------------------------------------------------

def mk_mask(t: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[picked] = 1
    return mask.reshape_as(t)


def mk_rescaled(t: torch.Tensor, mask: torch.Tensor, l1: bool) -> torch.Tensor:
    masked = t * mask
    if not l1:
        return masked
    before, after = t.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def mk_sparsify(kind: str, t: torch.Tensor, density: float, gamma: float, l1: bool,
                dare_mask: torch.Tensor | None) -> torch.Tensor:
    if kind == "none" or density >= 1:
        return t
    n = t.numel()
    if kind == "magnitude":
        k = max(1, int(density * n))
        mask = mk_mask(t, torch.argsort(t.abs().reshape(-1).float(), descending=True)[:k])
    elif kind == "outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        mask = mk_mask(t, torch.sort(t.abs().reshape(-1).float()).indices[bottom:bottom + target])
    else:  # DARE: the arithmetic with our mask (mergekit's comes from torch's global generator)
        assert dare_mask is not None
        mask = dare_mask.to(t.dtype)
    return mk_rescaled(t, mask, l1)


def mk_merge(w0: torch.Tensor, models: list[torch.Tensor], weights: list[float], *, kind: str = "none",
             consensus: bool = False, normalize: bool = False, lam: float = 1.0, density: float | list[float] = 1.0,
             gamma: float = 0.01, l1: bool = False, dare_masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``density``: one for all models or one per model (a parameter per model, as mergekit's are)."""
    densities = density if isinstance(density, list) else [density] * len(models)
    deltas = w0.new_empty((len(models), *w0.shape))
    for i, m in enumerate(models):
        deltas[i] = mk_sparsify(kind, m - w0, densities[i], gamma, l1, dare_masks[i] if dare_masks else None)
    w = torch.tensor(weights, dtype=deltas.dtype)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(w0.dtype) * 2 - 1
        mask = deltas.sign().to(w0.dtype) == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (w0 + mixed).to(w0.dtype)


# --- ours -------------------------------------------------------------------------------------------

def world(dtype: torch.dtype, count: int = 3, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(SHAPE, generator=g).to(dtype)
    return w0, [(w0.float() + 0.02 * torch.randn(SHAPE, generator=g)).to(dtype) for _ in range(count)]


def ours(method: str, w0: torch.Tensor, models: list[torch.Tensor], weights: list[float], given: dict,
         compute: str | None = None, seed: int = 5) -> torch.Tensor:
    m = get_method(method)
    compute = compute or NAMES[w0.dtype]
    params = m.resolve_params({**convention_defaults(method, "mergekit"), "compute_dtype": compute, **given})
    base = w0.float()
    inputs = MergeInputs("model.layers.0.mlp.up_proj.weight", base,
                         tuple(DenseUpdate(x.float() - base) for x in models),
                         tuple(weights), torch.Generator().manual_seed(seed))
    return (base + m.merge(inputs, params).update.dense()).to(w0.dtype)


WEIGHTS = [0.3, 0.9, 0.45]
CASES = {
    "task_arithmetic": ({}, {}),
    "task_arithmetic normalize lambda": ({"normalize": "total", "lambda": 0.7}, {"normalize": True, "lam": 0.7}),
    "ties": ({"density": 0.3, "normalize": "weights"}, {"kind": "magnitude", "consensus": True, "normalize": True,
                                                       "density": 0.3}),
    "ties no normalize lambda": ({"density": 0.3, "normalize": "none", "lambda": 1.3},
                                 {"kind": "magnitude", "consensus": True, "density": 0.3, "lam": 1.3}),
    "ties rescale": ({"density": 0.3, "normalize": "weights", "rescale": "l1"},
                     {"kind": "magnitude", "consensus": True, "normalize": True, "density": 0.3, "l1": True}),
    "magnitude_prune": ({"density": 0.25}, {"kind": "magnitude", "density": 0.25}),
    "breadcrumbs": ({"density": 0.4, "gamma": 0.05}, {"kind": "outliers", "density": 0.4, "gamma": 0.05}),
    "breadcrumbs_ties": ({"density": 0.4, "gamma": 0.05},
                         {"kind": "outliers", "consensus": True, "density": 0.4, "gamma": 0.05}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_narrow_compute_equals_mergekits_ops_in_that_dtype_bit_for_bit(case: str, dtype: torch.dtype) -> None:
    given, mk = CASES[case]
    w0, models = world(dtype)
    expected = mk_merge(w0, models, WEIGHTS, **mk)
    assert torch.equal(ours(case.split()[0], w0, models, WEIGHTS, given), expected)


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_narrow_arithmetic_equals_mergekits_with_the_same_mask(method: str, consensus: bool) -> None:
    w0, models = world(torch.bfloat16)
    drop = RandomDrop(0.5, torch.Generator().manual_seed(5), len(models), "none")
    masks = [drop.mask(torch.Size(SHAPE), i) for i in range(len(models))]
    expected = mk_merge(w0, models, WEIGHTS, kind="random", consensus=consensus, density=0.5, l1=True, dare_masks=masks)
    assert torch.equal(ours(method, w0, models, WEIGHTS, {"density": 0.5}), expected)


def test_a_lora_inputs_task_vector_is_that_of_the_copy_peft_merges_in_the_narrow_dtype() -> None:
    """mergekit merges ``model+lora`` with PEFT first: ``fl(W0 + (B·A)·s)`` (the fp32 product added to the bf16
    weight, rounded once), then takes its task vector like any model's."""
    w0, models = world(torch.bfloat16, count=1)
    g = torch.Generator().manual_seed(7)
    b, a = 0.05 * torch.randn(SHAPE[0], 4, generator=g), torch.randn(4, SHAPE[1], generator=g)
    merged_copy = (w0.float() + (b @ a) * 2.0).to(torch.bfloat16)
    expected = mk_merge(w0, [merged_copy, models[0]], [0.3, 0.9], kind="magnitude", consensus=True, normalize=True,
                        density=0.5)
    m = get_method("ties")
    params = m.resolve_params({**convention_defaults("ties", "mergekit"), "compute_dtype": "bfloat16",
                               "density": 0.5, "normalize": "weights"})
    base = w0.float()
    inputs = MergeInputs("w", base, (LowRankUpdate(up=b * 2.0, down=a), DenseUpdate(models[0].float() - base)),
                         (0.3, 0.9), torch.Generator())
    assert torch.equal((base + m.merge(inputs, params).update.dense()).to(torch.bfloat16), expected)


def test_fp32_compute_differs_from_mergekits_bf16_and_keeps_its_own_bytes() -> None:
    """The reference can tell the two apart: computing in fp32 and casting once is not mergekit's bf16."""
    w0, models = world(torch.bfloat16)
    given, mk = CASES["ties"]
    fp32 = ours("ties", w0, models, WEIGHTS, given, compute="float32")
    assert not torch.equal(fp32, mk_merge(w0, models, WEIGHTS, **mk))
    m = get_method("ties")
    params = m.resolve_params({**convention_defaults("ties", "mergekit"), **given})
    assert params["compute_dtype"] == "float32"
    base = w0.float()
    inputs = MergeInputs("w", base, tuple(DenseUpdate(x.float() - base) for x in models), tuple(WEIGHTS),
                         torch.Generator().manual_seed(5))
    assert torch.equal((base + m.merge(inputs, params).update.dense()).to(torch.bfloat16), fp32)


def test_task_arithmetic_narrow_is_elementwise_so_row_blocks_give_the_same_bits() -> None:
    w0, models = world(torch.bfloat16)
    m = get_method("task_arithmetic")
    params = m.resolve_params({"compute_dtype": "bfloat16", "normalize": "total", "lambda": 0.7})
    base = w0.float()
    updates = [x.float() - base for x in models]

    def merged(lo: int, hi: int) -> torch.Tensor:
        inputs = MergeInputs("w", base[lo:hi], tuple(DenseUpdate(u[lo:hi]) for u in updates), tuple(WEIGHTS),
                             torch.Generator())
        return m.merge(inputs, params).update.dense()

    assert torch.equal(torch.cat([merged(0, 8), merged(8, 13), merged(13, SHAPE[0])]), merged(0, SHAPE[0]))


def test_narrow_sparsifying_methods_run_on_whole_tensors_only() -> None:
    m = get_method("ties")
    assert m.rows is not None
    assert m.rows.supports(m.resolve_params({"density": 0.3}))
    assert not m.rows.supports(m.resolve_params({"density": 0.3, "compute_dtype": "bfloat16"}))


@pytest.mark.parametrize("method,given", [("ties", {"orthogonalize": True}), ("ties", {"scope": "global"}),
                                          ("ties", {"lambda": "auto"}), ("breadcrumbs", {"band": "row"})])
def test_narrow_compute_refuses_what_mergekit_does_not_compute(method: str, given: dict) -> None:
    with pytest.raises(MethodParameterError, match="compute_dtype 'bfloat16'"):
        get_method(method).resolve_params({**given, "compute_dtype": "bfloat16"})


# --- the translation and the engine -----------------------------------------------------------------

def doc_for(method: str, dtype: str, **extra) -> dict:
    return {"merge_method": method, "base_model": "/m/base", "dtype": dtype,
            "models": [{"model": "/m/a", "parameters": {"weight": 0.3, "density": 0.5}},
                       {"model": "/m/b", "parameters": {"weight": 0.6, "density": 0.5}}], **extra}


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs_ties", "dare_ties"])
def test_a_bf16_config_computes_in_bf16_and_linear_and_fp32_configs_do_not(method: str) -> None:
    params = dict(translate_mergekit(doc_for(method, "bfloat16")).recipe.params)
    assert params["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in dict(translate_mergekit(doc_for(method, "float32")).recipe.params)
    linear = {k: v for k, v in doc_for("linear", "bfloat16").items() if k != "base_model"}
    linear_params = dict(translate_mergekit(linear).recipe.params)
    assert "compute_dtype" not in linear_params and linear_params["load_dtype"] == "bfloat16"
    assert dict(translate_mergekit(doc_for(method, "float16")).recipe.params)["compute_dtype"] == "float16"


def test_normalize_true_in_bf16_divides_after_the_sum_instead_of_folding_the_weights() -> None:
    """mergekit divides the bf16 sum by the bf16 sum of the weights; folded weights w_i/Σw round otherwise."""
    doc = doc_for("task_arithmetic", "bfloat16", parameters={"normalize": True})
    recipe = translate_mergekit(doc).recipe
    assert dict(recipe.params)["normalize"] == "total"
    assert [s.weight for s in recipe.inputs] == [0.3, 0.6]
    folded = translate_mergekit(doc_for("task_arithmetic", "float32", parameters={"normalize": True})).recipe
    assert dict(folded.params)["normalize"] == "none"


@pytest.fixture(scope="module")
def bf16_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mkbf16")
    base = write_model(root / "base", PRESETS["tiny"], dtype="BF16")
    return {"base": base, "ft1": write_finetune(base, root / "ft1", seed=1, std=0.01),
            "ft2": write_finetune(base, root / "ft2", seed=2, std=0.01)}


@pytest.mark.parametrize("method", ["ties", "task_arithmetic",
                                    pytest.param("breadcrumbs_ties", marks=pytest.mark.slow)])
def test_a_bf16_mergekit_config_on_bf16_models_gives_mergekits_bytes(bf16_world, tmp_path, method: str) -> None:
    w = bf16_world
    weight1, weight2 = [0.3, 0.9], [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]
    params1, params2 = {"weight": weight1}, {"weight": weight2}
    if method != "task_arithmetic":
        params1.update(density=0.5, gamma=0.05)
        params2.update(density=[0.3, 0.7], gamma=0.05)
    if method == "ties":
        del params1["gamma"], params2["gamma"]
    doc = {"merge_method": method, "base_model": str(w["base"]), "dtype": "bfloat16",
           "parameters": {"normalize": True, "lambda": 0.9},
           "models": [{"model": str(w["ft1"]), "parameters": params1}, {"model": str(w["ft2"]), "parameters": params2}]}
    run_cli("merge", str(write_config(tmp_path / "mk.yml", doc)), "--out", str(tmp_path / "out"), "--no-progress",
            "--device", "cpu")
    merged, base = read_model(tmp_path / "out"), read_model(w["base"])
    fts = [read_model(w["ft1"]), read_model(w["ft2"])]
    kind = {"ties": "magnitude", "breadcrumbs_ties": "outliers"}.get(method, "none")
    for name, w0 in base.items():
        t = t_of(name)
        weights = [mk_evaluate(name, weight1, t), mk_evaluate(name, weight2, t)]
        densities = [0.5, mk_evaluate(name, [0.3, 0.7], t)] if kind != "none" else 1.0
        expected = mk_merge(w0, [ft[name] for ft in fts], weights, kind=kind, consensus=kind != "none",
                            normalize=True, lam=0.9, density=densities, gamma=0.05)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], expected), name


@pytest.mark.parametrize("models,out_dtype", [("fp32", None), ("bf16", "float32")])
def test_fp32_models_are_rounded_on_load_and_the_result_before_another_out_dtype(fp32_world, bf16_world, tmp_path,
                                                                                  models: str, out_dtype) -> None:
    """mergekit loads every tensor in ``dtype`` (fp32 models too) and its merge returns ``dtype`` tensors,
    which ``out_dtype`` then casts."""
    w = fp32_world if models == "fp32" else bf16_world
    doc = {"merge_method": "ties", "base_model": str(w["base"]), "dtype": "bfloat16",
           "models": [{"model": str(w["ft1"]), "parameters": {"weight": 0.3, "density": 0.4}},
                      {"model": str(w["ft2"]), "parameters": {"weight": 0.7, "density": 0.4}}]}
    if out_dtype:
        doc["out_dtype"] = out_dtype
    run_cli("merge", str(write_config(tmp_path / "mk.yml", doc)), "--out", str(tmp_path / "out"), "--no-progress",
            "--device", "cpu")
    merged, base = read_model(tmp_path / "out"), read_model(w["base"])
    fts = [read_model(w["ft1"]), read_model(w["ft2"])]
    for name, w0 in base.items():
        bf = torch.bfloat16
        expected = mk_merge(w0.to(bf), [ft[name].to(bf) for ft in fts], [0.3, 0.7], kind="magnitude", consensus=True,
                            normalize=True, density=0.4)
        assert torch.equal(merged[name], expected.to(torch.float32 if out_dtype else bf)), name


def test_a_model_plus_lora_bf16_config_gives_mergekits_bytes(fp32_world, tmp_path) -> None:
    """fp32 files, ``dtype: bfloat16``: mergekit's merged copy is ``fl(fl(W0) + s·B·A)`` (PEFT on the base loaded
    in bf16, ``--lora-merge-dtype bfloat16``), every tensor then loaded in bf16."""
    w = fp32_world
    doc = {"merge_method": "task_arithmetic", "base_model": str(w["base"]), "dtype": "bfloat16",
           "parameters": {"normalize": True},
           "models": [{"model": f"{w['base']}+{w['lora']}", "parameters": {"weight": 0.3}},
                      {"model": str(w["ft1"]), "parameters": {"weight": 0.6}}]}
    run_cli("merge", str(write_config(tmp_path / "mk.yml", doc)), "--out", str(tmp_path / "out"), "--no-progress",
            "--device", "cpu")
    merged, base, ft = read_model(tmp_path / "out"), read_model(w["base"]), read_model(w["ft1"])
    factors = load_file(str(w["lora"] / "adapter_model.safetensors"))
    bf = torch.bfloat16
    for name, w0 in base.items():
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        copy = w0.to(bf)
        if a_key in factors:  # lora_alpha = 2r: s = 2
            copy = (w0.to(bf).float() + (factors[a_key.replace("lora_A", "lora_B")] @ factors[a_key]) * 2.0).to(bf)
        expected = mk_merge(w0.to(bf), [copy, ft[name].to(bf)], [0.3, 0.6], normalize=True)
        assert torch.equal(merged[name], expected), name


def mk_linear(models: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """mergekit's ``linear_merge``: fp32 ``Σ w_i M_i`` (``addcmul_``), divided by ``Σ w_i``, cast to the dtype."""
    result = torch.zeros_like(models[0], dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)
    for m, c in zip(models, w):
        result.addcmul_(m, c)
    return result.div_(w.sum()).to(models[0].dtype)


def test_a_bf16_linear_config_with_model_plus_lora_is_within_one_ulp_of_mergekits(fp32_world, tmp_path) -> None:
    """``linear`` computes in fp32 on tensors loaded in bf16, a LoRA merged into a bf16 copy first (load_dtype):
    ours ``W0 + Σ c_i (M_i − W0)``, mergekit's ``Σ w_i M_i / Σ w_i``, the same up to fp32 rounding."""
    w = fp32_world
    doc = {"merge_method": "linear", "dtype": "bfloat16",
           "models": [{"model": str(w["base"]), "parameters": {"weight": 0.2}},
                      {"model": f"{w['base']}+{w['lora']}", "parameters": {"weight": 0.5}},
                      {"model": str(w["ft1"]), "parameters": {"weight": 0.3}}]}
    run_cli("merge", str(write_config(tmp_path / "mk.yml", doc)), "--out", str(tmp_path / "out"), "--no-progress",
            "--device", "cpu")
    merged, base, ft = read_model(tmp_path / "out"), read_model(w["base"]), read_model(w["ft1"])
    factors = load_file(str(w["lora"] / "adapter_model.safetensors"))
    bf = torch.bfloat16
    copies = 0
    for name, w0 in base.items():
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        copy = w0.to(bf)
        if a_key in factors:
            copy = (w0.to(bf).float() + (factors[a_key.replace("lora_A", "lora_B")] @ factors[a_key]) * 2.0).to(bf)
            copies += 1
        expected = mk_linear([w0.to(bf), copy, ft[name].to(bf)], [0.2, 0.5, 0.3])
        # ulps at max(|W0|, |out|), as benchmarks/README.md §8 counts them: an average that cancels to ~0
        # keeps the absolute error of its |W0|-sized terms
        size = torch.maximum(w0.to(bf).abs(), expected.abs())
        ulp = (torch.nextafter(size, torch.full_like(size, float("inf"))) - size).float()
        assert merged[name].dtype == bf
        bad = (merged[name].float() - expected.float()).abs() > ulp
        assert not bool(bad.any()), (name, int(bad.sum()), merged[name][bad][:4], expected[bad][:4], ulp[bad][:4])
    assert copies > 0


def test_load_dtype_takes_a_loras_task_vector_against_its_merged_copy() -> None:
    w0, models = world(torch.bfloat16, count=1)
    g = torch.Generator().manual_seed(7)
    b, a = 0.05 * torch.randn(SHAPE[0], 4, generator=g), torch.randn(4, SHAPE[1], generator=g)
    base = w0.float()
    m = get_method("task_arithmetic")
    lora = LowRankUpdate(up=b * 2.0, down=a)
    copy_delta = (base + (b * 2.0) @ a).to(torch.bfloat16).float() - base
    inputs = MergeInputs("w", base, (lora, DenseUpdate(models[0].float() - base)), (0.4, 0.6), torch.Generator())
    plain = MergeInputs("w", base, (DenseUpdate(copy_delta), DenseUpdate(models[0].float() - base)), (0.4, 0.6),
                        torch.Generator())
    params = m.resolve_params({"load_dtype": "bfloat16"})
    assert torch.equal(m.merge(inputs, params).update.dense(), m.merge(plain, m.resolve_params({})).update.dense())
    assert not torch.equal(m.merge(inputs, params).update.dense(), m.merge(inputs, m.resolve_params({})).update.dense())


def test_an_unknown_compute_dtype_is_refused_by_name() -> None:
    with pytest.raises(MethodParameterError, match="compute_dtype"):
        get_method("ties").resolve_params({"compute_dtype": "float8"})
