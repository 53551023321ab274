"""The `alvts` CLI on the built-in demo default, its JSON output, and its one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import alvts_cli.app as cli_app
import pytest
import torch
from alvts_cli.app import app
from typer.testing import CliRunner

from alvts_calib.artifact.schema import CALIBRATION_FORMAT, SELECTOR_FORMAT
from alvts_calib.artifact.selector import read_metadata
from alvts_calib.demo.builtin import BUILTIN_MODEL_DIR
from alvts_calib.errors import AlvtsError, SampleError
from alvts_calib.outputs import output_lock

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_calibrate_export_inspect_generate_on_the_demo(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    selector = tmp_path / "selector.safetensors"
    summary = json.loads(_ok(["calibrate", "--out", str(calibration), "--num-samples", "3", "--refine-steps", "5",
                              "--json"]))
    assert summary["summary"]["samples"] == 3 and set(summary["fidelity"]) == {str(i) for i in range(24)}
    assert calibration.exists() and not list(tmp_path.glob("*.partial.safetensors"))
    exported = json.loads(_ok(["export", str(calibration), "--keep-ratio", "0.25", "--out", str(selector), "--json"]))
    assert exported["keep_ratio"] == 0.25 and exported["rank"] == 64  # every head of the demo (default_rank)
    assert exported["budget"] == "sensitivity" and exported["skipped_keys"] == "pool"
    tokens = exported["allocation"]["tokens"]  # per layer, the stand-in included
    assert exported["allocation"]["mean_tokens_per_layer"] == 16 and sum(tokens.values()) == 16 * 24
    inspected = json.loads(_ok(["inspect", str(selector), "--json"]))
    assert inspected["fingerprint"]["family"] == "llava" and inspected["keep_ratios"] == exported["keep_ratios"]
    assert "calibrating" not in _ok(["inspect", str(calibration)])
    generated = json.loads(_ok(["generate", "--selector", str(selector), "--max-new-tokens", "3", "--json"]))
    cache = generated["kv_cache_tokens_per_layer"]
    for layer, count in tokens.items():  # the selected tokens and the stand-in: the layer's budget
        assert cache[int(layer)] - count == cache[0] - tokens["0"], layer
    assert len(generated["outputs"]) == 1
    assert generated["prompt"].endswith("?") and isinstance(generated["outputs"][0], str)
    assert "top-k recall" in _ok(["inspect", str(selector)])


@pytest.mark.slow
def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not an artifact")
    for args in (["inspect", str(bad)], ["export", str(bad), "--keep-ratio", "0.2"],
                 ["calibrate", "--model", str(tmp_path), "--data", str(bad)]):
        process = subprocess.run([sys.executable, "-m", "alvts_cli.app", *args], capture_output=True, text=True)
        assert process.returncode == 1, process.stderr
        assert process.stderr.startswith("error: ") and "Traceback" not in process.stderr, process.stderr
        assert len(process.stderr.strip().splitlines()) == 1, process.stderr
    debug = subprocess.run([sys.executable, "-m", "alvts_cli.app", "--debug", "inspect", str(bad)],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_nonsense_keep_ratio_is_rejected(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    _ok(["calibrate", "--out", str(calibration), "--num-samples", "1", "--refine-steps", "0", "--json"])
    for args, message in ((["--keep-ratio", "1.5"], "keep ratio must be in (0, 1]"),
                          ([], "give exactly one of --keep-ratio"),
                          (["--keep-ratio", "0.2", "--compression", "0.8"], "give exactly one of --keep-ratio"),
                          (["--compression", "1.5"], "compression must be in [0, 1)")):
        process = subprocess.run([sys.executable, "-m", "alvts_cli.app", "export", str(calibration), *args],
                                 capture_output=True, text=True)
        assert process.returncode == 1 and message in process.stderr, process.stderr


@pytest.mark.slow
def test_export_at_a_compression_counts_tokens_as_eval_does(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    _ok(["calibrate", "--out", str(calibration), "--num-samples", "1", "--refine-steps", "0", "--json"])
    exported = json.loads(_ok(["export", str(calibration), "--compression", "0.89", "--out",
                               str(tmp_path / "s.safetensors"), "--json"]))
    assert exported["calibration"]["visual_tokens"] == 64
    assert exported["keep_ratio"] == 7 / 64  # alvts eval's 89%: 7 whole tokens per layer, not ceil(0.11 x 64) = 8


@pytest.mark.slow
def test_calibrate_rejects_nonsense_refinement_before_loading_anything(tmp_path):
    for value, message in (("abc", "--refine-compressions takes"), ("1.2", "compression must be in [0, 1)")):
        process = subprocess.run(
            [sys.executable, "-m", "alvts_cli.app", "calibrate", "--out", str(tmp_path / "c.safetensors"),
             "--refine-compressions", value], capture_output=True, text=True,
        )
        assert process.returncode == 1 and message in process.stderr, process.stderr
        assert len(process.stderr.strip().splitlines()) == 1, process.stderr


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("calibrate", "export", "inspect", "generate", "eval", "demo-data", "doctor"):
        assert command in result.output


@pytest.mark.slow
def test_real_checkpoint_directory_with_jsonl_data(tmp_path):
    from PIL import Image

    from alvts_calib.testing.random_model import demo_model
    from alvts_calib.testing.tiny_processor import tiny_llava_processor

    checkpoint = tmp_path / "tiny-llava"
    demo_model("eager").save_pretrained(checkpoint)
    tiny_llava_processor().save_pretrained(checkpoint)
    rows = []
    for i, color in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (28, 28), color).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"what color is image {i}?"})
    rows.append({"image": "missing.png", "prompt": "where is it?"})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    calibration, selector = tmp_path / "c.safetensors", tmp_path / "s.safetensors"
    summary = json.loads(_ok(["calibrate", "--model", str(checkpoint), "--data", str(data), "--rank", "16",
                              "--refine-steps", "5", "--json", "--out", str(calibration)]))
    assert summary["summary"]["samples"] == 4
    _ok(["export", str(calibration), "--keep-ratio", "0.5", "--out", str(selector)])
    generated = json.loads(_ok(["generate", "--model", str(checkpoint), "--selector", str(selector), "--image",
                                str(tmp_path / "0.png"), "--prompt", "what color?", "--max-new-tokens", "3", "--json"]))
    cache = generated["kv_cache_tokens_per_layer"]
    assert len(generated["outputs"]) == 1 and min(cache[1:]) < cache[0]


@pytest.mark.slow
def test_eval_on_the_demo_reports_every_method_at_matched_budgets(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    _ok(["calibrate", "--out", str(calibration), "--num-samples", "4", "--refine-steps", "5", "--json"])
    out, markdown = tmp_path / "eval.json", tmp_path / "eval.md"
    report = json.loads(_ok([
        "eval", str(calibration), "--num-samples", "24", "--compression", "0.67,0.89", "--batch-size", "12",
        "--methods", "alvts-uniform,alvts,oracle,fastv,pyramiddrop,dart,random", "--out", str(out), "--json",
        "--markdown", str(markdown),
    ]))
    assert json.loads(out.read_text())["rows"] == report["rows"]
    for result in report["results"]:  # every demo row has a kind (its question form): the per-kind counts add up
        assert sum(result["correct_by_kind"].values()) == result["correct"]
        assert sum(result["total_by_kind"].values()) == result["total"] == 24
        assert set(result["total_by_kind"]) <= {"color", "shape", "count", "row", "column", "left of", "above"}
    tables = markdown.read_text().split("\n\n")
    assert len(tables) == 2 and tables[1].startswith("| method | target | ")
    rows = report["rows"]
    assert rows[0]["method"] == "full" and rows[0]["retention"] == 1.0 and rows[0]["compression"] == 0.0
    assert len(rows) == 1 + 7 * 2 and not report["infeasible"]
    for row in rows[1:]:
        assert row["compression"] >= row["target_compression"] - 1e-9, row  # never more than the budget
        assert row["compression"] < row["target_compression"] + 0.03, row  # and close to it
        if row["method"] in ("fastv", "pyramiddrop", "dart", "random"):
            assert row["flops_ratio"] < 1.0 - row["target_compression"] / 2, row
    assert all(row["mean_recall"] is not None for row in rows if row["method"].startswith("alvts"))


def test_demo_data_writes_the_toolkit_format(tmp_path):
    _ok(["demo-data", str(tmp_path / "demo"), "--count", "3"])
    lines = (tmp_path / "demo" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"file_name", "prompt", "answer", "kind"} <= set(json.loads(lines[0]))


@pytest.mark.slow
def test_eval_rejects_nonsense_options_in_one_line(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    _ok(["calibrate", "--out", str(calibration), "--num-samples", "1", "--refine-steps", "0", "--json"])
    for option, value, message in (("--compression", "abc", "--compression takes"),
                                   ("--compression", "1.2", "compression must be in [0, 1)"),
                                   ("--methods", "alvts,magic", "unknown method(s) magic")):
        process = subprocess.run([sys.executable, "-m", "alvts_cli.app", "eval", str(calibration), option, value,
                                  "--num-samples", "2"], capture_output=True, text=True)
        assert process.returncode == 1 and message in process.stderr, process.stderr
        assert len(process.stderr.strip().splitlines()) == 1, process.stderr


def _checkpoint_without_chat_template(folder):
    """The tiny LLaVA saved as a checkpoint whose processor has no chat template."""
    from alvts_calib.testing.random_model import demo_model
    from alvts_calib.testing.tiny_processor import tiny_llava_processor

    processor = tiny_llava_processor()
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    demo_model("eager").save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_calibrate_on_a_parquet_dataset_with_splits_columns_and_a_chat_template(tmp_path):
    """--data takes a folder of parquet splits (as datasets.load_dataset reads a Hub name), with --split and the
    column options; a processor without a chat template gets one from --chat-template."""
    import datasets
    from PIL import Image

    from alvts_calib.testing.tiny_processor import CHAT_TEMPLATE

    checkpoint = _checkpoint_without_chat_template(tmp_path / "tiny-llava")
    data = tmp_path / "data"
    data.mkdir()
    for split, colors in (("train", ["red", "green", "blue"]), ("test", ["white"])):
        images = [Image.new("RGB", (28, 28), color) for color in colors]
        table = datasets.Dataset.from_dict({"picture": images, "question": [f"which {c}?" for c in colors]},
                                           features=datasets.Features(picture=datasets.Image(),
                                                                      question=datasets.Value("string")))
        table.to_parquet(data / f"{split}.parquet")
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    base = ["calibrate", "--model", str(checkpoint), "--data", str(data), "--rank", "16", "--refine-steps", "0",
            "--sensitivity-samples", "0", "--out", str(tmp_path / "c.safetensors"), "--json"]
    columns = ["--image-column", "picture", "--prompt-column", "question"]
    for args, message in (([], "has splits train, test: choose one with --split"),
                          (["--split", "validation"], "has no split 'validation'; it has train, test"),
                          (["--split", "train"], "lacks column(s) image, prompt"),
                          (["--split", "train", *columns], "3 prompt without image token"),
                          (["--split", "train", *columns, "--chat-template", str(tmp_path / "none.jinja")],
                           "no such file")):
        result = runner.invoke(app, [*base, *args])
        assert isinstance(result.exception, AlvtsError) and message in str(result.exception), result.output
    process = subprocess.run([sys.executable, "-m", "alvts_cli.app", *base], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert process.returncode == 1 and process.stderr.startswith("error: "), process.stderr
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr  # before the model is loaded
    summary = json.loads(_ok([*base, "--split", "train", *columns, "--chat-template", str(template)]))
    assert summary["summary"]["samples"] == 3


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A one-sample demo calibration and a uniform selector exported from it."""
    folder = tmp_path_factory.mktemp("small")
    calibration, selector = folder / "calib.safetensors", folder / "selector.safetensors"
    summary = json.loads(_ok(["calibrate", "--out", str(calibration), "--num-samples", "1", "--refine-steps", "0",
                              "--sensitivity-samples", "0", "--json"]))
    assert summary["seconds"] > 0 and "seconds" not in json.dumps(read_metadata(calibration, CALIBRATION_FORMAT))
    _ok(["export", str(calibration), "--keep-ratio", "0.25", "--budget", "uniform", "--out", str(selector)])
    return calibration, selector


