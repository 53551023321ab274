"""`export`: turn a calibration into a selector artifact at a chosen keep ratio (and optionally lower rank)."""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .artifact import Selector
from .budgets import Budget, allocate, parse_budget
from .calibration import Calibration
from .errors import AlvtsError
from .importance import keep_count_host
from .methods import check_compression, per_layer_count
from .options import check_keep_ratio, parse_choice, torch_dtype
from .routing import SkippedKeys, default_skipped_update, selected_beside_stand_in
from .skip_update import SkipUpdate

DEFAULT_BUDGET = Budget.SENSITIVITY  # measured on the demo (docs/DESIGN.md)
DEFAULT_ADAPTIVE_BUDGET = Budget.SENSITIVITY  # what `alvts eval` compares with uniform
DEFAULT_SKIPPED_KEYS = SkippedKeys.POOL


def build_selector(
    calibration: Calibration,
    *,
    keep_ratio: float,
    rank: int | None = None,
    dtype: str = "float32",
    budget: str | Budget = DEFAULT_BUDGET,
    skipped_keys: str | SkippedKeys = DEFAULT_SKIPPED_KEYS,
) -> Selector:
    """The selector a calibration gives at `keep_ratio` and `rank`, in memory (ready for `attach`).

    `budget` "uniform" keeps `keep_ratio` in every routed layer; the adaptive budgets ("sensitivity",
    "adaptive-update", "adaptive", "adaptive-mass") spread the same average number of visual tokens per routed
    layer over layers by calibration statistics (see `budgets`); a layer may get 0 or all of them. With
    `skipped_keys` "pool" (what `attach` then uses), a layer's pooled stand-in for its skipped tokens is one of its
    tokens: at the calibration's reference visual count it selects one token fewer than its budget, or every token
    if the budget is all of them (`routing.selected_beside_stand_in`), and the artifact's runtime passes the
    stand-in's update on to the skipped tokens when it carries fitted skip updates (`routing.default_skipped_update`).
    With "all", every layer selects its whole budget and the "sensitivity" split is the one measured with pooled keys.
    """
    check_keep_ratio(keep_ratio)
    budget = parse_budget(budget)
    skipped_keys = parse_choice(SkippedKeys, skipped_keys, "skipped_keys")
    if not calibration.complete:
        raise AlvtsError("calibration is incomplete (interrupted run?); re-run `alvts calibrate` to finish it")
    rank = calibration.rank if rank is None else rank
    if rank <= 0 or rank % calibration.head_dim or rank > calibration.rank:
        raise AlvtsError(
            f"export rank must be a multiple of {calibration.head_dim} and at most the calibrated rank "
            f"{calibration.rank}, got {rank}"
        )
    stored_dtype = torch_dtype(dtype)
    indices = sorted(calibration.layers)
    layers = {i: calibration.selector(i, rank).to(stored_dtype) for i in indices}
    skip_updates = {
        i: SkipUpdate.from_tensors(calibration.layers[i].skip_update).to(stored_dtype)
        for i in indices
        if calibration.layers[i].skip_update is not None
    }
    ratios = dict.fromkeys(indices, keep_ratio)
    allocation: dict[str, object] = {}
    if budget is not Budget.UNIFORM:
        statistics, visual_tokens = calibration.budget_statistics()
        sees_skipped = skipped_keys is not SkippedKeys.DROP  # as the sensitivity measurement's pooled runtime does
        refined = calibration.refined_budget(keep_count_host(visual_tokens, keep_ratio)) if sees_skipped else None
        result = allocate(statistics, keep_ratio, visual_tokens, budget, pooled=skipped_keys is SkippedKeys.POOL,
                          refined=refined, sees_skipped=sees_skipped)
        ratios, allocation = result.ratios, {"allocation": result.summary()}
    if skipped_keys is SkippedKeys.POOL:
        ratios = _leave_room_for_pool(ratios, int(calibration.metadata["summary"].get("visual_tokens") or 0))
    fidelity = {str(i): calibration.fidelity(i, ratios[i], rank) for i in indices}
    metadata = {
        "family": calibration.metadata["family"],
        "rank": rank,
        "dtype": dtype,
        "keep_ratio": keep_ratio,
        "budget": budget.value,
        "skipped_keys": skipped_keys.value,
        "skipped_update": default_skipped_update(skipped_keys, set(indices) <= set(skip_updates)).value,
        **allocation,
        "start_layer": indices[0],
        "calibration": {
            **calibration.metadata["summary"],
            "data_sha256": calibration.metadata["data_sha256"],
            "options": calibration.metadata["options"],
        },
        "fidelity": fidelity,
        "toolkit_version": __version__,
    }
    return Selector(
        layers=layers,
        keep_ratios=ratios,
        importance=calibration.importance,
        fingerprint=calibration.metadata["fingerprint"],
        metadata=metadata,
        skip_updates=skip_updates,
    )


def export(
    calibration: Calibration,
    path: str | Path,
    *,
    keep_ratio: float,
    rank: int | None = None,
    dtype: str = "float32",
    budget: str | Budget = DEFAULT_BUDGET,
    skipped_keys: str | SkippedKeys = DEFAULT_SKIPPED_KEYS,
) -> Selector:
    """Write the selector artifact for `calibration` to `path` (atomically) and return it (see `build_selector`)."""
    selector = build_selector(
        calibration, keep_ratio=keep_ratio, rank=rank, dtype=dtype, budget=budget, skipped_keys=skipped_keys
    )
    selector.save(path)
    return selector


def tokens_per_layer_at(calibration: Calibration, compression: float) -> int:
    """Visual tokens per routed layer that `compression` leaves on average at the calibration's reference count n,
    counted as `alvts eval` counts them (whole tokens, at most the budget): 7 of 64 at 89% over 24 routed layers."""
    metadata = calibration.metadata
    count = per_layer_count(
        check_compression(compression), int(metadata["fingerprint"]["num_layers"]),
        int(metadata["summary"].get("visual_tokens") or 0), int(metadata["options"]["start_layer"]),
    )
    if not count:
        raise AlvtsError(f"compression {compression} leaves no visual token to the routed layers; choose a lower one")
    return count


def keep_ratio_at(calibration: Calibration, compression: float) -> float:
    """The keep ratio whose exported budget is `tokens_per_layer_at(compression)` (where a split refined at that
    compression applies)."""
    return tokens_per_layer_at(calibration, compression) / int(calibration.metadata["summary"]["visual_tokens"])


def _leave_room_for_pool(ratios: dict[int, float], visual_tokens: int) -> dict[int, float]:
    """Per-layer ratios whose selected tokens and stand-in make up each layer's budget at `visual_tokens`."""
    if visual_tokens <= 0:
        return ratios
    return {
        index: selected_beside_stand_in(keep_count_host(visual_tokens, ratio), visual_tokens) / visual_tokens
        for index, ratio in ratios.items()
    }


def calibrated_layers(calibration: Calibration) -> Selector:
    """Every calibrated layer at keep ratio 1, nothing pooled: the selector that evaluation plans set their own
    ratios and runtime on."""
    return build_selector(calibration, keep_ratio=1.0, budget=Budget.UNIFORM, skipped_keys=SkippedKeys.DROP)
