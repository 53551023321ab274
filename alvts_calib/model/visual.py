"""Where the visual tokens are, for the forward pass at hand.

Multimodal families mark them when image/video features are scattered into the embeddings (their
`get_placeholder_mask`), on both the input_ids and the inputs_embeds paths. Language models alone, or
custom VLMs, give an explicit (B, N) mask over sequence positions instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import AlvtsError
from .adapters import FamilyAdapter

TRACKER_ATTRIBUTE = "_alvts_visual_tracker"


class VisualTracker:
    """Records visual positions from placeholder masks or an explicit mask, and hands them to the text model."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.adapter = adapter
        self.owner = adapter.placeholder_owner(model)
        self.pending: torch.Tensor | None = None
        self.explicit: torch.Tensor | None = None

    def install(self) -> None:
        """Start recording the owner's placeholder masks."""
        if self.owner is None:
            return
        original = self.owner.get_placeholder_mask
        signature = inspect.signature(original)
        read = self.adapter.read_placeholder

        def recording_placeholder_mask(*args, **kwargs):
            result = original(*args, **kwargs)
            self.record(read(result, signature.bind(*args, **kwargs).arguments))
            return result

        self.owner.get_placeholder_mask = recording_placeholder_mask

    def remove(self) -> None:
        """Stop recording; the owner's own method is visible again."""
        if self.owner is not None and "get_placeholder_mask" in vars(self.owner):
            del self.owner.get_placeholder_mask

    def reset(self) -> None:
        """Forget placeholder masks from an earlier forward pass."""
        self.pending = None

    def record(self, visual: torch.Tensor) -> None:
        self.pending = visual if self.pending is None else self.pending | visual

    def known_text_only(self, past: int) -> bool:
        """Whether the next `take` has no visual position, known without reading a tensor: no mask was recorded
        and no explicit mask reaches position `past`."""
        return self.pending is None and (self.explicit is None or past >= self.explicit.shape[1])

    def take(self, batch: int, length: int, past: int, device: torch.device) -> torch.Tensor:
        """(B, L) visual mask for the positions [past, past + L) of this forward pass, consuming recorded masks."""
        pending, self.pending = self.pending, None
        if pending is not None:
            if tuple(pending.shape) != (batch, length):
                raise AlvtsError(
                    f"recorded visual mask has shape {tuple(pending.shape)} but the text model got ({batch}, {length})"
                )
            return pending.to(device=device, dtype=torch.bool)
        if self.explicit is not None:
            return _window(self.explicit, batch, length, past).to(device)
        return torch.zeros(batch, length, dtype=torch.bool, device=device)


def _window(mask: torch.Tensor, batch: int, length: int, past: int) -> torch.Tensor:
    """Columns [past, past + length) of an explicit (B, N) mask; positions beyond N are text."""
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise AlvtsError(f"visual mask must have shape (batch={batch}, sequence), got {tuple(mask.shape)}")
    window = mask[:, past : past + length].bool()
    if window.shape[1] == length:
        return window
    if window.shape[1] == 0:
        return torch.zeros(batch, length, dtype=torch.bool, device=mask.device)
    raise AlvtsError(
        f"visual mask covers {mask.shape[1]} positions but this forward pass spans positions {past}..{past + length}"
    )


def tracker_of(model: nn.Module) -> VisualTracker:
    tracker = getattr(model, TRACKER_ATTRIBUTE, None)
    if tracker is None:
        raise AlvtsError("no ALVTS selector is attached to this model; call alvts_calib.attach(model, artifact) first")
    return tracker


@contextmanager
def visual_positions(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Route with an explicit (B, N) bool mask of visual sequence positions (language models, custom VLMs).

    Inside the block, forward passes and generate() treat mask[:, p] as "position p is visual"; positions past N
    (generated tokens) are text. Placeholder masks recorded by multimodal families take precedence.
    """
    tracker = tracker_of(model)
    previous, tracker.explicit = tracker.explicit, mask.bool()
    try:
        yield
    finally:
        tracker.explicit = previous
