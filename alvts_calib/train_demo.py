"""Train the demo LVLM from scratch on the shapes task (seeded, CPU-friendly): `python -m alvts_calib.train_demo`.

Each step draws fresh examples from the train split and fits the answer word and the end-of-turn token.
The result is saved like any checkpoint (config, safetensors weights, processor files).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch

from .shapes_model import shapes_model, shapes_processor
from .shapes_task import MAX_OBJECTS, example, split_seeds

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "shapes-llava"


def _conversation(question: str, answer: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def training_batch(processor, seeds: range, max_objects: int = MAX_OBJECTS) -> dict[str, torch.Tensor]:
    """Processor inputs for `seeds` with the answer and `</s>` appended (left padded, so they end every row)."""
    examples = [example(seed, max_objects) for seed in seeds]
    texts = [processor.apply_chat_template(_conversation(e.question, e.answer), tokenize=False) for e in examples]
    return dict(processor(images=[e.image() for e in examples], text=texts, padding=True, return_tensors="pt"))


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer word and `</s>` given everything before them."""
    logits = model(**batch, logits_to_keep=3).logits[:, :2]
    targets = batch["input_ids"][:, -2:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def accuracy(model: torch.nn.Module, processor, seeds: range, batch_size: int = 128) -> tuple[float, dict[str, float]]:
    """Greedy next-word accuracy on examples `seeds`, overall and per question kind."""
    model.eval()
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for start in range(seeds.start, seeds.stop, batch_size):
        examples = [example(seed) for seed in range(start, min(start + batch_size, seeds.stop))]
        texts = [
            processor.apply_chat_template(_conversation(e.question), add_generation_prompt=True, tokenize=False)
            for e in examples
        ]
        inputs = processor(images=[e.image() for e in examples], text=texts, padding=True, return_tensors="pt")
        predicted = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        words = processor.tokenizer.convert_ids_to_tokens(predicted.tolist())
        for item, word in zip(examples, words, strict=True):
            total[item.kind] += 1
            right[item.kind] += word == item.answer
    model.train()
    return sum(right.values()) / sum(total.values()), {kind: right[kind] / total[kind] for kind in sorted(total)}


def curriculum(step: int, steps: int) -> int:
    """Most objects per scene at `step`: two first (find the object), all distractors from 40% on."""
    progress = step / steps
    return 2 if progress < 0.1 else 4 if progress < 0.25 else 5 if progress < 0.4 else MAX_OBJECTS


@torch.enable_grad()
def train(
    out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, eval_rows: int = 256
) -> dict:
    """Train and save the demo model to `out`; returns the training log."""
    torch.manual_seed(seed)
    model = shapes_model().train()
    processor = shapes_processor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, step / steps))),
    )
    held_out = split_seeds("test", eval_rows)
    log: dict = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "evaluations": []}
    started = time.perf_counter()
    seeds = split_seeds("train", steps * batch_size)
    for step in range(steps):
        max_objects = curriculum(step, steps)
        batch = training_batch(processor, seeds[step * batch_size : (step + 1) * batch_size], max_objects)
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            overall, per_kind = accuracy(model, processor, held_out)
            elapsed = time.perf_counter() - started
            entry = {"step": step + 1, "loss": loss.item(), "accuracy": overall, "per_kind": per_kind}
            log["evaluations"].append(entry)
            print(f"step {step + 1} loss {loss.item():.3f} held-out accuracy {overall:.3f} {per_kind} {elapsed:.0f}s")
            _save(model, processor, out, log)
    log["train_seconds"] = time.perf_counter() - started
    _save(model, processor, out, log)
    return log


def _save(model: torch.nn.Module, processor, out: Path, log: dict) -> None:
    """Save the model, its processor and the training log (also at every evaluation, so progress survives)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-4)  # deep and narrow: 2e-3 stalls at 24 layers
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every)


if __name__ == "__main__":
    main()
