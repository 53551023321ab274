"""A model fingerprint that travels with artifacts, so an artifact is never attached to the wrong model."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from torch import nn

from .adapters import AttentionGeometry, decoder_layers, get_adapter
from .devices import materialized
from .errors import ModelMismatchError

PROBE_VALUES = 8
PROBE_RTOL = 2e-2  # weights may be loaded in another dtype (bf16 vs fp32) than at calibration


def _probe(layers: nn.ModuleList) -> list[float]:
    """A few weight values from the first, middle and last layers' query/key projections."""
    picks = [layers[0].self_attn.q_proj, layers[len(layers) // 2].self_attn.k_proj, layers[-1].self_attn.q_proj]
    values: list[float] = []
    for projection in picks:
        with materialized(projection):
            values.extend(float(v) for v in projection.weight.detach()[0, :PROBE_VALUES].float().cpu())
    return values


def _shape_digest(layers: nn.ModuleList) -> str:
    shapes = sorted((name, tuple(p.shape)) for name, p in layers.named_parameters())
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Family, attention geometry, a digest of the decoder weight shapes and a few weight values."""
    layers = decoder_layers(model)
    geometry = AttentionGeometry.of(model)
    return {
        "family": get_adapter(model).name,
        "num_layers": geometry.num_layers,
        "hidden_size": geometry.hidden_size,
        "num_heads": geometry.num_heads,
        "num_kv_heads": geometry.num_kv_heads,
        "head_dim": geometry.head_dim,
        "vocab_size": model.config.get_text_config(decoder=True).vocab_size,
        "weight_shapes": _shape_digest(layers),
        "weight_probe": _probe(layers),
    }


def check_fingerprint(expected: dict[str, Any], model: nn.Module) -> None:
    """Raise ModelMismatchError naming the first difference between an artifact's fingerprint and `model`."""
    actual = model_fingerprint(model)
    for key, wanted in expected.items():
        found = actual.get(key)
        if key == "weight_probe":
            close = len(found) == len(wanted) and all(
                math.isclose(a, b, rel_tol=PROBE_RTOL, abs_tol=1e-3) for a, b in zip(found, wanted, strict=True)
            )
            if not close:
                raise ModelMismatchError(
                    "artifact was calibrated on different weights (same architecture); re-run `alvts calibrate` "
                    "on this model"
                )
        elif found != wanted:
            raise ModelMismatchError(
                f"artifact is for a different model: {key} is {wanted!r} in the artifact but {found!r} in the model"
            )
