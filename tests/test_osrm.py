"""OSRM: subspace math on synthetic covariances; the hook path, cache and PEFT round trip on a tiny llama."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streammerge import cli
from streammerge.inputs.lora import load_lora_adapter
from streammerge.errors import InputError
from streammerge.osrm import run as osrm_run
from streammerge.osrm.collect import collect_task_stats, load_model, parse_max_memory
from streammerge.osrm.data import padded_batches, read_examples
from streammerge.osrm.run import CollectOptions, gather_stats, osrm_init, osrm_project
from streammerge.osrm.stats import load_task_stats, stats_path
from streammerge.osrm.subspace import (
    ModuleStats,
    captured_energy,
    covariance_subspace,
    means_subspace,
    pooled_second_moment,
    project_factors,
    second_moment,
)
from tests.helpers import load_causal_lm, save_peft_adapter, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANK = 8
TARGETS = ["q_proj", "v_proj"]
# Each task uses its own 4 tokens: the input of a layer-0 projection is RMSNorm(embedding[token]),
# so a task's layer-0 features span exactly 4 known directions.
TASK_TOKENS = {"a": [3, 4, 5, 6], "b": [30, 31, 32, 33], "c": [60, 61, 62, 63]}
LAYER0 = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


# ---------------------------------------------------------------- synthetic statistics (pure math)

def _stats(features: torch.Tensor) -> ModuleStats:
    x = features.double()
    return ModuleStats(count=x.shape[0], sum_x=x.sum(0), sum_xxT=x.T @ x)


def _task_features(gen: torch.Generator, d: int, k: int, n: int, mean: torch.Tensor | None = None) -> tuple:
    basis = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]
    x = torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis.T
    if mean is not None:
        x = x + mean
    return x, basis


def test_covariance_subspace_is_orthonormal_and_blind_to_the_other_tasks():
    gen = torch.Generator().manual_seed(0)
    d, k = 32, 5
    pairs = [_task_features(gen, d, k, n) for n in (40, 400, 90)]  # unequal token counts
    feats = [f for f, _ in pairs]
    stats = [_stats(f) for f in feats]
    for t in range(3):
        others = [s for j, s in enumerate(stats) if j != t]
        # Oracle: with r = d - dim(others' span), the subspace must be exactly that span's complement.
        span = torch.linalg.qr(torch.cat([basis for j, (_, basis) in enumerate(pairs) if j != t], 1))[0]
        r = d - 2 * k
        sub = covariance_subspace(others, r)
        A = sub.A
        torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(A.T @ A, torch.eye(d, dtype=torch.float64) - span @ span.T, atol=1e-10, rtol=0)
        for j, f in enumerate(feats):
            if j != t:
                assert float((f @ A.T).norm() / f.norm()) < 1e-10
        assert sub.null_dim == r
        # a smaller rank picks r of those null directions: still blind to the others
        small = covariance_subspace(others, 3).A
        assert captured_energy(small, pooled_second_moment(others)) < 1e-14


def test_pooled_moment_weighs_tasks_equally_and_center_drops_the_mean():
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    x2 = torch.randn(1000, 6, generator=gen, dtype=torch.float64) + 3.0
    s1, s2 = _stats(x1), _stats(x2)
    expected = (x1.T @ x1 / 10 + x2.T @ x2 / 1000) / 2
    torch.testing.assert_close(pooled_second_moment([s1, s2]), expected, atol=1e-12, rtol=0)
    mu = x2.mean(0)
    torch.testing.assert_close(second_moment(s2, center=True), x2.T @ x2 / 1000 - torch.outer(mu, mu),
                               atol=1e-12, rtol=0)


def test_uncentred_default_keeps_the_shared_mean_out_of_A():
    # Other task: a large mean plus small noise in 3 directions (LLM features have big shared means).
    gen = torch.Generator().manual_seed(2)
    d = 12
    mean = torch.zeros(d, dtype=torch.float64)
    mean[0] = 10.0
    x, _ = _task_features(gen, d, 3, 500, mean=mean)
    others = [_stats(x)]
    raw = _stats(x)
    uncentred = covariance_subspace(others, d - 4).A
    centred = covariance_subspace(others, d - 3, center=True).A
    # Uncentred: the raw features (mean included) pass nothing. Centred ignores the mean direction.
    assert captured_energy(uncentred, second_moment(raw)) < 1e-12
    assert captured_energy(centred, second_moment(raw)) > 0.5


def test_means_variant_null_space_and_rank_beyond_it():
    gen = torch.Generator().manual_seed(3)
    d = 8
    others = [_stats(torch.randn(20, d, generator=gen, dtype=torch.float64) + 2 * i) for i in range(3)]
    means = torch.stack([s.mean() for s in others])
    sub = means_subspace(others, 4)
    assert sub.null_dim == d - 3 and sub.short_of_null == 0
    torch.testing.assert_close(sub.A @ sub.A.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float((means @ sub.A.T).abs().max()) < 1e-12
    # rank 7 > null space 5: no failure, the null space comes first, then the least-used directions
    wide = means_subspace(others, 7)
    assert wide.short_of_null == 2
    torch.testing.assert_close(wide.A @ wide.A.T, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float((means @ wide.A[:5].T).abs().max()) < 1e-12
    sing = torch.linalg.svdvals(means)
    torch.testing.assert_close((means @ wide.A[5:].T).norm(dim=0).sort().values, sing[1:].sort().values,
                               atol=1e-10, rtol=0)
    with pytest.raises(InputError, match="rank"):
        means_subspace(others, d + 1)


def test_project_factors_matches_the_formula():
    gen = torch.Generator().manual_seed(4)
    d_in, d_out, r, s = 24, 16, 4, 2.5
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    A_osrm = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))[0].T
    new_A, new_B = project_factors(A, B, A_osrm)
    torch.testing.assert_close(new_A, A_osrm)
    torch.testing.assert_close(new_B, (s * B @ A) @ A_osrm.T / s, atol=1e-12, rtol=0)
    torch.testing.assert_close(s * new_B @ new_A, (s * B @ A) @ A_osrm.T @ A_osrm, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- tiny llama: hooks, cache, PEFT

def _write_task(path: Path, tokens: list[int], seed: int, n: int = 12) -> Path:
    gen = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            length = int(torch.randint(3, 12, (1,), generator=gen))
            ids = [tokens[int(i)] for i in torch.randint(0, len(tokens), (length,), generator=gen)]
            f.write(json.dumps({"input_ids": ids}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread) -> dict:
    root = tmp_path_factory.mktemp("osrm")
    base = save_tiny_llama(root / "base")
    tasks = {name: _write_task(root / f"{name}.jsonl", tokens, seed=i)
             for i, (name, tokens) in enumerate(TASK_TOKENS.items())}
    opts = CollectOptions(batch_size=4)
    report = osrm_init(base, tasks, root / "init", target_modules=TARGETS, rank=RANK, opts=opts)
    return {"root": root, "base": base, "tasks": tasks, "out": root / "init", "report": report, "opts": opts}


def _layer_inputs(base: Path, files: list[Path], modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Independent oracle: every token's input to ``modules``, one unpadded example at a time."""
    model = load_causal_lm(base, torch.float32)
    table = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    handles = [table[m].register_forward_hook(lambda mod, args, out, m=m: seen[m].append(args[0][0].detach()))
               for m in modules]
    with torch.no_grad():
        for path in files:
            for line in path.read_text().splitlines():
                model(torch.tensor([json.loads(line)["input_ids"]]))
    for h in handles:
        h.remove()
    return {m: torch.cat(v) for m, v in seen.items()}


