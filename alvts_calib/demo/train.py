"""Train the demo LVLM from scratch on the shapes task (seeded, CPU-friendly): `python -m alvts_calib.demo.train`.

Training runs in stages (`DEFAULT_STAGES`): a 4-layer decoder first learns to find objects (what-questions),
then their positions and relations; it is then grown to 24 layers without changing its function (`grown`) and
trained on. A vision-only stage then teaches the tower and projector to deliver each cell's row and column (2-D
positions added to the tower's, `vision_loss`), and the whole model learns to use them. Each step draws fresh
scenes from the train split; every image carries a chat of several answered questions, and auxiliary losses ask
each visual token's last hidden state, and what the decoder receives for it, to name its cell (color, shape,
row, column). docs/RESULTS.md tells why each stage is there. The result is saved like any checkpoint (config,
safetensors weights, processor files) at the end of every stage, and a rerun resumes after the last finished stage.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from .shapes_model import DECODER_LAYERS, add_grid_positions, shapes_config, shapes_processor
from .shapes_task import COLUMN_NAMES, GRID, MAX_OBJECTS, Example, example, follow_up_questions, split_seeds

DEMO_MODEL_DIR = Path(__file__).parent / "shapes-llava"
QUESTIONS_PER_IMAGE = 4  # answered questions per training image (a chat), for more signal per image
DEFAULT_SEED = 1  # seed 0 learned the what-questions far later in stage 0 (see docs/RESULTS.md)
CELL_WEIGHT = 0.5  # weight of the auxiliary loss: each visual token's last hidden state names its cell's words


def _conversation(exchanges: list[tuple[str, str | None]]) -> list[dict]:
    """Chat turns about one image: the first question carries the image; an answer of None ends the chat there."""
    turns: list[dict] = []
    for index, (question, answer) in enumerate(exchanges):
        content = [{"type": "image"}] if index == 0 else []
        turns.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
    return turns


def question_inputs(processor, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Processor inputs asking each example's question (left padded), ready for the answer's first word."""
    texts = [
        processor.apply_chat_template(_conversation([(e.question, None)]), add_generation_prompt=True, tokenize=False)
        for e in examples
    ]
    return dict(processor(images=[e.image() for e in examples], text=texts, padding=True, return_tensors="pt"))


def training_batch(
    processor,
    seeds: range,
    max_objects: int = MAX_OBJECTS,
    questions: int = 1,
    kind_weights: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Processor inputs for `seeds`: a chat of `questions` answered questions about each image (left padded).

    The first question is the split's own; follow-ups draw their kinds by `kind_weights` (None: uniformly).
    """
    examples = [example(seed, max_objects) for seed in seeds]
    texts = [
        processor.apply_chat_template(
            _conversation([(e.question, e.answer), *follow_up_questions(e, questions - 1, kind_weights)]),
            tokenize=False,
        )
        for e in examples
    ]
    batch = dict(processor(images=[e.image() for e in examples], text=texts, padding=True, return_tensors="pt"))
    batch["cell_words"] = cell_words(examples, processor.tokenizer)
    return batch


def cell_words(examples: list, tokenizer) -> torch.Tensor:
    """(B, GRID * GRID, 4) word ids of each board cell: color, shape, row and column ("no" for an empty cell)."""
    empty = tokenizer.convert_tokens_to_ids("no")
    words = torch.full((len(examples), GRID * GRID, 4), empty, dtype=torch.long)
    for row, item in enumerate(examples):
        for shape in item.scene:
            names = [shape.color, shape.shape, str(shape.row + 1), COLUMN_NAMES[shape.column]]
            words[row, shape.row * GRID + shape.column] = torch.tensor(tokenizer.convert_tokens_to_ids(names))
    return words


def answer_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True at every answer word (the token after `ASSISTANT :`) and at the `</s>` that follows it."""
    assistant, colon = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    answers = torch.zeros_like(input_ids, dtype=torch.bool)
    answers[:, 2:] = (input_ids[:, :-2] == assistant) & (input_ids[:, 1:-1] == colon)
    answers[:, 1:] |= answers[:, :-1].clone()
    return answers


def answer_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    answers: torch.Tensor,
    cell_weight: float = 0.0,
    cell_words: int = 4,
    input_cell_weight: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of the tokens marked in `answers`, each given everything before it, plus two auxiliary
    losses on the visual tokens: `cell_weight` x the cross-entropy of the first `cell_words` of each token's cell
    words read from its last hidden state, and `input_cell_weight` x that of all four read from what the decoder
    receives (the projector's output, through the tied LM head), so the vision side must deliver them."""
    inputs = {name: value for name, value in batch.items() if name != "cell_words"}
    output = model(**inputs, output_hidden_states=bool(input_cell_weight))
    logits = output.logits.float()
    ids = inputs["input_ids"]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][answers[:, 1:]], ids[:, 1:][answers[:, 1:]])
    visual = ids == model.config.image_token_index
    words = batch["cell_words"].reshape(-1, batch["cell_words"].shape[-1])  # one row per visual token
    if cell_weight:
        loss = loss + cell_weight * _naming_loss(logits[visual], words[:, :cell_words])
    if input_cell_weight:
        received = model.get_output_embeddings()(output.hidden_states[0][visual]).float()
        loss = loss + input_cell_weight * _naming_loss(received, words)
    return loss


