"""The one schema of selector artifacts and calibration files: every metadata field and tensor is checked here.

Files are checked when read, before anything uses them, and a selector built in memory is checked the same way
before `attach` changes the model. Each problem is one line naming the field (`fingerprint.num_layers`,
`keep_ratios`, `tensor layers.3.q_proj.weight`) and what to do about it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, NoReturn

import torch

from ..errors import ArtifactError
from ..model.adapters import SUPPORTED_FAMILIES
from ..options import TORCH_DTYPES
from ..selector.importance import Importance
from ..selector.layer import SELECTOR_TENSOR_NAMES
from ..selector.skip_map import SKIP_UPDATE_TENSOR_NAMES
from ..selector.solver import Init
from .budgets import Budget
from .config import SkippedKeys, SkippedUpdate

SELECTOR_FORMAT = "alvts-selector"
CALIBRATION_FORMAT = "alvts-calibration"
FORMAT_VERSION = 2
ADVICE = {SELECTOR_FORMAT: "re-export it with `alvts export`", CALIBRATION_FORMAT: "re-run `alvts calibrate`"}
MAX_ARCHITECTURE_DEPTH = 3
INDEX = re.compile(r"0|[1-9][0-9]{0,5}")
Check = Callable[[Any, str], None]


class _Invalid(Exception):
    """One schema violation: where it is and what is wrong."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where} {problem}")


def _fail(where: str, problem: str) -> NoReturn:
    raise _Invalid(where, problem)


def _kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _type(value: Any, kind: type, what: str, where: str) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        _fail(where, f"must be {what}, got {_kind(value)}")


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        _type(value, int, "a whole number", where)
        if (low is not None and value < low) or (high is not None and value > high):
            _fail(where, f"must be between {low} and {high}, got {value}" if high is not None
                  else f"must be at least {low}, got {value}")
    return check


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
           finite: bool = True) -> Check:
    """A JSON number in the range; non-finite values only where `finite` is False (NaN marks "not measured")."""
    def check(value: Any, where: str) -> None:
        _type(value, (int, float), "a number", where)
        if not math.isfinite(value):
            if finite:
                _fail(where, f"must be a finite number, got {value}")
            return
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            _fail(where, f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value}")
    return check


