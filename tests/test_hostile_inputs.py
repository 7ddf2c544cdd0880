"""Hostile and broken inputs: each is refused with a typed error that names the file or tensor
and the reason, a non-zero exit code, and no output that claims to be a finished model.

Each case runs the library (``merge``) and the command (``cli.main``, in-process: exit code and
message) on a copy of a tiny model or adapter broken in one way.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import streammerge.io.writer as writer_module
from streammerge import InputSpec, Recipe, build_plan, cli, merge, run_plan
from streammerge.sinks import sink_for
from streammerge.errors import (AdapterError, DiskSpaceError, InputError, OutputError, PlanError,
                                SafetensorsFormatError, StreamMergeError)
from streammerge.io.reader import open_checkpoint
from streammerge.io.writer import save_tensors
from streammerge.jobs.journal import read_journal
from streammerge.names import (ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME, CACHE_DIR_ENV, INDEX_NAME,
                               MODEL_CARD_NAME)
from streammerge.jobs.verify import verify_output
from tests.helpers import load_adapter_file, read_model, read_raw
from tools.synthetic import PRESETS, write_adapter, write_finetune, write_model

SHARD1 = "model-00001-of-00003.safetensors"  # embed_tokens and layer 0's norm and attention
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q0_A = f"base_model.model.{Q0.removesuffix('.weight')}.lora_A.weight"
Q0_B = Q0_A.replace("lora_A", "lora_B")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("hostile")
    base = write_model(root / "base", PRESETS["tiny"], "BF16", seed=0, max_shard_size=100_000)
    qwen = write_model(root / "qwen", PRESETS["tiny-qwen2"], "BF16", seed=0)
    return {"root": root, "base": base, "adapter": write_adapter(base, root / "a1", rank=4, seed=1, b_std=0.05),
            "foreign": write_adapter(qwen, root / "foreign", rank=4, seed=3)}


@pytest.fixture(autouse=True)
def _pickle_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def copy_of(world, tmp_path: Path, what: str) -> Path:
    return Path(shutil.copytree(world[what], tmp_path / what))


def rewrite_header(path: Path, mutate: Callable[[dict], object]) -> None:
    """Replace a safetensors header by ``mutate(header)`` (a dict, or raw bytes), keeping the data."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    new = mutate(json.loads(data[8:8 + n]))
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def edit_index(model: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads((model / INDEX_NAME).read_text())
    edit(doc["weight_map"])
    (model / INDEX_NAME).write_text(json.dumps(doc))


def assert_no_completion(out: Path) -> None:
    if not out.exists():
        return
    assert not (out / INDEX_NAME).exists() and not (out / MODEL_CARD_NAME).exists()
    state = read_journal(out)
    assert state is None or state.complete is None
    assert not verify_output(out).ok


def refused(capsys, tmp_path: Path, base: Path, adapter: Path, error: type[StreamMergeError], *texts: str,
            flags: tuple[str, ...] = (), kind: str = "adapter", **merge_kw) -> StreamMergeError:
    """The library raises ``error`` naming ``texts``; the CLI exits with its code and says the same."""
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        merge(Recipe(base=str(base), inputs=(InputSpec(str(adapter), kind=kind),), device="cpu"), str(out),
              **merge_kw)
    for text in texts:
        assert text in str(caught.value), str(caught.value)
    assert_no_completion(out)
    code = cli.main(["merge", "--base", str(base), f"--{kind}", str(adapter), "--device", "cpu", "--out", str(out),
                     "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == error.exit_code != 0
    for text in texts:
        assert text in err, err
    assert_no_completion(out)
    return caught.value


def base_refused(capsys, world, tmp_path, base: Path, *texts: str) -> None:
    """A broken base model: the reader raises SafetensorsFormatError; a merge, a PlanError saying the same."""
    with pytest.raises(SafetensorsFormatError) as caught:
        open_checkpoint(base)
    for text in texts:
        assert text in str(caught.value), str(caught.value)
    error = refused(capsys, tmp_path, base, world["adapter"], PlanError, "base model:", *texts)
    assert isinstance(error.__cause__, SafetensorsFormatError)


# --- safetensors files ---------------------------------------------------------------------

def test_truncated_shard(capsys, world, tmp_path):
    base = copy_of(world, tmp_path, "base")
    shard = base / SHARD1
    shard.write_bytes(shard.read_bytes()[:60_000])
    base_refused(capsys, world, tmp_path, base, SHARD1, "run past the data buffer", "the file is truncated")


def test_header_length_larger_than_file(capsys, world, tmp_path):
    base = copy_of(world, tmp_path, "base")
    shard = base / SHARD1
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    base_refused(capsys, world, tmp_path, base, SHARD1, f"the header length {len(data)} runs past the end of the file")


@pytest.mark.parametrize("header,reason", [
    (b"this is not json", "the header is not valid UTF-8 JSON"),
    (b"[1, 2, 3]", "the header must be a JSON object, found list"),
    (b'{"a": 1, "a": 2}', "the header names 'a' twice"),
    (b"\xff\xfe{}", "the header is not valid UTF-8 JSON"),
])
def test_header_not_a_json_object(capsys, world, tmp_path, header, reason):
    base = copy_of(world, tmp_path, "base")
    rewrite_header(base / SHARD1, lambda doc: header)
    base_refused(capsys, world, tmp_path, base, SHARD1, reason)


def _entry(name: str, **changes):
    def mutate(doc: dict) -> dict:
        doc[name].update(changes)
        return doc
    return mutate


@pytest.mark.parametrize("mutate,reason", [
    (_entry(Q0, dtype="F17"), f"tensor {Q0!r}: unknown dtype 'F17'"),
    (_entry(Q0, dtype=["F32"]), f"tensor {Q0!r}: unknown dtype ['F32']"),
    (_entry(Q0, shape=[64, 63]), f"tensor {Q0!r}: BF16 shape [64, 63] needs 8064 bytes but data_offsets"),
    (_entry(Q0, shape=[64, -64]), f"tensor {Q0!r}: shape must be a list of non-negative integers"),
    (_entry(Q0, shape=[2**62, 2**62, 2**62]), f"tensor {Q0!r}: BF16 shape"),
    (_entry(Q0, data_offsets=[0, 10**9]), f"tensor {Q0!r}: data_offsets [0, 1000000000] run past the data buffer"),
    (_entry(Q0, data_offsets=[8192, 0]), f"tensor {Q0!r}: data_offsets [8192, 0] end before they begin"),
    (_entry(Q0, data_offsets=[0, 8192]), "overlap"),
])
def test_bad_tensor_entries(capsys, world, tmp_path, mutate, reason):
    base = copy_of(world, tmp_path, "base")
    rewrite_header(base / SHARD1, mutate)
    base_refused(capsys, world, tmp_path, base, SHARD1, reason)


# --- shard index ---------------------------------------------------------------------------

def test_index_path_outside_the_model(capsys, world, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(world["base"] / SHARD1, outside / SHARD1)
    for target in ["../elsewhere/" + SHARD1, str(outside / SHARD1), "escape.safetensors"]:
        base = copy_of(world, tmp_path / target.replace("/", "_"), "base")
        (base / "escape.safetensors").symlink_to(outside / SHARD1)
        edit_index(base, lambda m: m.update({Q0: target}))
        base_refused(capsys, world, tmp_path / target.replace("/", "_"), base, f"maps tensor {Q0!r} to {target!r}",
                     "outside the model directory")


def test_symlinked_shard_inside_the_model_is_fine(world, tmp_path):
    base = copy_of(world, tmp_path, "base")
    (base / "real").mkdir()
    (base / SHARD1).rename(base / "real" / SHARD1)
    (base / SHARD1).symlink_to(base / "real" / SHARD1)
    assert open_checkpoint(base).info(Q0).shape == (64, 64)


def test_index_names_a_missing_shard_or_a_tensor_not_in_its_shard(capsys, world, tmp_path):
    base = copy_of(world, tmp_path / "missing", "base")
    edit_index(base, lambda m: m.update({Q0: "model-00009-of-00009.safetensors"}))
    base_refused(capsys, world, tmp_path / "missing", base,
                 "names 'model-00009-of-00009.safetensors', which does not exist")
    base = copy_of(world, tmp_path / "moved", "base")
    edit_index(base, lambda m: m.update({Q0: "model-00003-of-00003.safetensors"}))
    base_refused(capsys, world, tmp_path / "moved", base,
                 f"places tensor {Q0!r} in 'model-00003-of-00003.safetensors', but that shard has no such tensor")


# --- adapters ------------------------------------------------------------------------------

def _rewrite_adapter(adapter: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_adapter_file(adapter)
    edit(tensors)
    (adapter / ADAPTER_WEIGHTS_NAME).unlink()
    save_tensors(adapter / ADAPTER_WEIGHTS_NAME, tensors)


def test_adapter_factors_that_do_not_fit_each_other_or_the_base(capsys, world, tmp_path):
    adapter = copy_of(world, tmp_path / "ab", "adapter")
    _rewrite_adapter(adapter, lambda t: t.update({Q0_B: torch.zeros(64, 3)}))
    refused(capsys, tmp_path / "ab", world["base"], adapter, PlanError,
            f"{Q0_A!r} [4, 64] and {Q0_B!r} [64, 3] are not LoRA factors A [r, d_in] and B [d_out, r] of one rank")
    adapter = copy_of(world, tmp_path / "base", "adapter")
    _rewrite_adapter(adapter, lambda t: t.update({Q0_A: torch.zeros(4, 32)}))
    refused(capsys, tmp_path / "base", world["base"], adapter, PlanError,
            "module 'model.layers.0.self_attn.q_proj' gives an update of shape [64, 32] but base "
            f"tensor {Q0!r} has shape [64, 64]")


def test_adapter_for_modules_the_base_lacks(capsys, world, tmp_path):
    adapter = copy_of(world, tmp_path, "adapter")
    ghost = Q0_A.replace("layers.0", "layers.9")

    def add_ghost(t):
        t[ghost], t[ghost.replace("lora_A", "lora_B")] = torch.zeros(4, 64), torch.zeros(64, 4)
    _rewrite_adapter(adapter, add_ghost)
    refused(capsys, tmp_path, world["base"], adapter, PlanError,
            "module 'model.layers.9.self_attn.q_proj' has no base tensor")


def test_adapter_for_another_architecture(capsys, world, tmp_path):
    refused(capsys, tmp_path, world["base"], world["foreign"], PlanError,
            "was made for a Qwen2ForCausalLM model but the base is a LlamaForCausalLM")


@pytest.mark.parametrize("value,count", [(float("nan"), "1 NaN, 0 Inf"), (float("-inf"), "0 NaN, 1 Inf")])
def test_non_finite_adapter_factors_fail_before_any_output(capsys, world, tmp_path, value, count):
    adapter = copy_of(world, tmp_path, "adapter")

    def poison(t):
        t[Q0_B][3, 1] = value
    _rewrite_adapter(adapter, poison)
    refused(capsys, tmp_path, world["base"], adapter, AdapterError, f"{Q0_B!r} in", count, "--no-check-finite")
    out = tmp_path / "unchecked"
    merge(Recipe(base=str(world["base"]), inputs=(InputSpec(str(adapter)),), device="cpu"), str(out),
          check_finite=False)
    merged = read_model(out)[Q0]
    assert not bool(torch.isfinite(merged[3]).all()) and bool(torch.isfinite(merged[4:]).all())


def test_non_finite_full_finetune_is_caught_while_merging(world, tmp_path):
    finetune = write_finetune(world["base"], tmp_path / "ft", seed=1)
    rewrite = finetune / "model-00002-of-00003.safetensors"
    data = bytearray(rewrite.read_bytes())
    data[-2:] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    rewrite.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(AdapterError, match="holds NaN or Inf values"):
        merge(Recipe(base=str(world["base"]), inputs=(InputSpec(str(finetune), kind="model"),), device="cpu"), str(out))
    assert_no_completion(out)


class _Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickled_adapter(world, tmp_path: Path, payload: object) -> Path:
    adapter = tmp_path / "pickled"
    adapter.mkdir(parents=True)
    shutil.copy(world["adapter"] / "adapter_config.json", adapter)
    torch.save(payload, adapter / ADAPTER_PICKLE_NAME)
    return adapter


def test_pickle_adapter_refused_unread_by_default_and_loaded_safely_when_allowed(capsys, world, tmp_path,
                                                                                 monkeypatch):
    adapter = _pickled_adapter(world, tmp_path, load_adapter_file(world["adapter"]))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    refused(capsys, tmp_path, world["base"], adapter, PlanError, "has only adapter_model.bin (a pickle",
            "--allow-pickle")
    assert calls == [], "a pickle must not be opened without --allow-pickle"
    out = tmp_path / "allowed"
    assert cli.main(["merge", "--base", str(world["base"]), "--adapter", str(adapter), "--device", "cpu",
                     "--out", str(out), "--no-progress", "--allow-pickle"]) == 0
    assert calls and all(k.get("weights_only") is True for k in calls)
    reference = tmp_path / "reference"
    merge(Recipe(base=str(world["base"]), inputs=(InputSpec(str(world["adapter"])),), device="cpu"), str(reference))
    assert read_raw(out) == read_raw(reference)


def test_malicious_pickle_never_runs(capsys, world, tmp_path):
    marker = tmp_path / "pwned"
    adapter = _pickled_adapter(world, tmp_path, {Q0_A: _Planted(marker)})
    refused(capsys, tmp_path / "default", world["base"], adapter, PlanError, "has only adapter_model.bin")
    refused(capsys, tmp_path / "allowed", world["base"], adapter, PlanError,
            "adapter_model.bin cannot be loaded safely with torch.load(weights_only=True)",
            flags=("--allow-pickle",), allow_pickle=True)
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(_Planted(marker))) is not None and marker.exists(), "the payload is live"


def test_pickle_only_base_model_is_refused_even_when_pickles_are_allowed(capsys, world, tmp_path):
    marker = tmp_path / "pwned"
    base = tmp_path / "pickled_base"
    base.mkdir()
    shutil.copy(world["base"] / "config.json", base)
    torch.save({"x": _Planted(marker)}, base / "pytorch_model.bin")
    for flags, kw in [((), {}), (("--allow-pickle",), {"allow_pickle": True})]:
        error = refused(capsys, tmp_path / str(len(flags)), base, world["adapter"], PlanError,
                        "holds only pickle weights ['pytorch_model.bin']", flags=flags, **kw)
        assert isinstance(error.__cause__, InputError)
    assert not marker.exists()


# --- the output directory and the disk -----------------------------------------------------

def test_output_directory_holding_another_model(capsys, world, tmp_path):
    out = copy_of(world, tmp_path, "base")
    before = read_raw(out)
    assert cli.main(["merge", "--base", str(world["base"]), "--adapter", str(world["adapter"]), "--device", "cpu",
                     "--out", str(out), "--no-progress", "--restart"]) == OutputError.exit_code
    assert "holds files that are not part of this streammerge job" in capsys.readouterr().err
    assert read_raw(out) == before


def test_not_enough_free_disk_is_refused_before_writing(capsys, world, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    error = refused(capsys, tmp_path, world["base"], world["adapter"], DiskSpaceError,
                    "not enough free disk space for the output", "but only 1,000 bytes (0.00 GiB) are free")
    plan = build_plan(Recipe(base=str(world["base"]), inputs=(InputSpec(str(world["adapter"])),)))
    needed = sink_for(plan).output_bytes()  # shards + copied configs
    assert f"still needs {needed + (1 << 20):,} bytes" in str(error)  # + index/card margin
    assert not (tmp_path / "out").exists()


class _FillingDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are spent (shared across files)."""

    def __init__(self, path, mode: str, budget: list[int]) -> None:
        self._file = open(path, mode)
        self._budget = budget

    def write(self, data) -> int:
        if len(data) > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_disk_full_mid_job_keeps_the_journal_consistent_and_resumes(world, tmp_path, monkeypatch):
    recipe = Recipe(base=str(world["base"]), inputs=(InputSpec(str(world["adapter"])),), device="cpu",
                    max_shard_size=90_000, out=str(tmp_path / "out"))
    plan = build_plan(recipe)
    run_plan(plan, tmp_path / "out")
    reference = tmp_path / "reference"
    (tmp_path / "out").rename(reference)
    budget = [150_000]  # two shards fit, the third does not
    monkeypatch.setattr(writer_module, "open", lambda path, mode: _FillingDisk(path, mode, budget), raising=False)
    with pytest.raises(DiskSpaceError, match=r"model-00003-of-00004\.safetensors\.partial.*the disk is full"):
        run_plan(plan, tmp_path / "out")
    out = tmp_path / "out"
    state = read_journal(out)
    assert sorted(state.units) == ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"]
    assert state.complete is None and not list(out.glob("*.partial"))
    assert all(entry.check(out) is None for entry in state.units.values())
    assert_no_completion(out)
    monkeypatch.undo()
    assert run_plan(plan, out).resumed_units == 2
    for name in [p.name for p in reference.iterdir() if p.name != MODEL_CARD_NAME and "journal" not in p.name]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert verify_output(out).ok


def test_base_truncated_after_planning(world, tmp_path):
    base = copy_of(world, tmp_path, "base")
    plan = build_plan(Recipe(base=str(base), inputs=(InputSpec(str(world["adapter"])),), device="cpu"))
    shard = base / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:50_000])
    with pytest.raises(SafetensorsFormatError, match="model-00002-of-00003.safetensors.*truncated"):
        run_plan(plan, tmp_path / "out")
    assert_no_completion(tmp_path / "out")
