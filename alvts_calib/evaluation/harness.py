"""The evaluation harness: accuracy of the unpatched model and of every method at matched visual-token budgets.

All methods run in the same runtime (`attach_policies`): each decoder layer processes the visual tokens its
policy selects. The harness measures, per method and budget, the visual tokens each layer actually processed,
the resulting compression and LLM prefill FLOPs (selection cost included), and the accuracy on a labelled set.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..answers import answer_matches, answer_token_budget
from ..artifact.budgets import Budget, parse_budget
from ..artifact.calibration import Calibration
from ..artifact.config import (
    DEFAULT_BUDGET,
    DEFAULT_SKIPPED_KEYS,
    RuntimeConfig,
    SkippedKeys,
    SkippedUpdate,
)
from ..artifact.export import build_selector
from ..artifact.selector import Selector
from ..calibration.capture import input_device, move
from ..data import LabelledItem
from ..errors import AlvtsError
from ..model.adapters import AttentionGeometry
from ..model.fingerprint import check_fingerprint
from ..options import DEFAULT_START_LAYER, parse_choice
from ..progress import track
from ..runtime.attach import attach_policies, detach, last_visual_pass
from ..runtime.policies import KeepAllPolicy
from ..tokens import check_compression
from .costs import pass_costs, update_ranks
from .plans import Plan, alvts_plan, dart_plan, fastv_plan, oracle_plan, pyramid_plan, random_plan, selector_plan

METHODS = ("alvts", "alvts-uniform", "oracle", "fastv", "pyramiddrop", "dart", "random")
DEFAULT_METHODS = ("alvts", "oracle", "fastv", "pyramiddrop", "dart", "random")  # with a calibration file
SELECTOR_METHODS = ("alvts-uniform", "oracle", "fastv", "pyramiddrop", "dart", "random")  # with a selector file
RENAMED = {"alvts-adaptive": "alvts"}  # earlier names, for a one-line hint


def default_methods(calibration: Calibration | None) -> tuple[str, ...]:
    """The methods `evaluate` compares when none are named: `alvts` (the toolkit's defaults, which re-split each
    budget from the calibration) needs a calibration file; a selector file alone gives `alvts-uniform`."""
    return DEFAULT_METHODS if calibration is not None else SELECTOR_METHODS
DEFAULT_COMPRESSIONS = (0.67, 0.78, 0.89)


@dataclass
class MethodResult:
    """One method at one budget (compression None: the unpatched model)."""

    method: str
    compression: float | None
    correct: int
    total: int
    visual_tokens_per_layer: list[float]  # measured mean over rows
    flops: float  # mean LLM prefill FLOPs per row, selection included
    selection_flops: float
    fidelity: dict[str, float] | None = None  # selector vs full attention on held-out calibration rows
    correct_by_kind: dict[str, int] = field(default_factory=dict)  # rows with a kind only
    total_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def accuracy_by_kind(self) -> dict[str, float]:
        return {kind: self.correct_by_kind.get(kind, 0) / total for kind, total in sorted(self.total_by_kind.items())}

    @property
    def mean_visual_tokens(self) -> float:
        return statistics.fmean(self.visual_tokens_per_layer)


@dataclass
class EvalReport:
    """Everything `alvts eval` prints: the full model's accuracy and each method's retention at each budget."""

    model: str
    data: str
    num_rows: int
    data_summary: str
    num_visual: int
    num_layers: int
    skipped_update: str = SkippedUpdate.NONE.value  # what skipped visual tokens of the layer-wise methods get
    results: list[MethodResult] = field(default_factory=list)
    infeasible: list[tuple[str, float]] = field(default_factory=list)  # (method, compression) with no token to keep
    seconds: float = 0.0

    @property
    def full(self) -> MethodResult:
        return self.results[0]

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per result: accuracy, retention, measured compression and FLOPs relative to the full model."""
        rows = []
        for result in self.results:
            rows.append({
                "method": result.method,
                "target_compression": result.compression,
                "compression": 1.0 - result.mean_visual_tokens / self.num_visual,
                "visual_tokens_per_layer": result.mean_visual_tokens,
                "accuracy": result.accuracy,
                "retention": result.accuracy / self.full.accuracy if self.full.accuracy else float("nan"),
                "flops_ratio": result.flops / self.full.flops,
                "selection_flops_ratio": result.selection_flops / self.full.flops,
                "mean_recall": None if result.fidelity is None else result.fidelity.get("recall"),
                "accuracy_by_kind": result.accuracy_by_kind,
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        summary = {key: value for key, value in asdict(self).items() if key != "results"}
        return {**summary, "rows": self.rows(), "results": [asdict(result) for result in self.results]}


def _batches(items: list[LabelledItem], size: int) -> Iterator[list[LabelledItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Harness:
    """Runs one model over one labelled set under any plan, batch by batch."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        items: list[LabelledItem],
        batch_size: int = 32,
        skipped_update: SkippedUpdate | str = SkippedUpdate.NONE,
        progress: bool = True,
        selector: Selector | None = None,
    ):
        """`selector` supplies the fitted skip updates when `skipped_update` is "linear" or "stand-in" (for every
        method)."""
        if batch_size < 1:
            raise AlvtsError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.items = items
        self.batch_size = batch_size
        self.skipped_update = parse_choice(SkippedUpdate, skipped_update, "skipped_update")
        self.progress = progress
        self.selector = selector
        self.geometry = AttentionGeometry.of(model)
        self.intermediate_size = model.config.get_text_config(decoder=True).intermediate_size
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        self.max_new_tokens = answer_token_budget(tokenizer, [item.answer for item in items])

    def run(self, plan: Plan | None, label: str, compression: float | None) -> MethodResult:
        """Accuracy and measured budgets with `plan` attached (None: every layer keeps every token)."""
        policies = {} if plan is None else dict(plan.policies)
        for index in range(self.geometry.num_layers):
            policies.setdefault(index, KeepAllPolicy())
        skipped_keys = SkippedKeys.DROP if plan is None else plan.skipped_keys
        update = self.skipped_update if plan is None else plan.skipped_update(self.skipped_update)
        attach_policies(self.model, policies, selector=self.selector, skipped_update=update, skipped_keys=skipped_keys)
        ranks = update_ranks(self.selector, policies, skipped_keys, update)
        try:
            correct, tokens, flops, selection = 0, [], [], []
            correct_by_kind: Counter[str] = Counter()
            total_by_kind: Counter[str] = Counter()
            for batch in track(list(_batches(self.items, self.batch_size)), label, enabled=self.progress):
                predictions, context = self._generate(batch)
                for prediction, item in zip(predictions, batch, strict=True):
                    right = answer_matches(prediction, item.answer)
                    correct += right
                    if item.kind is not None:
                        total_by_kind[item.kind] += 1
                        correct_by_kind[item.kind] += right
                costs = pass_costs(context, policies, ranks, skipped_keys, self.geometry, self.intermediate_size)
                tokens.append(costs.tokens)
                flops.extend(costs.flops)
                selection.extend(costs.selection)
        finally:
            detach(self.model)
        per_layer = torch.cat(tokens).float().mean(0).tolist()
        mean_flops, mean_selection = statistics.fmean(flops), statistics.fmean(selection)
        return MethodResult(label, compression, correct, len(self.items), per_layer, mean_flops, mean_selection,
                            correct_by_kind=dict(correct_by_kind), total_by_kind=dict(total_by_kind))

    def _generate(self, batch: list[LabelledItem]) -> tuple[list[str], Any]:
        inputs = self.processor(
            images=[item.image for item in batch], text=[item.text for item in batch], padding=True, return_tensors="pt"
        )
        inputs = move(dict(inputs), input_device(self.model))
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )
        context = last_visual_pass(self.model)
        if context is None:
            raise AlvtsError("the model saw no visual tokens: check that prompts reach the model with their image")
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True), context


def reference_visual_count(result: MethodResult) -> int:
    """The reference visual-token count n: the (rounded) mean the full model processed per layer."""
    return round(result.visual_tokens_per_layer[0])


def build_plans(
    method: str,
    compression: float,
    *,
    num_layers: int,
    num_visual: int,
    selector: Selector | None = None,
    calibration: Calibration | None = None,
    seed: int = 0,
    skipped_keys: SkippedKeys | str = DEFAULT_SKIPPED_KEYS,
    budget: Budget | str = DEFAULT_BUDGET,
) -> tuple[Plan | None, dict[str, float] | None]:
    """The plan of `method` at `compression` (None when the budget is infeasible) and its selector fidelity.

    `alvts` is what `export` and `attach` give by default: the calibration's selectors with the budget split over
    layers by `budget`; `alvts-uniform` keeps one ratio in every routed layer. `skipped_keys` applies to the
    layer-wise methods (alvts, alvts-uniform, oracle, random); FastV, PyramidDrop and DART run as published.
    """
    check_methods((method,), selector, calibration)
    fraction = check_compression(compression)
    keys = parse_choice(SkippedKeys, skipped_keys, "skipped_keys")
    start_layer = selector.start_layer if selector is not None else DEFAULT_START_LAYER
    importance = selector.importance if selector is not None else None
    builders: dict[str, Callable[[], Plan | None]] = {
        "oracle": lambda: oracle_plan(importance, fraction, num_layers, num_visual, start_layer, keys),
        "random": lambda: random_plan(fraction, num_layers, num_visual, start_layer, seed, keys),
        "fastv": lambda: fastv_plan(fraction, num_layers, num_visual),
        "pyramiddrop": lambda: pyramid_plan(fraction, num_layers, num_visual),
        "dart": lambda: dart_plan(fraction, num_layers, num_visual),
    }
    if method in builders:
        return builders[method](), None
    if method == "alvts-uniform":
        plan = alvts_plan(selector, fraction, num_layers, num_visual, keys)
        if plan is None:  # over budget, or no token left beside the stand-in
            return None, None
        ratio = plan.policies[start_layer].keep_ratio
        return plan, _fidelity(calibration, {i: ratio for i in plan.policies}, selector)
    uniform = alvts_plan(selector, fraction, num_layers, num_visual)  # the budget's tokens per routed layer
    if uniform is None:
        return None, None
    adaptive = build_selector(
        calibration, keep_ratio=uniform.planned_tokens[-1] / num_visual, budget=parse_budget(budget), skipped_keys=keys
    )
    return selector_plan(method, adaptive, num_visual), _fidelity(calibration, adaptive.keep_ratios, adaptive)


def _fidelity(
    calibration: Calibration | None, ratios: dict[int, float], selector: Selector
) -> dict[str, float] | None:
    """Mean held-out fidelity over routed layers at these ratios (None without a calibration to measure it)."""
    if calibration is None:
        return None
    per_layer = [calibration.fidelity(index, ratio, selector.layers[index].q_proj.out_features)
                 for index, ratio in ratios.items()]
    keys = per_layer[0].keys() if per_layer else []
    means = {}
    for key in keys:
        finite = [layer[key] for layer in per_layer if layer[key] == layer[key]]
        means[key] = statistics.fmean(finite) if finite else float("nan")
    return means


def check_methods(methods: tuple[str, ...], selector: Selector | None, calibration: Calibration | None) -> None:
    """Fail before any work when a method is unknown or lacks what it needs."""
    renamed = [method for method in methods if method in RENAMED]
    if renamed:
        raise AlvtsError(f"method {renamed[0]} is now called {RENAMED[renamed[0]]} (the toolkit's defaults); "
                         "alvts-uniform keeps one ratio in every layer")
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise AlvtsError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    if selector is None and any(m in ("alvts", "alvts-uniform", "oracle") for m in methods):
        raise AlvtsError("alvts, alvts-uniform and oracle need a selector artifact or a calibration file")
    if calibration is None and "alvts" in methods:
        raise AlvtsError("alvts re-splits each budget over layers from the calibration: pass the calibration file, "
                         "or use alvts-uniform with a selector file")


def evaluate(
    model: nn.Module,
    processor: Any,
    items: list[LabelledItem],
    *,
    selector: Selector | None = None,
    calibration: Calibration | None = None,
    methods: tuple[str, ...] | None = None,
    compressions: tuple[float, ...] = DEFAULT_COMPRESSIONS,
    batch_size: int = 32,
    skipped_update: SkippedUpdate | str | None = None,
    skipped_keys: SkippedKeys | str | None = None,
    budget: Budget | str | None = None,
    config: RuntimeConfig | None = None,
    progress: bool = True,
    model_name: str = "",
    data_name: str = "",
    data_summary: str = "",
) -> EvalReport:
    """Evaluate the full model, then every method at every compression, on `items` (see `build_plans` for
    `skipped_keys` and `budget`; `methods` None: `default_methods`). The runtime is `config` (default:
    `RuntimeConfig()`, the toolkit's defaults); `skipped_update`, `skipped_keys` and `budget` override one setting of
    it. `skipped_update` applies to the layer-wise methods; None takes the toolkit's default for the selector
    (`default_skipped_update`)."""
    methods = default_methods(calibration) if methods is None else methods
    check_methods(methods, selector, calibration)
    runtime = config if config is not None else RuntimeConfig()
    runtime = runtime.replace(skipped_update=skipped_update, skipped_keys=skipped_keys, budget=budget)
    if batch_size < 1:
        raise AlvtsError(f"batch size must be at least 1, got {batch_size}")
    if selector is not None:
        check_fingerprint(selector.fingerprint, model)
    layers = sorted(selector.layers) if selector is not None else [1]
    runtime = runtime.resolved(selector is not None and selector.has_skip_updates)
    runtime.validate(routed_layers=layers, fitted_layers={} if selector is None else selector.skip_updates)
    skipped_update, skipped_keys, budget = runtime.skipped_update, runtime.skipped_keys, runtime.budget
    started = time.perf_counter()
    harness = Harness(model, processor, items, batch_size, skipped_update, progress, selector)
    full = harness.run(None, "full", None)
    num_visual = reference_visual_count(full)
    report = EvalReport(
        model_name, data_name, len(items), data_summary, num_visual, harness.geometry.num_layers,
        skipped_update.value, [full],
    )
    for compression in compressions:
        for method in methods:
            plan, fidelity = build_plans(
                method, compression, num_layers=harness.geometry.num_layers, num_visual=num_visual,
                selector=selector, calibration=calibration, skipped_keys=skipped_keys, budget=budget,
            )
            if plan is None:
                report.infeasible.append((method, compression))
                continue
            result = harness.run(plan, method, compression)
            result.fidelity = fidelity
            report.results.append(result)
    report.seconds = time.perf_counter() - started
    return report
