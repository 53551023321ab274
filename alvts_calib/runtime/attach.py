"""Attach a selector artifact to a transformers model, and detach it again exactly."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..artifact.config import RuntimeConfig, SkippedKeys, SkippedUpdate, require_fitted_maps
from ..artifact.selector import Selector, check_selector, load_selector
from ..errors import AlvtsError
from ..model.adapters import decoder_layers, get_adapter
from ..model.fingerprint import check_fingerprint
from ..model.visual import TRACKER_ATTRIBUTE, VisualTracker
from ..options import check_keep_ratio, parse_choice
from .context import ForwardContext, PassCounts
from .key_bias import install_key_bias_folding
from .masks import check_backend
from .policies import LayerPolicy, SelectorPolicy
from .routing import CONTEXT_KWARG, route_layer, unroute_layer

RUNTIME_ATTRIBUTE = "_alvts_runtime"


@dataclass
class _Runtime:
    """What attach changed, so detach can undo exactly that."""

    selector: Selector | None
    tracker: VisualTracker
    routed_layers: list[int]
    hooks: list[RemovableHandle] = field(default_factory=list)
    last_visual_pass: ForwardContext | None = None  # the context of the latest pass that had visual tokens


def _forward_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        raise AlvtsError("the text model got neither input_ids nor inputs_embeds")
    return input_ids


def _valid_positions(attention_mask: Any, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, L) bool validity of this pass's positions from a 2-D padding mask (None: all valid)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise AlvtsError(
            "routed layers need a 2-D padding attention_mask (or none); precomputed 4-D masks and compiled "
            "static caches are not supported"
        )
    return attention_mask[:, -length:].to(device=device, dtype=torch.bool)


def _context_hook(tracker: VisualTracker, runtime: _Runtime):
    def add_routing_context(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        inputs = _forward_input(args, kwargs)
        batch, length = inputs.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        valid = _valid_positions(kwargs.get("attention_mask"), batch, length, inputs.device)
        decoding = length == 1 and tracker.known_text_only(past)  # no host read: no graph break when compiled
        visual = tracker.take(batch, length, past, inputs.device)
        counts = PassCounts.decoding_step(batch) if decoding else PassCounts.of(visual, valid)
        context = ForwardContext(visual=visual, valid=valid, counts=counts)
        if context.counts.has_visual:
            runtime.last_visual_pass = context
        elif past == 0:  # a new prompt without visual tokens: the previous prompt's pass no longer describes it
            runtime.last_visual_pass = None
        kwargs[CONTEXT_KWARG] = context
        return args, kwargs

    return add_routing_context


def attach(
    model: nn.Module,
    selector: Selector | str | Path,
    *,
    keep_ratio: float | None = None,
    skipped_update: SkippedUpdate | str | None = None,
    skipped_keys: SkippedKeys | str | None = None,
    config: RuntimeConfig | None = None,
) -> nn.Module:
    """Patch `model` in place so routed layers process only their selected visual tokens; returns `model`.

    It runs the artifact's own runtime (`Selector.runtime`), or `config` instead (a config without keep ratios
    keeps the artifact's). `keep_ratio`, `skipped_update` and `skipped_keys` override one setting of it:
    `keep_ratio` replaces the per-layer ratios with one uniform ratio. `skipped_keys` "pool" lets the text attend
    to one stand-in per row for the skipped visual tokens, with their mean key and value and their attention mass
    (one token per layer, which the exported budgets count; eager or SDPA attention). What visual tokens that skip
    a layer receive (`SkippedUpdate`): "stand-in" the update the layer gave that stand-in plus the artifact's fitted
    map of how each token's input differs from the stand-in's, "mean" the mean update of the tokens it processed,
    "linear" that mean plus the fitted map, "none" nothing. The artifact must have been calibrated on this model
    (checked by fingerprint). Everything is checked before the model is changed, and an error leaves it as it was.
    """
    _check_not_attached(model)
    if isinstance(selector, Selector):
        check_selector(selector)
    else:
        selector = load_selector(selector)
    check_fingerprint(selector.fingerprint, model)
    if keep_ratio is not None:
        check_keep_ratio(keep_ratio)
    runtime = selector.runtime if config is None else config
    if keep_ratio is not None:
        runtime = replace(runtime, keep_ratio=keep_ratio, keep_ratios={})
    runtime = runtime.replace(skipped_update=skipped_update, skipped_keys=skipped_keys)
    runtime = runtime.resolved(selector.has_skip_updates).validate()
    ratios = runtime.keep_ratios or (
        selector.keep_ratios if runtime.keep_ratio is None else dict.fromkeys(selector.keep_ratios, runtime.keep_ratio)
    )
    if set(ratios) != set(selector.keep_ratios):
        raise AlvtsError(
            f"the runtime's keep ratios are for layers {sorted(ratios)}, the selector's for {sorted(selector.layers)}"
        )
    policies = {
        index: SelectorPolicy(selector.layers[index], ratio, selector.importance) for index, ratio in ratios.items()
    }
    return attach_policies(
        model, policies, selector=selector, skipped_update=runtime.skipped_update, skipped_keys=runtime.skipped_keys
    )


def attach_policies(
    model: nn.Module,
    policies: dict[int, LayerPolicy],
    *,
    selector: Selector | None = None,
    skipped_update: SkippedUpdate | str = SkippedUpdate.NONE,
    skipped_keys: SkippedKeys | str = SkippedKeys.DROP,
) -> nn.Module:
    """Patch `model` in place so each layer in `policies` processes the visual tokens its policy selects.

    This is the runtime under `attach`; the evaluation harness uses it for its reference methods too. Everything is
    checked before the model is changed, and an error while patching undoes what was patched.
    """
    _check_not_attached(model)
    adapter = get_adapter(model)
    skipped_keys = parse_choice(SkippedKeys, skipped_keys, "skipped_keys")
    check_backend(model.config.get_text_config(decoder=True)._attn_implementation)
    if skipped_keys is SkippedKeys.POOL:
        install_key_bias_folding()
    skipped_update = parse_choice(SkippedUpdate, skipped_update, "skipped_update")
    layers = decoder_layers(model)
    outside = sorted(str(index) for index in policies if not (isinstance(index, int) and 0 <= index < len(layers)))
    if outside:
        raise AlvtsError(
            f"layer(s) {', '.join(outside)} are not decoder layers of this model (0 to {len(layers) - 1}); use a "
            "selector made for this model"
        )
    skip_modules = _skip_modules(skipped_update, selector, policies)
    tracker = VisualTracker(model, adapter)
    runtime = _Runtime(selector=selector, tracker=tracker, routed_layers=[])
    try:
        for index, policy in sorted(policies.items()):
            route_layer(layers[index], policy, skipped_update, skip_modules.get(index), skipped_keys)
            runtime.routed_layers.append(index)
        tracker.install()
        text_model = adapter.text_model(model)
        runtime.hooks.append(text_model.register_forward_pre_hook(_context_hook(tracker, runtime), with_kwargs=True))
        runtime.hooks.append(model.register_forward_pre_hook(lambda module, args: tracker.reset()))
    except BaseException:
        _undo(layers, runtime)
        raise
    setattr(model, RUNTIME_ATTRIBUTE, runtime)
    setattr(model, TRACKER_ATTRIBUTE, tracker)
    return model


def _check_not_attached(model: nn.Module) -> None:
    if getattr(model, RUNTIME_ATTRIBUTE, None) is not None:
        raise AlvtsError("a selector is already attached to this model; call alvts_calib.detach(model) first")


def _undo(layers: nn.ModuleList, runtime: _Runtime) -> None:
    """Remove what `attach_policies` patched: routed layers, hooks and the visual tracker."""
    for index in runtime.routed_layers:
        unroute_layer(layers[index])
    for hook in runtime.hooks:
        hook.remove()
    runtime.tracker.remove()


def _skip_modules(
    skipped_update: SkippedUpdate, selector: Selector | None, policies: dict[int, LayerPolicy]
) -> dict[int, nn.Module]:
    """The fitted skip updates "linear" and "stand-in" need, for every layer that may skip visual tokens."""
    if not skipped_update.fitted:
        return {}
    require_fitted_maps(
        skipped_update, [index for index, policy in policies.items() if not policy.keeps_all],
        {} if selector is None else selector.skip_updates,
    )
    return {index: selector.skip_updates[index] for index in policies if index in selector.skip_updates}


def detach(model: nn.Module) -> nn.Module:
    """Restore a model patched by `attach` to exactly its original classes, modules and methods."""
    runtime: _Runtime | None = getattr(model, RUNTIME_ATTRIBUTE, None)
    if runtime is None:
        raise AlvtsError("no ALVTS selector is attached to this model")
    _undo(decoder_layers(model), runtime)
    delattr(model, RUNTIME_ATTRIBUTE)
    delattr(model, TRACKER_ATTRIBUTE)
    return model


def attached_selector(model: nn.Module) -> Selector | None:
    """The selector attached to `model`, if any."""
    runtime = getattr(model, RUNTIME_ATTRIBUTE, None)
    return runtime.selector if runtime is not None else None


def last_visual_pass(model: nn.Module) -> ForwardContext | None:
    """The routing context of the latest forward pass that had visual tokens (see `processed_counts`)."""
    runtime = getattr(model, RUNTIME_ATTRIBUTE, None)
    if runtime is None:
        raise AlvtsError("no ALVTS selector is attached to this model")
    return runtime.last_visual_pass
