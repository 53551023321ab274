"""An offline processor for `tiny_llava()`: character-level tokenizer, 28px CLIP image processor, no hub access.

Text is split into single characters (printable ASCII and newline, ids 4..99); `<image>` is the special token
`IMAGE_TOKEN` (100) and the processor expands each one into the 16 visual tokens the tiny model expects.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..demo.shapes_model import CHAT_TEMPLATE
from .tiny_models import IMAGE_TOKEN, PAD_TOKEN

IMAGE_SIZE = 28
PATCH_SIZE = 7
SPECIAL_TOKENS = {"<pad>": PAD_TOKEN, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE_TOKEN}
CHARACTERS = "\n" + "".join(c for c in string.printable if c.isprintable())  # 96 characters: ids 4..99

def _tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (BPE without merges) that prepends `<s>`."""
    vocab = {char: 4 + i for i, char in enumerate(CHARACTERS)}
    vocab.update(SPECIAL_TOKENS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS["<s>"])]
    )
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def tiny_llava_processor() -> LlavaProcessor:
    """The processor matching `tiny_llava()`: one `<image>` in the text becomes 16 image tokens (4 x 4 patches)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # CLIP prepends a CLS token (+1) that the "default" strategy drops again (-1): 4 * 4 + 1 - 1 = 16.
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