def text(*choices: str, pattern: str | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        _type(value, str, "a string", where)
        if choices and value not in choices:
            _fail(where, f"must be one of {', '.join(choices)}, got {value!r}")
        if pattern is not None and not re.fullmatch(pattern, value):
            _fail(where, f"is not a valid value: {value[:40]!r}")
    return check


def choice(kind: type[Enum]) -> Check:
    """One of the values of the str enum `kind`."""
    return text(*(member.value for member in kind))


def boolean(value: Any, where: str) -> None:
    _type(value, bool, "true or false", where)


def optional(check: Check) -> Check:
    """`check`, or null."""
    def checked(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)
    return checked


def items(check: Check, minimum: int = 0) -> Check:
    """A list whose every item passes `check`."""
    def checked(value: Any, where: str) -> None:
        _type(value, list, "a list", where)
        if len(value) < minimum:
            _fail(where, f"must have at least {minimum} item(s)")
        for position, item in enumerate(value):
            check(item, f"{where}[{position}]")
    return checked


def mapping(check: Check, *, numbered: str | None = None, minimum: int = 0) -> Check:
    """An object whose every value passes `check`; with `numbered` (what its keys count, e.g. "a layer index"), keys
    are whole numbers written plainly ("0", "12")."""
    def checked(value: Any, where: str) -> None:
        _type(value, dict, "an object", where)
        if len(value) < minimum:
            _fail(where, "must not be empty")
        for key, item in value.items():
            if numbered and not INDEX.fullmatch(key):
                _fail(where, f"has key {key[:20]!r}, which is not {numbered} (0, 1, 2, ...)")
            check(item, f"{where}[{key!r}]")
    return checked


def fields(required: Mapping[str, Check], extra: Mapping[str, Check] | None = None) -> Check:
    """An object with exactly the `required` keys plus any of the `extra` ones, each passing its check."""
    extra = extra or {}

    def checked(value: Any, where: str) -> None:
        _type(value, dict, "an object", where)
        missing = [key for key in required if key not in value]
        if missing:
            _fail(where, f"lacks {', '.join(missing)}")
        unexpected = sorted(key for key in value if key not in required and key not in extra)
        if unexpected:
            _fail(where, f"has unexpected key(s) {', '.join(repr(key[:40]) for key in unexpected[:3])}")
        for key, check in {**required, **extra}.items():
            if key in value:
                check(value[key], f"{where}.{key}")
    return checked


def _json_value(depth: int) -> Check:
    """A JSON value nested at most `depth` levels (config fields)."""
    def check(value: Any, where: str) -> None:
        if isinstance(value, list | dict):
            if depth == 0:
                _fail(where, "is nested too deeply")
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                _json_value(depth - 1)(item, f"{where}[{key!r}]")
        elif not isinstance(value, str | int | float | bool | None):
            _fail(where, f"must be a JSON value, got {_kind(value)}")
    return check


_positive = integer(1)
_count = integer(0)
_ratio = number(0.0, 1.0)
_measure = optional(number(finite=False))  # a statistic that may be NaN (or null) where undefined

FINGERPRINT = fields({
    "family": text(*SUPPORTED_FAMILIES), "num_layers": _positive, "hidden_size": _positive, "num_heads": _positive,
    "num_kv_heads": _positive, "head_dim": _positive, "vocab_size": _positive,
    "architecture": mapping(_json_value(MAX_ARCHITECTURE_DEPTH)),
    "weight_shapes": text(pattern="[0-9a-f]{16}"),
    "weights": fields({"layers": items(items(number())), "other": items(number())}),
})
OPTIONS = fields({
    "rank": _positive, "start_layer": _count, "importance": choice(Importance),
    "init": choice(Init), "refine_steps": _count,
    "heldout_fraction": number(0.0, 1.0, high_open=True), "report_keep_ratio": number(0.0, 1.0, low_open=True),
    "seed": integer(), "skip_update_rank": _count, "sensitivity_samples": _count,
})
SUMMARY_FIELDS = {
    "samples": _positive, "rows": _positive, "heldout_samples": _count, "heldout_is_train": boolean,
    "skipped_without_visual": _count, "visual_tokens": _positive,
}
SUMMARY_EXTRA = {
    "sensitivity_samples": _count, "sensitivity_update": choice(SkippedUpdate), "sensitivity_unfinished": boolean,
}
REFINED = fields({
    "compression": number(0.0, 1.0, high_open=True), "tokens": mapping(_count, numbered="a layer index"),
    "divergence_before": number(0.0), "divergence_after": number(0.0), "evaluations": _positive,
    "samples": _positive,
})
ALLOCATION = fields({
    "method": text(), "target_keep_ratio": number(0.0, 1.0, low_open=True), "visual_tokens": _positive,
    "mean_tokens_per_layer": number(0.0), "uniform_tokens_per_layer": _count, "mean_keep_ratio": _ratio,
    "tokens": mapping(_count, numbered="a layer index"),
})
SELECTOR = fields(
    {
        "format": text(SELECTOR_FORMAT), "format_version": integer(FORMAT_VERSION, FORMAT_VERSION),
        "importance": choice(Importance), "fingerprint": FINGERPRINT,
        "keep_ratios": mapping(_ratio, numbered="a layer index", minimum=1),
    },
    {
        "family": text(*SUPPORTED_FAMILIES), "rank": _positive, "dtype": text(*TORCH_DTYPES),
        "keep_ratio": number(0.0, 1.0, low_open=True), "budget": choice(Budget),
        "skipped_keys": choice(SkippedKeys), "skipped_update": choice(SkippedUpdate),
        "allocation": ALLOCATION, "start_layer": _count,
        "calibration": fields({**SUMMARY_FIELDS, "data_sha256": text(pattern="[0-9a-f]{64}"), "options": OPTIONS},
                              SUMMARY_EXTRA),
        "fidelity": mapping(mapping(_measure), numbered="a layer index"), "toolkit_version": text(),
    },
)
CALIBRATION = fields(
    {
        "format": text(CALIBRATION_FORMAT), "format_version": integer(FORMAT_VERSION, FORMAT_VERSION),
        "fingerprint": FINGERPRINT, "data_sha256": text(pattern="[0-9a-f]{64}"), "options": OPTIONS,
        "family": text(*SUPPORTED_FAMILIES), "summary": fields(SUMMARY_FIELDS, SUMMARY_EXTRA),
        "toolkit_version": text(), "layer_stats": mapping(mapping(_measure), numbered="a layer index"),
    },
    {"refined_budgets": mapping(REFINED, numbered="a token count"), "model": text()},
)
SCHEMAS = {SELECTOR_FORMAT: SELECTOR, CALIBRATION_FORMAT: CALIBRATION}


def check_metadata(metadata: Any, formats: tuple[str, ...], path: Any) -> dict[str, Any]:
    """`metadata` checked against the schema of its format, which must be one of `formats`."""
    if not isinstance(metadata, dict) or metadata.get("format") not in formats:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise ArtifactError(f"{path}: expected a {' or '.join(formats)} file, found format {str(found)[:40]!r}")
    kind = metadata["format"]
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {str(metadata.get('format_version'))[:20]} is not supported (this toolkit reads "
            f"version {FORMAT_VERSION}); upgrade alvts-calib or {ADVICE[kind]}"
        )
    _checked(path, kind, lambda: (SCHEMAS[kind](metadata, "metadata"), _consistent(metadata)))
    return metadata


def _checked(path: Any, kind: str, run: Callable[[], object]) -> None:
    try:
        run()
    except _Invalid as problem:
        raise ArtifactError(f"{path}: {problem}; {ADVICE[kind]}") from None


def _layer_range(indices: Any, low: int, high: int, where: str) -> None:
    outside = sorted(int(index) for index in indices if not low <= int(index) < high)
    if outside:
        _fail(where, f"names layer(s) {outside[:5]} outside {low}..{high - 1} (the model's decoder layers)")


def _consistent(metadata: dict[str, Any]) -> None:
    """What the field types alone do not say: layer indices within the model, and fields that must agree."""
    fingerprint = metadata["fingerprint"]
    layers = fingerprint["num_layers"]
    if len(fingerprint["weights"]["layers"]) != layers:
        _fail("metadata.fingerprint.weights.layers", f"must have one entry per layer ({layers})")
    if metadata.get("family", fingerprint["family"]) != fingerprint["family"]:
        _fail("metadata.family", "differs from fingerprint.family")
    if metadata["format"] == SELECTOR_FORMAT:
        _layer_range(metadata["keep_ratios"], 0, layers, "metadata.keep_ratios")
        for name in ("fidelity", "allocation"):
            part = metadata.get(name, {})
            indices = part.get("tokens", {}) if name == "allocation" else part
            if set(indices) - set(metadata["keep_ratios"]):
                _fail(f"metadata.{name}", "names layers that keep_ratios does not")
        first = min(map(int, metadata["keep_ratios"]))
        if metadata.get("start_layer", first) != first:
            _fail("metadata.start_layer", "is not the first layer of keep_ratios")
        return
    options = metadata["options"]
    if options["start_layer"] >= layers:
        _fail("metadata.options.start_layer", f"must be below the model's {layers} layers")
    if options["rank"] % fingerprint["head_dim"]:
        _fail("metadata.options.rank", f"must be a multiple of the head dimension {fingerprint['head_dim']}")
    _layer_range(metadata["layer_stats"], options["start_layer"], layers, "metadata.layer_stats")
    for count, entry in metadata.get("refined_budgets", {}).items():
        _layer_range(entry["tokens"], options["start_layer"], layers, f"metadata.refined_budgets[{count!r}].tokens")


def _tensor(
    tensors: Mapping[str, torch.Tensor], name: str, dims: int, shape: tuple[int | None, ...] = ()
) -> torch.Tensor:
    """The tensor `name`, checked for presence, rank, the given sizes (None: any) and finite values."""
    where = f"tensor {name}"
    if name not in tensors:
        _fail(where, "is missing")
    tensor = tensors[name]
    if tensor.dim() != dims:
        _fail(where, f"must have {dims} dimension(s), has shape {tuple(tensor.shape)}")
    for axis, size in enumerate(shape):
        if size is not None and tensor.shape[axis] != size:
            _fail(where, f"has shape {tuple(tensor.shape)}; size {size} expected in dimension {axis}")
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            _fail(where, "holds NaN or infinite values")
    elif tensor.dtype in (torch.int64, torch.int32):
        if tensor.numel() and int(tensor.min()) < 0:
            _fail(where, "holds negative counts")
    else:
        _fail(where, f"has dtype {tensor.dtype}; a float (or integer count) tensor expected")
    return tensor


def _selector_tensors(tensors: Mapping[str, torch.Tensor], index: str, fingerprint: dict[str, Any],
                      rank: int | None) -> int:
    """Check layer `index`'s selector projections and fitted skip update; returns the selector's rank."""
    hidden, head_dim = fingerprint["hidden_size"], fingerprint["head_dim"]
    weight = _tensor(tensors, f"layers.{index}.q_proj.weight", 2, (rank, hidden))
    found = weight.shape[0]
    if found == 0 or found % head_dim:
        _fail(f"tensor layers.{index}.q_proj.weight", f"has {found} rows, not a positive multiple of {head_dim}")
    for name in SELECTOR_TENSOR_NAMES:
        matrix = name.endswith("weight")
        _tensor(tensors, f"layers.{index}.{name}", 2 if matrix else 1, (found, hidden) if matrix else (found,))
    if any(f"skip.{index}.{name}" in tensors for name in SKIP_UPDATE_TENSOR_NAMES):
        down = _tensor(tensors, f"skip.{index}.down.weight", 2, (None, hidden))
        _tensor(tensors, f"skip.{index}.up.weight", 2, (hidden, down.shape[0]))
        _tensor(tensors, f"skip.{index}.up.bias", 1, (hidden,))
    return found


def _no_others(tensors: Mapping[str, torch.Tensor], expected: set[str]) -> None:
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        _fail(f"tensor {unexpected[0]}", "is not part of the format")


def _layer_tensor_names(index: str) -> set[str]:
    return {f"layers.{index}.{name}" for name in SELECTOR_TENSOR_NAMES} | {
        f"skip.{index}.{name}" for name in SKIP_UPDATE_TENSOR_NAMES
    }


def check_selector_tensors(metadata: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: Any) -> None:
    """A selector file's tensors: each routed layer's projections (and skip update), all finite, nothing else."""
    def run() -> None:
        ranks = {_selector_tensors(tensors, index, metadata["fingerprint"], metadata.get("rank"))
                 for index in metadata["keep_ratios"]}
        if len(ranks) > 1:
            _fail("tensor layers.*.q_proj.weight", f"have different ranks {sorted(ranks)} across layers")
        _no_others(tensors, set().union(*(_layer_tensor_names(index) for index in metadata["keep_ratios"])))
    _checked(path, SELECTOR_FORMAT, run)


BUDGET_TENSORS = ("coverage", "visual_share", "updates", "update_coverage", "damage_budgets", "damage")


def check_calibration_tensors(metadata: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: Any) -> None:
    """A calibration file's tensors: per calibrated layer its selector, held-out statistics, budget statistics and
    skip update, with consistent shapes and finite values, and nothing else."""
    def run() -> None:
        fingerprint, rank = metadata["fingerprint"], metadata["options"]["rank"]
        heldout = int(_tensor(tensors, "heldout.counts", 1).sum())
        expected = {"heldout.counts"}
        for index in metadata["layer_stats"]:
            _selector_tensors(tensors, index, fingerprint, rank)
            _tensor(tensors, f"heldout.{index}.parts", 3, (None, rank // fingerprint["head_dim"], heldout))
            _tensor(tensors, f"heldout.{index}.target", 1, (heldout,))
            if f"budget.{index}.coverage" in tensors:
                _budget_tensors(tensors, index)
            expected |= _layer_tensor_names(index) | {f"heldout.{index}.{part}" for part in ("parts", "target")}
            expected |= {f"budget.{index}.{name}" for name in BUDGET_TENSORS}
        _no_others(tensors, expected)
    _checked(path, CALIBRATION_FORMAT, run)


def _budget_tensors(tensors: Mapping[str, torch.Tensor], index: str) -> None:
    _tensor(tensors, f"budget.{index}.coverage", 1)
    _tensor(tensors, f"budget.{index}.visual_share", 0)
    if f"budget.{index}.updates" in tensors or f"budget.{index}.update_coverage" in tensors:
        _tensor(tensors, f"budget.{index}.updates", 1, (2,))
        _tensor(tensors, f"budget.{index}.update_coverage", 1)
    if f"budget.{index}.damage" in tensors or f"budget.{index}.damage_budgets" in tensors:
        grid = _tensor(tensors, f"budget.{index}.damage_budgets", 1)
        _tensor(tensors, f"budget.{index}.damage", 1, (grid.shape[0],))
