"""How much the model's answer moves when one layer is routed: the measurement behind the "sensitivity" budget.

After the selectors are solved, calibration routes one layer at a time, with the toolkit's runtime (the layer's
selector, the pooled stand-in counted in the budget, the default skipped update), at a grid of budgets, and
records the mean KL divergence of the next-token distribution at each sample's last position from the unrouted
model's. A layer's budgets run as the rows of one batch: each sample is repeated once per budget. Which budgets each
layer is measured at: `sweep_grid`.
`budgets.min_damage` then spreads a total over layers so that the summed divergence is smallest.

What a layer's update statistics cannot show, this sees directly: on the demo model the copies of a trained layer
barely change the hidden states, yet together they read the image's rows (docs/DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..artifact.config import SkippedKeys, SkippedUpdate
from ..artifact.selector import Selector
from ..model.adapters import decoder_layers, get_adapter
from ..model.devices import execution_device
from ..model.visual import VisualTracker
from ..progress import counting
from ..runtime.attach import attach_policies, detach
from ..runtime.context import ForwardContext, PassCounts
from ..runtime.policies import LayerPolicy, SelectorScoring
from ..runtime.routing import CONTEXT_KWARG, RoutedLayerMixin
from ..selector.importance import Importance, top_count_mask
from ..selector.layer import LayerSelector
from ..tokens import keep_count, selected_beside_stand_in
from .capture import CapturedBatch, capture_layer_inputs, move

SENSITIVITY_SAMPLES = 64  # calibration samples the measurement uses by default (0: do not measure)


class BudgetSweepPolicy(SelectorScoring, LayerPolicy):
    """The calibrated selector at K budgets at once, for measuring sensitivity: the batch is K equal blocks of rows
    (a sample repeated K times) and block j processes ceil(fractions[j] * n) of a row's n visual tokens, a pooled
    stand-in counting as one of them."""

    def __init__(self, selector: LayerSelector, fractions: torch.Tensor, importance: Importance):
        self.selector = selector
        self.fractions = fractions.double()  # (K,)
        self.importance = importance

    def select(self, layer, normed, context, cos, sin):
        scores = self.scores(normed, context, cos, sin)
        candidates = context.visual & context.valid
        count = candidates.sum(-1)
        per_row = self.fractions.to(count.device).repeat_interleave(count.shape[0] // self.fractions.numel())
        budget = keep_count(count, per_row)
        return top_count_mask(scores, candidates, selected_beside_stand_in(budget, count))



def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(N,) KL(reference || other) between rows of log-probabilities (N, V)."""
    return (reference.exp() * (reference - other)).sum(-1)


@dataclass(frozen=True)
class SweepInputs:
    """What every sweep starts from: each sample's input to decoder layer 0 (the vision tower run once) and the
    unrouted model's next-token log-probabilities for it, on the CPU."""

    captured: list[CapturedBatch]
    references: list[torch.Tensor]

    def layer_zero(self) -> list[CapturedBatch]:
        """Copies of the captured batches that a walk through the layers may advance (the tensors are shared)."""
        return [replace(batch) for batch in self.captured]


def sweep_inputs(model: nn.Module, samples: list[Mapping[str, Any]]) -> SweepInputs:
    """`SweepInputs` of `samples` (one pass up to decoder layer 0 and one through the decoder per sample)."""
    captured = capture_samples(model, samples)
    return SweepInputs(captured, [tail_log_probs(model, batch, 0).cpu() for batch in captured])


