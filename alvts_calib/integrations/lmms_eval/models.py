"""The plugin's lmms-eval models: lmms-eval's transformers wrappers, with a selector attached once they have loaded.

Model args: `selector=PATH` (required) and `keep_ratio=R` (optional, one ratio for every routed layer instead of
the artifact's); the artifact's own runtime (skipped keys, skipped update) otherwise. Every other arg goes to the
lmms-eval wrapper unchanged, which loads the checkpoint as it always does. The runtime handles padded batches, so
`--batch_size` above 1 works for both families (lmms-eval's own llava_hf generates one request at a time).
"""

from __future__ import annotations

from typing import Any

from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE, LlavaHf
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
from loguru import logger
from PIL import Image
from tqdm import tqdm

from alvts_calib.artifact.selector import load_selector
from alvts_calib.errors import AlvtsError
from alvts_calib.runtime.attach import attach


class SelectorArgs:
    """Takes `selector` and `keep_ratio` out of the model args, lets the lmms-eval wrapper load, then attaches."""

    model_name = ""

    def __init__(self, selector: str | None = None, keep_ratio: float | None = None, **model_args: Any) -> None:
        if selector is None:
            raise AlvtsError(f"{self.model_name} needs a selector artifact: add selector=PATH to --model_args")
        artifact = load_selector(selector)  # a bad path fails before the checkpoint loads
        super().__init__(**model_args)
        attach(self.model, artifact, keep_ratio=None if keep_ratio is None else float(keep_ratio))
        ratios = "the artifact's keep ratios" if keep_ratio is None else f"keep ratio {float(keep_ratio):g}"
        logger.info(f"{self.model_name}: attached {selector} to {len(artifact.layers)} decoder layers at {ratios}")


class AlvtsLlavaHf(SelectorArgs, LlavaHf):
    """lmms-eval's `llava_hf` (LLaVA-1.5 and LLaVA-NeXT) with a selector, generating a batch of requests at once.

    Prompts follow llava_hf's rules: image tokens go before a context without any, then the `chat_template` model
    arg, the tokenizer's template or lmms-eval's Vicuna template. With `device=cpu` the model also loads with
    `device_map=cpu`, which lmms-eval's multi-process mode needs to give each process a CPU copy (without a
    device_map it places process i on cuda:i).
    """

    model_name = "alvts_llava_hf"

    def __init__(self, selector: str | None = None, keep_ratio: float | None = None, **model_args: Any) -> None:
        if model_args.get("device") == "cpu" and not model_args.get("device_map"):
            model_args["device_map"] = "cpu"
        super().__init__(selector, keep_ratio, **model_args)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, with a temperature) answers to `requests`, `batch_size` at a time, longest first."""
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(self.tok_encode(args[0])), args[0]),
            grouping=True,
        )
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
            visuals = [
                visual(self.task_dict[task][split][doc_id])
                for visual, doc_id, task, split in zip(doc_to_visual, doc_ids, tasks, splits, strict=True)
            ]
            batch = self._generate(list(contexts), visuals, dict(all_kwargs[0]))
            for context, answer in zip(contexts, batch, strict=True):
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), answer)
            answers.extend(batch)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(answers)

    def _generate(self, contexts: list[str], visuals: list[list[Any]], gen_kwargs: dict[str, Any]) -> list[str]:
        """One padded batch: the decoded continuations, cut at the first stop string."""
        images = [image for row in visuals for image in row]
        if any(not isinstance(image, Image.Image) for image in images):
            raise AlvtsError(f"{self.model_name} evaluates image tasks; this task gives videos or other inputs")
        texts = [self._prompt(context, len(row)) for context, row in zip(contexts, visuals, strict=True)]
        inputs = self._image_processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self._device, self.model.dtype)
        until = gen_kwargs.pop("until", None) or [self.tok_decode(self.eot_token_id)]
        temperature = gen_kwargs.get("temperature", 0)
        sampling = temperature > 0
        output = self.model.generate(
            **inputs, do_sample=sampling, temperature=temperature if sampling else None,
            top_p=gen_kwargs.get("top_p") if sampling else None, num_beams=gen_kwargs.get("num_beams", 1),
            max_new_tokens=gen_kwargs.get("max_new_tokens", 1024), use_cache=self.use_cache,
            pad_token_id=self.eot_token_id if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id,
            eos_token_id=self.eot_token_id,
        )
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        stops = [until] if isinstance(until, str) else until
        return [_cut(text, stops) for text in texts]

    def _prompt(self, context: str, images: int) -> str:
        """The chat-templated prompt for one request with `images` images."""
        if images and DEFAULT_IMAGE_TOKEN not in context:
            context = " ".join([DEFAULT_IMAGE_TOKEN] * images) + "\n" + context
        template = self.chat_template or self.tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": context}], chat_template=template, tokenize=False, add_generation_prompt=True
        )


class AlvtsQwen2_5_VL(SelectorArgs, Qwen2_5_VL):  # noqa: N801 (lmms-eval's class name)
    """lmms-eval's `qwen2_5_vl` with a selector (its own generation already batches requests)."""

    model_name = "alvts_qwen2_5_vl"


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
