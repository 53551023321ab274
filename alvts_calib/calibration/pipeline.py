"""`calibrate`: gather full-attention importance per decoder layer and solve each layer's selector.

Layers are processed one at a time: every sample's input to the current layer is kept (on `storage`),
the layer's selector is solved, then the samples are pushed through the unmodified layer. Memory is one
layer's activations for the calibration set. Each finished layer is checkpointed, so an interrupted run
resumes from its last finished layer with identical results.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifact.budgets import Budget, LayerStatistics, UpdateTally, allocate, coverage_curves, visual_attention_share
from ..artifact.calibration import Calibration, LayerResult, load_calibration
from ..artifact.config import SkippedKeys, SkippedUpdate, default_skipped_update
from ..artifact.export import calibrated_layers, tokens_per_layer_at
from ..artifact.selector import Selector
from ..errors import AlvtsError, SampleError
from ..model.adapters import AttentionGeometry, decoder_layers, get_adapter
from ..model.devices import execution_device, materialized
from ..model.fingerprint import model_fingerprint
from ..model.visual import VisualTracker
from ..options import (
    DEFAULT_START_LAYER,
    check_keep_ratio,
    check_skip_update_rank,
    parse_choice,
)
from ..progress import note, phase, track
from ..selector.importance import DEFAULT_IMPORTANCE, Importance, attention_parts, importance_from_parts
from ..selector.layer import LayerSelector
from ..selector.layer_attention import layer_queries_keys
from ..selector.skip_map import UpdateMoments, default_skip_update_rank, fit_update, row_centred
from ..selector.solver import Init, LayerBatch, refine, rope_svd_init, second_moment
from ..tokens import check_compression
from ..version import __version__
from .capture import CapturedBatch, capture_layer_inputs, data_digest, move, sample_length
from .joint_search import REFINE_EVALUATIONS, refine_budget
from .sensitivity import SENSITIVITY_SAMPLES, SweepInputs, measure_sensitivity, sweep_inputs
from .sweep_grid import GRID_COMPRESSIONS, next_round

HELDOUT_FRACTION = 0.125  # share of samples kept out of the fit to measure fidelity
REPORT_KEEP_RATIO = 0.11  # the keep ratio at which calibration reports fidelity
REFINE_STEPS = 200  # importance-consistency refinement steps per layer (docs/DESIGN.md)
MIN_DEFAULT_RANK = 256  # the default selector rank is two heads, and at least this many dimensions


@dataclass(frozen=True)
class CalibrationOptions:
    """Settings that determine the result; a checkpoint resumes only under identical options."""

    rank: int
    start_layer: int
    importance: str
    init: str
    refine_steps: int
    heldout_fraction: float
    report_keep_ratio: float
    seed: int
    skip_update_rank: int
    sensitivity_samples: int


def _layer_batches(
    layer: nn.Module, captured: list[CapturedBatch], geometry: AttentionGeometry, definition: Importance
) -> tuple[list[LayerBatch], LayerStatistics]:
    """The layer's normed inputs and full-attention importance for every calibration batch, and its budget
    statistics over all of them."""
    device = layer.self_attn.q_proj.weight.device
    batches, curves, shares = [], [], []
    with torch.no_grad():
        for batch in captured:
            hidden = batch.hidden.to(device)
            cos, sin = move(batch.position_embeddings, device)
            visual, valid = batch.visual.to(device), batch.valid.to(device)
            normed = layer.input_layernorm(hidden)
            queries, keys = layer_queries_keys(layer, normed, cos, sin, geometry.head_dim)
            parts = attention_parts(queries, keys, visual, valid, definition)
            target = importance_from_parts(parts)
            curves.append(coverage_curves(target, visual))
            shares.append(visual_attention_share(parts, visual))
            batches.append(LayerBatch(normed.float(), cos.float(), sin.float(), visual, valid, target))
    budget = LayerStatistics(coverage=torch.cat(curves).mean(0), visual_share=float(torch.cat(shares).mean()))
    return batches, budget


def _heldout_statistics(
    selector: LayerSelector, batches: list[LayerBatch], definition: Importance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selector parts (P, G, N) and targets (N,) over all held-out visual tokens, row by row."""
    parts, targets = [], []
    with torch.no_grad():
        for batch in batches:
            batch_parts = selector.parts(batch.normed, batch.cos, batch.sin, batch.visual, batch.valid, definition)
            for row in range(batch.normed.shape[0]):
                parts.append(batch_parts[row][..., batch.visual[row]].cpu())
                targets.append(batch.target[row][batch.visual[row]].cpu())
    return torch.cat(parts, dim=-1), torch.cat(targets)


