"""The per-layer selector: a low-rank, RoPE-aware stand-in for a decoder layer's query/key attention."""

from __future__ import annotations

import torch
from torch import nn

from ..tokens import at_positions
from .importance import Importance, apply_rope, attention_parts, importance_from_parts

SELECTOR_TENSOR_NAMES = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")


class LayerSelector(nn.Module):
    """Scores visual tokens for one decoder layer.

    Queries and keys are rank-R projections of the layer's normed input (R = heads x head_dim), rotated with
    the model's own cos/sin, so selector heads see the same (M-)RoPE positions as the layer does.
    """

    def __init__(self, hidden_size: int, rank: int, head_dim: int):
        super().__init__()
        if rank % head_dim:
            raise ValueError(f"selector rank {rank} must be a multiple of the head dimension {head_dim}")
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, rank)
        self.k_proj = nn.Linear(hidden_size, rank)

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    def _rotated(self, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, L, R) projected states to rotated (B, G, L, head_dim) selector heads."""
        shape = (*projected.shape[:2], self.num_heads, self.head_dim)
        return apply_rope(projected.view(shape).transpose(1, 2), cos, sin)

    def project(
        self, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) normed states to rotated (B, G, L, head_dim) selector queries and keys."""
        return self._rotated(self.q_proj(normed), cos, sin), self._rotated(self.k_proj(normed), cos, sin)

    def parts(
        self,
        normed: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visual: torch.Tensor,
        valid: torch.Tensor,
        definition: Importance,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-head importance parts (B, P, G, L); see `attention_parts`. With `positions` (B, Q) (`query_rows`)
        only those rows get queries, which gives the same parts when they are all the rows `definition` reads."""
        query_states = normed if positions is None else at_positions(normed, positions)
        return self.projected_parts(
            self.q_proj(query_states), self.k_proj(normed), cos, sin, visual, valid, definition, positions
        )

    def projected_parts(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visual: torch.Tensor,
        valid: torch.Tensor,
        definition: Importance,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`parts` from the selector's projections already applied: `queries` (B, Q, R) at `positions` (every
        position if None) and `keys` (B, L, R) at every position."""
        query_cos, query_sin = (cos, sin) if positions is None else (at_positions(t, positions) for t in (cos, sin))
        return attention_parts(
            self._rotated(queries, query_cos, query_sin), self._rotated(keys, cos, sin), visual, valid, definition,
            positions=positions,
        )

    def scores(
        self,
        normed: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visual: torch.Tensor,
        valid: torch.Tensor,
        definition: Importance,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) importance of each visual token (zero elsewhere); `positions` as for `parts`."""
        return importance_from_parts(self.parts(normed, cos, sin, visual, valid, definition, positions))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], head_dim: int) -> LayerSelector:
        """Build from {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"}."""
        rank, hidden = tensors["q_proj.weight"].shape
        selector = cls(hidden, rank, head_dim)
        selector.load_state_dict(tensors)
        return selector

    def truncated(self, rank: int) -> LayerSelector:
        """A copy keeping only the leading selector heads (rank must be a multiple of head_dim)."""
        state = {name: tensor[:rank].clone() for name, tensor in self.state_dict().items()}
        return LayerSelector.from_tensors(state, self.head_dim)
