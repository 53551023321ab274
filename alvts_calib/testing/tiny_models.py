"""Tiny random-weight models of every supported family, built from configs (no hub access).

They back the test suite and the CLI's built-in default until a trained demo model ships.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

VOCAB = 128
IMAGE_TOKEN = 100
VIDEO_TOKEN = 101
PAD_TOKEN = 0


def _llama_text(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_TOKEN,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def _clip(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )


def tiny_llava(attn_implementation: str = "eager", seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 geometry in miniature: 28px CLIP with 7px patches gives 16 visual tokens."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_clip(28, 7), text_config=_llama_text(), image_token_index=IMAGE_TOKEN,
        image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_next(attn_implementation: str = "eager", seed: int = 0) -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT anyres in miniature: the number of visual tokens depends on the image size."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_clip(28, 7), text_config=_llama_text(), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_qwen2_5_vl(attn_implementation: str = "eager", seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL in miniature with M-RoPE (head_dim 16, mrope_section sums to 8)."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1], in_channels=3,
        ),
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            pad_token_id=PAD_TOKEN, bos_token_id=1, eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=102, vision_end_token_id=103,
    )
    config._attn_implementation = attn_implementation
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_llama(attn_implementation: str = "eager", seed: int = 0) -> LlamaForCausalLM:
    """A decoder-only language model, routed through an explicit visual mask."""
    torch.manual_seed(seed)
    config = _llama_text()
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


TINY_MODELS: dict[str, Callable[..., PreTrainedModel]] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "llama": tiny_llama,
}


def _text(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(3, IMAGE_TOKEN, (length,), generator=generator).tolist()


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def _llava_inputs(model, generator, prefix_lengths, sizes) -> dict[str, torch.Tensor]:
    count = model.config.image_seq_length
    rows = [_text(generator, p) + [IMAGE_TOKEN] * count + _text(generator, 5) for p in prefix_lengths]
    input_ids, attention_mask = _left_pad(rows)
    pixel_values = torch.randn(len(rows), 3, 28, 28, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def _llava_next_inputs(model, generator, prefix_lengths, sizes) -> dict[str, torch.Tensor]:
    image_sizes = torch.tensor(sizes)
    pixel_values = torch.randn(len(sizes), 5, 3, 28, 28, generator=generator)
    features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
    rows = [
        _text(generator, p) + [IMAGE_TOKEN] * f.shape[0] + _text(generator, 5)
        for p, f in zip(prefix_lengths, features, strict=True)
    ]
    input_ids, attention_mask = _left_pad(rows)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }


def _qwen_inputs(model, generator, prefix_lengths, sizes) -> dict[str, torch.Tensor]:
    grids = [(1, h // 14, w // 14) for h, w in sizes]
    merge = model.config.vision_config.spatial_merge_size ** 2
    rows = [
        _text(generator, p) + [102] + [IMAGE_TOKEN] * (t * h * w // merge) + [103] + _text(generator, 5)
        for p, (t, h, w) in zip(prefix_lengths, grids, strict=True)
    ]
    input_ids, attention_mask = _left_pad(rows)
    patches = sum(t * h * w for t, h, w in grids)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=generator),
        "image_grid_thw": torch.tensor(grids), "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long(),
    }


def _llama_inputs(model, generator, prefix_lengths, sizes) -> dict[str, torch.Tensor]:
    rows = [_text(generator, p + 16 + 5) for p in prefix_lengths]
    input_ids, attention_mask = _left_pad(rows)
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    visual[:, -21:-5] = True  # rows are left-padded, so the 16-token span sits at the same columns
    return {"input_ids": input_ids, "attention_mask": attention_mask, "visual_mask": visual}


_INPUT_BUILDERS = {
    "llava": _llava_inputs, "llava_next": _llava_next_inputs, "qwen2_5_vl": _qwen_inputs, "llama": _llama_inputs,
}
_DEFAULT_SIZES = {"llava_next": [[56, 28], [56, 56]], "qwen2_5_vl": [[56, 56], [56, 112]]}


def tiny_inputs(
    model: PreTrainedModel, batch: int = 2, seed: int = 0, prefix_lengths: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Random model inputs for a tiny model: left-padded, with different visual-token counts where the family allows.

    Language models get a `visual_mask` marking a span of 16 positions as visual.
    """
    generator = torch.Generator().manual_seed(seed)
    prefix_lengths = prefix_lengths or [3 + 2 * i for i in range(batch)]
    sizes = (_DEFAULT_SIZES.get(model.config.model_type, [[28, 28]]) * batch)[:batch]
    return _INPUT_BUILDERS[model.config.model_type](model, generator, prefix_lengths[:batch], sizes)