def vision_loss(model: LlavaForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cross-entropy of each visual token's four cell words read from the projector's output through the tied
    LM head, computed from the images alone (for a stage that trains only the tower and the projector)."""
    features = torch.cat(list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    logits = model.get_output_embeddings()(features).float()
    return _naming_loss(logits, batch["cell_words"].reshape(-1, batch["cell_words"].shape[-1]))


def spread_words(model: LlavaForConditionalGeneration, word_ids: list[int], rms: float, seed: int) -> None:
    """Give the (tied) embeddings of `word_ids` random offsets of RMS norm `rms` around their mean, so words whose
    embeddings collapsed together can be told apart by a loss again."""
    table = model.get_output_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(len(word_ids), table.shape[1], generator=generator)
    offsets *= rms / offsets.norm(dim=-1).pow(2).mean().sqrt()
    with torch.no_grad():
        table[word_ids] = table[word_ids].mean(0) + offsets.to(table)


def _naming_loss(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Mean over the columns of `words` (N, W) of the cross-entropy of `logits` (N, vocab) naming that word."""
    return sum(torch.nn.functional.cross_entropy(logits, words[:, i]) for i in range(words.shape[1])) / words.shape[1]


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    processor,
    seeds: range,
    batch_size: int = 128,
    group: Callable[[Example], str] = lambda item: item.kind,
) -> tuple[float, dict[str, float]]:
    """Greedy next-word accuracy on examples `seeds`, overall and per group (default: question kind)."""
    was_training = model.training
    model.eval()
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for start in range(seeds.start, seeds.stop, batch_size):
        examples = [example(seed) for seed in range(start, min(start + batch_size, seeds.stop))]
        inputs = question_inputs(processor, examples)
        predicted = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        words = processor.tokenizer.convert_ids_to_tokens(predicted.tolist())
        for item, word in zip(examples, words, strict=True):
            total[group(item)] += 1
            right[group(item)] += word == item.answer
    model.train(was_training)
    return sum(right.values()) / sum(total.values()), {kind: right[kind] / total[kind] for kind in sorted(total)}


def curriculum(step: int, steps: int) -> int:
    """Most objects per scene at `step` of a from-scratch stage: two first (find the object), all from 40% on."""
    progress = step / steps
    return 2 if progress < 0.1 else 4 if progress < 0.25 else 5 if progress < 0.4 else MAX_OBJECTS


@dataclass(frozen=True)
class Stage:
    """One training stage: the decoder depth it trains at, its steps and peak learning rate."""

    layers: int
    steps: int
    lr: float
    curriculum: bool  # ease in the number of objects (for a stage that starts from scratch)
    cell_words: int = 4  # how many of (color, shape, row, column) the auxiliary loss asks each visual token for
    input_cell_weight: float = 0.0  # weight of the loss asking what the decoder receives to name all four
    position_boost: float = 0.0  # RMS of 2-D sine-cosine positions added to the tower's at the start (0: none)
    spread_column_names: float = 0.0  # at the start, spread the column names' embeddings to this RMS norm (0: no)
    vision_only: bool = False  # train only the tower and the projector, on `vision_loss`
    follow_up_weights: dict[str, float] | None = None  # kinds of follow-up questions (None: uniform)


