"""The real-weight evaluation's prompts: windows of real text of exactly the span length, marked as the span."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from real_passages import (  # noqa: E402
    Document,
    PromptBuilder,
    docstring_documents,
    license_documents,
    split_documents,
)


class CharacterTokenizer:
    """One token per character, and a chat template that wraps the user message."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(character) for character in text]}

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> str:
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_prompts_hold_exact_windows_marked_as_the_span():
    builder = PromptBuilder(CharacterTokenizer(), span_tokens=10)
    documents = [Document("a", "0123456789abcdefghijXYZ"), Document("b", "ABCDEFGHIJ")]
    samples = builder.samples(documents, 5)
    assert len(samples) == 3  # a gives two whole windows (its tail is dropped), b one
    texts = []
    for sample in samples:
        ids, span = sample["input_ids"][0], sample["visual_mask"][0]
        assert int(span.sum()) == 10 and sample["attention_mask"].shape == sample["input_ids"].shape
        texts.append("".join(chr(int(token)) for token in ids[span]))
        assert "".join(chr(int(token)) for token in ids[~span]).startswith("<user>Read the following text.")
    assert texts == ["0123456789", "ABCDEFGHIJ", "abcdefghij"]  # round-robin over documents
    start = len("<user>Read the following text.\n\n")
    assert all(torch.equal(s["visual_mask"][0].nonzero()[:, 0], torch.arange(start, start + 10)) for s in samples)


def test_calibration_and_evaluation_never_share_a_document():
    documents = license_documents() + docstring_documents()
    calibration, evaluation = split_documents(documents)
    assert {d.name for d in calibration}.isdisjoint({d.name for d in evaluation})
    assert len(calibration) + len(evaluation) == len(documents) >= 40
    assert sum(len(d.text) for d in documents) > 200_000  # real text, enough for hundreds of windows
