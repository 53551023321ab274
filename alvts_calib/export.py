"""`export`: turn a calibration into a selector artifact at a chosen keep ratio (and optionally lower rank)."""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .artifact import Selector
from .calibration import Calibration
from .errors import AlvtsError
from .options import check_keep_ratio, torch_dtype


def build_selector(
    calibration: Calibration, *, keep_ratio: float, rank: int | None = None, dtype: str = "float32"
) -> Selector:
    """The selector a calibration gives at `keep_ratio` (uniform over routed layers) and `rank`."""
    check_keep_ratio(keep_ratio)
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
    fidelity = {str(i): calibration.fidelity(i, keep_ratio, rank) for i in indices}
    metadata = {
        "family": calibration.metadata["family"],
        "rank": rank,
        "dtype": dtype,
        "keep_ratio": keep_ratio,
        "budget": "uniform",
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
        keep_ratios={i: keep_ratio for i in indices},
        importance=calibration.importance,
        fingerprint=calibration.metadata["fingerprint"],
        metadata=metadata,
    )


def export(
    calibration: Calibration, path: str | Path, *, keep_ratio: float, rank: int | None = None, dtype: str = "float32"
) -> Selector:
    """Write the selector artifact for `calibration` to `path` (atomically) and return it."""
    selector = build_selector(calibration, keep_ratio=keep_ratio, rank=rank, dtype=dtype)
    selector.save(path)
    return selector
