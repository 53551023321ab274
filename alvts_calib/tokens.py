"""Token arithmetic shared by export, the runtime and evaluation: keep counts, the pooled stand-in's token, the
per-layer count a compression leaves, and the positions a row keeps."""

from __future__ import annotations

import math

import torch

from .errors import AlvtsError


def keep_count(num_visual: torch.Tensor, keep_ratio: float | torch.Tensor) -> torch.Tensor:
    """k = ceil(keep_ratio * n_visual) per row (one ratio, or a (B,) float64 ratio per row), computed in float64 so
    1.0 keeps exactly everything."""
    return torch.ceil(num_visual.double() * keep_ratio - 1e-9).long().clamp(min=0)


def keep_count_host(num_visual: int, keep_ratio: float) -> int:
    """`keep_count` of one row on the host (the same float64 arithmetic), without touching a device."""
    return max(0, math.ceil(num_visual * keep_ratio - 1e-9))



def with_stand_in(selected: int, num_visual: int) -> int:
    """Visual positions a pooled layer processes when it selects `selected` of a row's `num_visual` tokens: a row
    that processed some of them and skipped others also processes their stand-in (`Pool`)."""
    return selected + (0 < selected < num_visual)


def selected_beside_stand_in(budget: int | torch.Tensor, num_visual: int | torch.Tensor) -> int | torch.Tensor:
    """Visual tokens a pooled layer selects so that it processes `budget` of `num_visual` (the inverse of
    `with_stand_in`; a budget of one leaves no room beside the stand-in, so the layer skips the image). Per row when
    given (B,) tensors."""
    if isinstance(budget, torch.Tensor):
        return torch.where(budget >= num_visual, budget, (budget - 1).clamp(min=0))
    return budget if budget >= num_visual else max(budget - 1, 0)



def per_layer_count(fraction: float, num_layers: int, num_visual: int, full_layers: int) -> int | None:
    """Largest k with (full_layers * n + k * (L - full_layers)) / L <= fraction * n, or None if k < 0."""
    spare = fraction * num_layers * num_visual - full_layers * num_visual
    count = math.floor(spare / (num_layers - full_layers) + 1e-9) if spare >= -1e-9 else -1
    return min(count, num_visual) if count >= 0 else None


def check_compression(compression: float) -> float:
    """The processed fraction 1 - compression, after checking 0 <= compression < 1."""
    if not 0.0 <= compression < 1.0:
        raise AlvtsError(f"compression must be in [0, 1) (e.g. 0.89 keeps 11% of visual tokens), got {compression}")
    return 1.0 - compression


def kept_positions(
    keep: torch.Tensor, count: int | None = None, sort_keys: torch.Tensor | None = None, fill: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept positions of (B, W) `keep`, in order (or in the order of `sort_keys`, integers below 2 W), as
    (B, count) positions, `count` being the most any row keeps (a host sync when not given), rows that keep fewer
    padded with `fill` (default W); and the (B, count) bool mask of that padding."""
    width = keep.shape[1]
    if sort_keys is None:
        sort_keys = torch.arange(width, device=keep.device).expand_as(keep)
    order = torch.where(keep, sort_keys, sort_keys + 2 * width).argsort(dim=1, stable=True)
    kept = keep.sum(1)
    count = int(kept.max()) if count is None else count
    padding = torch.arange(count, device=keep.device)[None, :] >= kept[:, None]
    return order[:, :count].masked_fill(padding, width if fill is None else fill), padding


def at_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, Q, ...) rows of (B or 1, L, ...) `states` at (B, Q) `positions`; positions past the end read the last."""
    batch = positions.shape[0]
    rows = torch.arange(batch, device=positions.device)[:, None]
    return states.expand(batch, *states.shape[1:])[rows, positions.clamp(max=states.shape[1] - 1)]
