"""`export`: turn a calibration into a selector artifact at a chosen keep ratio (and optionally lower rank)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AlvtsError
from ..options import torch_dtype
from ..selector.skip_map import SkipUpdate
from ..tokens import check_compression, keep_count_host, per_layer_count, selected_beside_stand_in
from ..version import __version__
from .budgets import Budget, allocate
from .calibration import Calibration
from .config import RuntimeConfig, SkippedKeys
from .selector import Selector


def _export_config(
    config: RuntimeConfig | None, keep_ratio: float | None, budget: str | Budget | None,
    skipped_keys: str | SkippedKeys | None,
) -> RuntimeConfig:
    """`config`, or one made of the separate settings (defaults: `RuntimeConfig`'s); not both."""
    if config is None:
        return RuntimeConfig(keep_ratio=keep_ratio).replace(budget=budget, skipped_keys=skipped_keys)
    if any(value is not None for value in (keep_ratio, budget, skipped_keys)):
        raise AlvtsError("give export either a RuntimeConfig or keep_ratio/budget/skipped_keys, not both")
    return config


def build_selector(
    calibration: Calibration,
    *,
    keep_ratio: float | None = None,
    rank: int | None = None,
    dtype: str = "float32",
    budget: str | Budget | None = None,
    skipped_keys: str | SkippedKeys | None = None,
    config: RuntimeConfig | None = None,
) -> Selector:
    """The selector a calibration gives at `keep_ratio` and `rank`, in memory (ready for `attach`).

    The runtime settings come from `config` or from `keep_ratio`, `budget` and `skipped_keys` (the others at their
    defaults, `RuntimeConfig`); the artifact records them, with the skipped update that suits its skip maps.

    `budget` "uniform" keeps `keep_ratio` in every routed layer; the adaptive budgets ("sensitivity",
    "adaptive-update", "adaptive", "adaptive-mass") spread the same average number of visual tokens per routed
    layer over layers by calibration statistics (see `budgets`); a layer may get 0 or all of them. With
    `skipped_keys` "pool" (what `attach` then uses), a layer's pooled stand-in for its skipped tokens is one of its
    tokens: at the calibration's reference visual count it selects one token fewer than its budget, or every token
    if the budget is all of them (`tokens.selected_beside_stand_in`), and the artifact's runtime passes the
    stand-in's update on to the skipped tokens when it carries fitted skip updates (`config.default_skipped_update`).
    With "all", every layer selects its whole budget and the "sensitivity" split is the one measured with pooled keys.
    """
    runtime = _export_config(config, keep_ratio, budget, skipped_keys)
    if runtime.keep_ratio is None:
        raise TypeError("build_selector() needs keep_ratio (or a config with one)")
    runtime.validate(exporting=True)
    keep_ratio, budget, skipped_keys = runtime.keep_ratio, runtime.budget, runtime.skipped_keys
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
        # the refined split, like the sensitivity measurement, stands for runtimes whose text reads skipped tokens
        total = keep_count_host(visual_tokens, keep_ratio)
        refined = calibration.refined_budget(total) if runtime.sees_skipped else None
        result = allocate(statistics, keep_ratio, visual_tokens, budget, pooled=runtime.pooled, refined=refined)
        ratios, allocation = result.ratios, {"allocation": result.summary()}
    if skipped_keys is SkippedKeys.POOL:
        ratios = _leave_room_for_pool(ratios, int(calibration.metadata["summary"].get("visual_tokens") or 0))
    fidelity = {str(i): calibration.fidelity(i, ratios[i], rank) for i in indices}
    runtime = runtime.resolved(has_fitted_maps=set(indices) <= set(skip_updates))
    metadata = {
        "family": calibration.metadata["family"],
        "rank": rank,
        "dtype": dtype,
        **runtime.metadata(),
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
    keep_ratio: float | None = None,
    rank: int | None = None,
    dtype: str = "float32",
    budget: str | Budget | None = None,
    skipped_keys: str | SkippedKeys | None = None,
    config: RuntimeConfig | None = None,
) -> Selector:
    """Write the selector artifact for `calibration` to `path` (atomically) and return it (see `build_selector`)."""
    selector = build_selector(
        calibration, keep_ratio=keep_ratio, rank=rank, dtype=dtype, budget=budget, skipped_keys=skipped_keys,
        config=config,
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
