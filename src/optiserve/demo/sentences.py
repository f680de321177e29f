"""Varied English sentences from text that ships with Python and scikit-learn (no download).

Used as MiniLM validation data: CPython's pydoc topics (programming prose, at most 8 per topic)
and scikit-learn's dataset descriptions (science prose, at most 30 per file), kept only when
they read as prose, deduplicated, and shuffled with a seed.
"""

from __future__ import annotations

import re

import numpy as np

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_BAD = re.compile(r"(::|>>>|\*\*|==|\|\||__|\\|[{}\[\]<>=#@$%^~`|])")


def _prose_paragraphs(text: str):
    """Paragraphs of running prose: unindented lines, no headings, tables or code."""
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue  # code blocks, grammar rules, indented lists and tables
        if any(set(ln.strip()) <= set("*=-~^+|:. ") for ln in lines):
            continue  # rst headings and table rules
        if lines[0].lstrip().startswith(("..", ":", "*", "-", "|", "+", "#")):
            continue
        yield " ".join(ln.strip() for ln in lines)


def _good_sentence(s: str) -> bool:
    words = s.split()
    if not (8 <= len(words) <= 45) or not s.endswith("."):
        return False
    if _BAD.search(s) or s.count('"') % 2 or s.count("(") != s.count(")"):
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters / len(s) > 0.9 and s[0].isupper()


def _sources() -> list[tuple[str, str, int]]:
    sources: list[tuple[str, str, int]] = []
    try:
        from pydoc_data.topics import topics

        sources += [(f"pydoc_data.topics:{k}", topics[k], 8) for k in sorted(topics)]
    except ImportError:  # some distributions strip pydoc_data
        pass
    try:
        import importlib.resources as resources

        descr = resources.files("sklearn.datasets") / "descr"
        sources += [(f"sklearn/datasets/descr/{p.name}", p.read_text(), 30)
                    for p in sorted(descr.iterdir(), key=lambda p: p.name)
                    if p.name.endswith(".rst")]
    except ImportError:
        pass
    return sources


def sentence_pool(n: int = 350, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` distinct prose sentences and, for each, where it came from."""
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    for where, text, cap in _sources():
        taken = 0
        for para in _prose_paragraphs(text):
            for s in _SENT_SPLIT.split(para):
                s = " ".join(s.split())
                if taken < cap and _good_sentence(s) and s.lower() not in seen:
                    seen.add(s.lower())
                    pool.append((s, where))
                    taken += 1
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} sentences found in the shipped texts; need {n}")
    picked = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n]]
    return [s for s, _ in picked], [w for _, w in picked]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    return sentence_pool(n, seed)[0]
