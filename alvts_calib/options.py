"""Validation of user options, with one-line errors that say what to do."""

from __future__ import annotations

from .adapters import AttentionGeometry
from .errors import AlvtsError


def check_keep_ratio(keep_ratio: float) -> None:
    if not 0.0 < keep_ratio <= 1.0:
        raise AlvtsError(f"keep ratio must be in (0, 1], got {keep_ratio}; e.g. 0.11 keeps 64 of 576 visual tokens")


def check_rank(rank: int, geometry: AttentionGeometry) -> None:
    limit = geometry.num_heads * geometry.head_dim
    if rank <= 0 or rank % geometry.head_dim or rank > limit:
        raise AlvtsError(
            f"rank must be a positive multiple of the head dimension {geometry.head_dim} and at most {limit} "
            f"(heads x head_dim), got {rank}"
        )


def check_start_layer(start_layer: int, geometry: AttentionGeometry) -> None:
    if not 1 <= start_layer < geometry.num_layers:
        raise AlvtsError(
            f"start layer must be between 1 and {geometry.num_layers - 1} (layer 0 always stays unrouted), "
            f"got {start_layer}"
        )
