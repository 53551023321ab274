"""The `alvts` CLI on the built-in demo default, its JSON output, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from alvts_cli.app import app
from typer.testing import CliRunner

from alvts_calib.errors import AlvtsError

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_calibrate_export_inspect_generate_on_the_demo(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    selector = tmp_path / "selector.safetensors"
    summary = json.loads(_ok(["calibrate", "--out", str(calibration), "--num-samples", "3", "--refine-steps", "5",
                              "--json"]))
    assert summary["summary"]["samples"] == 3 and set(summary["fidelity"]) == {str(i) for i in range(24)}
    assert calibration.exists() and not list(tmp_path.glob("*.partial.safetensors"))
    exported = json.loads(_ok(["export", str(calibration), "--keep-ratio", "0.25", "--out", str(selector), "--json"]))
    assert exported["keep_ratio"] == 0.25 and exported["rank"] == 32
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


def test_export_at_a_compression_counts_tokens_as_eval_does(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    _ok(["calibrate", "--out", str(calibration), "--num-samples", "1", "--refine-steps", "0", "--json"])
    exported = json.loads(_ok(["export", str(calibration), "--compression", "0.89", "--out",
                               str(tmp_path / "s.safetensors"), "--json"]))
    assert exported["calibration"]["visual_tokens"] == 64
    assert exported["keep_ratio"] == 7 / 64  # alvts eval's 89%: 7 whole tokens per layer, not ceil(0.11 x 64) = 8


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


def test_real_checkpoint_directory_with_jsonl_data(tmp_path):
    from PIL import Image

    from alvts_calib.demo import demo_model
    from alvts_calib.tiny_processor import tiny_llava_processor

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


def test_eval_on_the_demo_reports_every_method_at_matched_budgets(tmp_path):
    calibration = tmp_path / "calib.safetensors"
    _ok(["calibrate", "--out", str(calibration), "--num-samples", "4", "--refine-steps", "5", "--json"])
    out, markdown = tmp_path / "eval.json", tmp_path / "eval.md"
    report = json.loads(_ok([
        "eval", str(calibration), "--num-samples", "24", "--compression", "0.67,0.89", "--batch-size", "12",
        "--methods", "alvts,alvts-adaptive,oracle,fastv,pyramiddrop,dart,random", "--out", str(out), "--json",
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
    from alvts_calib.demo import demo_model
    from alvts_calib.tiny_processor import tiny_llava_processor

    processor = tiny_llava_processor()
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    demo_model("eager").save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_calibrate_on_a_parquet_dataset_with_splits_columns_and_a_chat_template(tmp_path):
    """--data takes a folder of parquet splits (as datasets.load_dataset reads a Hub name), with --split and the
    column options; a processor without a chat template gets one from --chat-template."""
    import datasets
    from PIL import Image

    from alvts_calib.tiny_processor import CHAT_TEMPLATE

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
