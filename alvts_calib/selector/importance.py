"""Attention importance of visual tokens, for the model's full attention and for the selector alike.

One code path serves both, so the calibration target and the selector's scores are defined the same way.
Importance is assembled from per-head "parts" (column aggregates of the attention map); averaging the
parts over heads before combining them gives the importance of the head-averaged attention.
"""

from __future__ import annotations

from enum import Enum

import torch

from ..tokens import keep_count, kept_positions


class Importance(str, Enum):
    """How a visual token's importance is read off an attention map."""

    PAPER = "paper"  # S_V2V * S_T2V: attention received from visual rows times from text rows
    TEXT = "text"  # S_T2V: attention received from text rows only
    LAST = "last"  # attention received from the last (valid) position only

    @property
    def num_parts(self) -> int:
        return 2 if self is Importance.PAPER else 1


DEFAULT_IMPORTANCE = Importance.TEXT  # measured on the demo and on real weights: docs/DESIGN.md


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's rotate_half convention: dimension f pairs with f + d/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, d) states by (B or 1, L, d) cos/sin, exactly as the decoder layers do (M-RoPE included)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def causal_allowed(valid: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool: query i may attend key j when j <= i and j is a valid (non-padding) position."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return causal[None] & valid[:, None, :]


def query_rows(
    visual: torch.Tensor, valid: torch.Tensor, definition: Importance, text_rows: int
) -> torch.Tensor | None:
    """(B, Q) the positions whose attention rows `definition` reads (L, the length, marks a filler in rows with
    fewer), or None for every row: the valid text rows (`text_rows`, the most in any row, known to the caller) for
    TEXT, the last position for LAST. Importance then needs queries at these positions only."""
    batch, length = visual.shape
    if definition is Importance.LAST:
        return torch.full((batch, 1), length - 1, device=visual.device)
    if definition is not Importance.TEXT:
        return None
    return kept_positions(~visual & valid, text_rows)[0]


def query_row_count(definition: Importance, num_tokens: int, num_text: int) -> int:
    """How many query rows `definition` reads in a row of `num_tokens` positions, `num_text` of them text (what
    `query_rows` gives, counted on the host)."""
    return {Importance.TEXT: num_text, Importance.LAST: 1}.get(definition, num_tokens)


def attention_parts(
    queries: torch.Tensor,
    keys: torch.Tensor,
    visual: torch.Tensor,
    valid: torch.Tensor,
    definition: Importance,
    head_chunk: int = 8,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head column aggregates of causal softmax attention, shape (B, P, H, L).

    queries: (B, H, L, d), or (B, H, Q, d) at `positions` (B, Q) (`query_rows`: the rows the importance reads);
    keys: (B, H_kv, L, d) with H a multiple of H_kv (grouped-query attention). visual, valid: (B, L) bool. Parts are
    zero outside visual columns. Heads are processed in chunks so memory stays at (B, head_chunk, Q, L).
    """
    batch, num_heads, _, head_dim = queries.shape
    group = num_heads // keys.shape[1]
    rows = _row_weights(visual, valid, definition)  # (B, P, L)
    if positions is None:
        masked = ~causal_allowed(valid)[:, None]
    else:
        length = valid.shape[1]
        present = positions < length
        positions = positions.clamp(max=length - 1)
        columns = torch.arange(length, device=valid.device)
        masked = ~((columns[None, None, :] <= positions[..., None]) & valid[:, None, :])[:, None]
        rows = rows.gather(2, positions[:, None, :].expand(-1, rows.shape[1], -1)) * present[:, None, :]
    scale = head_dim**-0.5
    keys = keys.float()
    chunks = []
    for start in range(0, num_heads, head_chunk):
        q = queries[:, start : start + head_chunk].float()
        if group == 1:
            k = keys[:, start : start + head_chunk]
        else:
            k = keys.index_select(1, torch.arange(start, start + q.shape[1], device=q.device) // group)
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale
        # a finite fill keeps rows without any allowed key (padding) finite; their row weight is zero, and in
        # every other row exp(min - max) underflows to exactly the 0 that -inf would give
        probs = torch.softmax(logits.masked_fill_(masked, torch.finfo(logits.dtype).min), dim=-1)
        chunks.append(torch.einsum("bpi,bhij->bphj", rows, probs))
    parts = torch.cat(chunks, dim=2)
    return parts * visual[:, None, None, :].to(parts.dtype)


def _row_weights(visual: torch.Tensor, valid: torch.Tensor, definition: Importance) -> torch.Tensor:
    """(B, P, L) weights over query rows whose weighted sum of attention rows gives each part."""
    visual_rows = (visual & valid).float()
    text_rows = (~visual & valid).float()

    def mean_over(rows: torch.Tensor) -> torch.Tensor:
        return rows / rows.sum(-1, keepdim=True).clamp(min=1.0)

    if definition is Importance.PAPER:
        return torch.stack([mean_over(visual_rows), mean_over(text_rows)], dim=1)
    if definition is Importance.TEXT:
        return mean_over(text_rows)[:, None]
    last = torch.zeros_like(visual_rows)
    last[:, -1] = 1.0  # left padding keeps the last position valid
    return last[:, None]


def importance_from_parts(parts: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
    """Combine (..., P, H, L) parts into (..., L) importance using the first `num_heads` heads."""
    if num_heads is not None:
        parts = parts[..., :num_heads, :]
    return parts.mean(dim=-2).prod(dim=-2)


def normalized(scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Scale each row's visual scores to mean 1 over its visual tokens (zero elsewhere)."""
    scores = scores * visual.to(scores.dtype)
    count = visual.sum(-1, keepdim=True).clamp(min=1)
    total = scores.sum(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    return scores * count / total


def top_k_mask(scores: torch.Tensor, visual: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(B, L) bool: each row's top-k visual positions by score, k = keep_count(n_visual, keep_ratio)."""
    return top_count_mask(scores, visual, keep_count(visual.sum(-1), keep_ratio))


def top_count_mask(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: each row's `counts` (B,) highest-scoring candidate positions (ties: earlier position first)."""
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < counts[:, None]) & candidates
