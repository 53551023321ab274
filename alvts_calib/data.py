"""Calibration and evaluation data: image/prompt records from local files, turned into processor inputs.

Records have an `image` (a file path, or an embedded `datasets.Image`), a `prompt` and optionally an `answer`.
Rows that cannot be used are skipped and counted by reason in a `DataReport`, never fatal one by one; a file whose
values have the wrong type (a number as image, a list as prompt) is an error naming the line.
"""

from __future__ import annotations

import io
import json
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
TOO_LARGE = "image too large to open safely"  # PIL's decompression bomb guard
TOO_LONG = "longer than the model's positions"
TEXT_COLUMNS = ("image", "file_name", "prompt", "answer", "kind")  # what the toolkit reads; other columns are ignored
IMAGE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises for files that are not images it can read


@dataclass
class DataReport:
    """How many rows became samples, and how many were skipped for which reason."""

    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list, compare=False)  # the data row (from 0) of each sample used

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
    records: datasets.Dataset, processor: Any, *, num_samples: int | None = None, image_token: str | None = None,
    max_tokens: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], DataReport]:
    """Turn records into processor inputs, one batch-of-1 dict of tensors per usable row.

    With a chat template the prompt goes into a user turn after an image entry (image tokens already in the
    prompt are dropped); without one the prompt must contain the image token (`image_token`, default the
    processor's). Rows longer than `max_tokens` (the model's positions) are skipped. Stops after `num_samples`
    usable samples (default: all rows), so skipped rows may leave fewer.
    """
    token, records = _prepare(records, processor, num_samples, image_token, "the calibration data")
    samples: list[dict[str, torch.Tensor]] = []
    report = DataReport()
    skipped: Counter[str] = Counter()
    for number, row in enumerate(records):
        if num_samples is not None and len(samples) == num_samples:
            break
        sample = _build_sample(row, processor, token, max_tokens)
        if isinstance(sample, str):
            skipped[sample] += 1
        else:
            samples.append(sample)
            report.rows.append(number)
    report.used, report.skipped = len(samples), dict(skipped)
    if not samples:
        raise AlvtsError(f"no usable rows in the calibration data: {report.summary()}")
    return samples, report


def single_sample(
    image: str | Path | Image.Image, prompt: str, processor: Any, *, max_tokens: int | None = None, source: str = ""
) -> dict[str, torch.Tensor]:
    """Processor inputs for one image and prompt, or a one-line error saying why they cannot be used."""
    token = getattr(processor, "image_token", None)
    row = {"image": str(image) if isinstance(image, str | Path) else image, "prompt": prompt}
    sample = _build_sample(row, processor, token, max_tokens)
    if isinstance(sample, str):
        raise AlvtsError(f"{source or image}: {sample}; give a readable image (PNG, JPEG) and a prompt that fits the "
                         "model")
    return sample


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
    """Read a JSONL file into memory, checking every line is an object whose values have the right types."""
    rows, names = [], {}
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    row = _json_object(line, f"{path} line {number}")
                    names.update(dict.fromkeys("image" if name == "file_name" else name for name in row))
                    rows.append(_typed_row(row, f"{path} line {number}"))
    except UnicodeDecodeError:
        raise AlvtsError(f"{path} is not UTF-8 text; save it as UTF-8 JSONL") from None
    if not rows:
        raise AlvtsError(f"{path} is empty: it needs one JSON object per line with an image and a prompt")
    _require_columns(list(names), str(path))
    columns = [name for name in TEXT_COLUMNS if any(name in row for row in rows)]
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict({name: [row.get(name) for row in rows] for name in columns}, features=features)


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise AlvtsError(f"{where}: not valid JSON ({reason}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise AlvtsError(f"{where}: expected a JSON object with an image and a prompt, got {type(row).__name__}")
    return row


def _typed_row(row: dict[str, Any], where: str) -> dict[str, str | None]:
    """The columns the toolkit reads, as text: paths and prompts must be strings, answers and kinds may be numbers."""
    typed: dict[str, str | None] = {}
    for name in TEXT_COLUMNS:
        value = row.get(name)
        numbers_allowed = name in ("answer", "kind")
        if value is None or isinstance(value, str):
            typed[name] = value
        elif numbers_allowed and isinstance(value, int | float) and not isinstance(value, bool):
            typed[name] = str(value)
        else:
            what = "a file path (a string)" if name in ("image", "file_name") else "text (a string)"
            found = f"{type(value).__name__} {str(value)[:40]}"
            raise AlvtsError(f"{where}: {name} must be {what}, got {found}; fix that line")
    return {name: value for name, value in typed.items() if name in row}


def _resolve_images(dataset: datasets.Dataset, root: Path) -> datasets.Dataset:
    """Rename `file_name` to `image`, and make image paths given as strings absolute against `root`."""
    if "file_name" in dataset.column_names and "image" not in dataset.column_names:
        dataset = dataset.rename_column("file_name", "image")
    feature = dataset.features.get("image")
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return dataset
    resolved = [None if name is None else str(root / name) for name in dataset["image"]]
    return dataset.remove_columns("image").add_column("image", resolved)


def _require_columns(names: list[str], source: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise AlvtsError(
            f"{source} lacks column(s) {', '.join(missing)}; it has {', '.join(names)}: name the "
            "columns to use with --image-column and --prompt-column (image_column=, prompt_column=)"
        )


def _check_columns(dataset: datasets.Dataset, source: str) -> None:
    """The required columns are there, and the columns the toolkit reads hold values of the right type."""
    _require_columns(dataset.column_names, source)
    for name in ("image", "prompt", "answer", "kind"):
        feature = dataset.features.get(name)
        if feature is None or (name == "image" and isinstance(feature, datasets.Image)):
            continue
        text_like = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")
        numeric = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "float"))
        if not (text_like or (numeric and name in ("answer", "kind"))):
            what = "file paths or images" if name == "image" else "text"
            raise AlvtsError(f"{source}: column {name} must hold {what}, but it holds {feature}; fix the data")


def _build_sample(
    row: dict[str, Any], processor: Any, token: str | None, max_tokens: int | None = None
) -> dict[str, torch.Tensor] | str:
    """The processor inputs for one row, or the reason it is skipped."""
    usable = _usable_row(row, processor, token)
    if isinstance(usable, str):
        return usable
    image, text = usable
    try:
        sample = dict(processor(images=image, text=text, return_tensors="pt"))
    except ValueError:
        return REJECTED
    if max_tokens is not None and sample["input_ids"].shape[-1] > max_tokens:
        return TOO_LONG
    return sample


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


def _open_image(value: str | dict[str, Any] | Image.Image | None) -> Image.Image | str:
    """The image as RGB, or the reason it cannot be opened. `value` is a path or an undecoded `datasets.Image`."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if value is None or (isinstance(value, str) and not Path(value).is_file()):
        return MISSING_IMAGE
    try:
        with Image.open(value) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError:
        return TOO_LARGE
    except IMAGE_ERRORS:
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