def measure_sensitivity(
    model: nn.Module,
    samples: list[Mapping[str, Any]] | SweepInputs,
    selector: Selector,
    grid: Sequence[int] | Mapping[int, Sequence[int]],
    visual_tokens: int,
    skipped_update: SkippedUpdate = SkippedUpdate.NONE,
    progress: bool = True,
    done: Mapping[int, torch.Tensor] | None = None,
    on_layer: Callable[[int, torch.Tensor], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Per layer of `selector`, the float64 mean KL(unrouted || routed) of the next token when only that layer is
    routed, with pooled skipped keys and `skipped_update`, at each budget of `grid` (tokens at the reference count
    `visual_tokens`; other counts scale): the same budgets for every layer, or per layer (layer -> budgets; a layer
    without budgets is not measured).

    Layer i's routing cannot change what layers before it compute, so each sample's input to decoder layer 0 is
    captured once (the vision tower runs once per sample; give `SweepInputs` to share it between calls), pushed
    through the unrouted layers one at a time, and layer i's sweep runs only layers i onward. Layers in `done` are
    not measured again; `on_layer(index, damage)` is called after each measured layer (for checkpoints).
    """
    damage = dict(done or {})
    budgets = grid if isinstance(grid, Mapping) else dict.fromkeys(selector.layers, grid)
    todo = [index for index in sorted(selector.layers) if index not in damage and budgets.get(index)]
    if not todo:
        return damage
    inputs = samples if isinstance(samples, SweepInputs) else sweep_inputs(model, samples)
    captured, references = inputs.layer_zero(), inputs.references
    layers = decoder_layers(model)
    with counting("measuring sensitivity", todo[-1] + 1, enabled=progress) as advance:
        for index in range(todo[-1] + 1):
            if index in todo:
                fractions = torch.tensor(budgets[index], dtype=torch.float64) / visual_tokens
                policy = BudgetSweepPolicy(selector.layers[index], fractions, selector.importance)
                damage[index] = routed_divergence(model, captured, references, {index: policy}, len(fractions),
                                                  selector, skipped_update)
                if on_layer is not None:
                    on_layer(index, damage[index])
            if index < todo[-1]:
                advance_batches(layers[index], captured)
            advance()
    return damage


def capture_samples(model: nn.Module, samples: list[Mapping[str, Any]]) -> list[CapturedBatch]:
    """What decoder layer 0 receives for each sample (its explicit visual mask included), kept on the CPU."""
    tracker = VisualTracker(model, get_adapter(model))
    tracker.install()
    try:
        return [capture_layer_inputs(model, sample, tracker, "cpu") for sample in samples]
    finally:
        tracker.remove()


def run_layer(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict[str, Any], **extra: Any) -> torch.Tensor:
    """`layer`'s output for `hidden` (moved to its device), with the captured keyword arguments and `extra`."""
    device = execution_device(layer)
    output = layer(hidden.to(device), **move(layer_kwargs, device), **extra)
    return output[0] if isinstance(output, tuple) else output


def advance_batches(layer: nn.Module, captured: list[CapturedBatch]) -> None:
    """Replace each batch's input by the unrouted `layer`'s output (the input to the next layer)."""
    with torch.no_grad():
        for batch in captured:
            batch.hidden = run_layer(layer, batch.hidden, batch.layer_kwargs)


def _repeat_batch(value: Any, batch: int, times: int) -> Any:
    """`value` with every tensor whose first dimension is the batch repeated `times` times along it (tensors that
    broadcast over the batch stay as they are)."""
    if isinstance(value, torch.Tensor):
        return value.repeat(times, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple | list):
        return type(value)(_repeat_batch(item, batch, times) for item in value)
    if isinstance(value, dict):
        return {key: _repeat_batch(item, batch, times) for key, item in value.items()}
    return value


def tail_log_probs(model: nn.Module, batch: CapturedBatch, start: int, times: int = 1) -> torch.Tensor:
    """(B x times, V) float32 next-token log-probabilities after each row's last valid position, running decoder
    layers `start` onward on `batch`'s input to layer `start`, repeated `times` times along the batch (one copy per
    block of a budget sweep). A routed layer `start` gets its routing context here."""
    rows = batch.hidden.shape[0]
    kwargs = _repeat_batch(batch.layer_kwargs, rows, times)
    hidden = batch.hidden.repeat(times, 1, 1)
    visual, valid = batch.visual.repeat(times, 1), batch.valid.repeat(times, 1)
    context = ForwardContext(visual=visual, valid=valid, counts=PassCounts.of(visual, valid))
    layers = decoder_layers(model)
    with torch.no_grad():
        for index in range(start, len(layers)):
            extra = {CONTEXT_KWARG: context} if isinstance(layers[index], RoutedLayerMixin) else {}
            hidden = run_layer(layers[index], hidden, kwargs, **extra)
        last = valid.shape[1] - 1 - valid.flip(1).long().argmax(1)
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
        norm = get_adapter(model).text_model(model).norm
        final = norm(final.to(execution_device(norm)))
        head = model.get_output_embeddings()
        return head(final.to(execution_device(head))).float().log_softmax(-1)


def routed_divergence(
    model: nn.Module,
    captured: list[CapturedBatch],
    references: list[torch.Tensor],
    policies: Mapping[int, LayerPolicy],
    blocks: int,
    selector: Selector,
    skipped_update: SkippedUpdate,
) -> torch.Tensor:
    """(blocks,) float64 mean KL(unrouted || routed) over the captured samples, each repeated once per block, with
    `policies` attached (pooled skipped keys, `skipped_update`; sweep policies give each block its own budget) and
    the layers from the first routed one on run; `captured` holds the input to that layer."""
    start = min(policies)
    attach_policies(model, dict(policies), selector=selector, skipped_update=skipped_update,
                    skipped_keys=SkippedKeys.POOL)
    try:
        return mean_block_divergence(
            ((reference, tail_log_probs(model, batch, start, blocks).cpu())
             for batch, reference in zip(captured, references, strict=True)),
            blocks,
        )
    finally:
        detach(model)


def mean_block_divergence(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], blocks: int) -> torch.Tensor:
    """(blocks,) float64 mean KL(reference || routed) over (reference (N, V), routed (N x blocks, V)) pairs of
    log-probabilities, the routed rows being `blocks` copies of the reference rows."""
    total, count = torch.zeros(blocks, dtype=torch.float64), 0
    for reference, routed in pairs:
        rows = reference.shape[0]
        divergence = kl_divergence(reference.repeat(blocks, 1), routed).clamp(min=0).double()
        total += divergence.view(blocks, rows).sum(1)
        count += rows
    return total / max(count, 1)
