"""Calibration and evaluation data: image/prompt records from local files, turned into processor inputs.

Records have an `image` (a file path, or an embedded `datasets.Image`), a `prompt` and optionally an `answer`.
Rows that cannot be used are skipped and counted by reason in a `DataReport`, never fatal one by one.
"""

from __future__ import annotations

import io
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from alvts_calib.answers import normalise_answer
from alvts_calib.errors import AlvtsError

ACCEPTED_KINDS = "a .jsonl file, a folder with metadata.jsonl, or a folder written by Dataset.save_to_disk"
REQUIRED_COLUMNS = ("image", "prompt")

MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_PROMPT = "empty prompt"
NO_IMAGE_TOKEN = "prompt without image token"
REJECTED = "rejected by processor"
MISSING_ANSWER = "missing answer"  # none, or no words in it (nothing could ever match it)


@dataclass
class DataReport:
    """How many rows became samples, and how many were skipped for which reason."""

    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line, e.g. `3 samples used, 2 rows skipped (1 empty prompt, 1 missing image)`."""
        if not self.skipped:
            return f"{self.used} samples used, no rows skipped"
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{self.used} samples used, {sum(self.skipped.values())} rows skipped ({reasons})"


def load_records(path: str | Path) -> datasets.Dataset:
    """Load image/prompt records from `path`, one of the kinds in `ACCEPTED_KINDS`.

    Relative image paths are resolved against the folder holding the data (the JSONL file's folder, the
    metadata.jsonl folder, or the save_to_disk folder); imagefolder-style `file_name` is accepted for `image`.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        dataset = _read_jsonl(path)
    elif (path / "metadata.jsonl").is_file():
        dataset = _read_jsonl(path / "metadata.jsonl")
    elif (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        dataset = datasets.load_from_disk(str(path))
    else:
        raise AlvtsError(f"cannot load data from {path}: expected {ACCEPTED_KINDS}")
    dataset = _resolve_images(dataset, path.parent if path.is_file() else path)
    _check_columns(dataset, str(path))
    return dataset


def build_samples(
    records: datasets.Dataset, processor: Any, *, num_samples: int | None = None, image_token: str | None = None
) -> tuple[list[dict[str, torch.Tensor]], DataReport]:
    """Turn records into processor inputs, one batch-of-1 dict of tensors per usable row.

    With a chat template the prompt goes into a user turn after an image entry (image tokens already in the
    prompt are dropped); without one the prompt must contain the image token (`image_token`, default the
    processor's). Stops after `num_samples` usable samples (default: all rows), so skipped rows may leave fewer.
    """
    token, records = _prepare(records, processor, num_samples, image_token, "the calibration data")
    samples: list[dict[str, torch.Tensor]] = []
    skipped: Counter[str] = Counter()
    for row in records:
        if num_samples is not None and len(samples) == num_samples:
            break
        sample = _build_sample(row, processor, token)
        if isinstance(sample, str):
            skipped[sample] += 1
        else:
            samples.append(sample)
    report = DataReport(used=len(samples), skipped=dict(skipped))
    if not samples:
        raise AlvtsError(f"no usable rows in the calibration data: {report.summary()}")
    return samples, report


@dataclass
class LabelledItem:
    """One evaluation row: the opened image, the processor text (chat template applied), the answer and, when the
    data has a `kind` column, the row's kind (accuracy is also reported per kind)."""

    image: Image.Image
    text: str
    answer: str
    kind: str | None = None


def build_labelled_items(
    records: datasets.Dataset, processor: Any, *, num_samples: int | None = None, image_token: str | None = None
) -> tuple[list[LabelledItem], DataReport]:
    """Usable rows of a labelled set (an `answer` column is required), with the same skip rules as `build_samples`."""
    if "answer" not in records.column_names:
        raise AlvtsError(f"the evaluation data needs an answer column; it has {', '.join(records.column_names)}")
    token, records = _prepare(records, processor, num_samples, image_token, "the evaluation data")
    items: list[LabelledItem] = []
    skipped: Counter[str] = Counter()
    for row in records:
        if num_samples is not None and len(items) == num_samples:
            break
        answered = normalise_answer(str(row["answer"] or ""))
        usable = _usable_row(row, processor, token) if answered else MISSING_ANSWER
        if isinstance(usable, str):
            skipped[usable] += 1
        else:
            kind = str(row["kind"]).strip() if row.get("kind") is not None else None
            items.append(LabelledItem(*usable, answer=str(row["answer"]).strip(), kind=kind or None))
    report = DataReport(used=len(items), skipped=dict(skipped))
    if not items:
        raise AlvtsError(f"no usable rows in the evaluation data: {report.summary()}")
    return items, report


def _prepare(
    records: datasets.Dataset, processor: Any, num_samples: int | None, image_token: str | None, source: str
) -> tuple[str | None, datasets.Dataset]:
    """Check the records and options; the image token to require and records with undecoded images."""
    if len(records) == 0:
        raise AlvtsError(f"{source} is empty: it needs rows with an image and a prompt")
    if num_samples is not None and not 0 < num_samples <= len(records):
        raise AlvtsError(f"num_samples={num_samples} is not between 1 and the {len(records)} rows of the data")
    _check_columns(records, source)
    token = image_token or getattr(processor, "image_token", None)
    if token is None and not getattr(processor, "chat_template", None):
        raise AlvtsError("the processor has no chat template and no image token: pass image_token")
    if isinstance(records.features["image"], datasets.Image):
        records = records.cast_column("image", datasets.Image(decode=False))
    return token, records


def _read_jsonl(path: Path) -> datasets.Dataset:
    """Read a JSONL file into memory, leaving no cache files behind."""
    with path.open(encoding="utf-8") as lines:
        if not any(line.strip() for line in lines):
            raise AlvtsError(f"{path} is empty: it needs one JSON object per line with an image and a prompt")
    with tempfile.TemporaryDirectory() as cache_dir:
        try:
            return datasets.Dataset.from_json(str(path), cache_dir=cache_dir, keep_in_memory=True)
        except datasets.exceptions.DatasetGenerationError as error:
            raise AlvtsError(f"cannot read {path} as JSONL: {error.__cause__ or error}") from error


def _resolve_images(dataset: datasets.Dataset, root: Path) -> datasets.Dataset:
    """Rename `file_name` to `image`, and make image paths given as strings absolute against `root`."""
    if "file_name" in dataset.column_names and "image" not in dataset.column_names:
        dataset = dataset.rename_column("file_name", "image")
    feature = dataset.features.get("image")
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return dataset
    resolved = [None if name is None else str(root / name) for name in dataset["image"]]
    return dataset.remove_columns("image").add_column("image", resolved)


def _check_columns(dataset: datasets.Dataset, source: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in dataset.column_names]
    if missing:
        raise AlvtsError(f"{source} lacks column(s) {', '.join(missing)}; it has {', '.join(dataset.column_names)}")


def _build_sample(row: dict[str, Any], processor: Any, token: str | None) -> dict[str, torch.Tensor] | str:
    """The processor inputs for one row, or the reason it is skipped."""
    usable = _usable_row(row, processor, token)
    if isinstance(usable, str):
        return usable
    image, text = usable
    try:
        return dict(processor(images=image, text=text, return_tensors="pt"))
    except ValueError:
        return REJECTED


def _usable_row(row: dict[str, Any], processor: Any, token: str | None) -> tuple[Image.Image, str] | str:
    """The opened image and the processor text of one row, or the reason it is skipped."""
    text = _prompt_text(row["prompt"] or "", processor, token)
    if not text.strip():
        return EMPTY_PROMPT
    if token is not None and token not in text:
        return NO_IMAGE_TOKEN
    image = _open_image(row["image"])
    if isinstance(image, str):
        return image
    return image, text


def _open_image(value: str | dict[str, Any] | None) -> Image.Image | str:
    """The image as RGB, or the reason it cannot be opened. `value` is a path or an undecoded `datasets.Image`."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if value is None or (isinstance(value, str) and not Path(value).is_file()):
        return MISSING_IMAGE
    try:
        with Image.open(value) as image:
            return image.convert("RGB")
    except OSError:
        return UNREADABLE_IMAGE


def _prompt_text(prompt: str, processor: Any, token: str | None) -> str:
    """The processor text for a prompt: a chat-templated user turn, or the prompt itself; "" if the prompt is empty."""
    if not getattr(processor, "chat_template", None):
        return prompt
    prompt = prompt.replace(token, "").strip() if token else prompt.strip()
    if not prompt:
        return ""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
