"""Loading image/prompt records from local files and turning them into inputs for the tiny LLaVA model."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

from alvts_calib.data import (
    EMPTY_PROMPT,
    MISSING_IMAGE,
    NO_IMAGE_TOKEN,
    REJECTED,
    TOO_LARGE,
    TOO_LONG,
    UNREADABLE_IMAGE,
    DataReport,
    build_samples,
    load_records,
    single_sample,
)
from alvts_calib.errors import AlvtsError
from alvts_calib.testing.tiny_models import IMAGE_TOKEN, VOCAB, tiny_llava
from alvts_calib.testing.tiny_processor import tiny_llava_processor

RAW_PROMPT = "USER: <image>\nwhat color? ASSISTANT:"
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    return tiny_llava_processor()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llava()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with three PNGs of different sizes and a `.png` that is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (name, color) in enumerate(COLORS.items()):
        Image.new("RGB", (30 + 10 * i, 28 + 5 * i), color).save(folder / f"{name}.png")
    (folder / "corrupt.png").write_bytes(b"this is not a png")
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _mixed_rows(images: Path) -> list[dict]:
    """Three good rows (relative, absolute, and a prompt carrying its own <image>) and four bad ones."""
    return [
        {"image": "images/red.png", "prompt": "what color?", "answer": "red"},
        {"image": str(images / "green.png"), "prompt": "what color is this?"},
        {"image": "images/blue.png", "prompt": "<image>\nwhich color?"},
        {"image": "images/missing.png", "prompt": "what color?"},
        {"image": "images/corrupt.png", "prompt": "what color?"},
        {"image": "images/red.png", "prompt": ""},
        {"image": "images/blue.png", "prompt": "   "},
    ]


def _check_sample(sample: dict[str, torch.Tensor]) -> None:
    assert set(sample) == {"input_ids", "attention_mask", "pixel_values"}
    assert sample["input_ids"].shape[0] == 1
    assert (sample["input_ids"] == IMAGE_TOKEN).sum() == 16
    assert sample["pixel_values"].shape == (1, 3, 28, 28)


def test_processor_expands_image_token_and_round_trips(processor, model, tmp_path):
    image = Image.new("RGB", (40, 30), COLORS["red"])
    inputs = processor(images=image, text=RAW_PROMPT, return_tensors="pt")
    _check_sample(inputs)
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert processor.decode(inputs["input_ids"][0], skip_special_tokens=True) == "USER: \nwhat color? ASSISTANT:"
    logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB)

    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == RAW_PROMPT

    processor.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, LlavaProcessor)
    again = reloaded(images=image, text=RAW_PROMPT, return_tensors="pt")
    assert all(torch.equal(inputs[key], again[key]) for key in inputs)
    assert reloaded.chat_template == processor.chat_template
    model_again = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(model_again(**again).logits, logits)


def test_jsonl_skips_bad_rows_and_counts_them(processor, model, images):
    records = load_records(_write_jsonl(images.parent / "data.jsonl", _mixed_rows(images)))
    assert len(records) == 7
    assert Path(records[0]["image"]) == images / "red.png"

    samples, report = build_samples(records, processor)

    assert report == DataReport(used=3, skipped={MISSING_IMAGE: 1, UNREADABLE_IMAGE: 1, EMPTY_PROMPT: 2})
    assert report.summary() == "3 samples used, 4 rows skipped (2 empty prompt, 1 missing image, 1 unreadable image)"
    for sample in samples:
        _check_sample(sample)
        logits = model(**sample).logits
        assert logits.shape == (*sample["input_ids"].shape, VOCAB)
        assert torch.isfinite(logits).all()
    # different colors give different pixels, so the rows were not mixed up
    assert not torch.equal(samples[0]["pixel_values"], samples[1]["pixel_values"])


def test_num_samples_stops_after_enough_usable_rows(processor, images):
    records = load_records(_write_jsonl(images.parent / "data.jsonl", _mixed_rows(images)[::-1]))
    samples, report = build_samples(records, processor, num_samples=2)
    assert len(samples) == 2
    assert report.used == 2
    assert report.skipped == {MISSING_IMAGE: 1, UNREADABLE_IMAGE: 1, EMPTY_PROMPT: 2}


def test_without_chat_template_the_prompt_needs_the_image_token(images):
    processor = tiny_llava_processor()
    processor.chat_template = None
    records = datasets.Dataset.from_list([
        {"image": str(images / "red.png"), "prompt": RAW_PROMPT},
        {"image": str(images / "blue.png"), "prompt": "what color?"},
        {"image": str(images / "green.png"), "prompt": "Q: [img] what color?"},
        {"image": str(images / "green.png"), "prompt": "<image> and <image>: two tokens, one image"},
    ])
    samples, report = build_samples(records, processor)
    assert report == DataReport(used=1, skipped={NO_IMAGE_TOKEN: 2, REJECTED: 1})
    assert samples[0]["input_ids"].shape[1] == len(RAW_PROMPT) - len("<image>") + 16 + 1  # characters, 16, <s>

    with pytest.raises(AlvtsError, match="no usable rows.*1 prompt without image token"):
        build_samples(records.select([1]), processor)


def test_metadata_folder(processor, images):
    _write_jsonl(images / "metadata.jsonl", [
        {"file_name": "red.png", "prompt": "what color?"},
        {"file_name": "corrupt.png", "prompt": "what color?"},
        {"file_name": "blue.png", "prompt": "what color?"},
    ])
    records = load_records(images)
    assert Path(records[0]["image"]) == images / "red.png"
    samples, report = build_samples(records, processor)
    assert report == DataReport(used=2, skipped={UNREADABLE_IMAGE: 1})
    for sample in samples:
        _check_sample(sample)


def test_save_to_disk_with_paths(processor, images, tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([
        {"image": "../images/red.png", "prompt": "what color?"},
        {"image": "../images/missing.png", "prompt": "what color?"},
    ]).save_to_disk(saved)
    samples, report = build_samples(load_records(saved), processor)
    assert report == DataReport(used=1, skipped={MISSING_IMAGE: 1})
    _check_sample(samples[0])


def test_save_to_disk_with_embedded_images(processor, model, images, tmp_path):
    saved = tmp_path / "saved"
    rows = {"image": [str(images / name) for name in ("red.png", "corrupt.png", "blue.png")], "prompt": ["what?"] * 3}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(saved)
    for path in images.iterdir():  # the saved dataset must not depend on the original files
        path.unlink()

    records = load_records(saved)
    assert isinstance(records.features["image"], datasets.Image)
    samples, report = build_samples(records, processor)
    assert report == DataReport(used=2, skipped={UNREADABLE_IMAGE: 1})
    for sample in samples:
        _check_sample(sample)
        assert torch.isfinite(model(**sample).logits).all()


def test_empty_data_is_an_error(processor, tmp_path):
    with pytest.raises(AlvtsError, match="is empty"):
        load_records(_write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(AlvtsError, match="is empty"):
        build_samples(datasets.Dataset.from_dict({"image": [], "prompt": []}), processor)


def test_too_many_samples_is_an_error(processor, images):
    records = load_records(_write_jsonl(images.parent / "data.jsonl", _mixed_rows(images)))
    with pytest.raises(AlvtsError, match=r"num_samples=8\b.*\b7 rows"):
        build_samples(records, processor, num_samples=8)
    with pytest.raises(AlvtsError, match=r"num_samples=0\b.*\b7 rows"):
        build_samples(records, processor, num_samples=0)


def test_only_bad_rows_is_an_error_listing_the_reasons(processor, images):
    records = load_records(_write_jsonl(images.parent / "data.jsonl", _mixed_rows(images)[3:]))
    with pytest.raises(AlvtsError, match="no usable rows.*2 empty prompt, 1 missing image, 1 unreadable image"):
        build_samples(records, processor)


@pytest.mark.parametrize("kind", ["text file", "plain folder", "nothing"])
def test_unknown_path_kind_is_an_error(kind, tmp_path):
    path = {"text file": tmp_path / "data.txt", "plain folder": tmp_path, "nothing": tmp_path / "absent"}[kind]
    if kind == "text file":
        path.write_text("{}\n")
    with pytest.raises(AlvtsError, match="metadata.jsonl.*save_to_disk") as raised:
        load_records(path)
    assert "\n" not in str(raised.value)


def test_missing_columns_is_an_error(tmp_path):
    with pytest.raises(AlvtsError, match="lacks column.*prompt"):
        load_records(_write_jsonl(tmp_path / "data.jsonl", [{"image": "a.png", "question": "what?"}]))


def _table(images: Path, count: int = 3) -> datasets.Dataset:
    """Rows with embedded images (PIL images without a file name are stored as bytes) under columns named as on the
    Hub (`img`, `question`, `label`), plus an `image` caption that is not the image."""
    colors = list(COLORS)[:count]
    pictures = [Image.open(images / f"{color}.png").convert("RGB") for color in colors]
    rows = {"img": pictures, "question": ["what color?"] * count, "image": ["a caption, not an image"] * count,
            "label": colors}
    return datasets.Dataset.from_dict(rows, features=datasets.Features(
        img=datasets.Image(), question=datasets.Value("string"), image=datasets.Value("string"),
        label=datasets.Value("string"),
    ))


def test_parquet_file_with_named_columns(processor, images, tmp_path):
    path = tmp_path / "calib.parquet"
    _table(images).to_parquet(path)
    for image in images.iterdir():  # the images are embedded in the parquet file
        image.unlink()
    records = load_records(path, image_column="img", prompt_column="question", answer_column="label")
    assert set(records.column_names) == {"image", "prompt", "answer"} and records["answer"] == ["red", "green", "blue"]
    samples, report = build_samples(records, processor)
    assert report == DataReport(used=3)
    for sample in samples:
        _check_sample(sample)


def test_dataset_folders_with_splits_go_through_load_dataset(processor, images, tmp_path):
    """A folder of parquet splits (what a Hub name gives) and a saved DatasetDict: one split by name, with errors
    naming the splits there are."""
    parquet, saved = tmp_path / "parquet", tmp_path / "saved"
    parquet.mkdir()
    splits = {"train": _table(images, 3), "test": _table(images, 2)}
    for name, table in splits.items():
        table.to_parquet(parquet / f"{name}.parquet")
    datasets.DatasetDict(splits).save_to_disk(saved)
    for source in (parquet, saved):
        records = load_records(source, split="test", image_column="img", prompt_column="question")
        assert len(records) == 2 and build_samples(records, processor)[1].used == 2
        for split, message in ((None, r"has splits train, test: choose one with --split"),
                               ("validation", r"has no split 'validation'; it has train, test")):
            with pytest.raises(AlvtsError, match=message):
                load_records(source, split=split, image_column="img", prompt_column="question")


def test_missing_columns_and_splits_name_what_there_is(images, tmp_path):
    path = tmp_path / "calib.parquet"
    _table(images).to_parquet(path)
    with pytest.raises(AlvtsError, match=r"no column 'picture' for the image; it has img, question, image, label"):
        load_records(path, image_column="picture")
    with pytest.raises(AlvtsError, match=r"lacks column\(s\) prompt; .*--prompt-column"):
        load_records(path, image_column="img")
    with pytest.raises(AlvtsError, match=r"single table without named splits; drop --split train"):
        load_records(_write_jsonl(tmp_path / "data.jsonl", [{"image": "a.png", "prompt": "what?"}]), split="train")


def test_unreachable_dataset_name_is_a_one_line_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AlvtsError, match=r"cannot load data from someone/no-such-dataset \(.*\); expected") as raised:
        load_records("someone/no-such-dataset", split="train")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("line", "message"), [
    ('{"image": 5, "prompt": "what?"}', r"line 2: image must be a file path \(a string\), got int 5; fix that line"),
    ('{"image": "a.png", "prompt": ["what?"]}', r"line 2: prompt must be text \(a string\), got list"),
    ('{"image": "a.png", "prompt": "what?", "answer": {"x": 1}}', r"line 2: answer must be text"),
    ('{"image": "a.png", "prompt": "what?"', r"line 2: not valid JSON \(Expecting"),
    ('["a.png", "what?"]', r"line 2: expected a JSON object with an image and a prompt, got list"),
])
def test_jsonl_values_of_the_wrong_type_name_the_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.png", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(AlvtsError, match=message) as raised:
        load_records(path)
    assert "\n" not in str(raised.value)


def test_numeric_answers_and_kinds_are_read_as_text(tmp_path):
    records = load_records(_write_jsonl(tmp_path / "data.jsonl", [
        {"image": "a.png", "prompt": "how many?", "answer": 3, "kind": 1, "extra": [1, 2]},
        {"file_name": "b.png", "prompt": "how many?", "answer": "0"},
    ]))
    assert records["answer"] == ["3", "0"] and records["kind"] == ["1", None] and "extra" not in records.column_names


def test_saved_datasets_with_wrong_column_types_are_an_error(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": ["a.png"], "prompt": [7]}).save_to_disk(saved)
    with pytest.raises(AlvtsError, match="column prompt must hold text, but it holds"):
        load_records(saved)


def _bomb(path: Path) -> Path:
    """A PNG header claiming 30000 x 30000 pixels: PIL refuses to open it (decompression bomb guard)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))
    return path


def test_bombs_and_prompts_too_long_for_the_model_are_skipped_and_counted(processor, images):
    _bomb(images / "bomb.png")
    records = load_records(_write_jsonl(images.parent / "data.jsonl", [
        {"image": "images/bomb.png", "prompt": "what color?"},
        {"image": "images/red.png", "prompt": "what color?"},
        {"image": "images/red.png", "prompt": "what color? " * 30},
        {"image": "images/blue.png", "prompt": "which?"},
    ]))
    samples, report = build_samples(records, processor, max_tokens=64)
    assert report == DataReport(used=2, skipped={TOO_LARGE: 1, TOO_LONG: 1})
    assert report.rows == [1, 3] and all(sample["input_ids"].shape[1] <= 64 for sample in samples)


def test_a_single_unusable_image_says_why(processor, images):
    for image, reason in ((_bomb(images / "bomb.png"), TOO_LARGE), (images / "corrupt.png", UNREADABLE_IMAGE)):
        with pytest.raises(AlvtsError, match=f"--image x: {reason}; give a readable image"):
            single_sample(image, "what color?", processor, source="--image x")
    assert single_sample(images / "red.png", "what color?", processor)["input_ids"].shape[0] == 1
