"""Varied English sentences from text that ships with Python and scikit-learn (no download).

Used as MiniLM validation data: CPython's pydoc topics (programming prose) and scikit-learn's
dataset descriptions (science prose), split into sentences, deduplicated, shuffled with a seed.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _clean(text: str) -> list[str]:
    text = re.sub(r"[`*|=_~^\[\]<>#]+", " ", text)
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in _SPLIT.split(text):
        s = s.strip()
        words = s.split()
        if 6 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?" and \
                sum(c.isalpha() for c in s) > 0.7 * len(s.replace(" ", "")):
            out.append(s)
    return out


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """`n` distinct sentences (fewer only if the sources run out)."""
    texts: list[str] = []
    try:
        from pydoc_data.topics import topics

        texts.extend(topics.values())
    except ImportError:  # some distributions strip pydoc_data
        pass
    try:
        import sklearn

        texts.extend(p.read_text(errors="ignore")
                     for p in sorted((Path(sklearn.__file__).parent / "datasets" / "descr")
                                     .glob("*.rst")))
    except ImportError:
        pass
    seen, sentences = set(), []
    for text in texts:
        for s in _clean(text):
            if s.lower() not in seen:
                seen.add(s.lower())
                sentences.append(s)
    random.Random(seed).shuffle(sentences)
    return sentences[:n]