def test_init_adapters_are_orthonormal_and_blind_to_other_tasks(world):
    names = set(TASK_TOKENS)
    assert world["report"]["collected"] == list(TASK_TOKENS) and world["report"]["reused"] == []
    for task in TASK_TOKENS:
        factors = load_file(str(world["out"] / task / "adapter_model.safetensors"))
        assert len(factors) == 4 * 2  # 2 layers x (q, v) x (A, B)
        for key, value in factors.items():
            if ".lora_B." in key:
                assert value.shape[1] == RANK and not value.any()
            else:
                torch.testing.assert_close(value.double() @ value.double().T, torch.eye(RANK, dtype=torch.float64),
                                           atol=1e-6, rtol=0)
        # q_proj and v_proj read the same tensor: one subspace, computed once
        assert torch.equal(factors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"],
                           factors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])
        others = [world["tasks"][t] for t in sorted(names - {task})]
        feats = _layer_inputs(world["base"], others, LAYER0)
        own = _layer_inputs(world["base"], [world["tasks"][task]], LAYER0)
        for module in LAYER0:
            A = factors[f"base_model.model.{module}.lora_A.weight"].double()
            h = feats[module].double()
            assert float((h @ A.T).norm(dim=1).max() / h.norm(dim=1).min()) < 1e-5
            assert float((own[module].double() @ A.T).norm()) > 0.1 * float(own[module].norm())  # own data passes
        # streammerge itself accepts the adapter for merging
        problems: list[str] = []
        base_names = {n for n, _ in load_causal_lm(world["base"], torch.float32).named_parameters()}
        load_lora_adapter(world["out"] / task, base_names, problems)
        assert problems == []


