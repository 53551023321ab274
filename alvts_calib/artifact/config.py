"""The runtime configuration: how routed layers run, with every default in one place and one `validate()`.

`export` writes it into the selector artifact (as the metadata fields it has always had: the bytes are unchanged),
`Selector.runtime` reads it back, and `attach`, `evaluate` and the CLI take it, so `attach(model, artifact)` and
`alvts generate` run the same runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from ..errors import AlvtsError
from ..options import check_keep_ratio, parse_choice
from ..selector.importance import Importance
from .budgets import Budget, parse_budget


class SkippedKeys(str, Enum):
    """What the tokens a routed layer processes see of the visual tokens that skip it."""

    DROP = "drop"  # nothing: they are not among the layer's keys (the paper)
    POOL = "pool"  # one stand-in per row with their mean key and value and their attention mass (see `Pool`)
    ALL = "all"  # every one's own key and value, from its current state: attention runs on every token (see
    # `RoutedLayerMixin._keys_all_forward`), as a serving engine's unchanged attention call would; the MLP does not


class SkippedUpdate(str, Enum):
    """What the visual tokens that skip a layer receive from it."""

    NONE = "none"  # nothing: they keep their hidden state (the paper)
    MEAN = "mean"  # the mean residual update of the visual tokens the layer processed in the same row
    LINEAR = "linear"  # mean plus the layer's fitted map of their own deviation from those tokens (`skip_map`)
    STAND_IN = "stand-in"  # the update the layer gives their pooled stand-in plus the fitted map (SkippedKeys.POOL)
    EXACT = "exact"  # diagnostic bound: the update the layer gives them unrouted (it also runs on every token)

    @property
    def fitted(self) -> bool:
        """Whether it adds each layer's fitted map (`selector.skip_map`), which the selector must then carry."""
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


DEFAULT_BUDGET = Budget.SENSITIVITY  # how export spreads tokens over layers; measured on the demo (docs/DESIGN.md)
DEFAULT_SKIPPED_KEYS = SkippedKeys.POOL  # what export writes, and evaluate and the CLI run
# What an artifact that does not record a setting runs with (written before the setting existed), and what the
# bare runtime under `attach_policies` runs with: the paper's routing.
UNRECORDED_SKIPPED_KEYS = SkippedKeys.DROP
UNRECORDED_SKIPPED_UPDATE = SkippedUpdate.NONE


@dataclass(frozen=True)
class RuntimeConfig:
    """How routed layers run: how many visual tokens each keeps, and what it does with the ones it skips.

    Strings are accepted for the choices and checked when the config is made. `skipped_update` None is the
    toolkit's default for the selector at hand (`default_skipped_update`: "linear" with fitted skip maps, else
    "none"). `keep_ratio` is the average share of visual tokens a routed layer processes: export spreads it over
    layers by `budget`; given to `attach`, it replaces the artifact's per-layer ratios with one ratio for every
    layer. `keep_ratios` and `importance` are what an artifact records (the exported split, and the importance the
    selector was calibrated to read).
    """

    keep_ratio: float | None = None
    budget: Budget = DEFAULT_BUDGET
    skipped_keys: SkippedKeys = DEFAULT_SKIPPED_KEYS
    skipped_update: SkippedUpdate | None = None
    keep_ratios: Mapping[int, float] = field(default_factory=dict)
    importance: Importance | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))
        object.__setattr__(self, "skipped_keys", parse_choice(SkippedKeys, self.skipped_keys, "skipped_keys"))
        if self.skipped_update is not None:
            object.__setattr__(
                self, "skipped_update", parse_choice(SkippedUpdate, self.skipped_update, "skipped_update")
            )
        if self.importance is not None:
            object.__setattr__(self, "importance", parse_choice(Importance, self.importance, "importance"))

    @property
    def pooled(self) -> bool:
        return self.skipped_keys is SkippedKeys.POOL

    @property
    def sees_skipped(self) -> bool:
        """The text reads the skipped visual tokens (pooled, or every one's own key), as when sensitivity was
        measured (with pooled keys)."""
        return self.skipped_keys is not SkippedKeys.DROP

    def replace(self, **changes: Any) -> RuntimeConfig:
        """A copy with `changes`; None values leave a field as it is."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def resolved(self, has_fitted_maps: bool) -> RuntimeConfig:
        """The config with `skipped_update` filled in for a selector that has (or lacks) fitted skip maps."""
        if self.skipped_update is not None:
            return self
        return replace(self, skipped_update=default_skipped_update(self.skipped_keys, has_fitted_maps))

    def validate(
        self,
        *,
        routed_layers: Iterable[int] | None = None,
        fitted_layers: Iterable[int] | None = None,
        exporting: bool = False,
    ) -> RuntimeConfig:
        """Fail with a one-line error on a value or combination routed layers cannot run; returns the config.

        With `routed_layers` (the layers that may skip visual tokens) and `fitted_layers` (those whose fitted skip
        map the selector carries), a fitted update must have a map in every routed layer. `exporting` also checks
        what export needs: a keep ratio, and pooled skipped keys for the measured "sensitivity" budget.
        """
        if self.keep_ratio is not None:
            check_keep_ratio(self.keep_ratio)
        for index, ratio in self.keep_ratios.items():
            if not 0.0 <= ratio <= 1.0:
                raise AlvtsError(f"layer {index}'s keep ratio must be in [0, 1], got {ratio}")
        if self.skipped_update is not None:
            check_skipped_update(self.skipped_update, self.skipped_keys)
            if routed_layers is not None:
                require_fitted_maps(self.skipped_update, routed_layers, fitted_layers or ())
        if exporting:
            if self.keep_ratio is None:
                raise AlvtsError("export needs a keep ratio (or a compression)")
            if self.budget is Budget.SENSITIVITY and not self.sees_skipped:
                raise AlvtsError(
                    "budget 'sensitivity' is measured with pooled skipped keys; export with --skipped-keys pool (or "
                    "all) or choose another budget"
                )
        return self

    def metadata(self) -> dict[str, Any]:
        """The fields export writes into a selector artifact (besides its per-layer keep ratios and importance)."""
        return {
            "keep_ratio": self.keep_ratio,
            "budget": self.budget.value,
            "skipped_keys": self.skipped_keys.value,
            "skipped_update": None if self.skipped_update is None else self.skipped_update.value,
        }

    @classmethod
    def of_artifact(cls, metadata: Mapping[str, Any], keep_ratios: Mapping[int, float], importance: Importance):
        """The config a selector artifact records; settings it does not record are the paper's (`UNRECORDED_*`)."""
        return cls(
            keep_ratio=metadata.get("keep_ratio"),
            budget=metadata.get("budget", Budget.UNIFORM),
            skipped_keys=metadata.get("skipped_keys", UNRECORDED_SKIPPED_KEYS),
            skipped_update=metadata.get("skipped_update", UNRECORDED_SKIPPED_UPDATE),
            keep_ratios=dict(keep_ratios),
            importance=importance,
        )


def require_fitted_maps(skipped_update: SkippedUpdate, routed_layers: Iterable[int], fitted_layers: Iterable[int]):
    """Fail when `skipped_update` adds fitted skip maps and a layer that may skip visual tokens has none."""
    missing = sorted(set(routed_layers) - set(fitted_layers)) if skipped_update.fitted else []
    if missing:
        raise AlvtsError(
            f"skipped_update '{skipped_update.value}' needs fitted skip updates for layers {missing}, and the "
            "selector has none there; calibrate with --skip-update-rank above 0 and export again, or use 'none' "
            "or 'mean'"
        )
