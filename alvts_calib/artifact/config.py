"""The runtime configuration a selector artifact carries: what routed layers do with the visual tokens they skip."""

from __future__ import annotations

from enum import Enum

from ..errors import AlvtsError


class SkippedKeys(str, Enum):
    """What the tokens a routed layer processes see of the visual tokens that skip it."""

    DROP = "drop"  # nothing: they are not among the layer's keys (the paper)
    POOL = "pool"  # one stand-in per row with their mean key and value and their attention mass (see `Pool`)


class SkippedUpdate(str, Enum):
    """What the visual tokens that skip a layer receive from it."""

    NONE = "none"  # nothing: they keep their hidden state (the paper)
    MEAN = "mean"  # the mean residual update of the visual tokens the layer processed in the same row
    LINEAR = "linear"  # mean plus the layer's fitted map of their own deviation from those tokens (see skip_update)
    STAND_IN = "stand-in"  # the update the layer gives their pooled stand-in plus the fitted map (SkippedKeys.POOL)
    EXACT = "exact"  # diagnostic bound: the update the layer gives them unrouted (it also runs on every token)

    @property
    def fitted(self) -> bool:
        """Whether it adds each layer's fitted map (`skip_update`), which the selector must then carry."""
        return self in (SkippedUpdate.LINEAR, SkippedUpdate.STAND_IN)


def default_skipped_update(skipped_keys: SkippedKeys, has_fitted_maps: bool) -> SkippedUpdate:
    """The toolkit's skipped update for a runtime: the processed tokens' mean update plus the fitted map (`linear`)
    when the selector carries the maps, otherwise none. It is the one that holds on both the demo and real weights
    (docs/DESIGN.md); `skipped_keys` does not change it."""
    return SkippedUpdate.LINEAR if has_fitted_maps else SkippedUpdate.NONE


def check_skipped_update(skipped_update: SkippedUpdate, skipped_keys: SkippedKeys) -> None:
    """Fail when `skipped_update` needs something `skipped_keys` does not give (the stand-in needs pooling)."""
    if skipped_update is SkippedUpdate.STAND_IN and skipped_keys is not SkippedKeys.POOL:
        raise AlvtsError(
            "skipped_update 'stand-in' passes on the update of the pooled stand-in, which skipped_keys "
            f"'{skipped_keys.value}' does not have; use skipped_keys 'pool', or skipped_update 'linear' or 'none'"
        )
