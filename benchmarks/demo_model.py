"""What the demo model learned: held-out accuracy per question form, and where its visual tokens know their cell.

- Accuracy: greedy first answer word on `--rows` held-out rows (every demo answer is one word), overall and per
  question form (color, shape, count, row, column, left of, above).
- Position probes: for the object cells of `--probe-images` held-out images, how well a linear probe (fitted on
  70% of the cells, scored on the rest) reads the cell's row and column from the vision tower's input embeddings,
  its output, the projector's output (what the decoder gets) and the decoder's last hidden state. Chance is 1/8.

    python benchmarks/demo_model.py --out docs/results/demo-model.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlavaForConditionalGeneration

from alvts_calib.demo import (
    BUILTIN_MODEL_DIR,
    GRID,
    accuracy,
    example,
    question_form,
    question_inputs,
    shapes_processor,
    split_seeds,
)


@torch.no_grad()
def cell_features(model, processor, images: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Features of every object cell at four depths, with the cells' rows and columns."""
    examples = [example(seed) for seed in split_seeds("test", images)]
    inputs = question_inputs(processor, examples)
    tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    output = model(**inputs, output_hidden_states=True)
    visual = inputs["input_ids"] == model.config.image_token_index
    decoder = [output.hidden_states[depth][visual].reshape(len(examples), GRID * GRID, -1) for depth in (0, -1)]
    depths = {
        "vision input": tower.hidden_states[0][:, 1:],
        "vision output": tower.hidden_states[-1][:, 1:],
        "projector output": decoder[0],  # the decoder's input at the visual positions
        "decoder last layer": decoder[1],
    }
    image, cell, rows, columns = [], [], [], []
    for index, item in enumerate(examples):
        for shape in item.scene:
            image.append(index)
            cell.append(shape.row * GRID + shape.column)
            rows.append(shape.row)
            columns.append(shape.column)
    features = {name: values[image, cell].float() for name, values in depths.items()}
    return features, torch.tensor(rows), torch.tensor(columns)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a softmax-regression probe fitted on the first 70% of the cells."""
    torch.manual_seed(0)
    features = (features - features.mean(0)) / features.std(0).clamp_min(1e-6)
    split = int(0.7 * len(labels))
    weight = torch.zeros(features.shape[1], GRID, requires_grad=True)
    bias = torch.zeros(GRID, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = features[:split] @ weight + bias
            loss = torch.nn.functional.cross_entropy(logits, labels[:split]) + 1e-4 * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float(((features[split:] @ weight + bias).argmax(-1) == labels[split:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUILTIN_MODEL_DIR)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--probe-images", type=int, default=600)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = shapes_processor()
    overall, by_form = accuracy(model, processor, split_seeds("test", args.rows), 100,
                                lambda item: question_form(item.question))
    accuracy_table = {"all": overall, **by_form}
    features, rows, columns = cell_features(model, processor, args.probe_images)
    probes = {
        depth: {"row": probe_accuracy(values, rows), "column": probe_accuracy(values, columns)}
        for depth, values in features.items()
    }
    console = Console()
    table = Table(title=f"held-out first-word accuracy ({args.rows} rows)")
    for form in accuracy_table:
        table.add_column(form, justify="right")
    table.add_row(*(f"{value:.1%}" for value in accuracy_table.values()))
    console.print(table)
    table = Table(title=f"linear probes of object cells' positions ({len(rows)} cells; chance 12.5%)")
    for column in ("depth", "row", "column"):
        table.add_column(column, justify="right")
    for depth, scores in probes.items():
        table.add_row(depth, f"{scores['row']:.1%}", f"{scores['column']:.1%}")
    console.print(table)
    if args.out:
        results = {"model": str(args.model), "rows": args.rows, "accuracy": accuracy_table,
                   "probe_cells": len(rows), "probes": probes}
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
