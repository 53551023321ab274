"""The lmms-eval plugin on the demo: the models lmms-eval finds through the entry point, their arguments, and the
local task `alvts_shapes`, whose accuracy under lmms-eval (one process and two, batched) is `alvts eval`'s on the
same rows and budget. lmms-eval runs in subprocesses, offline, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from alvts_cli.app import app
from lmms_eval.models import get_model
from lmms_eval.models.simple.llava_hf import LlavaHf
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
from typer.testing import CliRunner

from alvts_calib import calibrate, export
from alvts_calib.artifact.export import keep_ratio_at
from alvts_calib.data import build_labelled_items, build_samples
from alvts_calib.demo.builtin import BUILTIN_MODEL_DIR, builtin_model, builtin_processor
from alvts_calib.demo.shapes_task import split_records
from alvts_calib.errors import AlvtsError, ArtifactError
from alvts_calib.evaluation.harness import evaluate
from alvts_calib.integrations.lmms_eval.models import AlvtsLlavaHf, AlvtsQwen2_5_VL
from alvts_calib.integrations.lmms_eval.task import write_task

ROWS = 24
COMPRESSION = 0.89


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A demo selector exported at 89% with one ratio for every layer (what `alvts eval`'s alvts method runs at that
    compression), and the task over the first ROWS test rows, written by `alvts lmms-eval-task`."""
    folder = tmp_path_factory.mktemp("lmms-eval")
    model, processor = builtin_model(), builtin_processor()
    samples, _ = build_samples(split_records("calibration", 8), processor)
    calibration = calibrate(model, samples, refine_steps=5, sensitivity_samples=0, progress=False)
    selector = folder / "selector.safetensors"
    export(calibration, selector, keep_ratio=keep_ratio_at(calibration, COMPRESSION), budget="uniform")
    result = CliRunner().invoke(app, ["lmms-eval-task", str(folder / "tasks"), "--count", str(ROWS), "--json"])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "selector": selector, "tasks": folder / "tasks"}


@pytest.fixture(scope="module")
def harness(run) -> dict[str, float]:
    """`alvts eval`'s accuracy on the same rows: the unpatched model and alvts at COMPRESSION."""
    from alvts_calib.artifact.selector import load_selector

    processor = builtin_processor()
    items, _ = build_labelled_items(split_records("test", ROWS), processor)
    report = evaluate(builtin_model(), processor, items, selector=load_selector(run["selector"]),
                      methods=("alvts-uniform",), compressions=(COMPRESSION,), batch_size=4, progress=False)
    return {result.method: result.accuracy for result in report.results}


def _lmms_eval(
    run: dict[str, Path], name: str, model_args: str, launcher: list[str], **env: str
) -> tuple[dict, list, str]:
    """Run lmms-eval on the demo task offline; its accuracy, its logged samples and its output."""
    out = run["folder"] / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(run["folder"] / "cache"), **env}
    command = [*launcher, "-m", "lmms_eval", "--model", "alvts_llava_hf", "--model_args",
               f"pretrained={BUILTIN_MODEL_DIR},selector={run['selector']},device=cpu{model_args}",
               "--tasks", "alvts_shapes", "--include_path", str(run["tasks"]), "--batch_size", "4",
               "--output_path", str(out), "--log_samples"]
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = process.stdout + process.stderr
    results = list(out.glob("*/*_results.json"))  # lmms-eval exits 0 after a failed evaluation: look for results
    assert process.returncode == 0 and len(results) == 1, output[-3000:]
    samples = [json.loads(line) for path in out.glob("*/*_samples_alvts_shapes.jsonl") for line in path.open()]
    return json.loads(results[0].read_text())["results"]["alvts_shapes"], samples, output


def test_lmms_eval_finds_the_plugin_models_through_the_entry_point():
    assert get_model("alvts_llava_hf") is AlvtsLlavaHf and get_model("alvts_llava_next") is AlvtsLlavaHf
    assert get_model("alvts_qwen2_5_vl") is AlvtsQwen2_5_VL
    assert issubclass(AlvtsLlavaHf, LlavaHf) and issubclass(AlvtsQwen2_5_VL, Qwen2_5_VL)


def test_selector_arg_is_required_and_checked_before_the_checkpoint_loads(tmp_path):
    for model in (AlvtsLlavaHf, AlvtsQwen2_5_VL):
        with pytest.raises(AlvtsError, match=r"needs a selector artifact: add selector=PATH to --model_args"):
            model(pretrained=str(BUILTIN_MODEL_DIR), device="cpu")
        with pytest.raises(ArtifactError):
            model(pretrained=str(tmp_path / "no-checkpoint"), selector=str(tmp_path / "none.safetensors"))


def test_a_task_needs_labelled_records_with_images(tmp_path):
    rows = {"image": ["a.png"], "prompt": ["what?"]}
    with pytest.raises(AlvtsError, match=r"needs columns image, prompt, answer; the records lack answer"):
        write_task(tmp_path, datasets.Dataset.from_dict(rows), name="t", max_new_tokens=2)
    with pytest.raises(AlvtsError, match=r"must be a datasets.Image column"):
        write_task(tmp_path, datasets.Dataset.from_dict({**rows, "answer": ["red"]}), name="t", max_new_tokens=2)


@pytest.mark.slow
def test_lmms_eval_accuracy_is_alvts_eval_accuracy_in_batches(run, harness):
    results, samples, output = _lmms_eval(run, "one-process", "", [sys.executable])
    assert f"alvts_llava_hf: attached {run['selector']} to 24 decoder layers at the artifact's keep ratios" in output
    assert len(samples) == ROWS
    assert results["accuracy,none"] == harness["alvts-uniform"]


@pytest.mark.slow
def test_two_processes_share_the_rows_and_keep_ratio_overrides_the_artifact(run, harness):
    """lmms-eval's data-parallel mode on the CPU: accelerate's multi-process launcher with ACCELERATE_USE_CPU, each
    process evaluating half the rows; keep_ratio=1 routes nothing, so the accuracy is the unpatched model's."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    results, samples, output = _lmms_eval(run, "two-processes", ",keep_ratio=1.0", launcher, ACCELERATE_USE_CPU="1")
    assert sorted(sample["doc_id"] for sample in samples) == list(range(ROWS))
    assert f"Postprocessed {ROWS // 2} docs for alvts_shapes" in output  # rank 0 had half the rows
    assert "at keep ratio 1" in output
    assert results["accuracy,none"] == harness["full"]
