"""The demo task: colored shapes on a grid, with questions whose answers depend on specific image regions.

Each image is a GRID x GRID board of CELL-pixel cells (one vision patch per cell). A scene holds a few objects
(color, shape, cell); questions ask for the color, shape, count, relation or position of objects, with the
other objects as distractors. Every answer is one word. Splits are seeded, so every machine draws the same
scenes; `write_split` stores a split in the toolkit's own data format (images + metadata.jsonl).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

GRID = 8
CELL = 8
IMAGE_SIZE = GRID * CELL
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle", "cross")
NUMBERS = tuple(str(n) for n in range(GRID + 1))  # counts and rows (1 = top)
COLUMN_NAMES = tuple("abcdefgh"[:GRID])  # columns are letters, as on a chess board (a = left)
ANSWERS = (*COLORS, *SHAPES, *NUMBERS, *COLUMN_NAMES, "yes", "no")
MIN_OBJECTS, MAX_OBJECTS = 3, 7
SPLIT_SEEDS = {"train": 0, "calibration": 1, "test": 2}


@dataclass(frozen=True)
class Shape:
    """One object on the board."""

    color: str
    shape: str
    row: int
    column: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def _masks() -> dict[str, np.ndarray]:
    """CELL x CELL boolean masks of each shape, with a one-pixel margin."""
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    center = CELL / 2
    inner = (x > 1) & (x < CELL - 1) & (y > 1) & (y < CELL - 1)
    return {
        "square": inner,
        "circle": (x - center) ** 2 + (y - center) ** 2 <= (CELL / 2 - 1) ** 2,
        "triangle": inner & (np.abs(x - center) <= (y - 1) / 2),
        "cross": inner & ((np.abs(x - center) < 1.1) | (np.abs(y - center) < 1.1)),
    }


SHAPE_MASKS = _masks()


def render(scene: list[Shape], noise: np.random.Generator | None = None) -> Image.Image:
    """Draw a scene on a dark board (with slight pixel noise when `noise` is given)."""
    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 20.0)
    for item in scene:
        top, left = item.row * CELL, item.column * CELL
        patch = pixels[top : top + CELL, left : left + CELL]
        patch[SHAPE_MASKS[item.shape]] = COLORS[item.color]
    if noise is not None:
        pixels += noise.normal(0.0, 6.0, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def random_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> list[Shape]:
    """Between MIN_OBJECTS (or fewer, if max_objects is lower) and max_objects objects in distinct cells."""
    cells = rng.sample(range(GRID * GRID), rng.randint(min(MIN_OBJECTS, max_objects), max_objects))
    return [Shape(rng.choice(list(COLORS)), rng.choice(SHAPES), cell // GRID, cell % GRID) for cell in cells]


def _unique(scene: list[Shape], key: Callable[[Shape], str]) -> list[Shape]:
    """Objects whose `key` no other object in the scene shares."""
    counts: dict[str, int] = {}
    for item in scene:
        counts[key(item)] = counts.get(key(item), 0) + 1
    return [item for item in scene if counts[key(item)] == 1]


def _color_of(scene: list[Shape], rng: random.Random) -> tuple[str, str] | None:
    item = _pick_unique(scene, rng, lambda candidate: candidate.shape)
    return None if item is None else (f"what color is the {item.shape} ?", item.color)


def _shape_of(scene: list[Shape], rng: random.Random) -> tuple[str, str] | None:
    item = _pick_unique(scene, rng, lambda candidate: candidate.color)
    return None if item is None else (f"what shape is the {item.color} object ?", item.shape)


def _pick_unique(scene: list[Shape], rng: random.Random, key: Callable[[Shape], str]) -> Shape | None:
    """A random object that no other object shares `key` with, or None."""
    candidates = _unique(scene, key)
    return rng.choice(candidates) if candidates else None


def _count(scene: list[Shape], rng: random.Random) -> tuple[str, str] | None:
    color = rng.choice([item.color for item in scene] + [rng.choice(list(COLORS))])
    return f"how many {color} objects are there ?", str(sum(item.color == color for item in scene))


def _references(scene: list[Shape]) -> list[tuple[Shape, str]]:
    """Every way to name one object by a single attribute no other object shares: "the circle", "the red object"."""
    by_shape = [(item, f"the {item.shape}") for item in _unique(scene, lambda candidate: candidate.shape)]
    by_color = [(item, f"the {item.color} object") for item in _unique(scene, lambda candidate: candidate.color)]
    return by_shape + by_color


def _relation(scene: list[Shape], rng: random.Random) -> tuple[str, str] | None:
    references = _references(scene)
    if len({item for item, _ in references}) < 2:
        return None
    (first, first_name), (second, second_name) = rng.sample(references, 2)
    if first == second:
        return None
    if rng.random() < 0.5 and first.column != second.column:
        return f"is {first_name} left of {second_name} ?", "yes" if first.column < second.column else "no"
    if first.row != second.row:
        return f"is {first_name} above {second_name} ?", "yes" if first.row < second.row else "no"
    return None


def _position(scene: list[Shape], rng: random.Random) -> tuple[str, str] | None:
    references = _references(scene)
    if not references:
        return None
    item, name = rng.choice(references)
    if rng.random() < 0.5:
        return f"which row is {name} in ?", str(item.row + 1)
    return f"which column is {name} in ?", COLUMN_NAMES[item.column]


QUESTION_KINDS: dict[str, Callable[[list[Shape], random.Random], tuple[str, str] | None]] = {
    "color": _color_of,
    "shape": _shape_of,
    "count": _count,
    "relation": _relation,
    "position": _position,
}
VOCABULARY = sorted(
    {"what", "color", "is", "the", "shape", "object", "how", "many", "objects", "are", "there", "left", "of",
     "above", "which", "row", "column", "in", "?", "USER", "ASSISTANT", ":", *ANSWERS, *SHAPES}
)


QUESTION_FORMS = {"what color": "color", "what shape": "shape", "how many": "count", "which row": "row",
                  "which column": "column", " left of ": "left of", " above ": "above"}


def question_form(question: str) -> str:
    """The finer kind of a question: its kind, with position split into row/column and relation into left of/above."""
    return next((form for phrase, form in QUESTION_FORMS.items() if phrase in question.lower()), "other")


@dataclass(frozen=True)
class Example:
    """One question about one scene."""

    scene: tuple[Shape, ...]
    kind: str
    question: str
    answer: str
    seed: int

    def image(self) -> Image.Image:
        return render(list(self.scene), np.random.default_rng(self.seed))


def example(seed: int, max_objects: int = MAX_OBJECTS) -> Example:
    """The example for one seed: a scene and a question of a kind drawn uniformly (redrawn if not askable).

    `max_objects` below MAX_OBJECTS gives the easier scenes of the training curriculum.
    """
    rng = random.Random(seed)
    while True:
        scene = random_scene(rng, max_objects)
        kind = rng.choice(list(QUESTION_KINDS))
        asked = QUESTION_KINDS[kind](scene, rng)
        if asked is not None:
            return Example(tuple(scene), kind, *asked, seed)


def follow_up_questions(
    item: Example, count: int, kind_weights: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """`count` more (question, answer) pairs about `item`'s scene, seeded by the example (for training).

    Kinds are drawn uniformly, or by `kind_weights` (so training can ask the hard kinds more often).
    """
    rng = random.Random(f"follow-up {item.seed}")
    scene = list(item.scene)
    kinds = list(QUESTION_KINDS)
    asked: list[tuple[str, str]] = []
    for _ in range(100 * count):
        if len(asked) == count:
            return asked
        kind = rng.choice(kinds) if kind_weights is None else rng.choices(kinds, [kind_weights[k] for k in kinds])[0]
        pair = QUESTION_KINDS[kind](scene, rng)
        if pair is not None:
            asked.append(pair)
    if len(asked) < count:
        raise ValueError(f"could not ask {count} follow-up questions of the weighted kinds about this scene")
    return asked


def split_seeds(split: str, count: int, start: int = 0) -> range:
    """The example seeds of a split; splits never share a seed."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_SEEDS)}")
    base = SPLIT_SEEDS[split] * 10_000_000
    return range(base + start, base + start + count)


def split_records(split: str, count: int) -> datasets.Dataset:
    """`count` examples of a split as records {image (PIL), prompt, answer, kind}, ready for `data.build_samples`;
    kind is the question's form (`question_form`), so evaluations report accuracy per form."""
    examples = [example(seed) for seed in split_seeds(split, count)]
    features = datasets.Features(
        image=datasets.Image(), prompt=datasets.Value("string"), answer=datasets.Value("string"),
        kind=datasets.Value("string"),
    )
    return datasets.Dataset.from_dict(
        {
            "image": [item.image() for item in examples],
            "prompt": [item.question for item in examples],
            "answer": [item.answer for item in examples],
            "kind": [question_form(item.question) for item in examples],
        },
        features=features,
    )


def write_split(folder: str | Path, split: str, count: int) -> Path:
    """Write a split as PNG images plus metadata.jsonl ({file_name, prompt, answer, kind}); returns the JSONL path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in split_seeds(split, count):
        item = example(seed)
        name = f"images/{split}-{seed}.png"
        item.image().save(folder / name)
        lines.append(json.dumps({"file_name": name, "prompt": item.question, "answer": item.answer,
                                "kind": question_form(item.question)}))
    metadata = folder / "metadata.jsonl"
    metadata.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return metadata