def test_peft_loads_the_adapter_and_trains_from_it(world):
    from peft import PeftModel

    adapter = world["out"] / "a"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(load_causal_lm(world["base"], torch.float32), adapter, is_trainable=True)
    params = dict(model.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert params[name].requires_grad
        torch.testing.assert_close(params[name].detach(), value, atol=0, rtol=0)  # loaded over PEFT's init
    batch = torch.tensor([json.loads(line)["input_ids"][:3] for line in world["tasks"]["a"].read_text().splitlines()])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    a_keys = [k.replace(".weight", ".default.weight") for k in saved if ".lora_A." in k]
    losses = []
    for step in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step == 0:  # B = 0 gives A no gradient on the first step: A is exactly what we wrote
            for name in a_keys:
                torch.testing.assert_close(params[name].detach(), saved[name.replace(".default", "")], atol=0, rtol=0)
    assert losses[-1] < losses[0]
    assert all(params[k.replace(".weight", ".default.weight")].abs().max() > 0 for k in saved if ".lora_B." in k)


def test_backbone_adapters_load_on_the_bare_model(world, tmp_path):
    # Adapters trained on transformers' AutoModel (task heads outside) name modules without "model.".
    from peft import PeftModel
    from transformers import AutoModel

    opts = CollectOptions(batch_size=4, backbone=True, stats_dir=str(tmp_path / "stats"))
    osrm_init(world["base"], world["tasks"], tmp_path / "bb", target_modules=["v_proj"], rank=4, opts=opts)
    saved = load_file(str(tmp_path / "bb" / "b" / "adapter_model.safetensors"))
    assert sorted(saved)[0].startswith("base_model.model.layers.0.")
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(world["base"]), tmp_path / "bb" / "b")
    params = dict(model.named_parameters())
    for key, value in saved.items():
        torch.testing.assert_close(params[key.replace(".weight", ".default.weight")].detach(), value, atol=0, rtol=0)
    # the backbone sees the same features as the causal LM, under other names
    ours = load_task_stats(stats_path(tmp_path / "stats", "b"))
    causal = load_task_stats(stats_path(world["out"] / ".osrm_stats", "b"))
    assert sorted(ours.modules) == ["layers.0.self_attn.v_proj", "layers.1.self_attn.v_proj"]
    for name, m in ours.modules.items():
        assert m.count == causal.modules["model." + name].count
        torch.testing.assert_close(m.sum_xxT, causal.modules["model." + name].sum_xxT, atol=1e-9, rtol=1e-9)


def test_padding_does_not_leak_into_the_statistics(world):
    model = load_model(world["base"], torch.device("cpu"), torch.float32)
    examples = read_examples(world["tasks"]["b"], None, 100, 64)
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    alone, _ = collect_task_stats(model, modules, padded_batches(examples, 1))

    def extra_padding():  # batches of 5, padded 7 columns further with a token of another task
        for ids, mask in padded_batches(examples, 5, pad_id=60):
            yield (torch.cat([ids, torch.full((ids.shape[0], 7), 61)], 1),
                   torch.cat([mask, torch.zeros(ids.shape[0], 7, dtype=torch.long)], 1))

    padded, passes = collect_task_stats(model, modules, extra_padding())
    assert passes == 3
    for m in modules:
        assert padded[m].count == alone[m].count == sum(len(e) for e in examples)
        # equal up to fp32 kernel rounding (batched vs unbatched attention), far below any leak
        for ours, ref in ((padded[m].sum_x, alone[m].sum_x), (padded[m].sum_xxT, alone[m].sum_xxT)):
            assert float((ours - ref).norm() / ref.norm()) < 1e-6


def test_offloaded_model_gives_the_same_statistics(world, tmp_path):
    # A model "larger than memory": accelerate keeps what fits in the budget and streams the rest from disk.
    pytest.importorskip("accelerate")
    examples = read_examples(world["tasks"]["c"], None, 100, 64)
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    resident, _ = collect_task_stats(load_model(world["base"], torch.device("cpu"), torch.float32), modules,
                                     padded_batches(examples, 4))
    model = load_model(world["base"], torch.device("cpu"), torch.float32, parse_max_memory("cpu=300KB"),
                       tmp_path / "offload")
    assert "disk" in set(model.hf_device_map.values())
    offloaded, _ = collect_task_stats(model, modules, padded_batches(examples, 4))
    for m in modules:
        assert offloaded[m].count == resident[m].count
        torch.testing.assert_close(offloaded[m].sum_xxT, resident[m].sum_xxT, atol=1e-9, rtol=1e-9)


