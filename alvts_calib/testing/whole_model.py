"""The whole model routed per sample and budget, vision tower included: what the sensitivity measurement and the
joint refinement computed before they reused each sample's captured decoder input, kept for the tests to compare
against."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..artifact.config import SkippedKeys, SkippedUpdate
from ..artifact.selector import Selector
from ..calibration.capture import input_device, move
from ..calibration.sensitivity import mean_block_divergence
from ..model.visual import visual_positions
from ..runtime.attach import attach_policies, detach
from ..runtime.policies import LayerPolicy


def _repeated(sample: Mapping[str, Any], times: int) -> dict[str, Any]:
    """The sample's batch repeated `times` times along dim 0 (images and their metadata with it)."""
    return {key: value.repeat(times, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) else value
            for key, value in sample.items()}


def _last_log_probs(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """(B, V) float32 log-probabilities of the next token after each row's last valid position."""
    mask = inputs.get("attention_mask")
    if mask is None or bool(mask[:, -1].all()):
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
    else:
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        logits = model(**inputs, use_cache=False).logits[torch.arange(mask.shape[0]), last]
    return logits.float().log_softmax(-1)


PreparedSample = tuple[dict[str, Any], torch.Tensor | None, torch.Tensor]


def prepare_samples(model: nn.Module, samples: list[Mapping[str, Any]]) -> list[PreparedSample]:
    """Per sample: its model inputs, its explicit visual mask (or None) and the unrouted model's next-token
    log-probabilities (kept on the CPU), for comparing routed runs against."""
    device = input_device(model)
    prepared = []
    with torch.no_grad():
        for sample in samples:
            inputs = dict(sample)
            explicit = inputs.pop("visual_mask", None)
            mask = None if explicit is None else torch.as_tensor(explicit).bool()
            prepared.append((inputs, mask, _last_log_probs(model, move(inputs, device)).cpu()))
    return prepared


def swept_divergence(
    model: nn.Module,
    prepared: list[PreparedSample],
    policies: Mapping[int, LayerPolicy],
    blocks: int,
    selector: Selector,
    skipped_update: SkippedUpdate,
) -> torch.Tensor:
    """(blocks,) float64 mean KL(unrouted || routed) of the next token over `prepared` samples, each repeated once
    per block, with `policies` attached (pooled skipped keys, `skipped_update`); sweep policies
    (`BudgetSweepPolicy`) give each block of rows its own budget."""
    attach_policies(model, dict(policies), selector=selector, skipped_update=skipped_update,
                    skipped_keys=SkippedKeys.POOL)
    try:
        return mean_block_divergence(
            ((reference, routed_log_probs(model, inputs, mask, blocks)) for inputs, mask, reference in prepared), blocks
        )
    finally:
        detach(model)


def routed_log_probs(
    model: nn.Module, inputs: dict[str, Any], mask: torch.Tensor | None, times: int = 1
) -> torch.Tensor:
    """The attached model's next-token log-probabilities (on the CPU) for a prepared sample's inputs, repeated
    `times` times along the batch (one copy per row of a budget sweep)."""
    routing = nullcontext() if mask is None else visual_positions(model, mask.repeat(times, 1))
    with torch.no_grad(), routing:
        return _last_log_probs(model, move(_repeated(inputs, times), input_device(model))).cpu()
