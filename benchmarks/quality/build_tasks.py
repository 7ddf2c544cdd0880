"""Build the benchmark's text-classification tasks from real text available offline: the
Debian package index (``apt-cache dumpavail``: ~63k packages of bookworm on this machine).

Every task reads the same kind of input, a package's one-line synopsis (the ``Description``
field, e.g. "Real-time strategy game of ancient warfare"), and predicts a different label
family of that package. The package name is never shown (``python3-foo`` would give away
most labels). The tasks want different things from the same representation, so their
adapters interfere when merged:

=================  ============================================================  =======
task               label (source field)                                          classes
=================  ============================================================  =======
section_lang       language ecosystem (Section: python, perl, ruby, ...)         8
section_topic      application area (Section: games, sound, graphics, ...)       8
interface          user interface (Debtag interface::*, exactly one)            5
use                what it is used for (Debtag use::*, exactly one)             8
arch               compiled code or not (Architecture: amd64 vs all)            2
=================  ============================================================  =======

Splits are fixed by a hash of the synopsis text (70 / 10 / 20 %), shared by all tasks, so no
synopsis seen in training by any task is ever in any task's validation or test split (and a
merged model has not seen a test text either). Identical synopses ("transitional package",
...) with conflicting labels are dropped. Within a split each task takes at most a fixed
number per class (balanced where the data allows), sampled with a fixed seed.

    .venv/bin/python benchmarks/quality/build_tasks.py [--cache DIR] [--packages FILE]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, SPLITS, TASKS_SUBDIR, write_json, write_jsonl  # noqa: E402

SEED = 20250521
SPLIT_BUCKETS = {"train": range(0, 70), "validation": range(70, 80), "test": range(80, 100)}
# Per task: at most this many examples in a split (spread evenly over the classes).
SPLIT_CAPS = {"train": 960, "validation": 100, "test": 240}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    labels: tuple[str, ...]
    label_of: Callable[[dict[str, str]], str | None]


def _section(pkg: dict[str, str]) -> str:
    return pkg.get("Section", "").rsplit("/", 1)[-1]  # "contrib/games" -> "games"


def _one_tag(family: str) -> Callable[[dict[str, str]], str | None]:
    def label(pkg: dict[str, str]) -> str | None:
        tags = [t.strip() for t in pkg.get("Tag", "").split(",") if t.strip().startswith(family + "::")]
        return tags[0].split("::", 1)[1] if len(tags) == 1 else None
    return label


def _in(labels: tuple[str, ...], fn: Callable[[dict[str, str]], str | None]) -> Callable[[dict[str, str]], str | None]:
    return lambda pkg: (lab if (lab := fn(pkg)) in labels else None)


def _arch(pkg: dict[str, str]) -> str | None:
    arch = pkg.get("Architecture")
    return {"all": "all", "amd64": "compiled"}.get(arch or "")


LANG = ("python", "perl", "ruby", "javascript", "java", "haskell", "golang", "rust")
TOPIC = ("games", "sound", "graphics", "mail", "editors", "science", "database", "hamradio")
INTERFACE = ("commandline", "daemon", "text-mode", "web", "shell")
USE = ("gameplaying", "converting", "checking", "editing", "monitor", "configuring", "viewing", "playing")

TASKS = (
    TaskSpec("section_lang", "language ecosystem of the package (Debian Section)", LANG, _in(LANG, _section)),
    TaskSpec("section_topic", "application area (Debian Section)", TOPIC, _in(TOPIC, _section)),
    TaskSpec("interface", "user interface (Debtag interface::)", INTERFACE, _in(INTERFACE, _one_tag("interface"))),
    TaskSpec("use", "what the package is used for (Debtag use::)", USE, _in(USE, _one_tag("use"))),
    TaskSpec("arch", "architecture-specific compiled code vs Architecture: all", ("all", "compiled"), _arch),
)


def parse_packages(text: str) -> Iterator[dict[str, str]]:
    """RFC-822 stanzas of a Packages file; continuation lines join with a space."""
    pkg: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if pkg:
                yield pkg
            pkg, key = {}, ""
        elif line[0] in " \t":
            if key:
                pkg[key] += " " + line.strip()
        else:
            key, _, value = line.partition(":")
            pkg[key] = value.strip()
    if pkg:
        yield pkg


def split_of(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    return next(s for s, r in SPLIT_BUCKETS.items() if bucket in r)


def build(spec: TaskSpec, packages: list[dict[str, str]]) -> dict[str, list[dict[str, object]]]:
    by_text: dict[str, set[str]] = collections.defaultdict(set)
    for pkg in packages:
        text = pkg.get("Description", "").strip()
        if len(text) >= 12 and (label := spec.label_of(pkg)) is not None:
            by_text[text].add(label)
    # Deterministic order before sampling: sorted texts, one RNG per (task, split).
    per_split: dict[str, dict[str, list[str]]] = {s: collections.defaultdict(list) for s in SPLITS}
    for text in sorted(by_text):
        if len(by_text[text]) == 1:
            per_split[split_of(text)][next(iter(by_text[text]))].append(text)
    out: dict[str, list[dict[str, object]]] = {}
    for split in SPLITS:
        rng = random.Random(f"{SEED}/{spec.name}/{split}")
        pools = {lab: rng.sample(per_split[split][lab], len(per_split[split][lab])) for lab in spec.labels}
        # Even share per class; classes too small to fill theirs leave room for the others.
        cap, chosen = SPLIT_CAPS[split], {lab: 0 for lab in spec.labels}
        while sum(chosen.values()) < cap and any(chosen[l] < len(pools[l]) for l in spec.labels):
            for lab in spec.labels:
                if chosen[lab] < len(pools[lab]) and sum(chosen.values()) < cap:
                    chosen[lab] += 1
        rows = [{"text": t, "label": spec.labels.index(lab), "label_name": lab}
                for lab in spec.labels for t in pools[lab][:chosen[lab]]]
        rng.shuffle(rows)
        out[split] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--packages", type=Path, help="a Packages file (default: `apt-cache dumpavail`)")
    args = ap.parse_args()
    if args.packages:
        raw = args.packages.read_text(encoding="utf-8", errors="replace")
    else:
        raw = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True).stdout.decode(
            "utf-8", errors="replace")
    packages = list(parse_packages(raw))
    if len(packages) < 10_000:
        raise SystemExit(f"only {len(packages)} packages in the index; run `apt-get update` first")
    root = args.cache / TASKS_SUBDIR
    index = {"source": str(args.packages or "apt-cache dumpavail"), "packages": len(packages),
             "source_sha256": hashlib.sha256(raw.encode()).hexdigest(), "seed": SEED, "tasks": {}}
    print(f"{len(packages)} packages; splits by sha256(synopsis) {dict((k, len(v)) for k, v in SPLIT_BUCKETS.items())}")
    print(f"| task | classes | train | validation | test | majority (test) |\n|---|---|---|---|---|---|")
    for spec in TASKS:
        data = build(spec, packages)
        for split, rows in data.items():
            write_jsonl(root / spec.name / f"{split}.jsonl", rows)
        counts = collections.Counter(r["label_name"] for r in data["test"])
        majority = max(counts.values()) / max(1, len(data["test"]))
        write_json(root / spec.name / "meta.json", {"name": spec.name, "description": spec.description,
                                                    "labels": list(spec.labels)})
        index["tasks"][spec.name] = {s: len(r) for s, r in data.items()}
        print(f"| {spec.name} | {len(spec.labels)} | {len(data['train'])} | {len(data['validation'])} "
              f"| {len(data['test'])} | {majority:.3f} |")
    write_json(root / "index.json", index)


if __name__ == "__main__":
    main()
