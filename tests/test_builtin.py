"""The shipped demo model: a normal checkpoint that loads with from_pretrained, and its training script."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from alvts_calib.attach import attach, detach
from alvts_calib.builtin import BUILTIN_MODEL_DIR, builtin_model, builtin_processor
from alvts_calib.data import build_labelled_items
from alvts_calib.shapes_model import DECODER_LAYERS, NUM_VISUAL_TOKENS, shapes_config, shapes_processor
from alvts_calib.shapes_task import COLUMN_NAMES, GRID, example, split_records
from alvts_calib.train_demo import Stage, answer_mask, grown, train, training_batch


def test_the_demo_checkpoint_loads_like_any_local_checkpoint():
    model = LlavaForConditionalGeneration.from_pretrained(BUILTIN_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(BUILTIN_MODEL_DIR)
    assert model.config.text_config.num_hidden_layers == DECODER_LAYERS
    items, _ = build_labelled_items(split_records("test", 2), processor)
    inputs = processor(images=[items[0].image], text=[items[0].text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == NUM_VISUAL_TOKENS
    log = json.loads((BUILTIN_MODEL_DIR / "training_log.json").read_text())
    assert log["evaluations"], "the shipped model records how it was trained"


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
