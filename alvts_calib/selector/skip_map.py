"""A calibrated stand-in for the update a decoder layer would give the visual tokens that skip it.

Skipped tokens keep a stale hidden state. At inference a skipped token gets the mean update of the visual
tokens the layer processed in its row, plus a per-layer low-rank linear map of how its own normed input
differs from theirs: `update_i ~ mean(update_p) + W (normed_i - mean(normed_p))`. W = up(down(.)) is fitted on
calibration data by reduced-rank ridge regression of the within-row deviations of updates on those of normed
inputs, from streamed second moments. It costs 2 x hidden x rank multiply-adds per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SKIP_UPDATE_TENSOR_NAMES = ("down.weight", "up.weight", "up.bias")
MAX_SKIP_UPDATE_RANK = 64  # the default rank of the fitted map is hidden_size / 8, at most this (0: fit none)
RIDGE = 1e-3  # relative to the mean input variance


def default_skip_update_rank(hidden_size: int) -> int:
    """The fitted map's default rank for a model of this width: hidden_size / 8, at most MAX_SKIP_UPDATE_RANK (8 on
    the demo, 64 on real models; docs/DESIGN.md, "Skip-update rank")."""
    return min(MAX_SKIP_UPDATE_RANK, max(1, hidden_size // 8))


def row_centred(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N, D) rows of `values` (B, L, D) at `tokens` (B, L), each minus the mean of its batch row's tokens."""
    weights = tokens[..., None].to(values.dtype)
    means = (values * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    return (values - means)[tokens]


@dataclass
class UpdateMoments:
    """Running sums over visual tokens of one layer: inputs x (normed), updates y, and their second moments."""

    count: int
    sum_x: torch.Tensor  # (D,)
    sum_y: torch.Tensor  # (D,)
    xx: torch.Tensor  # (D, D)
    xy: torch.Tensor  # (D, D)
    yy: float  # sum of squared update norms

    @classmethod
    def empty(cls, hidden_size: int) -> UpdateMoments:
        zeros = torch.zeros(hidden_size, dtype=torch.float64)
        square = torch.zeros(hidden_size, hidden_size, dtype=torch.float64)
        return cls(0, zeros, zeros.clone(), square, square.clone(), 0.0)

    def add(self, inputs: torch.Tensor, updates: torch.Tensor) -> None:
        """Accumulate (N, D) normed inputs and their (N, D) updates (products on their device, sums in float64)."""
        x, y = inputs.float(), updates.float()
        self.count += x.shape[0]
        self.sum_x += x.sum(0).double().cpu()
        self.sum_y += y.sum(0).double().cpu()
        self.xx += (x.T @ x).double().cpu()
        self.xy += (x.T @ y).double().cpu()
        self.yy += float((y * y).sum())


@dataclass(frozen=True)
class FittedUpdate:
    """A fitted map and how much of the centred update variance it explains on the calibration data."""

    tensors: dict[str, torch.Tensor]  # SKIP_UPDATE_TENSOR_NAMES, float32
    explained: float  # 1 - residual / variance of the deviations (0: no better than the row's mean update)


def fit_update(moments: UpdateMoments, rank: int) -> FittedUpdate:
    """Reduced-rank ridge regression of updates on normed inputs (rank at most hidden size)."""
    n = max(moments.count, 1)
    mean_x, mean_y = moments.sum_x / n, moments.sum_y / n
    cxx = moments.xx / n - torch.outer(mean_x, mean_x)
    cxy = moments.xy / n - torch.outer(mean_x, mean_y)
    hidden = cxx.shape[0]
    ridge = RIDGE * float(cxx.diagonal().mean().clamp(min=1e-12))
    full = torch.linalg.solve(cxx + ridge * torch.eye(hidden, dtype=cxx.dtype), cxy)  # (D_in, D_out)
    fitted_covariance = full.T @ cxx @ full
    _, vectors = torch.linalg.eigh(fitted_covariance)
    basis = vectors[:, -min(rank, hidden):].flip(-1)  # (D_out, R): leading directions of the fitted updates
    down = full @ basis  # (D_in, R)
    bias = mean_y - (mean_x @ down) @ basis.T
    reduced = down @ basis.T
    total = moments.yy / n - float(mean_y @ mean_y)
    residual = total - 2 * float((reduced * cxy).sum()) + float((reduced * (cxx @ reduced)).sum())
    tensors = {"down.weight": down.T.float(), "up.weight": basis.float(), "up.bias": bias.float()}
    return FittedUpdate(
        tensors={name: tensor.contiguous() for name, tensor in tensors.items()},
        explained=1.0 - residual / total if total > 0 else 0.0,
    )


def stored_skip_update(tensors: dict[str, torch.Tensor], index: int | str) -> dict[str, torch.Tensor] | None:
    """Layer `index`'s fitted update among a file's tensors (named `skip.{index}.{name}`), or None if absent."""
    if f"skip.{index}.{SKIP_UPDATE_TENSOR_NAMES[0]}" not in tensors:
        return None
    return {name: tensors[f"skip.{index}.{name}"] for name in SKIP_UPDATE_TENSOR_NAMES}


class SkipUpdate(nn.Module):
    """`up(down(normed))`: the fitted map W (plus a bias that cancels in differences; see the module doc)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size)

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(normed))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SkipUpdate:
        """Build from {"down.weight", "up.weight", "up.bias"}."""
        rank, hidden = tensors["down.weight"].shape
        module = cls(hidden, rank)
        module.load_state_dict(tensors)
        return module
