"""How far a routed model's continuation drifts from the full model's: the measure behind the real-weight evaluation.

For each prompt, the unpatched model writes a greedy continuation; every method then reads the same prompt and
continuation teacher-forced, as it would decode it (one prefill that routes the visual span, then the continuation
against the cache), and is scored by the KL divergence of the full model's next-token distributions from its own
and by how often its top token agrees, at every continuation position. No labels are needed, so any language model
reading a span of real text as if it were an image (`visual_positions`) is an evaluation surface.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..artifact.config import SkippedUpdate
from ..calibration.capture import input_device
from ..calibration.sensitivity import kl_divergence
from ..errors import AlvtsError
from ..model.adapters import AttentionGeometry
from ..model.visual import visual_positions
from ..runtime.attach import attach_policies, detach, last_visual_pass
from ..runtime.policies import KeepAllPolicy
from .costs import full_prefill_flops, pass_costs, update_ranks
from .plans import Plan


@dataclass
class Reference:
    """One prompt, its visual span and the full model's greedy continuation with its log-probabilities."""

    input_ids: torch.Tensor  # (1, L)
    span: torch.Tensor  # (1, L) bool: the positions routed as visual
    continuation: torch.Tensor  # (1, T) the full model's greedy tokens
    log_probs: torch.Tensor  # (T, V) float32 on the CPU: the full model's next-token log-probabilities


def full_references(model: nn.Module, samples: list[Mapping[str, Any]], new_tokens: int) -> list[Reference]:
    """The unpatched model's greedy `new_tokens` continuation of each sample (input_ids and a `visual_mask`, one row
    each) and its log-probabilities at every continuation position."""
    if new_tokens < 1:
        raise AlvtsError(f"the continuation needs at least one token, got {new_tokens}")
    references = []
    device = input_device(model)
    with torch.no_grad():
        for sample in samples:
            input_ids = torch.as_tensor(sample["input_ids"])
            span = torch.as_tensor(sample["visual_mask"]).bool()
            if input_ids.shape[0] != 1 or span.shape != input_ids.shape:
                raise AlvtsError("each sample must be one row of input_ids with a visual_mask of the same shape")
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
            )
            continuation = output[:, input_ids.shape[1]:].cpu()
            reference = Reference(input_ids, span, continuation, torch.empty(0))
            reference.log_probs = _continuation_log_probs(model, reference)
            references.append(reference)
    return references


def _continuation_log_probs(model: nn.Module, reference: Reference) -> torch.Tensor:
    """(T, V) log-probabilities of the next token after the prompt and after each continuation token but the last,
    as decoding computes them: a prefill of the prompt, then the continuation against its cache."""
    device = input_device(model)
    prompt = reference.input_ids.to(device)
    rest = reference.continuation[:, :-1].to(device)
    with torch.no_grad():
        prefill = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True, logits_to_keep=1)
        logits = [prefill.logits[0, -1:]]
        if rest.shape[1]:
            mask = torch.ones(1, prompt.shape[1] + rest.shape[1], dtype=torch.long, device=device)
            step = model(input_ids=rest, attention_mask=mask, cache=prefill.past_key_values, use_cache=True)
            logits.append(step.logits[0])
    return torch.cat(logits).float().log_softmax(-1).cpu()


@dataclass
class DivergenceResult:
    """One method at one budget (compression None: the full model against itself)."""

    method: str
    compression: float | None
    kl: float  # mean KL(full || method) over continuation positions and prompts
    top1: float  # share of continuation positions where the method's top token is the full model's
    kl_per_prompt: list[float]
    visual_tokens_per_layer: list[float]  # measured mean over prompts, at prefill
    runtime: dict[str, str] = field(default_factory=dict)  # skipped keys and update of the run
    flops_ratio: float = 1.0  # mean prefill FLOPs over the full model's, selection and skipped updates included

    @property
    def mean_visual_tokens(self) -> float:
        return statistics.fmean(self.visual_tokens_per_layer)


def measure_plan(
    model: nn.Module,
    references: list[Reference],
    plan: Plan,
    label: str,
    compression: float,
    *,
    skipped_update: SkippedUpdate | str = SkippedUpdate.NONE,
    selector=None,
) -> DivergenceResult:
    """Attach `plan` (layers it leaves out keep every token), decode every reference teacher-forced, detach."""
    num_layers = len(plan.planned_tokens)
    policies = {index: plan.policies.get(index, KeepAllPolicy()) for index in range(num_layers)}
    skipped_update = plan.skipped_update(SkippedUpdate(skipped_update))
    attach_policies(model, policies, selector=selector, skipped_update=skipped_update,
                    skipped_keys=plan.skipped_keys)
    geometry = AttentionGeometry.of(model)
    intermediate = model.config.get_text_config(decoder=True).intermediate_size
    ranks = update_ranks(selector, policies, plan.skipped_keys, skipped_update)
    kls, agreements, tokens, flops_ratios = [], [], [], []
    try:
        for reference in references:
            with visual_positions(model, reference.span.to(input_device(model))):
                log_probs = _continuation_log_probs(model, reference)
            context = last_visual_pass(model)
            if context is None:
                raise AlvtsError("the model saw no visual tokens: check the samples' visual_mask")
            costs = pass_costs(context, policies, ranks, plan.skipped_keys, geometry, intermediate)
            tokens.append(costs.tokens[0].float().tolist())
            ratio = costs.flops[0] / full_prefill_flops(reference.input_ids.shape[1], geometry, intermediate)
            exact = skipped_update is SkippedUpdate.EXACT  # which also runs every layer unrouted
            flops_ratios.append(1.0 + ratio if exact else ratio)
            kls.append(float(kl_divergence(reference.log_probs, log_probs).clamp(min=0).mean()))
            agreements.append(float((reference.log_probs.argmax(-1) == log_probs.argmax(-1)).float().mean()))
    finally:
        detach(model)
    per_layer = torch.tensor(tokens).mean(0).tolist()
    runtime = {"skipped_keys": plan.skipped_keys.value, "skipped_update": skipped_update.value}
    return DivergenceResult(label, compression, statistics.fmean(kls), statistics.fmean(agreements), kls, per_layer,
                            runtime, statistics.fmean(flops_ratios))


def result_row(result: DivergenceResult, num_visual: int) -> dict[str, Any]:
    """A flat dict of `result` with its measured compression at the reference span length `num_visual`."""
    return {**asdict(result), "measured_compression": 1.0 - result.mean_visual_tokens / num_visual}