BASE_LAYERS = 4
WHAT_KINDS = {"color": 3.0, "shape": 3.0, "count": 1.0, "position": 0.5, "relation": 0.5}  # follow-ups, stage 0
HARD_KINDS = {"color": 1.0, "shape": 1.0, "count": 1.0, "position": 2.0, "relation": 3.0}  # follow-ups, later
DEFAULT_STAGES = (
    Stage(layers=BASE_LAYERS, steps=2000, lr=2e-3, curriculum=True, cell_words=2, follow_up_weights=WHAT_KINDS),
    Stage(layers=BASE_LAYERS, steps=5000, lr=1.5e-3, curriculum=False, follow_up_weights=HARD_KINDS),
    Stage(layers=DECODER_LAYERS, steps=1500, lr=5e-4, curriculum=False, follow_up_weights=HARD_KINDS),
    Stage(layers=DECODER_LAYERS, steps=300, lr=3e-3, curriculum=False, position_boost=2.0, spread_column_names=1.1,
          vision_only=True),
    Stage(layers=DECODER_LAYERS, steps=1500, lr=5e-4, curriculum=False, input_cell_weight=0.5,
          follow_up_weights=HARD_KINDS),
    Stage(layers=DECODER_LAYERS, steps=2000, lr=1e-3, curriculum=False, input_cell_weight=0.5,
          follow_up_weights=HARD_KINDS),
)


def grown(model: LlavaForConditionalGeneration, layers: int) -> LlavaForConditionalGeneration:
    """A copy of `model` with `layers` decoder layers and the same function: trained layer i moves to depth
    i x factor and is followed by factor - 1 copies of itself whose output projections (attention and MLP)
    start at zero, so they add nothing until training gives them a part."""
    depth = model.config.text_config.num_hidden_layers
    if layers % depth:
        raise ValueError(f"can only grow {depth} decoder layers by a whole factor, not to {layers}")
    factor = layers // depth
    bigger = LlavaForConditionalGeneration(shapes_config(model.config.text_config._attn_implementation, layers))
    state = {}
    for name, tensor in model.state_dict().items():
        prefix, found, rest = name.partition("layers.")
        if not found or "language_model" not in prefix:
            state[name] = tensor
            continue
        index, _, parameter = rest.partition(".")
        for copy in range(factor):
            silent = copy > 0 and parameter in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
            state[f"{prefix}layers.{int(index) * factor + copy}.{parameter}"] = (
                torch.zeros_like(tensor) if silent else tensor.clone()
            )
    bigger.load_state_dict(state)
    return bigger


