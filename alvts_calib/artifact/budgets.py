"""Per-layer visual-token budgets: the statistics calibration records, and the strategies that split a budget.

Every strategy gives each routed layer a whole number of tokens k_l at a reference visual count n, with
sum k_l = L * keep_count(n, keep_ratio): routed layers process on average exactly what a uniform keep ratio gives,
and the runtime turns each ratio k_l / n back into k_l tokens. The strategies (`Budget`):
- "sensitivity" (the default): calibration routes each layer alone at a grid of budgets and measures how far the
  answer moves (`calibration.sensitivity`); `min_damage` finds the split with the least summed square root of it;
- "adaptive-update": a floor of UPDATE_FLOOR tokens per layer, the rest by water-filling on each layer's gain
  T C(k) + V U(k): the text rows' relative update weighted by their attention share on the image, times the
  coverage C (importance mass, or `pooled_coverage` with a stand-in), plus the visual tokens' relative update V
  times the share U of it held by the k largest updates;
- "adaptive" (equal coverage) and "adaptive-mass" (water-filling on importance mass weighted by the visual
  attention share): the full attention's statistics alone;
- "uniform": the same ratio everywhere (the paper).
Why each exists and what it keeps on the demo and real weights: docs/DESIGN.md, "Per-layer budgets".
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np
import torch

from ..errors import AlvtsError
from ..options import parse_choice
from ..tokens import keep_count

COVERAGE_POINTS = 257  # keep fractions 0, 1/256, ..., 1
UPDATE_FLOOR = 2  # "adaptive-update" leaves no layer blind: each keeps at least its top token and the stand-in


class Budget(str, Enum):
    """How the average keep ratio is spread over routed layers."""

    UNIFORM = "uniform"  # the same ratio in every layer (the paper)
    ADAPTIVE = "adaptive"  # equal coverage: every layer keeps the same share of its importance mass
    ADAPTIVE_MASS = "adaptive-mass"  # water-filling: most importance mass in total, weighted by visual share
    ADAPTIVE_UPDATE = "adaptive-update"  # water-filling weighted by how much each layer changes the hidden states
    SENSITIVITY = "sensitivity"  # least answer divergence, measured per layer at calibration (`sensitivity`)

    @property
    def method(self) -> str:
        """The allocation method's name, as recorded in artifacts."""
        return {
            "uniform": "uniform", "adaptive": "equal-coverage", "adaptive-mass": "water-filling",
            "adaptive-update": "update-weighted water-filling", "sensitivity": "measured sensitivity",
        }[self.value]


def parse_budget(name: str | Budget) -> Budget:
    """The budget called `name`, or a one-line error listing the choices."""
    return parse_choice(Budget, name, "budget")


def coverage_grid() -> torch.Tensor:
    """The keep fractions (COVERAGE_POINTS,) at which coverage curves are recorded."""
    return torch.linspace(0.0, 1.0, COVERAGE_POINTS, dtype=torch.float64)


@lru_cache(maxsize=64)
def _grid_counts(n: int) -> torch.Tensor:
    """Tokens the runtime keeps out of `n` at every grid fraction."""
    return torch.stack([keep_count(torch.tensor(n), float(f)) for f in coverage_grid()])


