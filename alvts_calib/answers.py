"""How a generated answer is compared with a labelled one (relaxed exact match on normalised words)."""

from __future__ import annotations

import re


def normalise_answer(text: str) -> str:
    """Lower-case words with punctuation removed and whitespace collapsed: "The Red." -> "the red"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_matches(prediction: str, answer: str) -> bool:
    """Relaxed exact match: the normalised prediction is the answer or starts with it as whole words."""
    predicted, expected = normalise_answer(prediction), normalise_answer(answer)
    return bool(expected) and (predicted == expected or predicted.startswith(expected + " "))
