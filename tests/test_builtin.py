"""The shipped demo model: a normal checkpoint that loads with from_pretrained, and its training script."""

from __future__ import annotations

import json

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from alvts_calib.attach import attach, detach
from alvts_calib.builtin import BUILTIN_MODEL_DIR, builtin_model, builtin_processor
from alvts_calib.data import build_labelled_items
from alvts_calib.shapes_model import DECODER_LAYERS, NUM_VISUAL_TOKENS
from alvts_calib.shapes_task import split_records
from alvts_calib.train_demo import train


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


def test_training_runs_and_saves_a_loadable_checkpoint(tmp_path):
    log = train(tmp_path, steps=2, batch_size=2, lr=1e-3, seed=0, eval_every=2, eval_rows=4)
    assert len(log["evaluations"]) == 1 and torch.isfinite(torch.tensor(log["evaluations"][0]["loss"]))
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path).config.text_config.num_hidden_layers == 24
