"""The shipped demo model: a normal checkpoint that loads with from_pretrained, and its training script."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from alvts_calib.data import build_labelled_items
from alvts_calib.demo.builtin import BUILTIN_MODEL_DIR, builtin_model, builtin_processor
from alvts_calib.demo.shapes_model import (
    DECODER_LAYERS,
    NUM_VISUAL_TOKENS,
    add_grid_positions,
    grid_position_embeddings,
    shapes_config,
    shapes_processor,
)
from alvts_calib.demo.shapes_task import COLUMN_NAMES, GRID, example, split_records, split_seeds
from alvts_calib.demo.train import Stage, accuracy, answer_loss, answer_mask, grown, train, training_batch, vision_loss
from alvts_calib.runtime.attach import attach, detach


def test_the_demo_checkpoint_loads_like_any_local_checkpoint():
    model = LlavaForConditionalGeneration.from_pretrained(BUILTIN_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(BUILTIN_MODEL_DIR)
    assert model.config.text_config.num_hidden_layers == DECODER_LAYERS
    items, _ = build_labelled_items(split_records("test", 2), processor)
    inputs = processor(images=[items[0].image], text=[items[0].text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == NUM_VISUAL_TOKENS
    log = json.loads((BUILTIN_MODEL_DIR / "training_log.json").read_text())
    assert log["evaluations"], "the shipped model records how it was trained"


@pytest.mark.slow
def test_the_shipped_model_answers_at_least_90_percent_of_held_out_questions():
    """Issue 3's bar for the demo model (95.2% on 1000 rows; docs/RESULTS.md), checked on the first 300 rows."""
    overall, per_kind = accuracy(builtin_model(), builtin_processor(), split_seeds("test", 300))
    assert overall >= 0.9, per_kind


def test_keep_ratio_one_is_exact_on_the_demo_model(make_selector):
    model = builtin_model()
    processor = builtin_processor()
    items, _ = build_labelled_items(split_records("test", 3), processor)
    inputs = processor(images=[i.image for i in items], text=[i.text for i in items], padding=True,
                       return_tensors="pt")
    reference = model(**inputs).logits
    reference_tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    attach(model, make_selector(model, 1.0))
    assert torch.equal(model(**inputs).logits, reference)
    assert torch.equal(model.generate(**inputs, max_new_tokens=2, do_sample=False), reference_tokens)
    detach(model)


@pytest.mark.slow
def test_training_runs_in_stages_saves_a_loadable_checkpoint_and_resumes_identically(tmp_path):
    stages = (
        Stage(layers=2, steps=2, lr=1e-3, curriculum=True, cell_words=2),
        Stage(layers=4, steps=2, lr=1e-3, curriculum=False),
    )
    log = train(tmp_path / "whole", stages, batch_size=2, eval_every=2, eval_rows=4)
    assert [entry["stage"] for entry in log["evaluations"]] == [0, 1] and log["completed_stages"] == 2
    assert all(math.isfinite(entry["loss"]) for entry in log["evaluations"])
    whole = LlavaForConditionalGeneration.from_pretrained(tmp_path / "whole")
    assert whole.config.text_config.num_hidden_layers == 4

    train(tmp_path / "parts", stages[:1], batch_size=2, eval_every=2, eval_rows=4)  # "interrupted" after stage 0
    resumed = train(tmp_path / "parts", stages, batch_size=2, eval_every=2, eval_rows=4)
    assert [entry["stage"] for entry in resumed["evaluations"]] == [0, 1]
    parts = LlavaForConditionalGeneration.from_pretrained(tmp_path / "parts")
    for (name, tensor), other in zip(whole.state_dict().items(), parts.state_dict().values(), strict=True):
        assert torch.equal(tensor, other), name


def test_growing_the_decoder_keeps_the_function_exactly():
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(shapes_config(num_layers=2)).eval()
    bigger = grown(base, 6).eval()
    layers = bigger.model.language_model.layers
    assert len(layers) == 6
    assert torch.equal(layers[3].self_attn.q_proj.weight, base.model.language_model.layers[1].self_attn.q_proj.weight)
    assert not layers[4].self_attn.o_proj.weight.any() and not layers[5].mlp.down_proj.weight.any()
    batch = training_batch(shapes_processor(), range(3), questions=2)
    batch.pop("cell_words")
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, bigger(**batch).logits)
    with pytest.raises(ValueError, match="whole factor"):
        grown(base, 5)


def test_training_targets_are_every_answer_and_each_cells_words():
    processor = shapes_processor()
    batch = training_batch(processor, range(2), questions=3)
    answers = answer_mask(batch["input_ids"], processor.tokenizer)
    for row, seed in enumerate(range(2)):
        item = example(seed)
        words = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][row][answers[row]].tolist())
        assert words[:2] == [item.answer, "</s>"] and len(words) == 6 and words[3::2] == ["</s>", "</s>"]
        cells = batch["cell_words"][row]
        for shape in item.scene:
            named = processor.tokenizer.convert_ids_to_tokens(cells[shape.row * GRID + shape.column].tolist())
            assert named == [shape.color, shape.shape, str(shape.row + 1), COLUMN_NAMES[shape.column]]
        assert int((cells != processor.tokenizer.convert_tokens_to_ids("no")).any(-1).sum()) == len(item.scene)


