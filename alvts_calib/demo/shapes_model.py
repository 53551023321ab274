"""The demo LVLM's architecture and processor: a small LLaVA (CLIP-style tower, projector, deep narrow Llama).

The decoder is deep (24 layers) so budgets of static peers with K=2 full layers stay feasible at 89%
compression, as in 7B models; it is narrow so it trains on a CPU. One vision patch covers one board cell,
so the image gives GRID x GRID = 64 visual tokens.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .shapes_task import CELL, GRID, IMAGE_SIZE, VOCABULARY

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")
NUM_VISUAL_TOKENS = GRID * GRID
DECODER_LAYERS = 24
# a LLaVA-1.5-style chat template (the tiny test processor uses it too)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)



def shapes_config(attn_implementation: str = "sdpa", num_layers: int = DECODER_LAYERS) -> LlavaConfig:
    """The demo model's configuration (random initialisation is seeded by the caller); training starts with
    fewer decoder layers (see `demo.train`)."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=CELL, projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(SPECIAL_TOKENS) + len(VOCABULARY), hidden_size=64, intermediate_size=128,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        ),
        image_token_index=IMAGE_TOKEN_ID, image_seq_length=NUM_VISUAL_TOKENS, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=True,
    )
    config._attn_implementation = attn_implementation
    return config


def shapes_model(attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """A freshly initialised demo model."""
    return LlavaForConditionalGeneration(shapes_config(attn_implementation))


def grid_position_embeddings(hidden_size: int, grid: int = GRID, base: float = 100.0) -> torch.Tensor:
    """(grid * grid, hidden_size) 2-D sine-cosine position embeddings of a tower's patches (RMS 1/sqrt(2)): sines
    and cosines of the patch's row in the first half of the features and of its column in the second half."""
    quarter = hidden_size // 4
    frequencies = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    angles = torch.arange(grid, dtype=torch.float32)[:, None] * frequencies  # (grid, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (grid, hidden / 2)
    rows = axis[:, None].expand(grid, grid, -1)
    columns = axis[None, :].expand(grid, grid, -1)
    return torch.cat([rows, columns], dim=-1).reshape(grid * grid, -1)


def add_grid_positions(model: LlavaForConditionalGeneration, rms: float) -> None:
    """Add 2-D sine-cosine position embeddings of RMS `rms` to the vision tower's learned patch positions."""
    table = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        table[1:] += grid_position_embeddings(table.shape[1]).to(table) * (rms * 2**0.5)


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's vocabulary that prepends `<s>`."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def shapes_processor() -> LlavaProcessor:
    """The demo model's processor: images resized to IMAGE_SIZE square (the demo's own images already are, and
    resizing them is exact), CLIP normalisation."""
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=False,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=_tokenizer(), patch_size=CELL,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
