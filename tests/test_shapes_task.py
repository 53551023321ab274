"""The demo task's generator: deterministic splits, answers that follow from the scene, the toolkit's data format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alvts_calib.data import build_labelled_items, load_records
from alvts_calib.demo.shapes_model import NUM_VISUAL_TOKENS, shapes_processor
from alvts_calib.demo.shapes_task import (
    CELL,
    COLORS,
    COLUMN_NAMES,
    QUESTION_KINDS,
    SHAPE_MASKS,
    Example,
    Shape,
    example,
    follow_up_questions,
    question_form,
    render,
    split_records,
    split_seeds,
    write_split,
)


def test_splits_are_deterministic_and_disjoint():
    assert example(7) == example(7)
    assert set(split_seeds("calibration", 500)).isdisjoint(split_seeds("test", 500))
    assert set(split_seeds("train", 10_000)).isdisjoint(split_seeds("test", 500))
    with pytest.raises(ValueError, match="unknown split"):
        split_seeds("validation", 3)


def test_every_kind_is_asked_and_answers_follow_from_the_scene():
    examples = [example(seed) for seed in range(400)]
    assert {item.kind for item in examples} == set(QUESTION_KINDS)
    for item in examples:
        words = item.question.split()
        if item.kind == "count":
            assert item.answer == str(sum(shape.color == words[2] for shape in item.scene))
        elif item.kind == "color":
            (match,) = [shape for shape in item.scene if shape.shape == words[4]]
            assert item.answer == match.color
        elif item.kind == "shape":
            (match,) = [shape for shape in item.scene if shape.color == words[4]]
            assert item.answer == match.shape
        elif item.kind == "position":
            (match,) = _referred(item.scene, words[3:-2])
            assert item.answer == (str(match.row + 1) if words[1] == "row" else COLUMN_NAMES[match.column])
        else:
            split = words.index("left" if "left" in words else "above")
            after = split + (2 if words[split] == "left" else 1)  # "left of the ..." / "above the ..."
            (first,), (second,) = _referred(item.scene, words[1:split]), _referred(item.scene, words[after:-1])
            if words[split] == "left":
                assert item.answer == ("yes" if first.column < second.column else "no")
            else:
                assert item.answer == ("yes" if first.row < second.row else "no")


def _referred(scene, phrase: list[str]) -> list:
    """The objects "the circle" or "the red object" names (exactly one, if the question is sound)."""
    if phrase[-1] == "object":
        return [shape for shape in scene if shape.color == phrase[1]]
    return [shape for shape in scene if shape.shape == phrase[1]]


def test_follow_up_questions_are_seeded_and_can_favour_hard_kinds():
    item = example(3)
    assert follow_up_questions(item, 5) == follow_up_questions(item, 5)
    kinds = {pair[0].split()[0] + " " + pair[0].split()[1] for pair in follow_up_questions(item, 400)}
    assert len(kinds) >= 4
    weights = {"color": 0.0, "shape": 0.0, "count": 0.05, "position": 0.0, "relation": 1.0}
    questions = [question for seed in range(20) for question, _ in follow_up_questions(example(seed), 3, weights)]
    assert sum(question.startswith("is ") for question in questions) > 0.7 * len(questions)
    impossible = {"color": 0.0, "shape": 0.0, "count": 0.0, "position": 0.0, "relation": 1.0}
    single = Example((Shape("red", "circle", 0, 0),), "count", "q", "1", 0)
    with pytest.raises(ValueError, match="could not ask"):
        follow_up_questions(single, 2, impossible)


def test_rendered_pixels_show_each_object_in_its_cell():
    item = example(3)
    pixels = np.asarray(render(list(item.scene)))
    for shape in item.scene:
        cell = pixels[shape.row * CELL : (shape.row + 1) * CELL, shape.column * CELL : (shape.column + 1) * CELL]
        assert (cell[SHAPE_MASKS[shape.shape]] == COLORS[shape.color]).all()


def test_a_written_split_loads_through_the_data_path(tmp_path):
    metadata = write_split(tmp_path, "test", 5)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert [row["answer"] for row in rows] == [example(seed).answer for seed in split_seeds("test", 5)]
    processor = shapes_processor()
    items, report = build_labelled_items(load_records(tmp_path), processor)
    in_memory, _ = build_labelled_items(split_records("test", 5), processor)
    assert report.used == 5 and [item.text for item in items] == [item.text for item in in_memory]
    forms = [question_form(example(seed).question) for seed in split_seeds("test", 5)]
    assert [item.kind for item in items] == [item.kind for item in in_memory] == forms
    without_kind = load_records(tmp_path).remove_columns("kind")
    assert {item.kind for item in build_labelled_items(without_kind, processor)[0]} == {None}
    inputs = processor(images=[items[0].image], text=[items[0].text], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == NUM_VISUAL_TOKENS


def test_bad_rows_are_counted_and_skipped(tmp_path):
    write_split(tmp_path, "test", 5)
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    rows[0]["file_name"] = "images/missing.png"
    rows[1]["prompt"] = ""
    rows[2]["answer"] = ""
    rows[3]["answer"] = " ?! "  # no words: no prediction could ever match it
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    items, report = build_labelled_items(load_records(tmp_path), shapes_processor())
    assert len(items) == 1
    assert report.skipped == {"missing image": 1, "empty prompt": 1, "missing answer": 2}