def _error(args: list[str]) -> str:
    """The one-line error a command stops with (what `alvts` prints after `error: `)."""
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 1 and isinstance(result.exception, AlvtsError), (result.output, result.exception)
    assert "\n" not in str(result.exception)
    return str(result.exception)


def _images_and_data(folder: Path) -> Path:
    """red.png, an odd-sized blue.png and data.jsonl naming them (and a missing image)."""
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(folder / "red.png")
    Image.new("RGB", (100, 80), "blue").save(folder / "blue.png")
    rows = [{"image": "red.png", "prompt": "what color is the shape?"}, {"image": "gone.png", "prompt": "what?"},
            {"image": "blue.png", "prompt": "what color is the shape?"}]
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    return data


def test_outputs_never_clobber_inputs_links_or_special_files(small, tmp_path):
    calibration, selector = small
    before = {path: path.read_bytes() for path in small}
    data = _images_and_data(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    export = ["export", calibration, "--keep-ratio", "0.1", "--budget", "uniform", "--out"]
    for args, message in (
        ([*export, fifo], "pipe is a special file"),
        ([*export, calibration], "is the input"),
        ([*export, tmp_path], "is a directory"),
        (["eval", selector, "--num-samples", "2", "--out", selector], "is the input"),
        (["eval", selector, "--num-samples", "2", "--out", tmp_path / "r", "--markdown", tmp_path / "r"], "same file"),
        (["calibrate", "--data", data, "--out", data], "is the input"),
        (["calibrate", "--data", data, "--out", tmp_path / "red.png"], "is the input"),  # an image the data names
    ):
        assert message in _error(args), args
    assert {path: path.read_bytes() for path in small} == before and stat.S_ISFIFO(fifo.stat().st_mode)
    target, link = tmp_path / "target.safetensors", tmp_path / "link.safetensors"
    target.write_text("old")
    link.symlink_to(target.name)
    _ok([*map(str, export), str(link)])
    assert link.is_symlink() and read_metadata(target, SELECTOR_FORMAT)["keep_ratio"] == 0.1


def test_a_second_writer_gets_a_one_line_error(small, tmp_path):
    out = tmp_path / "selector.safetensors"
    with output_lock(out, "alvts export (the first run)"):
        message = _error(["export", small[0], "--keep-ratio", "0.1", "--out", out])
    assert re.search(r"being written by another alvts run \(pid \d+: alvts export \(the first run\)\)", message)
    assert not out.exists()


def test_options_data_and_images_are_checked_before_the_model_loads(small, tmp_path, monkeypatch):
    def no_loading(*args):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli_app, "_load", no_loading)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": 5, "prompt": "what?"}\n')
    (tmp_path / "junk.png").write_text("not an image")
    calibrate = ["calibrate", "--out", tmp_path / "c.safetensors", "--num-samples", "1"]
    cases = [
        ([*calibrate, "--device", "bogus"], "device must be cpu, cuda, cuda:N, mps or auto, got 'bogus'"),
        ([*calibrate, "--device", "meta"], "got 'meta'"),
        ([*calibrate, "--refine-steps", "-1"], "refine steps must be 0 (no refinement) or more, got -1"),
        ([*calibrate, "--data", bad], "bad.jsonl line 1: image must be a file path (a string), got int 5"),
        (["eval", small[1], "--budget", "bogus"], "budget must be one of uniform"),
        (["eval", small[1], "--batch-size", "0"], "--batch-size must be at least 1"),
        (["generate", "--selector", small[1], "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["generate", "--selector", small[1], "--model", BUILTIN_MODEL_DIR, "--image", tmp_path / "junk.png"],
         "junk.png: unreadable image"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*calibrate, "--device", "cuda"], "no cuda device is available here"))
    if importlib.util.find_spec("flash_attn") is None:
        cases.append(([*calibrate, "--attn-implementation", "flash_attention_2"],
                      "flash_attention_2 cannot run here: the flash_attn package is not installed; use sdpa"))
    for args, message in cases:
        assert message in _error(args), args


