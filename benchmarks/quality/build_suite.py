"""Build the six-task suite (issue 17): text-classification tasks from real text on this
machine, with *different* input distributions, so that each adapter has to learn something
the frozen base does not linearly expose, and the adapters pull a merged backbone apart.

=============  ================================================================  =======
task           input -> label (source)                                           classes
=============  ================================================================  =======
ui_lang        a translated UI message -> its language (gettext ``.mo``          10
               catalogues under /usr/share/locale: msgstr of da, sv, nb, nl, de,
               es, pt, it, ca, fr; the ``iso_*`` name lists left out)
msg_domain     an English UI message -> the program it belongs to (msgid of the  8
               ``de`` catalogue of gtk20, glib20, Linux-PAM, coreutils, apt,
               PackageKit, gstreamer-1.0, shared-mime-info)
code_lang      one line of source code -> its language (files on disk: C, Python,  7
               Perl, PHP, Tcl, JavaScript, shell)
man_section    an English man page's NAME description -> its section (1, 2, 3,    6
               5, 7, 8; /usr/share/man/man*/)
deb_topic      a Debian package synopsis -> application area (Section; as in      8
               build_tasks.py)
deb_lang       a Debian package synopsis -> language ecosystem (Section)          8
=============  ================================================================  =======

Splits by sha256 of the text (70 / 10 / 20 buckets) shared by every task; texts with
conflicting labels dropped; per split a fixed cap spread evenly over the classes; fixed seed.
The source files' list and sizes are hashed into ``index.json`` (another machine's files give
another suite; the builder says so rather than pretending otherwise).

    .venv/bin/python benchmarks/quality/build_suite.py --cache DIR
"""

from __future__ import annotations

import argparse
import collections
import gettext
import glob
import gzip
import hashlib
import random
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tasks  # noqa: E402
from common import DEFAULT_CACHE, SPLITS, TASKS_SUBDIR, write_json, write_jsonl  # noqa: E402

SEED = 20261201
CAPS = {"train": 960, "validation": 150, "test": 300}
UI_LANGS = ("da", "sv", "nb", "nl", "de", "es", "pt", "it", "ca", "fr")
DOMAINS = ("gtk20", "glib20", "Linux-PAM", "coreutils", "apt", "PackageKit", "gstreamer-1.0", "shared-mime-info")
CODE = {"C": ("c", "h"), "Python": ("py",), "Perl": ("pl", "pm"), "PHP": ("php",), "Tcl": ("tcl",),
        "JavaScript": ("js",), "shell": ("sh",)}
CODE_ROOTS = ("/usr/include", "/usr/lib", "/usr/share", "/usr/local/lib", "/opt")
MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")
MAX_FILES_PER_LANG = 1500


