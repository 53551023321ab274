"""How much the model's answer moves when one layer is routed: the measurement behind the "sensitivity" budget.

After the selectors are solved, calibration routes one layer at a time, with the toolkit's runtime (the layer's
selector, the pooled stand-in counted in the budget, the default skipped update), at a grid of budgets, and
records the mean KL divergence of the next-token distribution at each sample's last position from the unrouted
model's. The grid's budgets run as the rows of one batch: each sample is repeated once per budget.
`budgets.min_damage` then spreads a total over layers so that the summed divergence is smallest.

What a layer's update statistics cannot show, this sees directly: on the demo model the copies of a trained layer
barely change the hidden states, yet together they read the image's rows (docs/DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..artifact.config import SkippedKeys, SkippedUpdate
from ..artifact.selector import Selector
from ..model.adapters import decoder_layers, get_adapter
from ..model.devices import execution_device
from ..model.visual import VisualTracker, visual_positions
from ..progress import counting
from ..runtime.attach import attach_policies, detach
from ..runtime.context import ForwardContext, PassCounts
from ..runtime.policies import LayerPolicy, selector_scores
from ..runtime.routing import CONTEXT_KWARG, RoutedLayerMixin
from ..selector.importance import Importance, top_count_mask
from ..selector.layer import LayerSelector
from ..tokens import keep_count, selected_beside_stand_in
from .capture import CapturedBatch, capture_layer_inputs, input_device, move

SENSITIVITY_SAMPLES = 64  # calibration samples the measurement uses by default (0: do not measure)


class BudgetSweepPolicy(LayerPolicy):
    """The calibrated selector at K budgets at once, for measuring sensitivity: the batch is K equal blocks of rows
    (a sample repeated K times) and block j processes ceil(fractions[j] * n) of a row's n visual tokens, a pooled
    stand-in counting as one of them."""

    def __init__(self, selector: LayerSelector, fractions: torch.Tensor, importance: Importance):
        self.selector = selector
        self.fractions = fractions.double()  # (K,)
        self.importance = importance

    def select(self, layer, normed, context, cos, sin):
        scores = selector_scores(self.selector, normed, context, cos, sin, self.importance)
        candidates = context.visual & context.valid
        count = candidates.sum(-1)
        per_row = self.fractions.to(count.device).repeat_interleave(count.shape[0] // self.fractions.numel())
        budget = keep_count(count, per_row)
        return top_count_mask(scores, candidates, selected_beside_stand_in(budget, count))

    def to(self, device, dtype):
        self.selector = self.selector.to(device=device, dtype=dtype)
        return self



def budget_grid(visual_tokens: int) -> list[int]:
    """Budgets (tokens per layer, a stand-in included) at which sensitivity is measured: 0, 2, 3, 4, 6, 8, 12, ...
    (powers of two and 1.5 times them) below `visual_tokens`, and `visual_tokens` itself."""
    grid, power = [0], 2
    while power < visual_tokens:
        grid += [value for value in (power, power * 3 // 2) if value < visual_tokens and value not in grid]
        power *= 2
    return [*grid, visual_tokens]


def _repeated(sample: Mapping[str, Any], times: int) -> dict[str, Any]:
    """The sample's batch repeated `times` times along dim 0 (images and their metadata with it)."""
    return {key: value.repeat(times, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) else value
            for key, value in sample.items()}


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(N,) KL(reference || other) between rows of log-probabilities (N, V)."""
    return (reference.exp() * (reference - other)).sum(-1)


def _last_log_probs(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """(B, V) float32 log-probabilities of the next token after each row's last valid position."""
    mask = inputs.get("attention_mask")
    if mask is None or bool(mask[:, -1].all()):
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
    else:
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        logits = model(**inputs, use_cache=False).logits[torch.arange(mask.shape[0]), last]
    return logits.float().log_softmax(-1)


def measure_sensitivity(
    model: nn.Module,
    samples: list[Mapping[str, Any]],
    selector: Selector,
    grid: list[int],
    visual_tokens: int,
    skipped_update: SkippedUpdate = SkippedUpdate.NONE,
    progress: bool = True,
    done: Mapping[int, torch.Tensor] | None = None,
    on_layer: Callable[[int, torch.Tensor], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Per layer of `selector`, the (len(grid),) float64 mean KL(unrouted || routed) of the next token when only
    that layer is routed, with pooled skipped keys and `skipped_update`, at each budget of `grid` (tokens at the
    reference count `visual_tokens`; other counts scale).

    Layer i's routing cannot change what layers before it compute, so each sample's input to decoder layer 0 is
    captured once (the vision tower runs once per sample), pushed through the unrouted layers one at a time, and
    layer i's sweep runs only layers i onward. Layers in `done` are not measured again; `on_layer(index, damage)` is
    called after each measured layer (for checkpoints).
    """
    damage = dict(done or {})
    todo = [index for index in sorted(selector.layers) if index not in damage]
    if not todo:
        return damage
    fractions = torch.tensor(grid, dtype=torch.float64) / visual_tokens
    captured = capture_samples(model, samples)
    references = [tail_log_probs(model, batch, 0).cpu() for batch in captured]
    layers = decoder_layers(model)
    with counting("measuring sensitivity", todo[-1] + 1, enabled=progress) as advance:
        for index in range(todo[-1] + 1):
            if index in todo:
                policy = BudgetSweepPolicy(selector.layers[index], fractions, selector.importance)
                attach_policies(model, {index: policy}, selector=selector, skipped_update=skipped_update,
                                skipped_keys=SkippedKeys.POOL)
                try:
                    damage[index] = _tail_divergence(model, captured, references, index, len(grid))
                finally:
                    detach(model)
                if on_layer is not None:
                    on_layer(index, damage[index])
            if index < todo[-1]:
                for batch in captured:
                    batch.hidden = run_layer(layers[index], batch.hidden, batch.layer_kwargs)
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


def _tail_divergence(
    model: nn.Module, captured: list[CapturedBatch], references: list[torch.Tensor], index: int, blocks: int
) -> torch.Tensor:
    """(blocks,) float64 mean KL(unrouted || routed) over the captured samples, each repeated once per block, with
    layer `index` routed by the attached sweep policy and layers from `index` on run."""
    total, count = torch.zeros(blocks, dtype=torch.float64), 0
    for batch, reference in zip(captured, references, strict=True):
        routed = tail_log_probs(model, batch, index, blocks).cpu()
        rows = reference.shape[0]
        divergence = kl_divergence(reference.repeat(blocks, 1), routed).clamp(min=0).double()
        total += divergence.view(blocks, rows).sum(1)
        count += rows
    return total / max(count, 1)


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
    total, count = torch.zeros(blocks, dtype=torch.float64), 0
    try:
        for inputs, mask, reference in prepared:
            routed = routed_log_probs(model, inputs, mask, blocks)
            rows = reference.shape[0]
            divergence = kl_divergence(reference.repeat(blocks, 1), routed).clamp(min=0).double()
            total += divergence.view(blocks, rows).sum(1)
            count += rows
    finally:
        detach(model)
    return total / max(count, 1)


def routed_log_probs(
    model: nn.Module, inputs: dict[str, Any], mask: torch.Tensor | None, times: int = 1
) -> torch.Tensor:
    """The attached model's next-token log-probabilities (on the CPU) for a prepared sample's inputs, repeated
    `times` times along the batch (one copy per row of a budget sweep)."""
    routing = nullcontext() if mask is None else visual_positions(model, mask.repeat(times, 1))
    with torch.no_grad(), routing:
        return _last_log_probs(model, move(_repeated(inputs, times), input_device(model))).cpu()
