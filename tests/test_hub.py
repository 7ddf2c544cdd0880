"""Hub repo ids as inputs, offline, against a locally built cache with the Hub's real layout.

``models--org--name/{blobs/<sha256>, refs/<branch>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}``,
found through HF_HUB_CACHE or HF_HOME, with HF_HUB_OFFLINE=1: no network is ever used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from streammerge.errors import HubError
from tests.helpers import read_raw, run_cli
from tools.synthetic import PRESETS, write_adapter, write_model

COMMIT_1 = "a1b2c3d4" * 5
COMMIT_2 = "e5f6a7b8" * 5


def add_to_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file of ``source`` into ``cache`` exactly as huggingface_hub stores a download."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    base = write_model(root / "local" / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=100_000)
    base2 = write_model(root / "local" / "base2", PRESETS["tiny"], "BF16", seed=5, max_shard_size=100_000)
    lora = write_adapter(base, root / "local" / "lora", rank=4, seed=1)
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    cache = root / "home" / "hub"
    add_to_cache(cache, "org/tiny-llama", base, COMMIT_1, refs=("main",))
    add_to_cache(cache, "org/tiny-llama", base2, COMMIT_2, refs=("v2",))
    add_to_cache(cache, "org/tiny-lora", lora, COMMIT_1)
    return {"root": root, "base": base, "base2": base2, "lora": lora, "cache": cache}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def test_repo_ids_merge_like_local_paths(world, tmp_path):
    env = _env(HF_HUB_CACHE=str(world["cache"]))
    hub_out, local_out = tmp_path / "hub", tmp_path / "local"
    proc = run_cli("merge", "--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--out", str(hub_out),
                   "--no-progress", env=env)
    run_cli("merge", "--base", str(world["base"]), "--adapter", str(world["lora"]), "--out", str(local_out),
            "--no-progress", env=env)
    assert read_raw(hub_out) == read_raw(local_out)
    assert (hub_out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert f"Hub commit {COMMIT_1}" in proc.stderr
    saved = json.loads((hub_out / "streammerge_recipe.json").read_text())
    assert saved["recipe"]["base"] == "org/tiny-llama" and saved["recipe"]["revision"] == COMMIT_1
    assert saved["recipe"]["inputs"][0]["revision"] == COMMIT_1
    assert saved["sources"][0]["repo_id"] == "org/tiny-llama"
    card = (hub_out / "README.md").read_text()
    assert "- org/tiny-llama" in card and COMMIT_1 in card
    # the pinned recipe re-runs to the same bytes
    again = tmp_path / "again"
    run_cli("merge", str(hub_out / "streammerge_recipe.json"), "--out", str(again), "--no-progress", env=env)
    assert read_raw(again) == read_raw(hub_out)


def test_hf_home_and_revision(world, tmp_path):
    env = _env(HF_HOME=str(world["cache"].parent))
    out = tmp_path / "v2"
    run_cli("merge", "--base", "org/tiny-llama", "--revision", "v2", "--adapter", str(world["lora"]),
            "--out", str(out), "--no-progress", env=env)
    ref = tmp_path / "ref"
    run_cli("merge", "--base", str(world["base2"]), "--adapter", str(world["lora"]), "--out", str(ref),
            "--no-progress", env=env)
    assert read_raw(out) == read_raw(ref)
    by_commit = tmp_path / "by_commit"
    run_cli("merge", "--base", "org/tiny-llama", "--revision", COMMIT_2, "--adapter", str(world["lora"]),
            "--out", str(by_commit), "--no-progress", env=env)
    assert read_raw(by_commit) == read_raw(ref)


def test_recipe_file_with_repo_ids(world, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: org/tiny-llama\ninputs:\n  - path: org/tiny-lora\n    revision: main\n")
    proc = run_cli("plan", str(recipe), env=_env(HF_HUB_CACHE=str(world["cache"])))
    assert f"revision: {COMMIT_1}" in proc.stdout


def test_missing_offline_repo_is_a_clear_error(world, tmp_path):
    env = _env(HF_HUB_CACHE=str(world["cache"]))
    out = tmp_path / "out"
    proc = run_cli("merge", "--base", "org/tiny-llama", "--adapter", "org/not-downloaded", "--adapter",
                   "org/tiny-lora", "--revision", "no-such-branch", "--out", str(out), "--no-progress",
                   env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "2 problem(s) found" in proc.stderr
    assert "inputs[0]: 'org/not-downloaded' is not a local path" in proc.stderr
    assert "HF_HUB_OFFLINE=1 is set and the repo is not in the local cache" in proc.stderr
    assert "base: 'org/tiny-llama' is not a local path, so it was looked up as a Hugging Face Hub repo id at " \
           "revision 'no-such-branch'" in proc.stderr
    assert not out.exists()


def test_existing_local_path_wins_over_repo_id(world, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    from streammerge.inputs.hub import resolve_source
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert resolve_source("org/tiny-llama").commit == COMMIT_1  # not on disk here: the Hub cache
    shutil.copytree(world["base2"], tmp_path / "org" / "tiny-llama")
    local = resolve_source("org/tiny-llama")
    assert local.repo_id is None and local.commit is None and local.local_path == "org/tiny-llama"


def test_gated_and_unknown_repos_become_hub_errors(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from streammerge.inputs.hub import resolve_source
    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    for error, expected in ((GatedRepoError("gated", response=response), "the repo is gated: accept its terms"),
                            (RepositoryNotFoundError("404", response=response), "no such repo exists, or it is private")):
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(HubError, match=expected):
            resolve_source("org/x")


def test_only_weights_configs_and_tokenizer_files_are_requested(monkeypatch, tmp_path):
    import huggingface_hub

    from streammerge.inputs.hub import resolve_source
    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        (tmp_path / COMMIT_1).mkdir()
        return str(tmp_path / COMMIT_1)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    source = resolve_source("meta-llama/Llama-3.1-8B", revision="main")
    assert source.commit == COMMIT_1 and seen["revision"] == "main"
    from huggingface_hub.utils import filter_repo_objects
    files = ["model-00001-of-00004.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "pytorch_model.bin",
             "original/consolidated.00.pth", "original/params.json", "modeling_custom.py", "tokenizer.model"]
    kept = set(filter_repo_objects(files, allow_patterns=seen["allow_patterns"], ignore_patterns=seen["ignore_patterns"]))
    assert kept == {"model-00001-of-00004.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model"}