def catalogue(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        try:
            cat = gettext.GNUTranslations(f)._catalog  # noqa: SLF001 (stdlib has no public accessor)
        except Exception:  # a corrupt or unusual .mo: skip it
            return {}
    return {k: v for k, v in cat.items() if isinstance(k, str) and k and isinstance(v, str)}


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", "").replace("&", "")).strip()


def ui_lang() -> Iterator[tuple[str, str]]:
    for lang in UI_LANGS:
        for path in sorted(glob.glob(f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo")):
            if Path(path).name.startswith("iso_"):
                continue
            for msgid, msgstr in catalogue(path).items():
                text = clean(msgstr)
                if 15 <= len(text) <= 100 and "%" not in text and text != clean(msgid):
                    yield text, lang


def msg_domain() -> Iterator[tuple[str, str]]:
    for domain in DOMAINS:
        path = f"/usr/share/locale/de/LC_MESSAGES/{domain}.mo"
        if Path(path).exists():
            for msgid in catalogue(path):
                text = clean(msgid.split("\x00")[0])
                if 12 <= len(text) <= 100:
                    yield text, domain


def code_lang() -> Iterator[tuple[str, str]]:
    for lang, exts in CODE.items():
        files: list[str] = []
        for ext in exts:
            out = subprocess.run(["find", *CODE_ROOTS, "-name", f"*.{ext}", "-type", "f", "-size", "-200k"],
                                 capture_output=True, text=True).stdout.split()
            files += sorted(p for p in out if "/site-packages/" not in p or lang == "Python")
        for path in sorted(files)[:MAX_FILES_PER_LANG]:
            try:
                lines = Path(path).read_text(encoding="utf-8", errors="strict").splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            for line in lines:
                text = line.strip()
                if 25 <= len(text) <= 100 and re.search(r"[A-Za-z]{3}", text) and not text.startswith(("#", "//", "*", "/*")):
                    yield text, lang


def man_section() -> Iterator[tuple[str, str]]:
    for sec in MAN_SECTIONS:
        for path in sorted(glob.glob(f"/usr/share/man/man{sec}/*.gz")):
            try:
                lines = gzip.open(path, "rt", encoding="utf-8", errors="replace").read().splitlines()
            except (OSError, EOFError):
                continue
            for i, line in enumerate(lines):
                if line.upper().startswith((".SH NAME", '.SH "NAME"', ".SH NOM")):
                    body = " ".join(l for l in lines[i + 1:i + 4] if not l.startswith(".SH"))
                    m = re.search(r"\\?-\s+(.*)", body.replace("\\-", "-").replace("\\(em", "-"))
                    if m:
                        text = clean(re.sub(r"\\f[BIRP]|\\[&e]|^\.\w+\s*", "", m.group(1)))
                        if 10 <= len(text) <= 100:
                            yield text, sec
                    break


def debian(spec_name: str) -> Iterator[tuple[str, str]]:
    raw = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True).stdout.decode(
        "utf-8", errors="replace")
    spec = next(s for s in build_tasks.TASKS if s.name == spec_name)
    for pkg in build_tasks.parse_packages(raw):
        text = pkg.get("Description", "").strip()
        if len(text) >= 12 and (label := spec.label_of(pkg)) is not None:
            yield text, label


TASKS = {
    "ui_lang": ("language of a translated UI message (gettext catalogues)", UI_LANGS, ui_lang),
    "msg_domain": ("program an English UI message belongs to (gettext msgid)", DOMAINS, msg_domain),
    "code_lang": ("language of one line of source code", tuple(CODE), code_lang),
    "man_section": ("section of an English man page from its NAME line", MAN_SECTIONS, man_section),
    "deb_topic": ("application area of a Debian package (Section) from its synopsis", build_tasks.TOPIC,
                  lambda: debian("section_topic")),
    "deb_lang": ("language ecosystem of a Debian package (Section) from its synopsis", build_tasks.LANG,
                 lambda: debian("section_lang")),
}


def split_rows(name: str, labels: tuple[str, ...], pairs: Iterator[tuple[str, str]]) -> dict[str, list[dict]]:
    by_text: dict[str, set[str]] = collections.defaultdict(set)
    for text, label in pairs:
        by_text[text].add(label)
    pools: dict[str, dict[str, list[str]]] = {s: collections.defaultdict(list) for s in SPLITS}
    for text in sorted(by_text):
        if len(by_text[text]) == 1:
            pools[build_tasks.split_of(text)][next(iter(by_text[text]))].append(text)
    out = {}
    for split in SPLITS:
        rng = random.Random(f"{SEED}/{name}/{split}")
        per = {lab: rng.sample(pools[split][lab], len(pools[split][lab])) for lab in labels}
        cap, chosen = CAPS[split], {lab: 0 for lab in labels}
        while sum(chosen.values()) < cap and any(chosen[l] < len(per[l]) for l in labels):
            for lab in labels:
                if chosen[lab] < len(per[lab]) and sum(chosen.values()) < cap:
                    chosen[lab] += 1
        rows = [{"text": t, "label": labels.index(lab), "label_name": lab} for lab in labels for t in per[lab][:chosen[lab]]]
        rng.shuffle(rows)
        out[split] = rows
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args(argv)
    root = args.cache / TASKS_SUBDIR
    index: dict = {"seed": SEED, "caps": CAPS, "tasks": {}}
    print("| task | classes | train | validation | test | majority (test) |\n|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        description, labels, source = TASKS[name]
        write_task(root, name, description, labels, split_rows(name, labels, source()), index)
    write_json(root / "index.json", index)


def write_task(root: Path, name: str, description: str, labels: Sequence[str], data: dict[str, list[dict]],
               index: dict) -> None:
    """One task's splits and meta under ``root / name``, its entry in ``index`` and its row of the printed table."""
    for split, rows in data.items():
        write_jsonl(root / name / f"{split}.jsonl", rows)
    write_json(root / name / "meta.json", {"name": name, "description": description, "labels": list(labels)})
    digest = hashlib.sha256("\n".join(r["text"] for s in SPLITS for r in data[s]).encode()).hexdigest()
    index["tasks"][name] = {**{s: len(r) for s, r in data.items()}, "sha256": digest}
    counts = collections.Counter(r["label_name"] for r in data["test"])
    print(f"| {name} | {len(labels)} | {len(data['train'])} | {len(data['validation'])} | {len(data['test'])} "
          f"| {max(counts.values()) / max(1, len(data['test'])):.3f} |", flush=True)


if __name__ == "__main__":
    main()
