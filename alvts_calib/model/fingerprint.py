"""A model fingerprint that travels with artifacts, so an artifact is never attached to the wrong model.

It pins the architecture (family, attention geometry, the config fields that shape the computation and a digest
of every parameter's name and shape) and samples a few values of every decoder layer's weight matrices and of the
weights outside the decoder layers. Samples are compared with a tolerance that allows loading in another dtype
(bf16 vs fp32) than at calibration, so they are stored as values rather than hashed.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from torch import nn

from ..errors import ModelMismatchError
from .adapters import AttentionGeometry, decoder_layers, get_adapter
from .devices import materialized

GEOMETRY_KEYS = ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
SAMPLES_PER_MATRIX = 4  # per weight matrix of a decoder layer (q/k/v/o and the MLP)
SAMPLES_OUTSIDE = 2  # per weight matrix outside the decoder layers (embeddings, vision tower, projector)
SAMPLE_RTOL = 1e-2  # bf16 keeps about three significant digits
SAMPLE_ATOL = 1e-6  # fp16 flushes the smallest values to zero
TEXT_FIELDS = (
    "model_type", "hidden_act", "intermediate_size", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "tie_word_embeddings",
)
MODEL_FIELDS = (
    "model_type", "image_token_index", "image_token_id", "video_token_id", "vision_feature_layer",
    "vision_feature_select_strategy", "projector_hidden_act", "multimodal_projector_bias", "image_grid_pinpoints",
)
VISION_FIELDS = (
    "model_type", "hidden_act", "image_size", "patch_size", "spatial_merge_size", "temporal_patch_size",
    "window_size", "fullatt_block_indexes", "layer_norm_eps",
)


def _own(name: str) -> bool:
    """Whether a parameter belongs to the model (not to an attached selector)."""
    return "alvts_" not in name


def _architecture(model: nn.Module) -> dict[str, Any]:
    """The config fields that shape the computation, as JSON values ("text.rope_parameters", "vision.patch_size")."""
    config = model.config
    text = config.get_text_config(decoder=True)
    sections = [("text", text, TEXT_FIELDS)]
    if text is not config:
        sections.append(("model", config, MODEL_FIELDS))
        vision = getattr(config, "vision_config", None)
        if vision is not None:
            sections.append(("vision", vision, VISION_FIELDS))
    return {
        f"{section}.{name}": json.loads(json.dumps(getattr(source, name), sort_keys=True, default=str))
        for section, source, fields in sections
        for name in fields
        if getattr(source, name, None) is not None
    }


def _shape_digest(model: nn.Module) -> str:
    shapes = sorted((name, tuple(p.shape)) for name, p in model.named_parameters() if _own(name))
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


def _matrices(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's weight matrices (two or more dimensions), by name."""
    return sorted(
        ((name, p) for name, p in module.named_parameters() if _own(name) and p.dim() >= 2), key=lambda item: item[0]
    )


def _sampled(matrices: list[tuple[str, torch.Tensor]], count: int) -> list[float]:
    """`count` values spread evenly over each matrix, in order, to six significant digits."""
    if not matrices:
        return []
    picks = []
    for _, matrix in matrices:
        flat = matrix.detach().reshape(-1)
        last = flat.numel() - 1  # whole-number positions: a float32 linspace would round past the end of large matrices
        positions = torch.tensor([step * last // (count - 1) for step in range(count)], device=flat.device)
        picks.append(flat[positions].float().cpu())
    return [float(f"{value:.6g}") for value in torch.cat(picks).tolist()]


def _outside_blocks(model: nn.Module, layers: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    """The largest submodules that hold no decoder layer (embeddings, vision tower, projector, head), by name."""
    inside = {id(layer) for layer in layers}
    blocks: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if not any(id(m) in inside for m in child.modules()):
                blocks.append((prefix + name, child))
            elif id(child) not in inside:
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return blocks


def _outside_names(model: nn.Module, layers: nn.ModuleList) -> list[str]:
    """The names of the weight matrices outside the decoder layers, in the order they are sampled."""
    return [f"{prefix}.{name}" for prefix, block in _outside_blocks(model, layers) for name, _ in _matrices(block)]


def _weights(model: nn.Module, layers: nn.ModuleList) -> dict[str, list]:
    """Sampled values per decoder layer and outside them; offloaded weights are loaded one block at a time."""
    per_layer = []
    for layer in layers:
        with materialized(layer):
            per_layer.append(_sampled(_matrices(layer), SAMPLES_PER_MATRIX))
    outside: list[float] = []
    for _, block in _outside_blocks(model, layers):
        with materialized(block):
            outside.extend(_sampled(_matrices(block), SAMPLES_OUTSIDE))
    return {"layers": per_layer, "other": outside}


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Family, attention geometry, architecture fields, a digest of every parameter's shape, sampled weights."""
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
        "architecture": _architecture(model),
        "weight_shapes": _shape_digest(model),
        "weights": _weights(model, layers),
    }


def _close(found: list[float], wanted: list[float]) -> bool:
    return len(found) == len(wanted) and all(
        math.isclose(a, b, rel_tol=SAMPLE_RTOL, abs_tol=SAMPLE_ATOL) for a, b in zip(found, wanted, strict=True)
    )


def _differing(found: list[float], wanted: list[float], names: list[str], count: int) -> str:
    """The name of the first matrix whose samples differ."""
    for position, name in enumerate(names):
        part = slice(position * count, (position + 1) * count)
        if not _close(found[part], wanted[part]):
            return name
    return "a weight matrix"


def check_fingerprint(expected: dict[str, Any], model: nn.Module) -> None:
    """Raise ModelMismatchError naming the first difference between a (validated) fingerprint and `model`."""
    actual = model_fingerprint(model)
    wanted_architecture, found_architecture = expected["architecture"], actual["architecture"]
    differences = [(key, expected[key], actual[key]) for key in GEOMETRY_KEYS] + [
        (key, wanted_architecture.get(key), found_architecture.get(key))
        for key in sorted(set(wanted_architecture) | set(found_architecture))
    ]
    for key, wanted, found in differences:
        if wanted != found:
            raise ModelMismatchError(
                f"artifact is for a different model: {key} is {wanted!r} in the artifact but {found!r} in the model"
            )
    if expected["weight_shapes"] != actual["weight_shapes"]:
        raise ModelMismatchError(
            "artifact is for a different model: the names or shapes of its parameters differ from this model's"
        )
    layers = decoder_layers(model)
    for index, (found, wanted) in enumerate(zip(actual["weights"]["layers"], expected["weights"]["layers"],
                                                strict=True)):
        if not _close(found, wanted):
            name = _differing(found, wanted, [name for name, _ in _matrices(layers[index])], SAMPLES_PER_MATRIX)
            _different_weights(f"layer {index} {name}")
    if not _close(actual["weights"]["other"], expected["weights"]["other"]):
        names = _outside_names(model, layers)
        name = _differing(actual["weights"]["other"], expected["weights"]["other"], names, SAMPLES_OUTSIDE)
        _different_weights(f"{name} (outside the decoder layers)")


def _different_weights(where: str) -> None:
    raise ModelMismatchError(
        f"artifact was calibrated on different weights (same architecture): {where} differs; re-run "
        "`alvts calibrate` on this model"
    )
