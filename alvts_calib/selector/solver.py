"""Per-layer solver: RoPE-aware truncated SVD initialisation, then importance-consistency refinement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from scipy.stats import spearmanr
from torch import nn

from ..tokens import keep_count
from .importance import Importance, importance_from_parts, normalized
from .layer import LayerSelector


class Init(str, Enum):
    """How the selector's projections are initialised before refinement."""

    WEIGHT_SVD = "weight_svd"  # truncated SVD of the layer's W_Q/W_K bilinear form, per RoPE frequency
    DATA_SVD = "data_svd"  # the same, after whitening by the calibration inputs' second moment


@dataclass
class LayerBatch:
    """One calibration batch as seen by one decoder layer."""

    normed: torch.Tensor  # (B, L, D) the layer's normed input
    cos: torch.Tensor
    sin: torch.Tensor
    visual: torch.Tensor  # (B, L) bool
    valid: torch.Tensor  # (B, L) bool
    target: torch.Tensor  # (B, L) full-attention importance


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W | b] so that a bias is the coefficient of a constant input 1."""
    bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return torch.cat([weight, bias[:, None]], dim=1).double()


def _as_complex(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(heads*d, D+1) real rows to (heads, d/2, D+1) complex: dimension f pairs with f + d/2 under RoPE."""
    rows = weight.view(num_heads, head_dim, -1)
    half = head_dim // 2
    return torch.complex(rows[:, :half], rows[:, half:])