def test_adding_a_task_reuses_the_cached_statistics(world, tmp_path, monkeypatch):
    calls: list[int] = []
    real = osrm_run.collect_task_stats

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result[1])
        return result

    monkeypatch.setattr(osrm_run, "collect_task_stats", spy)
    tasks, opts = world["tasks"], CollectOptions(batch_size=4, stats_dir=str(tmp_path / "stats"))
    two = {t: tasks[t] for t in ("a", "b")}
    osrm_init(world["base"], two, tmp_path / "o1", target_modules=TARGETS, rank=RANK, opts=opts)
    assert calls == [3, 3]
    before = {t: stats_path(tmp_path / "stats", t).stat().st_mtime_ns for t in two}
    report = osrm_init(world["base"], tasks, tmp_path / "o2", target_modules=TARGETS, rank=RANK, opts=opts)
    assert calls == [3, 3, 3]  # only c ran through the model
    assert report["reused"] == ["a", "b"] and report["collected"] == ["c"]
    assert report["forward_passes"] == {"c": 3}
    assert {t: stats_path(tmp_path / "stats", t).stat().st_mtime_ns for t in two} == before
    # everything cached: the model is not even loaded; and the result equals the uncached run's
    monkeypatch.setattr(osrm_run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    osrm_init(world["base"], tasks, tmp_path / "o3", target_modules=TARGETS, rank=RANK, opts=opts)
    for t in TASK_TOKENS:
        assert (tmp_path / "o3" / t / "adapter_model.safetensors").read_bytes() == \
            (world["out"] / t / "adapter_model.safetensors").read_bytes()
    # changed data invalidates that task's entry only
    monkeypatch.setattr(osrm_run, "load_model", load_model)
    changed = _write_task(tmp_path / "a2.jsonl", TASK_TOKENS["a"], seed=9)
    report = osrm_init(world["base"], {**tasks, "a": changed}, tmp_path / "o4", target_modules=TARGETS, rank=RANK,
                       opts=opts)
    assert report["collected"] == ["a"] and report["reused"] == ["b", "c"]


def test_a_statistics_memory_budget_splits_modules_into_passes(world, tmp_path):
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    budget = 2 * 64 * 64 * 8  # two d_in=64 float64 sums at a time
    opts = CollectOptions(batch_size=4, stats_dir=str(tmp_path), stats_memory=budget)
    stats, report = gather_stats(world["base"], {"a": world["tasks"]["a"]}, modules, True, opts, tmp_path)
    assert report.forward_passes == {"a": 6}  # 2 groups x 3 batches
    whole = load_task_stats(stats_path(world["out"] / ".osrm_stats", "a"))
    for m in modules:
        torch.testing.assert_close(stats["a"].modules[m].sum_xxT, whole.modules[m].sum_xxT, atol=1e-9, rtol=1e-9)
    with pytest.raises(InputError, match="stats-memory"):
        gather_stats(world["base"], {"b": world["tasks"]["b"]}, modules, True,
                     CollectOptions(stats_memory=1000), tmp_path)


def test_means_variant_end_to_end(world, tmp_path):
    opts = CollectOptions(batch_size=4, stats_dir=str(tmp_path / "stats"))
    osrm_init(world["base"], world["tasks"], tmp_path / "out", target_modules=["q_proj"], rank=RANK,
              variant="means", opts=opts)
    cached = {t: load_task_stats(stats_path(tmp_path / "stats", t)) for t in TASK_TOKENS}
    assert not cached["a"].has_second_moments  # the cheap variant collects first moments only
    A = load_file(str(tmp_path / "out" / "a" / "adapter_model.safetensors"))
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        a = A[f"base_model.model.{module}.lora_A.weight"].double()
        for t in ("b", "c"):
            mean = cached[t].modules[module].mean()
            assert float((a @ mean).norm() / mean.norm()) < 1e-6
    # the covariance variant then needs second moments: the cache is refreshed, not misused
    report = osrm_init(world["base"], world["tasks"], tmp_path / "out", target_modules=["q_proj"], rank=RANK,
                       opts=opts)
    assert report["collected"] == list(TASK_TOKENS)


def test_project_an_existing_adapter(world, tmp_path):
    adapter = save_peft_adapter(world["base"], tmp_path / "trained", torch.float32, seed=5, r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"])
    out = tmp_path / "proj" / "a_osrm"
    report = osrm_project(adapter, world["base"], world["tasks"], out, own="a", opts=world["opts"])
    assert report["collected"] == list(TASK_TOKENS)
    src = load_file(str(adapter / "adapter_model.safetensors"))
    new = load_file(str(out / "adapter_model.safetensors"))
    assert (out / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    stats = {t: load_task_stats(stats_path(tmp_path / "proj" / ".osrm_stats", t)) for t in ("b", "c")}
    s = 8 / 4
    for key in src:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_key = key.replace("lora_A", "lora_B")
        A_osrm = covariance_subspace([stats[t].modules[module] for t in ("b", "c")], 4).A
        torch.testing.assert_close(new[key].double(), A_osrm, atol=1e-6, rtol=0)
        expected_B = (s * src[b_key].double() @ src[key].double()) @ A_osrm.T / s
        torch.testing.assert_close(new[b_key].double(), expected_B, atol=1e-6, rtol=1e-5)
    info = json.loads((out / "osrm.json").read_text())
    assert info["other_tasks"] == ["b", "c"] and 0 < info["summary"]["update_kept_mean"] <= 1
    # the same through the command line, statistics from the shared cache next to the output
    args = ["osrm-project", "--adapter", str(adapter), "--base", str(world["base"]), "--own", "a",
            "--out", str(tmp_path / "proj" / "cli")]
    for name, path in world["tasks"].items():
        args += ["--task", f"{name}={path}"]
    assert cli.main(args) == 0
    assert (tmp_path / "proj" / "cli" / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter_model.safetensors").read_bytes()


def _cli_init(base: Path, out: Path, *tasks: str) -> list[str]:
    args = ["osrm-init", "--base", str(base), "--target-modules", "v_proj", "--rank", "4", "--out", str(out)]
    for task in tasks:
        args += ["--task", task]
    return args


def test_cli_osrm_init_and_errors(world, tmp_path, capsys, monkeypatch):
    a, b = f"a={world['tasks']['a']}", f"b={world['tasks']['b']}"
    assert cli.main(_cli_init(world["base"], tmp_path / "cli", a, b) + ["--only", "b"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["adapters"]) == ["b"] and report["collected"] == ["a", "b"]
    assert json.loads((tmp_path / "cli" / "b" / "adapter_config.json").read_text())["r"] == 4
    # text data without a tokenizer in the model directory: the message says what to give instead
    text = tmp_path / "text.txt"
    text.write_text("hello world\n")
    assert cli.main(_cli_init(world["base"], tmp_path / "x", f"t={text}", b)) == 2
    assert "input_ids" in capsys.readouterr().err
    assert cli.main(_cli_init(world["base"], tmp_path / "x", "a", b)) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    assert cli.main(_cli_init(world["base"], tmp_path / "x", a)) == 2
    assert "at least two tasks" in capsys.readouterr().err
    # transformers missing: a clear error naming the fix
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(_cli_init(world["base"], tmp_path / "y", a, b)) == 2
    assert "pip install transformers" in capsys.readouterr().err


def test_text_tasks_use_the_model_tokenizer(world, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    words = ["w%d" % i for i in range(128)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(base)
    lines = [json.loads(line)["input_ids"] for line in world["tasks"]["a"].read_text().splitlines()]
    text = tmp_path / "a.txt"
    text.write_text("".join(" ".join(words[i] for i in ids) + "\n" for ids in lines))
    ids = tmp_path / "a.jsonl"
    ids.write_text("".join(json.dumps({"input_ids": x}) + "\n" for x in lines))
    opts = CollectOptions(batch_size=4, stats_dir=str(tmp_path / "stats"))
    osrm_init(base, {"a": text, "b": world["tasks"]["b"]}, tmp_path / "t", target_modules=["q_proj"], rank=4,
              opts=opts)
    osrm_init(base, {"a2": ids, "b": world["tasks"]["b"]}, tmp_path / "t", target_modules=["q_proj"], rank=4,
              opts=opts)
    from_text = load_task_stats(stats_path(tmp_path / "stats", "a"))
    from_ids = load_task_stats(stats_path(tmp_path / "stats", "a2"))
    for m, s in from_text.modules.items():
        assert s.count == from_ids.modules[m].count
        torch.testing.assert_close(s.sum_xxT, from_ids.modules[m].sum_xxT, atol=1e-8, rtol=1e-6)
