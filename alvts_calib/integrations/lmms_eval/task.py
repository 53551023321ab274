"""A local lmms-eval task over labelled records {image, prompt, answer}, written to one folder with no Hub access.

The folder holds the rows as parquet (images embedded), the task YAML, and `utils.py`, which lmms-eval reads the
YAML's `!function utils.*` entries from and which imports the functions below. Answers are scored as `alvts eval`
scores them (`answers.answer_matches`), so the task's accuracy is comparable with the harness's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from alvts_calib.answers import answer_matches
from alvts_calib.errors import AlvtsError

COLUMNS = ("image", "prompt", "answer")
SHIM = "from alvts_calib.integrations.lmms_eval.task import doc_to_text, doc_to_visual, process_results  # noqa: F401\n"


def write_task(folder: str | Path, records: datasets.Dataset, *, name: str, max_new_tokens: int) -> Path:
    """Write the task `name` over `records` (images in a `datasets.Image` column, stored in the parquet file) into
    `folder`; run it with `lmms-eval --include_path FOLDER --tasks NAME`. Returns the YAML's path. Generation is
    greedy, at most `max_new_tokens` tokens."""
    missing = [column for column in COLUMNS if column not in records.column_names]
    if missing:
        raise AlvtsError(f"an lmms-eval task needs columns {', '.join(COLUMNS)}; the records lack {', '.join(missing)}")
    if not isinstance(records.features["image"], datasets.Image):
        raise AlvtsError("an lmms-eval task stores its images: the image column must be a datasets.Image column")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.parquet"
    records.to_parquet(str(data))
    (folder / "utils.py").write_text(SHIM, encoding="utf-8")
    task = folder / f"{name}.yaml"
    task.write_text(_task_yaml(name, data, max_new_tokens), encoding="utf-8")
    return task


def _task_yaml(name: str, data: Path, max_new_tokens: int) -> str:
    """The task's YAML (strings JSON-quoted, which YAML reads as they are)."""
    return f"""task: {json.dumps(name)}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The row's image, in RGB as `alvts eval` opens it."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The row's prompt; the model adds the image and its chat template."""
    return doc["prompt"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the generated answer matches the row's, as `alvts eval` counts it."""
    return {"accuracy": float(answer_matches(results[0], doc["answer"]))}