def rope_svd_init(
    attention: nn.Module,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    selector_heads: int,
    second_moment: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Selector tensors from a truncated SVD of the layer's query/key bilinear form.

    Under RoPE, frequency f of head h contributes Re(x^T u_hf v_hf^H y e^{i theta_f (p_x - p_y)}), with u, v
    the complex rows of W_Q and W_K. Query heads are split into `selector_heads` groups; for each group and
    frequency the summed form sum_h u_hf v_hf^H is replaced by its best rank-1 approximation, which stays exact
    under any rotation angle. With `second_moment` (E[x x^T] of the augmented inputs) the approximation is
    optimal for the calibration inputs instead of in weight space.
    """
    wq = _as_complex(_augmented(attention.q_proj.weight, attention.q_proj.bias), num_heads, head_dim)
    wk = _as_complex(_augmented(attention.k_proj.weight, attention.k_proj.bias), num_kv_heads, head_dim)
    wk = wk.repeat_interleave(num_heads // num_kv_heads, dim=0)
    whiten = None
    if second_moment is not None:
        eye = torch.eye(second_moment.shape[0], dtype=torch.float64, device=second_moment.device)
        damp = 1e-4 * second_moment.diagonal().mean()
        whiten = torch.linalg.cholesky(second_moment.double() + damp * eye).to(wq.device)
    q_rows, k_rows = [], []
    for heads in torch.arange(num_heads).tensor_split(selector_heads):
        u = wq[heads].permute(1, 2, 0)  # (d/2, D+1, group)
        v = wk[heads].permute(1, 2, 0)
        if whiten is not None:
            u, v = whiten.T.to(u.dtype) @ u, whiten.T.to(v.dtype) @ v
        qu, ru = torch.linalg.qr(u)
        qv, rv = torch.linalg.qr(v)
        left, sigma, right_h = torch.linalg.svd(ru @ rv.mH)
        root = sigma[:, :1].sqrt()
        u1 = (qu @ left[:, :, :1])[..., 0] * root  # (d/2, D+1)
        v1 = (qv @ right_h.mH[:, :, :1])[..., 0] * root
        if whiten is not None:
            u1 = torch.linalg.solve_triangular(whiten.T.to(u1.dtype), u1.T, upper=True).T
            v1 = torch.linalg.solve_triangular(whiten.T.to(v1.dtype), v1.T, upper=True).T
        q_rows.append(torch.cat([u1.real, u1.imag]))
        k_rows.append(torch.cat([v1.real, v1.imag]))
    q, k = torch.cat(q_rows).float(), torch.cat(k_rows).float()
    return {"q_proj.weight": q[:, :-1], "q_proj.bias": q[:, -1], "k_proj.weight": k[:, :-1], "k_proj.bias": k[:, -1]}


def second_moment(batches: Sequence[LayerBatch]) -> torch.Tensor:
    """E[x x^T] over valid tokens of the augmented inputs [x, 1], in float64."""
    total, count = None, 0
    for batch in batches:
        tokens = batch.normed[batch.valid].double()
        tokens = torch.cat([tokens, torch.ones_like(tokens[:, :1])], dim=1)
        moment = tokens.T @ tokens
        total = moment if total is None else total + moment
        count += tokens.shape[0]
    return total / max(count, 1)


def consistency_loss(selector: LayerSelector, batch: LayerBatch, definition: Importance) -> torch.Tensor:
    """MSE between the selector's and the full attention's normalised importance over visual tokens."""
    scores = selector.scores(batch.normed, batch.cos, batch.sin, batch.visual, batch.valid, definition)
    error = (normalized(scores, batch.visual) - normalized(batch.target, batch.visual)) ** 2
    return error[batch.visual].mean() if batch.visual.any() else error.sum() * 0.0


def mean_loss(selector: LayerSelector, batches: Sequence[LayerBatch], definition: Importance) -> float:
    with torch.no_grad():
        return sum(float(consistency_loss(selector, b, definition)) for b in batches) / max(len(batches), 1)


def refine(
    selector: LayerSelector,
    batches: Sequence[LayerBatch],
    definition: Importance,
    steps: int,
    generator: torch.Generator,
    lr_scale: float = 0.01,
) -> tuple[float, float]:
    """Adam on the consistency loss; keeps the initialisation if refinement does not lower the loss.

    Returns (loss before, loss after) on the training batches.
    """
    before = mean_loss(selector, batches, definition)
    if steps <= 0 or not batches:
        return before, before
    initial = {name: tensor.clone() for name, tensor in selector.state_dict().items()}
    weight_rms = float(selector.q_proj.weight.detach().pow(2).mean().sqrt()) or 1e-3
    optimizer = torch.optim.Adam(selector.parameters(), lr=lr_scale * weight_rms)
    order = torch.randperm(len(batches) * ((steps // len(batches)) + 1), generator=generator) % len(batches)
    with torch.enable_grad():  # callers may hold torch.no_grad() around calibration
        for index in order[:steps].tolist():
            optimizer.zero_grad(set_to_none=True)
            loss = consistency_loss(selector, batches[index], definition)
            loss.backward()
            optimizer.step()
    after = mean_loss(selector, batches, definition)
    if not after < before:
        selector.load_state_dict(initial)
        after = before
    return before, after


def fidelity(
    selector_parts: torch.Tensor,
    target: torch.Tensor,
    counts: Sequence[int],
    keep_ratio: float,
    num_heads: int | None = None,
) -> dict[str, float]:
    """Selector vs full-attention importance, averaged over samples: top-k recall, Spearman correlation, and
    the share of the full attention's importance mass in the selector's top-k ("mass").

    selector_parts: (P, G, N) per-head parts of all samples' visual tokens concatenated; target: (N,);
    counts: visual tokens per sample. `num_heads` keeps only the leading selector heads. Recall is NaN at k = 0.
    """
    scores = importance_from_parts(selector_parts, num_heads)
    recalls, correlations, masses = [], [], []
    for chosen, truth in zip(scores.split(list(counts)), target.split(list(counts)), strict=True):
        n = truth.numel()
        if n == 0:
            continue
        k = int(keep_count(torch.tensor(n), keep_ratio))
        selected = chosen.argsort(descending=True, stable=True)[:k]
        total = float(truth.sum())
        masses.append(float(truth[selected].sum()) / total if total > 0 else k / n)
        if k > 0:
            top_true = set(truth.argsort(descending=True, stable=True)[:k].tolist())
            recalls.append(len(set(selected.tolist()) & top_true) / k)
        if n > 1:
            rho = spearmanr(chosen.numpy(), truth.numpy()).statistic
            correlations.append(0.0 if rho != rho else float(rho))
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return {"recall": mean(recalls), "spearman": mean(correlations), "mass": mean(masses)}