def train_stage(
    model: LlavaForConditionalGeneration,
    processor,
    stage: Stage,
    *,
    batch_size: int,
    seeds: range,
    questions: int,
    cell_weight: float,
    eval_every: int,
    evaluate: Callable[[int, float], None],
) -> None:
    """Run one stage: AdamW with warmup and a cosine decay to 55% of the peak rate, on examples `seeds`."""
    model.train()
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    trained = vision if stage.vision_only else list(model.parameters())
    optimizer = torch.optim.AdamW(trained, lr=stage.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, stage.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, step / stage.steps))),
    )
    for step in range(stage.steps):
        max_objects = curriculum(step, stage.steps) if stage.curriculum else MAX_OBJECTS
        batch = training_batch(
            processor, seeds[step * batch_size : (step + 1) * batch_size], max_objects, questions,
            stage.follow_up_weights,
        )
        if stage.vision_only:
            loss = vision_loss(model, batch)
        else:
            answers = answer_mask(batch["input_ids"], processor.tokenizer)
            loss = answer_loss(model, batch, answers, cell_weight, stage.cell_words, stage.input_cell_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        model.zero_grad(set_to_none=True)  # also the tied LM head, which a vision-only stage reads but does not train
        schedule.step()
        if (step + 1) % eval_every == 0 or step + 1 == stage.steps:
            evaluate(step + 1, loss.item())


@torch.enable_grad()
def train(
    out: Path,
    stages: tuple[Stage, ...] = DEFAULT_STAGES,
    *,
    batch_size: int = 32,
    seed: int = DEFAULT_SEED,
    eval_every: int = 500,
    eval_rows: int = 256,
    questions: int = QUESTIONS_PER_IMAGE,
    cell_weight: float = CELL_WEIGHT,
) -> dict:
    """Train the demo model stage by stage (growing the decoder between stages) and save it to `out`.

    The model is saved at the end of every stage; a rerun with the same settings resumes after the last finished
    stage (each stage is seeded on its own, so a resumed run gives the same model). Returns the training log.
    """
    processor = shapes_processor()
    settings = {
        "stages": [asdict(stage) for stage in stages], "batch_size": batch_size, "seed": seed,
        "questions_per_image": questions, "cell_weight": cell_weight,
    }
    log, model = _resume(out, settings)
    held_out = split_seeds("test", eval_rows)
    started = time.perf_counter() - log.get("train_seconds", 0.0)

    def evaluate(model: LlavaForConditionalGeneration, stage: int, step: int, loss: float) -> None:
        overall, per_kind = accuracy(model, processor, held_out)
        elapsed = time.perf_counter() - started
        log["evaluations"].append(
            {"stage": stage, "step": step, "loss": loss, "accuracy": overall, "per_kind": per_kind, "seconds": elapsed}
        )
        kinds = " ".join(f"{kind} {value:.2f}" for kind, value in per_kind.items())
        print(f"stage {stage} step {step} loss {loss:.3f} held-out accuracy {overall:.3f} ({kinds}) {elapsed:.0f}s",
              flush=True)

    for number, stage in enumerate(stages):
        if number < log["completed_stages"]:
            continue
        torch.manual_seed(seed * 1000 + number)
        if model is None:
            model = LlavaForConditionalGeneration(shapes_config(num_layers=stage.layers))
        elif model.config.text_config.num_hidden_layers != stage.layers:
            model = grown(model, stage.layers)
        if stage.position_boost:
            add_grid_positions(model, stage.position_boost)
        if stage.spread_column_names:
            column_ids = processor.tokenizer.convert_tokens_to_ids(list(COLUMN_NAMES))
            spread_words(model, column_ids, stage.spread_column_names, seed * 1000 + number)
        first_seed = sum(earlier.steps for earlier in stages[:number]) * batch_size
        train_stage(model, processor, stage, batch_size=batch_size,
                    seeds=split_seeds("train", stage.steps * batch_size, start=first_seed), questions=questions,
                    cell_weight=cell_weight, eval_every=eval_every,
                    evaluate=lambda step, loss, number=number, model=model: evaluate(model, number, step, loss))
        log["completed_stages"] = number + 1
        log["train_seconds"] = time.perf_counter() - started
        _save(model, processor, out, log)
    return log


def _resume(out: Path, settings: dict) -> tuple[dict, LlavaForConditionalGeneration | None]:
    """The log and model of an earlier run into `out` with the same settings, or a fresh log and no model."""
    fresh = {**settings, "completed_stages": 0, "evaluations": []}
    path = out / "training_log.json"
    if not path.exists():
        return fresh, None
    log = json.loads(path.read_text(encoding="utf-8"))
    done = log.get("completed_stages", 0)
    same = all(log.get(key) == value for key, value in settings.items() if key != "stages")
    if not done or not same or not _same_stages(log.get("stages", [])[:done], settings["stages"][:done]):
        return fresh, None
    print(f"resuming after stage {done - 1} from {out}")
    return {**log, "stages": settings["stages"]}, LlavaForConditionalGeneration.from_pretrained(out)


def _same_stages(logged: list[dict], planned: list[dict]) -> bool:
    """Whether logged stages are the planned ones (a field added to `Stage` later counts at its default)."""
    try:
        return [Stage(**entry) for entry in logged] == [Stage(**entry) for entry in planned]
    except TypeError:  # a field this version does not know
        return False


def _save(model: torch.nn.Module, processor, out: Path, log: dict) -> None:
    """Save the model, its processor and the training log."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument(
        "--steps", type=int, nargs=len(DEFAULT_STAGES), default=[stage.steps for stage in DEFAULT_STAGES],
        help="steps of each stage (decoder layers: " + ", ".join(str(stage.layers) for stage in DEFAULT_STAGES) + ")",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    stages = tuple(replace(stage, steps=steps) for stage, steps in zip(DEFAULT_STAGES, args.steps, strict=True))
    train(args.out, stages, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every)


if __name__ == "__main__":
    main()