def test_grid_positions_separate_rows_and_columns_and_are_added_at_the_asked_size():
    table = grid_position_embeddings(64)
    cells = table.reshape(GRID, GRID, -1)
    assert torch.equal(cells[0, :, :32], cells[0, :1, :32].expand(GRID, -1))  # first half: the row only
    assert torch.equal(cells[:, 0, 32:], cells[:1, 0, 32:].expand(GRID, -1))  # second half: the column only
    assert len({tuple(row.tolist()) for row in table}) == GRID * GRID
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(shapes_config(num_layers=1))
    before = model.model.vision_tower.embeddings.position_embedding.weight.detach().clone()
    add_grid_positions(model, 2.0)
    added = model.model.vision_tower.embeddings.position_embedding.weight.detach() - before
    assert not added[0].any(), "the class token keeps its embedding"
    torch.testing.assert_close(added[1:].pow(2).mean().sqrt(), torch.tensor(2.0))


def test_the_input_cell_loss_trains_the_vision_side():
    """The auxiliary loss on what the decoder receives sends gradient into the tower and depends on the cell words."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(shapes_config(num_layers=1))
    processor = shapes_processor()
    batch = training_batch(processor, range(2))
    answers = answer_mask(batch["input_ids"], processor.tokenizer)
    with torch.enable_grad():  # the suite runs without autograd
        plain = answer_loss(model, batch, answers)
        with_input = answer_loss(model, batch, answers, input_cell_weight=1.0)
        with_input.backward()
    assert with_input > plain
    assert model.model.vision_tower.embeddings.position_embedding.weight.grad.abs().sum() > 0
    shuffled = {**batch, "cell_words": batch["cell_words"].flip(1)}
    assert not torch.equal(answer_loss(model, shuffled, answers, input_cell_weight=1.0), with_input.detach())


@pytest.mark.slow
def test_a_log_written_before_a_stage_field_existed_still_resumes(tmp_path):
    stages = (Stage(layers=2, steps=2, lr=1e-3, curriculum=True, cell_words=2),)
    train(tmp_path, stages, batch_size=2, eval_every=2, eval_rows=4)
    path = tmp_path / "training_log.json"
    log = json.loads(path.read_text())
    del log["stages"][0]["input_cell_weight"]  # as logged before the field was added (at its default)
    path.write_text(json.dumps(log))
    more = (*stages, Stage(layers=2, steps=2, lr=1e-3, curriculum=False, input_cell_weight=0.5))
    resumed = train(tmp_path, more, batch_size=2, eval_every=2, eval_rows=4)
    assert [entry["stage"] for entry in resumed["evaluations"]] == [0, 1], "stage 0 was not trained again"
    changed = (Stage(layers=2, steps=2, lr=1e-3, curriculum=True, cell_words=2, input_cell_weight=0.5),)
    assert [entry["stage"] for entry in train(tmp_path, changed, batch_size=2, eval_every=2, eval_rows=4)[
        "evaluations"]] == [0], "a stage logged with other settings starts over"


@pytest.mark.slow
def test_a_vision_only_stage_trains_only_the_tower_and_the_projector(tmp_path):
    stages = (
        Stage(layers=2, steps=1, lr=1e-3, curriculum=True, cell_words=2),
        Stage(layers=2, steps=2, lr=1e-2, curriculum=False, position_boost=2.0, spread_column_names=1.0,
              vision_only=True),
    )
    train(tmp_path / "before", stages[:1], batch_size=2, eval_every=2, eval_rows=4)
    train(tmp_path / "after", stages, batch_size=2, eval_every=2, eval_rows=4)
    before = LlavaForConditionalGeneration.from_pretrained(tmp_path / "before").state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(tmp_path / "after").state_dict()
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith(("model.vision_tower", "model.multi_modal_projector",
                                            "model.language_model.embed_tokens", "lm_head")) for name in changed)
    letters = shapes_processor().tokenizer.convert_tokens_to_ids(list(COLUMN_NAMES))
    embeddings = after["model.language_model.embed_tokens.weight"]
    others = [i for i in range(embeddings.shape[0]) if i not in letters]
    assert torch.equal(embeddings[others], before["model.language_model.embed_tokens.weight"][others])
    spread = embeddings[letters] - before["model.language_model.embed_tokens.weight"][letters].mean(0)
    torch.testing.assert_close(spread.norm(dim=-1).pow(2).mean().sqrt(), torch.tensor(1.0))


def test_the_vision_loss_reads_each_cell_from_the_projector():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(shapes_config(num_layers=1))
    batch = training_batch(shapes_processor(), range(2))
    with torch.enable_grad():
        loss = vision_loss(model, batch)
        loss.backward()
    assert math.isfinite(loss.item())
    assert model.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.language_model.layers.parameters())
    shuffled = {**batch, "cell_words": batch["cell_words"].flip(1)}
    assert not torch.equal(vision_loss(model, shuffled), loss.detach())
