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

ACCEPTED_KINDS = (
    "a .jsonl file, a folder with metadata.jsonl, a folder written by Dataset.save_to_disk, a .parquet/.csv/.json "
    "file or a folder of them, or a dataset name that datasets.load_dataset understands"
)
REQUIRED_COLUMNS = ("image", "prompt")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}

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


def load_records(
    source: str | Path,
    *,
    split: str | None = None,
    image_column: str = "image",
    prompt_column: str = "prompt",
    answer_column: str = "answer",
) -> datasets.Dataset:
    """Load image/prompt records from `source`, one of the kinds in `ACCEPTED_KINDS`.

    The toolkit's own formats (JSONL, metadata.jsonl folders) and save_to_disk folders are read directly; anything
    else goes to `datasets.load_dataset`, a local file through its builder (parquet, csv, json, arrow). `split`
    picks one split of a source with several (required when there are several); the column options name the
    source's columns holding the image, the prompt and (for evaluation) the answer. Relative image paths of local
    sources are resolved against the folder holding the data; imagefolder-style `file_name` is accepted for `image`.
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        dataset = _single_table(_read_jsonl(path), split, path)
    elif (path / "metadata.jsonl").is_file():
        dataset = _single_table(_read_jsonl(path / "metadata.jsonl"), split, path)
    elif any((path / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json")):
        dataset = _choose_split(datasets.load_from_disk(str(path)), split, str(path))
    elif path.is_file() and path.suffix not in DATA_FILE_BUILDERS:
        raise AlvtsError(f"cannot load data from {path}: expected {ACCEPTED_KINDS}")
    else:
        dataset = _load_dataset(str(source), split)
    dataset = _rename_columns(dataset, str(source), image=image_column, prompt=prompt_column, answer=answer_column)
    if path.exists():
        dataset = _resolve_images(dataset, path.parent if path.is_file() else path)
    _check_columns(dataset, str(source))
    return dataset


def _load_dataset(source: str, split: str | None) -> datasets.Dataset:
    """One split of `source` through `datasets.load_dataset`: a Hub name, a local folder, or a local data file."""
    builder, options = source, {}
    if Path(source).is_file():
        builder, options = DATA_FILE_BUILDERS[Path(source).suffix], {"data_files": source}
    try:
        split = _pick_split(datasets.get_dataset_split_names(builder, **options), split, source)
        return datasets.load_dataset(builder, split=split, **options)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise AlvtsError(f"cannot load data from {source} ({reason}); expected {ACCEPTED_KINDS}") from error


def _choose_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str | None, source: str) -> datasets.Dataset:
    """The requested split of a saved dataset (a single saved table has no named splits)."""
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[_pick_split(list(loaded), split, source)]
    return _single_table(loaded, split, source)


def _pick_split(names: list[str], split: str | None, source: str) -> str:
    """`split` if `source` has it; the only split when none is asked for; otherwise a one-line error."""
    if split is None and len(names) == 1:
        return names[0]
    if split is None:
        raise AlvtsError(f"{source} has splits {', '.join(names)}: choose one with --split (split=)")
    if split not in names:
        raise AlvtsError(f"{source} has no split {split!r}; it has {', '.join(names)}: pass one of them to --split")
    return split


def _single_table(dataset: datasets.Dataset, split: str | None, source: str | Path) -> datasets.Dataset:
    """A source without named splits; asking it for a split is a mistake worth reporting."""
    if split is not None:
        raise AlvtsError(f"{source} is a single table without named splits; drop --split {split}")
    return dataset


def _rename_columns(dataset: datasets.Dataset, source: str, **columns: str) -> datasets.Dataset:
    """Give the chosen columns the toolkit's names (image, prompt, answer), replacing columns already so named.

    A column chosen explicitly (not its default name) must exist; a default one may be absent (calibration data
    has no answer, and `_check_columns` reports a missing image or prompt).
    """
    renames = {}
    for name, column in columns.items():
        if column in dataset.column_names:
            renames[column] = name
        elif column != name:
            raise AlvtsError(
                f"{source} has no column {column!r} for the {name}; it has {', '.join(dataset.column_names)}"
            )
    renames = {column: name for column, name in renames.items() if column != name}
    if not renames:
        return dataset
    replaced = [name for name in renames.values() if name in dataset.column_names and name not in renames]
    return dataset.remove_columns(replaced).rename_columns(renames)


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
        raise AlvtsError(
            f"the evaluation data needs an answer column; it has {', '.join(records.column_names)}: name it with "
            "--answer-column (answer_column=)"
        )
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
        raise AlvtsError(
            f"{source} lacks column(s) {', '.join(missing)}; it has {', '.join(dataset.column_names)}: name the "
            "columns to use with --image-column and --prompt-column (image_column=, prompt_column=)"
        )


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