def _solve_layer(
    layer: nn.Module,
    index: int,
    captured: list[CapturedBatch],
    heldout: list[int],
    geometry: AttentionGeometry,
    options: CalibrationOptions,
) -> LayerResult:
    definition = Importance(options.importance)
    batches, budget = _layer_batches(layer, captured, geometry, definition)
    train = [b for i, b in enumerate(batches) if i not in heldout] or batches
    held = [batches[i] for i in heldout]
    moment = second_moment(train) if Init(options.init) is Init.DATA_SVD else None
    tensors = rope_svd_init(
        layer.self_attn, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim,
        options.rank // geometry.head_dim, moment,
    )
    device = layer.self_attn.q_proj.weight.device
    selector = LayerSelector.from_tensors(tensors, geometry.head_dim).to(device=device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(options.seed * 100_003 + index)
    loss_init, loss_refined = refine(selector, train, definition, options.refine_steps, generator)
    parts, target = _heldout_statistics(selector, held, definition)
    state = {name: tensor.detach().cpu().clone() for name, tensor in selector.state_dict().items()}
    stats = {"loss_init": loss_init, "loss_refined": loss_refined}
    return LayerResult(selector=state, heldout_parts=parts, heldout_target=target, stats=stats, budget=budget)


def _propagate(
    layer: nn.Module,
    captured: list[CapturedBatch],
    moments: UpdateMoments | None = None,
    tally: UpdateTally | None = None,
) -> None:
    """Replace every batch's hidden states by the unmodified layer's output; with `moments`, also accumulate
    the visual tokens' normed inputs and updates there, each minus its row's mean over visual tokens; with
    `tally`, the relative size of the layer's updates (for budgets)."""
    device = execution_device(layer)
    with torch.no_grad():
        for batch in captured:
            hidden = batch.hidden.to(device)
            output = layer(hidden, **move(batch.layer_kwargs, device))
            output = output[0] if isinstance(output, tuple) else output
            if tally is not None:
                tally.add(hidden, output, batch.visual.to(device), batch.valid.to(device))
            if moments is not None:
                tokens = (batch.visual & batch.valid).to(device)
                normed = layer.input_layernorm(hidden)
                moments.add(*(row_centred(values, tokens) for values in (normed, output - hidden)))
            batch.hidden = output.to(batch.hidden.device)


def _propagate_routed(
    layer: nn.Module, captured: list[CapturedBatch], result: LayerResult, skip_update_rank: int, last: bool
) -> None:
    """Propagate through a routed `layer`, recording in `result` the size of its updates (for budgets) and, with
    `skip_update_rank`, its fitted skipped-token update (see `selector.skip_map`)."""
    moments = UpdateMoments.empty(layer.self_attn.q_proj.in_features) if skip_update_rank else None
    tally = UpdateTally()
    _propagate(layer, captured, moments, tally)
    result.budget = replace(result.budget, updates=tally.result(read_later=not last))
    if moments is not None:
        with phase("skip-map fit"):
            fitted = fit_update(moments, skip_update_rank)
        result.skip_update = fitted.tensors
        result.stats["skip_update_explained"] = fitted.explained


def _heldout_indices(count: int, fraction: float) -> list[int]:
    if count < 2:
        return list(range(count))  # too few samples: fidelity is measured on the training sample
    held = min(count - 1, max(1, round(count * fraction)))
    return list(range(count - held, count))


IDENTITY_NAMES = {"fingerprint": "a different model", "data_sha256": "different calibration data"}


def _resume(
    checkpoint: Path | None, identity: dict[str, Any], progress: bool
) -> tuple[dict[int, LayerResult], dict[str, Any]]:
    """The finished layers and refined splits of a checkpoint made with the same identity (none without one)."""
    if checkpoint is None or not checkpoint.exists():
        return {}, {}
    previous = load_calibration(checkpoint)
    for key, value in identity.items():
        stored = previous.metadata.get(key)
        if stored != value:
            changed = [f"{name} {stored[name]!r} there, {value[name]!r} now" for name in value
                       if stored.get(name) != value[name]] if key == "options" else []
            what = f"different options ({'; '.join(changed)})" if changed else IDENTITY_NAMES[key]
            raise AlvtsError(
                f"checkpoint {checkpoint} was made with {what}; to start over delete it (`alvts calibrate "
                "--no-resume` does), or choose another output path"
            )
    note(f"resuming from {checkpoint}: {len(previous.layers)} layer(s) already calibrated", progress)
    return previous.layers, previous.metadata.get("refined_budgets", {})


def _capture(
    model: nn.Module, samples: list[Mapping[str, Any]], tracker: VisualTracker, storage: torch.device | str,
    progress: bool,
) -> list[CapturedBatch]:
    """Each sample's input to decoder layer 0; a sample the model cannot run is a `SampleError` naming it."""
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    captured = []
    for index, sample in enumerate(track(samples, "capturing inputs", enabled=progress)):
        tokens = sample_length(sample)
        if positions is not None and tokens > positions:
            raise SampleError(index, f"it has {tokens} tokens, more than the model's {positions} positions")
        try:
            captured.append(capture_layer_inputs(model, sample, tracker, storage))
        except (ValueError, RuntimeError, IndexError) as error:
            raise SampleError(index, str(error).strip().splitlines()[0] if str(error).strip() else repr(error)) \
                from error
    return captured


def check_rank(rank: int, geometry: AttentionGeometry) -> None:
    limit = geometry.num_heads * geometry.head_dim
    if rank <= 0 or rank % geometry.head_dim or rank > limit:
        raise AlvtsError(
            f"rank must be a positive multiple of the head dimension {geometry.head_dim} and at most {limit} "
            f"(heads x head_dim), got {rank}"
        )


def check_start_layer(start_layer: int, geometry: AttentionGeometry) -> None:
    if not 0 <= start_layer < geometry.num_layers:
        raise AlvtsError(f"start layer must be between 0 and {geometry.num_layers - 1}, got {start_layer}")


def default_rank(geometry: AttentionGeometry) -> int:
    """The selector's default rank: two heads, and at least MIN_DEFAULT_RANK (whole heads), at most every head (256
    at LLaVA-1.5-7B and Qwen2.5-VL-7B, four heads of SmolLM2-135M, all four of the demo's; docs/DESIGN.md)."""
    heads = max(2, -(-MIN_DEFAULT_RANK // geometry.head_dim))
    return min(heads, geometry.num_heads) * geometry.head_dim


def calibration_options(
    config: Any, *, rank: int | None, start_layer: int, importance: str | Importance, init: str | Init,
    refine_steps: int, heldout_fraction: float, report_keep_ratio: float, seed: int, skip_update_rank: int | None,
    sensitivity_samples: int, refine_compressions: Sequence[float], refine_evaluations: int,
) -> CalibrationOptions:
    """The options (see `calibrate`) for a model with this transformers `config`, each checked with a one-line error;
    needs no weights, so a command can check them before it loads the model."""
    geometry = AttentionGeometry.of_config(config)
    rank = rank if rank is not None else default_rank(geometry)
    check_rank(rank, geometry)
    check_start_layer(start_layer, geometry)
    check_keep_ratio(report_keep_ratio)
    if skip_update_rank is None:
        skip_update_rank = default_skip_update_rank(geometry.hidden_size)
    check_skip_update_rank(skip_update_rank, geometry.hidden_size)
    if sensitivity_samples < 0:
        raise AlvtsError(f"sensitivity samples must be 0 (do not measure) or more, got {sensitivity_samples}")
    for compression in refine_compressions:
        check_compression(compression)
    if refine_compressions and not sensitivity_samples:
        raise AlvtsError("refining the split needs the sensitivity measurement; give --sensitivity-samples above 0")
    if refine_evaluations < 1:
        raise AlvtsError(f"refine evaluations must be at least 1, got {refine_evaluations}")
    if refine_steps < 0:
        raise AlvtsError(f"refine steps must be 0 (no refinement) or more, got {refine_steps}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise AlvtsError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    return CalibrationOptions(
        rank=rank, start_layer=start_layer, importance=parse_choice(Importance, importance, "importance").value,
        init=parse_choice(Init, init, "init").value, refine_steps=refine_steps, heldout_fraction=heldout_fraction,
        report_keep_ratio=report_keep_ratio, seed=seed, skip_update_rank=skip_update_rank,
        sensitivity_samples=sensitivity_samples,
    )


def calibrate(
    model: nn.Module,
    samples: Iterable[Mapping[str, Any]],
    config: CalibrationOptions | None = None,
    *,
    rank: int | None = None,
    start_layer: int = DEFAULT_START_LAYER,
    importance: str | Importance = DEFAULT_IMPORTANCE,
    init: str | Init = Init.WEIGHT_SVD,
    refine_steps: int = REFINE_STEPS,
    heldout_fraction: float = HELDOUT_FRACTION,
    report_keep_ratio: float = REPORT_KEEP_RATIO,
    seed: int = 0,
    skip_update_rank: int | None = None,
    sensitivity_samples: int = SENSITIVITY_SAMPLES,
    refine_compressions: Sequence[float] = (),
    refine_evaluations: int = REFINE_EVALUATIONS,
    checkpoint: str | Path | None = None,
    storage: torch.device | str = "cpu",
    progress: bool = True,
) -> Calibration:
    """Calibrate ALVTS selectors for every decoder layer from `start_layer` on.

    `samples` yields dicts of model inputs as a processor returns them; for a language model alone a sample
    may carry a bool `visual_mask` (B, L). The options that shape the result are `config` (a `CalibrationOptions`,
    as a calibration records them) or the separate keywords, not both. `rank` defaults to two heads and
    at least 256 (`default_rank`). `skip_update_rank` is the rank of each layer's fitted update for skipped visual
    tokens (0: none; default hidden_size / 8, at most 64; see `selector.skip_map`).

    The steps, each saved to `checkpoint` as it finishes (a rerun with the same model, data and options resumes
    from them): capture every sample's input to layer 0; per layer, solve its selector and fit its skip map
    (`_solve_layers`); on the first `sensitivity_samples` samples, measure each layer's effect on the answer at a
    grid of budgets (0: skip; see `sensitivity`), for the "sensitivity" budget; at each of `refine_compressions`,
    refine that split with every layer routed at once, in up to `refine_evaluations` evaluated splits (see
    `joint_search`; export uses a refined split when its keep ratio gives the same tokens per layer).
    """
    separate = dict(
        rank=rank, start_layer=start_layer, importance=importance, init=init, refine_steps=refine_steps,
        heldout_fraction=heldout_fraction, report_keep_ratio=report_keep_ratio, seed=seed,
        skip_update_rank=skip_update_rank, sensitivity_samples=sensitivity_samples,
    )
    if config is not None:
        if separate != _DEFAULT_OPTIONS:
            raise AlvtsError("give calibrate either a CalibrationOptions or the separate options, not both")
        separate = asdict(config)
    options = calibration_options(
        model.config, **separate, refine_compressions=refine_compressions, refine_evaluations=refine_evaluations
    )
    samples = list(samples)
    if not samples:
        raise AlvtsError("the calibration set is empty; give at least one sample")
    captured, kept = _capture_step(model, samples, storage, progress)
    identity = {
        "fingerprint": model_fingerprint(model),
        "data_sha256": data_digest([samples[i] for i in kept]),
        "options": asdict(options),
    }
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    results, refined = _resume(checkpoint, identity, progress)
    heldout = _heldout_indices(len(captured), options.heldout_fraction)
    counts = [int(row.sum()) for i in heldout for row in captured[i].visual]
    metadata = {
        **identity,
        "family": get_adapter(model).name,
        "summary": {
            "samples": len(captured),
            "rows": sum(b.visual.shape[0] for b in captured),
            "heldout_samples": len(heldout),
            "heldout_is_train": len(captured) < 2,
            "skipped_without_visual": len(samples) - len(kept),
            "visual_tokens": statistics.median_low(
                int(row.sum()) for batch in captured for row in batch.visual if bool(row.any())
            ),
        },
        "toolkit_version": __version__,
        **({"refined_budgets": refined} if refined else {}),
    }

    def save_layers() -> None:
        Calibration(results, counts, metadata).save(checkpoint)

    _solve_layers(model, captured, heldout, options, results, save_layers if checkpoint is not None else None,
                  progress)
    del captured
    calibration = Calibration(results, counts, metadata)
    if options.sensitivity_samples:
        used = [samples[i] for i in kept][: options.sensitivity_samples]
        selector = calibrated_layers(calibration)
        skipped_update = default_skipped_update(SkippedKeys.POOL, selector.has_skip_updates)
        metadata["summary"].update(sensitivity_samples=len(used), sensitivity_update=skipped_update.value)
        with phase("sensitivity"):
            inputs = _measure_sensitivity(model, used, calibration, selector, skipped_update, checkpoint, progress)
        for compression in refine_compressions:
            with phase("refinement"):
                inputs = _refine_budget(model, used, inputs, calibration, selector, skipped_update, compression,
                                        refine_evaluations, checkpoint, progress)
    return calibration


_DEFAULT_OPTIONS = {
    name: parameter.default for name, parameter in inspect.signature(calibrate).parameters.items()
    if name in {field.name for field in fields(CalibrationOptions)}
}


def _capture_step(
    model: nn.Module, samples: list[Mapping[str, Any]], storage: torch.device | str, progress: bool
) -> tuple[list[CapturedBatch], list[int]]:
    """Every sample's input to decoder layer 0, for the samples with visual tokens, and their indices."""
    tracker = VisualTracker(model, get_adapter(model))
    tracker.install()
    try:
        with phase("capture"):
            captured = _capture(model, samples, tracker, storage, progress)
    finally:
        tracker.remove()
    kept = [i for i, batch in enumerate(captured) if bool(batch.visual.any())]
    if not kept:
        raise AlvtsError("no calibration sample contains visual tokens (are the image tokens in the prompts?)")
    return [captured[i] for i in kept], kept


def _solve_layers(
    model: nn.Module, captured: list[CapturedBatch], heldout: list[int], options: CalibrationOptions,
    results: dict[int, LayerResult], save: Callable[[], None] | None, progress: bool,
) -> None:
    """Layer by layer: solve the selector of each routed layer not in `results` (a resumed run) and fit its skip map,
    then push the samples through the unmodified layer; `save` after each solved layer."""
    geometry = AttentionGeometry.of(model)
    layers = decoder_layers(model)
    last = geometry.num_layers - 1
    for index in track(range(geometry.num_layers), "calibrating layers", enabled=progress):
        layer = layers[index]
        if index >= options.start_layer and index not in results:
            with materialized(layer), phase("solve"):  # offloaded weights (accelerate) stay loaded while solved
                result = _solve_layer(layer, index, captured, heldout, geometry, options)
            with phase("skip maps"):  # the samples pushed through the layer, the update statistics and the fit
                _propagate_routed(layer, captured, result, options.skip_update_rank, index == last)
            results[index] = result
            if save is not None:
                save()
        elif index < last:
            with phase("propagate"):
                _propagate(layer, captured)


def _measure_sensitivity(
    model: nn.Module, samples: list[Mapping[str, Any]], calibration: Calibration, selector: Selector,
    skipped_update: SkippedUpdate, checkpoint: Path | None, progress: bool,
) -> SweepInputs | None:
    """Record each layer's measured sensitivity (with `selector`, the calibration's layers, and `skipped_update`)
    in its budget statistics (see `sensitivity`), at the budgets `sweep_grid` asks for round by round,
    checkpointing after every layer; budgets already measured (a resumed run) are kept. Returns the samples'
    `SweepInputs` if it made them."""
    visual_tokens = int(calibration.metadata["summary"]["visual_tokens"])
    layers = calibration.layers
    measured = {
        index: dict(zip(result.budget.damage_budgets.tolist(), result.budget.damage.tolist(), strict=True))
        if result.budget.damage is not None else {}
        for index, result in layers.items()
    }
    totals = _grid_totals(calibration)
    summary = calibration.metadata["summary"]
    summary["sensitivity_unfinished"] = True  # only while measuring: a finished file is as before the rounds

    def record(index: int, damage: torch.Tensor) -> None:
        measured[index].update(zip(wanted[index], damage.tolist(), strict=True))
        budgets = sorted(measured[index])
        layers[index].budget = replace(
            layers[index].budget, damage_budgets=torch.tensor(budgets, dtype=torch.long),
            damage=torch.tensor([measured[index][b] for b in budgets], dtype=torch.float64),
        )
        if checkpoint is not None:
            calibration.save(checkpoint)

    inputs: SweepInputs | None = None
    while (round_budgets := next_round(measured, visual_tokens, totals)) is not None:
        wanted = {index: [b for b in budgets if b not in measured[index]] for index, budgets in round_budgets.items()}
        inputs = inputs or sweep_inputs(model, samples)  # the vision tower runs once per sample, for every round
        measure_sensitivity(model, inputs, selector, wanted, visual_tokens, skipped_update, progress,
                            on_layer=record)
    del summary["sensitivity_unfinished"]
    if checkpoint is not None:
        calibration.save(checkpoint)
    return inputs


def _grid_totals(calibration: Calibration) -> range:
    """The average tokens per routed layer from the highest compression of `GRID_COMPRESSIONS` to the lowest (at
    least one token)."""

    def at(compression: float) -> int:
        try:
            return tokens_per_layer_at(calibration, compression)
        except AlvtsError:  # the compression leaves no token
            return 1

    return range(at(max(GRID_COMPRESSIONS)), at(min(GRID_COMPRESSIONS)) + 1)


def _refine_budget(
    model: nn.Module, samples: list[Mapping[str, Any]], inputs: SweepInputs | None, calibration: Calibration,
    selector: Selector, skipped_update: SkippedUpdate, compression: float, evaluations: int, checkpoint: Path | None,
    progress: bool,
) -> SweepInputs | None:
    """Refine the sensitivity split at `compression` jointly (see `joint_search`; `selector` and `skipped_update` as
    the measurement used, on the samples' `inputs`, made here if None) and record it in the calibration's metadata
    under its tokens per routed layer, then checkpoint; a split already refined (a resumed run) is kept. Returns the
    inputs it used."""
    statistics, visual_tokens = calibration.budget_statistics()
    count = tokens_per_layer_at(calibration, compression)
    refined = calibration.metadata.setdefault("refined_budgets", {})
    if str(count) in refined:
        return inputs
    inputs = inputs or sweep_inputs(model, samples)
    start = allocate(statistics, count / visual_tokens, visual_tokens, Budget.SENSITIVITY, pooled=True).tokens
    tokens, result = refine_budget(model, inputs, selector, start, visual_tokens, skipped_update, evaluations,
                                   progress)
    refined[str(count)] = {
        "compression": compression,
        "tokens": {str(index): k for index, k in tokens.items()},
        "divergence_before": result.divergence_before,
        "divergence_after": result.divergence_after,
        "evaluations": result.evaluations,
        "samples": len(samples),
    }
    if checkpoint is not None:
        calibration.save(checkpoint)
    return inputs
