"""How a generated answer is compared with a labelled one (relaxed exact match on normalised words)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


def normalise_answer(text: str) -> str:
    """Lower-case words with punctuation removed and whitespace collapsed: "The Red." -> "the red"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_matches(prediction: str, answer: str) -> bool:
    """Relaxed exact match: the normalised prediction is the answer or starts with it as whole words."""
    predicted, expected = normalise_answer(prediction), normalise_answer(answer)
    return bool(expected) and (predicted == expected or predicted.startswith(expected + " "))


def answer_token_budget(tokenizer: Any, answers: Iterable[str]) -> int:
    """New tokens to generate for these answers: the longest one's tokens plus one, so that a prediction running on
    past an answer shows (and fails the whole-word match)."""
    return 1 + max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers)
