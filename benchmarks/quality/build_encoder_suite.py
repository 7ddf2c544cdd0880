"""Build the encoder suite (issue 17): tasks on *form and order* of real text, for which the
frozen, mean-pooled encoder (a bag of contextual token vectors) gives a weak linear probe but
fine-tuning the attention layers helps, each from a different source so that the adapters pull
the merged backbone apart.

=============  =================================================================  =======
task           input -> label (source)                                            classes
=============  =================================================================  =======
word_shuffle   a man page NAME line, as written or with its words shuffled        2
               (/usr/share/man, as build_suite.man_section)
half_swap      a Debian package synopsis, as written or with its two halves       2
               swapped at a word boundary (apt-cache dumpavail)
pair_order     an English UI message and its German translation joined by " / ":  2
               English first or German first (de gettext catalogues)
rotation       an English UI message rotated left by 0, 1/4, 1/2 or 3/4 of its    4
               words (msgid of all de gettext catalogues)
dup_word       a French UI message, as written or with one word doubled           2
               (fr gettext catalogues)
code_swap      a line of source code, as written or with two of its               2
               whitespace-separated tokens exchanged (as build_suite.code_lang)
last_first     a German UI message, as written or with its last word moved to     2
               the front (msgstr of de gettext catalogues; the decoder's sixth
               task in place of pair_order, which its frozen probe already solves)
man_section    an English man page's NAME line -> its section (build_suite)       6
=============  =================================================================  =======

Each *original* text is assigned to a split by sha256 (70 / 10 / 20 buckets, as build_suite)
and then to one class by a seeded draw, so a text never appears in two splits in any form; the
transformation's randomness is seeded by the text. Per split a fixed cap spread evenly over
the classes; fixed seed.

    .venv/bin/python benchmarks/quality/build_encoder_suite.py --cache DIR [--tasks a,b]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_suite  # noqa: E402
import build_tasks  # noqa: E402
from common import SPLITS, TASKS_SUBDIR, write_json  # noqa: E402

SEED = 20261202
CAPS = {"train": 960, "validation": 150, "test": 300}


def words_between(text: str, lo: int, hi: int) -> list[str] | None:
    w = text.split()
    return w if lo <= len(w) <= hi else None


def man_lines() -> Iterator[str]:
    for text, _ in build_suite.man_section():
        yield text


def synopses() -> Iterator[str]:
    raw = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True).stdout.decode(
        "utf-8", errors="replace")
    for pkg in build_tasks.parse_packages(raw):
        yield pkg.get("Description", "").strip()


def catalogues(lang: str) -> Iterator[tuple[str, str]]:
    for path in sorted(glob.glob(f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo")):
        if Path(path).name.startswith("iso_"):
            continue
        for msgid, msgstr in build_suite.catalogue(path).items():
            en, tr = build_suite.clean(msgid.split("\x00")[0]), build_suite.clean(msgstr.split("\x00")[0])
            if "%" not in en and "%" not in tr and en != tr:
                yield en, tr


# Each transform: (original, class, rng) -> text of that class; class 0 is the text as written.
def shuffle_words(text: str, cls: int, rng: random.Random) -> str:
    w = text.split()
    if cls:
        while w == text.split():
            rng.shuffle(w)
    return " ".join(w)


def swap_halves(text: str, cls: int, rng: random.Random) -> str:
    w = text.split()
    k = len(w) // 2 + rng.randint(-1, 1)
    return " ".join(w[k:] + w[:k]) if cls else text


def rotate(text: str, cls: int, rng: random.Random) -> str:
    w = text.split()
    k = cls * len(w) // 4
    return " ".join(w[k:] + w[:k])


def double_word(text: str, cls: int, rng: random.Random) -> str:
    w = text.split()
    if cls:
        i = rng.randrange(len(w))
        w.insert(i, w[i])
    return " ".join(w)


def swap_tokens(text: str, cls: int, rng: random.Random) -> str:
    w = text.split()
    if cls:
        i, j = rng.sample(range(len(w)), 2)
        w[i], w[j] = w[j], w[i]
    return " ".join(w)


def last_to_front(text: str, cls: int, rng: random.Random) -> str:
    w = text.split()
    return " ".join(w[-1:] + w[:-1]) if cls else text


def pair(texts: tuple[str, str], cls: int, rng: random.Random) -> str:
    en, de = texts
    return f"{de} / {en}" if cls else f"{en} / {de}"


def unique_words(text: str) -> bool:
    return len(set(text.split())) == len(text.split())


def source_word_shuffle() -> Iterator[str]:
    return (t for t in man_lines() if words_between(t, 5, 14) and unique_words(t))


def source_half_swap() -> Iterator[str]:
    return (t for t in synopses() if words_between(t, 6, 14) and unique_words(t))


def source_pairs() -> Iterator[tuple[str, str]]:
    return ((en, de) for en, de in catalogues("de") if words_between(en, 3, 9) and words_between(de, 3, 9))


def source_rotation() -> Iterator[str]:
    return (en for en, _ in catalogues("de") if words_between(en, 8, 16) and unique_words(en))


def source_dup() -> Iterator[str]:
    return (fr for _, fr in catalogues("fr") if words_between(fr, 5, 14))


def source_german() -> Iterator[str]:
    # Without the closing punctuation: a moved "word." at the front would be a cue needing no order.
    stripped = (de.rstrip(".:!?…") for _, de in catalogues("de"))
    return (de for de in stripped if words_between(de, 5, 14) and unique_words(de))


def source_code() -> Iterator[str]:
    return (t for t, _ in build_suite.code_lang() if words_between(t, 5, 14) and unique_words(t))


# name -> (description, class names, source of originals, transform)
FORM_TASKS: dict[str, tuple[str, tuple[str, ...], Callable[[], Iterator], Callable]] = {
    "word_shuffle": ("man page NAME line as written (0) or word-shuffled (1)", ("original", "shuffled"),
                     source_word_shuffle, shuffle_words),
    "half_swap": ("Debian synopsis as written (0) or halves swapped (1)", ("original", "swapped"),
                  source_half_swap, swap_halves),
    "pair_order": ("English / German UI message pair: English first (0) or German first (1)", ("en_first", "de_first"),
                   source_pairs, pair),
    "rotation": ("English UI message rotated by 0, 1/4, 1/2, 3/4 of its words", ("0", "1/4", "1/2", "3/4"),
                 source_rotation, rotate),
    "dup_word": ("French UI message as written (0) or with one word doubled (1)", ("original", "doubled"),
                 source_dup, double_word),
    "code_swap": ("source line as written (0) or with two tokens exchanged (1)", ("original", "swapped"),
                  source_code, swap_tokens),
    "last_first": ("German UI message as written (0) or its last word moved to the front (1)", ("original", "last_first"),
                   source_german, last_to_front),
}


def key_of(original: str | tuple[str, str]) -> str:
    return original if isinstance(original, str) else " / ".join(original)


def build_form(name: str) -> dict[str, list[dict]]:
    _, labels, source, transform = FORM_TASKS[name]
    originals = sorted(set(source()), key=key_of)
    pools: dict[str, list] = {s: [] for s in SPLITS}
    for orig in originals:
        pools[build_tasks.split_of(key_of(orig))].append(orig)
    out = {}
    for split in SPLITS:
        rng = random.Random(f"{SEED}/{name}/{split}")
        chosen = rng.sample(pools[split], min(CAPS[split], len(pools[split])))
        rows = []
        for i, orig in enumerate(chosen):
            cls = i % len(labels)  # balanced; the draw above already randomised which text gets which class
            trng = random.Random(hashlib.sha256(f"{SEED}/{key_of(orig)}".encode()).digest())
            rows.append({"text": transform(orig, cls, trng), "label": cls, "label_name": labels[cls]})
        rng.shuffle(rows)
        out[split] = rows
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--tasks", default=",".join([*FORM_TASKS, "man_section"]))
    args = ap.parse_args(argv)
    root = args.cache / TASKS_SUBDIR
    index: dict = {"seed": SEED, "caps": CAPS, "tasks": {}}
    print("| task | classes | train | validation | test | majority (test) |\n|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        if name in FORM_TASKS:
            description, labels = FORM_TASKS[name][:2]
            data = build_form(name)
        else:
            description, labels, source = build_suite.TASKS[name]
            data = build_suite.split_rows(name, labels, source())
        build_suite.write_task(root, name, description, labels, data, index)
    write_json(root / "index.json", index)


if __name__ == "__main__":
    main()