def coverage_curves(importance: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(R, COVERAGE_POINTS) coverage curve of each row of (B, L) importance that has visual tokens, rows grouped
    by their visual-token count (callers average them).

    Row r at fraction f: the share of its visual importance held by its top keep_count(n_r, f) visual tokens.
    A row without importance mass counts as evenly spread (coverage k / n).
    """
    importance, visual = importance.detach().double().cpu(), visual.cpu()
    per_row = visual.sum(-1)
    curves = []
    for n in per_row.unique().tolist():
        if n == 0:
            continue
        rows = (per_row == n).nonzero().flatten()
        values = importance[rows][visual[rows]].view(len(rows), n).clamp(min=0.0).sort(-1, descending=True).values
        total = values.sum(-1, keepdim=True)
        cumulative = torch.cat([values.new_zeros(len(rows), 1), values.cumsum(-1)], dim=-1)
        counts = _grid_counts(n)
        even = (counts.double() / n).expand(len(rows), -1)
        curves.append(torch.where(total > 0, cumulative[:, counts] / total.clamp(min=1e-300), even))
    return torch.cat(curves) if curves else torch.empty(0, COVERAGE_POINTS, dtype=torch.float64)


def visual_attention_share(parts: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(R,) share of the query rows' head-averaged attention that lands on visual tokens, per row with any.

    parts: (B, P, H, L) attention parts (importance.attention_parts); the last part belongs to the query rows
    that define relevance (text rows, or the last position), and parts are zero outside visual columns.
    """
    share = parts[:, -1].double().mean(dim=1).sum(dim=-1)
    return share[visual.any(dim=-1)].cpu()


@dataclass(frozen=True)
class LayerUpdates:
    """How much one layer changes the hidden states, over calibration rows (see "adaptive-update")."""

    text: float  # mean relative update |dh|^2 / |h|^2 of the valid text rows
    visual: float  # the same for visual tokens (0 where nothing after the layer reads them)
    coverage: torch.Tensor  # (COVERAGE_POINTS,) share of the visual update energy held by the largest updates


def relative_update_energy(hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """(B, L) |output - hidden|^2 / |hidden|^2 per position, in float64."""
    hidden = hidden.double()
    return (output.double() - hidden).pow(2).sum(-1) / hidden.pow(2).sum(-1).clamp(min=1e-30)


class UpdateTally:
    """Accumulates a layer's LayerUpdates over calibration batches."""

    def __init__(self):
        self.text: list[torch.Tensor] = []
        self.visual: list[torch.Tensor] = []
        self.curves: list[torch.Tensor] = []

    def add(self, hidden: torch.Tensor, output: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> None:
        """One batch: the layer's (B, L, D) input and output, and its visual and valid (B, L) masks."""
        energy = relative_update_energy(hidden, output)
        visual = visual & valid
        self.text.append(energy[valid & ~visual].cpu())
        self.visual.append(energy[visual].cpu())
        self.curves.append(coverage_curves(energy, visual))

    def result(self, read_later: bool) -> LayerUpdates:
        """The layer's statistics; `read_later` False (the last layer) zeroes the visual tokens' weight."""
        text, visual = torch.cat(self.text), torch.cat(self.visual)
        return LayerUpdates(
            text=float(text.mean()) if text.numel() else 0.0,
            visual=float(visual.mean()) if read_later and visual.numel() else 0.0,
            coverage=torch.cat(self.curves).mean(0),
        )


@dataclass(frozen=True)
class LayerStatistics:
    """What allocation needs to know about one routed layer."""

    coverage: torch.Tensor  # (COVERAGE_POINTS,) mean coverage curve
    visual_share: float  # mean share of the query rows' attention on visual tokens
    updates: LayerUpdates | None = None  # how much the layer changes the hidden states (None: older files)
    damage_budgets: torch.Tensor | None = None  # (K,) budgets at which sensitivity was measured (None: not measured)
    damage: torch.Tensor | None = None  # (K,) mean answer KL divergence with only this layer routed at each budget


@dataclass(frozen=True)
class Allocation:
    """Per-layer visual-token budgets at a reference visual count."""

    budget: Budget
    keep_ratio: float  # the target average, as asked
    visual_tokens: int  # reference visual count n
    tokens: dict[int, int]  # layer -> tokens kept out of n
    refined: bool = False  # the sensitivity split as refined jointly at calibration (`joint_search`)

    @property
    def ratios(self) -> dict[int, float]:
        """Per-layer keep ratios k / n (the runtime keeps exactly k of n tokens)."""
        return {index: k / self.visual_tokens for index, k in self.tokens.items()}

    def summary(self) -> dict[str, object]:
        """JSON-ready description for artifact metadata."""
        tokens = list(self.tokens.values())
        return {
            "method": self.budget.method + (", refined jointly" if self.refined else ""),
            "target_keep_ratio": self.keep_ratio,
            "visual_tokens": self.visual_tokens,
            "mean_tokens_per_layer": sum(tokens) / len(tokens),
            "uniform_tokens_per_layer": int(keep_count(torch.tensor(self.visual_tokens), self.keep_ratio)),
            "mean_keep_ratio": sum(tokens) / len(tokens) / self.visual_tokens,
            "tokens": {str(index): k for index, k in sorted(self.tokens.items())},
        }


def token_curves(curves: np.ndarray, visual_tokens: int) -> np.ndarray:
    """(L, n + 1) coverage after keeping 0..n tokens, interpolated from (L, COVERAGE_POINTS) grid curves."""
    grid = coverage_grid().numpy()
    fractions = np.arange(visual_tokens + 1) / visual_tokens
    interpolated = np.stack([np.interp(fractions, grid, curve) for curve in np.asarray(curves, dtype=np.float64)])
    return np.maximum.accumulate(interpolated, axis=1)


def pooled_coverage(curves: np.ndarray) -> np.ndarray:
    """(L, n + 1) share of a layer's attention over visual tokens that is right when it keeps its top k tokens and
    the rest share their mass equally, as behind a pooled stand-in: 1 minus the total-variation distance between
    the two. A flat attention loses nothing to pooling; only the tokens that stand out need a place of their own.

    curves: (L, n + 1) coverage after keeping the top 0..n tokens (sorted importance, so masses are its steps).
    """
    masses = np.diff(curves, axis=1)  # (L, n), largest first
    pooled = np.ones_like(curves)
    for k in range(masses.shape[1]):
        tail = masses[:, k:]
        pooled[:, k] = 1.0 - 0.5 * np.abs(tail - tail.mean(axis=1, keepdims=True)).sum(axis=1)
    return pooled


def water_filling(curves: np.ndarray, weights: np.ndarray, total: int, floor: int = 0) -> list[int]:
    """Tokens per layer maximising sum_l w_l C_l(k_l) with sum k_l = total and every k_l >= floor, one token at a
    time.

    curves: (L, n + 1) coverage after 0..n tokens. Greedy on marginal gains is optimal for concave curves
    (a layer's sorted importance makes its coverage concave); ties go to the lower layer.
    """
    layers, width = curves.shape
    tokens = [min(floor, width - 1)] * layers
    gains = [(-weights[i] * (curves[i, tokens[i] + 1] - curves[i, tokens[i]]), i)
             for i in range(layers) if tokens[i] < width - 1]
    heapq.heapify(gains)
    for _ in range(total - sum(tokens)):
        _, i = heapq.heappop(gains)
        tokens[i] += 1
        if tokens[i] < width - 1:
            heapq.heappush(gains, (-weights[i] * (curves[i, tokens[i] + 1] - curves[i, tokens[i]]), i))
    return tokens


def equal_coverage(curves: np.ndarray, total: int, iterations: int = 60) -> list[int]:
    """Tokens per layer giving every layer the same coverage, with sum k_l = total.

    Bisection finds the highest common coverage target whose minimal token counts fit in `total`; the few
    tokens left go one at a time to the layer with the lowest coverage so far.
    """
    layers, width = curves.shape

    def needed(target: float) -> np.ndarray:
        return np.array([min(int(np.searchsorted(curve, target, side="left")), width - 1) for curve in curves])

    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if needed(middle).sum() <= total else (low, middle)
    tokens = needed(low).tolist()
    lowest = [(curves[i, tokens[i]], i) for i in range(layers) if tokens[i] < width - 1]
    heapq.heapify(lowest)
    for _ in range(total - sum(tokens)):
        _, i = heapq.heappop(lowest)
        tokens[i] += 1
        if tokens[i] < width - 1:
            heapq.heappush(lowest, (curves[i, tokens[i]], i))
    return tokens


def allocate(
    statistics: Mapping[int, LayerStatistics],
    keep_ratio: float,
    visual_tokens: int,
    budget: Budget,
    pooled: bool = False,
    refined: Mapping[int, int] | None = None,
) -> Allocation:
    """Adaptive per-layer budgets averaging keep_count(visual_tokens, keep_ratio) tokens over the layers.

    `pooled`: skipped tokens are seen through a pooled stand-in, so `adaptive-update` values a layer's tokens by
    `pooled_coverage` (what pooling gets wrong) instead of the importance mass they hold. `refined`: the
    calibration's jointly refined split for this total (layer -> tokens), which "sensitivity" then uses (the other
    budgets ignore it). "sensitivity" was measured with pooled keys: it stands for runtimes whose text reads the
    skipped tokens (`RuntimeConfig.validate`)."""
    indices = sorted(statistics)
    if budget is Budget.UNIFORM or visual_tokens <= 0 or not indices:
        raise AlvtsError("adaptive allocation needs an adaptive budget, routed layers and visual tokens")
    total = int(keep_count(torch.tensor(visual_tokens), keep_ratio)) * len(indices)
    curves = token_curves(np.stack([statistics[i].coverage.double().numpy() for i in indices]), visual_tokens)
    refined = refined if budget is Budget.SENSITIVITY else None
    if refined is not None:
        tokens = [int(refined[index]) for index in indices]
        if sum(tokens) != total:
            raise AlvtsError(f"the refined split spends {sum(tokens)} tokens, not {total}; re-run `alvts calibrate`")
    elif budget is Budget.SENSITIVITY:
        tokens = min_damage(_damage_curves(statistics, indices, visual_tokens), total)
    elif budget is Budget.ADAPTIVE:
        tokens = equal_coverage(curves, total)
    elif budget is Budget.ADAPTIVE_UPDATE:
        gains = _update_gains(statistics, indices, pooled_coverage(curves) if pooled else curves, visual_tokens)
        floor = min(UPDATE_FLOOR, total // len(indices))
        tokens = water_filling(gains, np.ones(len(indices)), total, floor)
    else:
        weights = np.array([max(statistics[i].visual_share, 0.0) for i in indices])
        tokens = water_filling(curves, weights if weights.sum() > 0 else np.ones(len(indices)), total)
    return Allocation(budget, keep_ratio, visual_tokens, dict(zip(indices, tokens, strict=True)), refined is not None)


def damage_curve(budgets: np.ndarray, damage: np.ndarray, visual_tokens: int) -> np.ndarray:
    """(n + 1,) damage after 0..n tokens from measurements at `budgets`: linear in between, never rising with more
    tokens (a rise is measurement noise), and as bad at 1 token as at 0 (one token leaves no room beside the
    stand-in, so the layer skips the image)."""
    curve = np.interp(np.arange(visual_tokens + 1), np.asarray(budgets, dtype=np.float64), np.asarray(damage))
    curve = np.minimum.accumulate(curve)
    if visual_tokens >= 1:
        curve[1] = curve[0]
    return curve


def min_damage(curves: np.ndarray, total: int) -> list[int]:
    """Tokens per layer minimising sum_l D_l(k_l) with sum k_l = total (dynamic programming over layers, exact for
    any curves). curves: (L, n + 1) damage after 0..n tokens."""
    layers, width = curves.shape
    total = min(total, layers * (width - 1))
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((layers, total + 1), dtype=np.int64)
    for layer in range(layers):
        after = np.full(total + 1, np.inf)
        for tokens in range(min(width, total + 1)):
            candidate = np.full(total + 1, np.inf)
            candidate[tokens:] = best[: total + 1 - tokens] + curves[layer, tokens]
            better = candidate < after
            after[better], choices[layer, better] = candidate[better], tokens
        best = after
    result, used = [], total
    for layer in reversed(range(layers)):
        result.append(int(choices[layer, used]))
        used -= result[-1]
    return result[::-1]


def _damage_curves(statistics: Mapping[int, LayerStatistics], indices: list[int], visual_tokens: int) -> np.ndarray:
    """(L, n + 1) what each layer costs the answer after 0..n tokens, or a one-line error saying what is missing.

    The cost is the square root of the measured KL divergence: KL grows with the square of a small change of the
    logits, while the changes that routed layers make add up in the residual stream, so their square roots (Fisher
    distances) add up to a bound on the total. Summing KL itself undervalues many small contributions
    (docs/DESIGN.md). It is measured with pooled skipped keys (`RuntimeConfig.validate` holds export to runtimes
    whose text reads the skipped tokens).
    """
    missing = [index for index in indices if statistics[index].damage is None]
    if missing:
        raise AlvtsError(
            f"budget 'sensitivity' needs the layers' measured sensitivity, which this calibration lacks (layers "
            f"{missing}); re-run `alvts calibrate` with --sensitivity-samples above 0, or use another budget"
        )
    return damage_costs(
        [(statistics[index].damage_budgets.numpy(), statistics[index].damage.numpy()) for index in indices],
        visual_tokens,
    )


def damage_costs(measured: list[tuple[np.ndarray, np.ndarray]], visual_tokens: int) -> np.ndarray:
    """(L, n + 1) what `min_damage` minimises for each layer's measured (budgets, damage): the square root of its
    `damage_curve` (why the root: `_damage_curves`)."""
    return np.sqrt(np.stack([damage_curve(budgets, damage, visual_tokens) for budgets, damage in measured]))


def _update_gains(
    statistics: Mapping[int, LayerStatistics], indices: list[int], coverage: np.ndarray, visual_tokens: int
) -> np.ndarray:
    """(L, n + 1) gain T C(k) + V U(k) of each layer after keeping 0..n tokens (see the module docstring)."""
    missing = [index for index in indices if statistics[index].updates is None]
    if missing:
        raise AlvtsError(
            f"budget 'adaptive-update' needs the layers' update statistics, which this calibration lacks (layers "
            f"{missing}); re-run `alvts calibrate` with this version, or use another budget"
        )
    updates = [statistics[index].updates for index in indices]
    update_curves = token_curves(np.stack([u.coverage.double().numpy() for u in updates]), visual_tokens)
    text = np.array([u.text * max(statistics[i].visual_share, 0.0) for u, i in zip(updates, indices, strict=True)])
    visual = np.array([u.visual for u in updates])
    return text[:, None] * coverage + visual[:, None] * update_curves
