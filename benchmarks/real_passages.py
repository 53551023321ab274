"""Prompts for the real-weight evaluation: passages of real text that nobody here wrote, each routed as the image.

Documents are the license texts a Debian system ships in /usr/share/common-licenses and the docstrings of Python
standard-library modules (module, class and function docstrings, in source order). Each document is cut into
consecutive windows of exactly `span_tokens` tokens. Whole documents go alternately (in sorted order) to the
calibration side and the evaluation side, so the two never share text. Each window sits in a chat prompt that asks
a question about it; the window's positions are the visual span (`visual_mask`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSES = ("Apache-2.0", "Artistic", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0")
MODULES = (
    "argparse", "asyncio.events", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fileinput", "fractions", "functools", "heapq",
    "http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pdb", "pickle", "random", "re",
    "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "turtle", "typing", "unittest.case", "urllib.parse", "wave", "zipfile",
)
QUESTIONS = (
    "Summarize the text above in one sentence.",
    "What is the main topic of the text above?",
    "Which rules or conditions does the text above state?",
    "Explain the text above to a beginner.",
)


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def license_documents() -> list[Document]:
    """The Debian license texts listed in LICENSES (a one-line error when the folder is missing)."""
    if not LICENSE_DIR.is_dir():
        raise SystemExit(f"{LICENSE_DIR} is missing: the real-weight passages need a Debian-like system's licenses")
    return [Document(f"license:{name}", (LICENSE_DIR / name).read_text()) for name in LICENSES
            if (LICENSE_DIR / name).exists()]


def _docstrings(module: Any) -> str:
    parts = [inspect.getdoc(module) or ""]
    for _, member in inspect.getmembers(module, lambda m: inspect.isclass(m) or inspect.isfunction(m)):
        if getattr(member, "__module__", None) == module.__name__:
            parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(part for part in parts if part)


def docstring_documents() -> list[Document]:
    """One document per standard-library module in MODULES: its docstrings."""
    return [Document(f"python:{name}", _docstrings(importlib.import_module(name))) for name in MODULES]


def split_documents(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    """(calibration, evaluation): sorted by name, alternately."""
    ordered = sorted(documents, key=lambda document: document.name)
    return ordered[0::2], ordered[1::2]


class PromptBuilder:
    """Chat prompts around windows of `span_tokens` tokens of a document, with the window marked as the span."""

    def __init__(self, tokenizer: Any, span_tokens: int = 400):
        self.tokenizer = tokenizer
        self.span_tokens = span_tokens

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def windows(self, document: Document) -> list[list[int]]:
        ids = self._ids(document.text)
        size = self.span_tokens
        return [ids[start:start + size] for start in range(0, len(ids) - size + 1, size)]

    def prompt(self, window: list[int], question: str) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and visual_mask (1, L) of the chat prompt asking `question` about `window`."""
        marker = "\x00PASSAGE\x00"
        messages = [{"role": "user", "content": f"Read the following text.\n\n{marker}\n\n{question}"}]
        chat = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        before, after = chat.split(marker)
        head, tail = self._ids(before), self._ids(after)
        ids = torch.tensor([head + window + tail])
        span = torch.zeros_like(ids, dtype=torch.bool)
        span[0, len(head):len(head) + len(window)] = True
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "visual_mask": span}

    def samples(self, documents: list[Document], count: int) -> list[dict[str, torch.Tensor]]:
        """Up to `count` prompts, taking windows round-robin over `documents` so every document is used."""
        per_document = [self.windows(document) for document in documents]
        order = [window for depth in range(max(map(len, per_document), default=0))
                 for windows in per_document if depth < len(windows) for window in [windows[depth]]]
        return [self.prompt(window, QUESTIONS[index % len(QUESTIONS)]) for index, window in enumerate(order[:count])]


def real_samples(tokenizer: Any, calibration: int, evaluation: int, span_tokens: int = 400):
    """(calibration samples, evaluation samples) from disjoint documents."""
    calibration_docs, evaluation_docs = split_documents(license_documents() + docstring_documents())
    builder = PromptBuilder(tokenizer, span_tokens)
    return builder.samples(calibration_docs, calibration), builder.samples(evaluation_docs, evaluation)
