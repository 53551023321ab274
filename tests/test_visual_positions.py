"""Visual positions are found automatically on the inputs_embeds path and for Qwen2.5-VL video tokens."""

from __future__ import annotations

import torch

from alvts_calib import attach, detach
from alvts_calib.testing.tiny_models import IMAGE_TOKEN, VIDEO_TOKEN, tiny_qwen2_5_vl


def test_inputs_embeds_path_routes_like_input_ids(tiny_case, make_selector):
    case = tiny_case("llava", "sdpa")
    inputs = dict(case.inputs)
    embeds = case.model.get_input_embeddings()(inputs.pop("input_ids"))
    reference = case.model(inputs_embeds=embeds, **inputs).logits
    attach(case.model, make_selector(case.model, 1.0))
    assert torch.equal(case.model(inputs_embeds=embeds, **inputs).logits, reference)
    detach(case.model)
    attach(case.model, make_selector(case.model, 0.25))
    routed_ids = case.model(**case.inputs).logits
    routed_embeds = case.model(inputs_embeds=embeds, **inputs).logits
    torch.testing.assert_close(routed_embeds, routed_ids)
    assert not torch.allclose(routed_embeds, reference, atol=1e-4)  # routing really happened


def _video_inputs(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    grid = (2, 4, 4)  # two temporal patches of 4x4: 8 merged video tokens
    tokens = grid[0] * grid[1] * grid[2] // model.config.vision_config.spatial_merge_size**2
    text = torch.randint(3, IMAGE_TOKEN, (9,), generator=generator).tolist()
    input_ids = torch.tensor([text[:4] + [102] + [VIDEO_TOKEN] * tokens + [103] + text[4:]])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=generator),
        "video_grid_thw": torch.tensor([grid]),
        "mm_token_type_ids": (input_ids == VIDEO_TOKEN).long() * 2,
    }


def test_qwen_video_tokens_are_routed(make_selector):
    model = tiny_qwen2_5_vl("sdpa")
    inputs = _video_inputs(model)
    reference = model(**inputs).logits
    attach(model, make_selector(model, 1.0))
    assert torch.equal(model(**inputs).logits, reference)
    detach(model)
    attach(model, make_selector(model, 0.25))
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    lengths = [layer.keys.shape[-2] for layer in output.past_key_values.layers]
    videos = int((inputs["input_ids"] == VIDEO_TOKEN).sum())
    text = inputs["input_ids"].shape[1] - videos
    assert output.past_key_values.get_seq_length() == inputs["input_ids"].shape[1] + 1
    assert all(length == text + 2 + 1 for length in lengths)  # ceil(0.25 * 8) = 2 video tokens kept