def test_a_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(BUILTIN_MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    message = _error(["calibrate", "--model", folder, "--data", _images_and_data(tmp_path), "--out",
                      tmp_path / "c.safetensors"])
    assert "no safetensors weights (it holds pytorch_model.bin); alvts loads safetensors only, never pickle" in message


@pytest.mark.slow
def test_odd_sized_images_run_on_the_demo_and_a_failing_row_is_named(tmp_path, monkeypatch):
    data = _images_and_data(tmp_path)
    summary = json.loads(_ok(["calibrate", "--data", str(data), "--out", str(tmp_path / "c.safetensors"),
                              "--refine-steps", "0", "--sensitivity-samples", "0", "--json"]))
    assert summary["summary"]["samples"] == 2  # red.png and the 100 x 80 blue.png

    def model_fails_on_the_second_sample(*args, **kwargs):
        raise SampleError(1, "the model failed")

    monkeypatch.setattr(cli_app, "calibrate", model_fails_on_the_second_sample)
    message = _error(["calibrate", "--data", data, "--out", tmp_path / "d.safetensors"])
    assert message == f"{data} row 3: the model failed; fix or remove that row"  # row 2 (gone.png) was skipped


@pytest.mark.slow
def test_ctrl_c_says_what_was_saved_inspect_says_what_is_there_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    import alvts_calib.calibration.pipeline as pipeline

    out = tmp_path / "calib.safetensors"
    checkpoint = tmp_path / "calib.safetensors.partial.safetensors"
    solve = pipeline._solve_layer

    def interrupted_at_layer_2(layer, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return solve(layer, index, *args)

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's Ctrl-C handler stays out of pytest
    monkeypatch.setattr(pipeline, "_solve_layer", interrupted_at_layer_2)
    command = ["alvts", "calibrate", "--out", str(out), "--num-samples", "1", "--refine-steps", "0",
               "--sensitivity-samples", "0"]
    monkeypatch.setattr(sys, "argv", command)
    with pytest.raises(SystemExit) as exited:
        cli_app.main()
    assert exited.value.code == 130 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: interrupted; what was finished is saved in {checkpoint}: rerun the same command to resume")
    inspected = _ok(["inspect", str(checkpoint)])
    assert "unfinished calibration checkpoint (2 of 24 layers calibrated): rerun the alvts calibrate" in inspected
    assert "rank: 64" in inspected and "{'" not in inspected  # options as key: value lines, not a Python dict
    monkeypatch.setattr(pipeline, "_solve_layer", solve)
    with pytest.raises(SystemExit) as exited:
        cli_app.main()
    assert exited.value.code == 0 and f"resuming from {checkpoint}: 2 layer(s)" in capsys.readouterr().err
    assert "calibration: export a selector from it" in _ok(["inspect", str(out)]) and not checkpoint.exists()


def test_inspect_says_a_selector_is_one(small):
    assert json.loads(_ok(["inspect", str(small[1]), "--json"]))["kind"].startswith("selector artifact: attach it")
