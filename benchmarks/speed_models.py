"""Model geometries for the speed benchmark, built from configs with random weights (speed does not depend on them).

`FULL` holds the real 7B geometries; `SMALL` scales them down for CPU development runs (same classes, same code
paths). Each spec also builds synthetic inputs: about 60 text tokens around one image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

TEXT_TOKENS = 60  # prompt text around the image (system prompt + question)
LLAVA_IMAGE_TOKEN, QWEN_IMAGE_TOKEN, QWEN_START, QWEN_END = 32000, 151655, 151652, 151653


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked geometry: a name, the family, and the sizes that matter for speed."""

    name: str
    family: str  # llava | llava_next | qwen2_5_vl
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int  # CLIP input size (llava) / tile size (llava_next) / square image side (qwen)
    patch: int = 14
    image_side: int = 0  # llava_next: the image's side in pixels (anyres picks the tiling); qwen: image side


def _clip(spec: ModelSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch, projection_dim=768,
    )


def _llama(spec: ModelSpec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=0,
    )


def model_config(spec: ModelSpec, attn_implementation: str):
    """The transformers config of `spec` with the given attention backend."""
    if spec.family == "llava":
        config = LlavaConfig(
            vision_config=_clip(spec), text_config=_llama(spec), image_token_index=LLAVA_IMAGE_TOKEN,
            image_seq_length=(spec.image_size // spec.patch) ** 2, vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    elif spec.family == "llava_next":
        tile = spec.image_size
        config = LlavaNextConfig(
            vision_config=_clip(spec), text_config=_llama(spec), image_token_index=LLAVA_IMAGE_TOKEN,
            image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile],
                                  [tile, 3 * tile]],
            vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
    else:
        config = Qwen2_5_VLConfig(
            vision_config=dict(
                depth=spec.vision_layers, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                num_heads=spec.vision_heads, patch_size=spec.patch, spatial_merge_size=2, temporal_patch_size=2,
                out_hidden_size=spec.hidden, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_channels=3,
            ),
            text_config=dict(
                vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": _mrope_section(spec),
                                 "rope_theta": 1_000_000.0},
            ),
            image_token_id=QWEN_IMAGE_TOKEN, video_token_id=QWEN_IMAGE_TOKEN + 1, vision_start_token_id=QWEN_START,
            vision_end_token_id=QWEN_END,
        )
    config._attn_implementation = attn_implementation
    config.get_text_config(decoder=True)._attn_implementation = attn_implementation
    return config


def _mrope_section(spec: ModelSpec) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] at head_dim 128, scaled to the spec's head_dim (sums to head_dim / 2)."""
    half = spec.hidden // spec.heads // 2
    temporal = half // 4
    rest = half - temporal
    return [temporal, rest // 2, rest - rest // 2]


_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


def build_model(spec: ModelSpec, attn_implementation: str, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> PreTrainedModel:
    """Random-weight model of `spec`, allocated and initialised directly on `device` in `dtype`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = _CLASSES[spec.family]._from_config(model_config(spec, attn_implementation), dtype=dtype)
    return model.eval()


def _text_ids(generator: torch.Generator, count: int, vocab: int) -> list[int]:
    return torch.randint(3, min(vocab, 32000) - 1, (count,), generator=generator).tolist()


def build_inputs(spec: ModelSpec, model: PreTrainedModel, batch: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic prompt (about TEXT_TOKENS text tokens around one image) repeated `batch` times, no padding."""
    generator = torch.Generator().manual_seed(seed)
    before, after = _text_ids(generator, 35, spec.vocab), _text_ids(generator, TEXT_TOKENS - 35, spec.vocab)
    extra: dict[str, torch.Tensor] = {}
    if spec.family == "llava":
        side = spec.image_size
        count = model.config.image_seq_length
        image = [LLAVA_IMAGE_TOKEN] * count
        extra["pixel_values"] = torch.randn(batch, 3, side, side, generator=generator)
    elif spec.family == "llava_next":
        tile, side = spec.image_size, spec.image_side
        extra["pixel_values"] = torch.randn(batch, 5, 3, tile, tile, generator=generator)
        extra["image_sizes"] = torch.tensor([[side, side]] * batch)
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=extra["pixel_values"][:1].to(device, dtype), image_sizes=extra["image_sizes"][:1]
            ).pooler_output
        image = [LLAVA_IMAGE_TOKEN] * features[0].shape[0]
    else:
        grid = spec.image_side // spec.patch
        image = [QWEN_START] + [QWEN_IMAGE_TOKEN] * (grid * grid // 4) + [QWEN_END]
        extra["pixel_values"] = torch.randn(batch * grid * grid, 3 * 2 * spec.patch**2, generator=generator)
        extra["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch)
    input_ids = torch.tensor([before + image + after] * batch)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
    if spec.family == "qwen2_5_vl":
        inputs["mm_token_type_ids"] = (input_ids == QWEN_IMAGE_TOKEN).long()
    return {
        name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for name, value in inputs.items()
    }


def visual_mask(spec: ModelSpec, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) bool image-token positions of `inputs`."""
    token = QWEN_IMAGE_TOKEN if spec.family == "qwen2_5_vl" else LLAVA_IMAGE_TOKEN
    return inputs["input_ids"] == token


FULL = (
    ModelSpec("llava-1.5-7b", "llava", 4096, 32, 32, 32, 11008, 32064, 1024, 24, 16, 4096, 336),
    ModelSpec("llava-next-7b", "llava_next", 4096, 32, 32, 32, 11008, 32064, 1024, 24, 16, 4096, 336,
              image_side=672),
    ModelSpec("qwen2.5-vl-7b", "qwen2_5_vl", 3584, 28, 28, 4, 18944, 152064, 1280, 32, 16, 3420, 0,
              image_side=672),
)
SMALL = (  # 20 layers: at fewer, FastV / PyramidDrop (2 full layers) cannot reach 89% compression
    ModelSpec("llava-1.5-small", "llava", 256, 20, 4, 4, 688, 32064, 64, 2, 2, 128, 224),
    ModelSpec("llava-next-small", "llava_next", 256, 20, 4, 4, 688, 32064, 64, 2, 2, 128, 112, image_side=224),
    ModelSpec("qwen2.5-vl-small", "qwen2_5_vl", 256, 20, 4, 2, 688, 152064, 64, 2, 2, 128, 0, image_side=336),
)
