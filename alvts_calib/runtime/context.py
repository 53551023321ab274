"""What a forward pass tells its routed layers: visual and valid positions, host-side counts, what each layer did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class PassCounts:
    """Host-side token counts of one forward pass, read once so routed layers need no host syncs of their own."""

    visual: list[int]  # valid visual tokens per row
    text: list[int]  # valid text tokens per row
    length: int  # sequence length of the pass
    last_text: bool  # every row ends with a valid text token

    @classmethod
    def of(cls, visual: torch.Tensor, valid: torch.Tensor) -> PassCounts:
        """Counts of (B, L) masks, with one device-to-host copy."""
        last_text = valid[:, -1] & ~visual[:, -1]
        rows = torch.stack([(visual & valid).sum(-1), (~visual & valid).sum(-1), last_text.long()]).tolist()
        return cls(visual=rows[0], text=rows[1], length=visual.shape[1], last_text=all(rows[2]))

    @classmethod
    def decoding_step(cls, batch: int) -> PassCounts:
        """Counts of a one-position pass without visual tokens, with no device read: a routed layer processes a
        pass's last position whether or not it is padding, so it counts as that row's text token."""
        return cls(visual=[0] * batch, text=[1] * batch, length=1, last_text=True)

    @property
    def has_visual(self) -> bool:
        return any(self.visual)

    @property
    def all_valid(self) -> bool:
        return all(v + t == self.length for v, t in zip(self.visual, self.text, strict=True))


@dataclass
class ForwardContext:
    """What every routed layer needs to know about the current forward pass."""

    visual: torch.Tensor  # (B, L) bool: visual positions among this pass's inputs
    valid: torch.Tensor  # (B, L) bool: non-padding positions among this pass's inputs
    selected: dict[int, torch.Tensor | None] = field(default_factory=dict)  # layer -> its visual keep mask (None: all)
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,) bool: it processed a pooled stand-in
    counts: PassCounts | None = None  # host-side counts; computed on first use if not given
    policy_state: dict[str, Any] = field(default_factory=dict)  # what a pass's policies hand on to later layers

    def processed_counts(self) -> dict[int, torch.Tensor]:
        """Per routed layer, the (B,) visual tokens it processed, a pooled stand-in counting as one (counted here,
        off the hot path)."""
        visual = self.visual & self.valid
        counts = {
            layer: (visual if keep is None else keep & self.valid).sum(-1) for layer, keep in self.selected.items()
        }
        for layer, pooled in self.pooled.items():
            counts[layer] = counts[layer] + pooled.long()
        return counts

    def host_counts(self) -> PassCounts:
        """The pass's host-side counts (one device sync the first time, none after)."""
        if self.counts is None:
            self.counts = PassCounts.of(self.visual, self.valid)
        return self.counts
