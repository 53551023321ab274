"""Shared fixtures: tiny models with their inputs, and selectors built without calibration."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from alvts_calib.artifact.selector import Selector
from alvts_calib.model.adapters import decoder_layers
from alvts_calib.model.visual import visual_positions
from alvts_calib.runtime.attach import attach, detach
from alvts_calib.selector.skip_map import SkipUpdate
from alvts_calib.testing.selectors import weight_svd_selector
from alvts_calib.testing.tiny_models import IMAGE_TOKEN, TINY_MODELS, tiny_inputs

FAMILIES = tuple(TINY_MODELS)
BACKENDS = ("eager", "sdpa")


@dataclass
class TinyCase:
    """A fresh tiny model, its (left-padded) inputs, and where the visual tokens are."""

    family: str
    backend: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    explicit_visual: torch.Tensor | None  # the language model's explicit visual mask, else None

    @property
    def visual(self) -> torch.Tensor:
        """(B, L) bool visual positions of the prompt."""
        if self.explicit_visual is not None:
            return self.explicit_visual
        return self.inputs["input_ids"] == IMAGE_TOKEN

    @property
    def valid(self) -> torch.Tensor:
        return self.inputs["attention_mask"].bool()

    def routing(self) -> contextlib.AbstractContextManager:
        """What a routed call needs around it: the explicit visual mask for language models, nothing otherwise."""
        if self.explicit_visual is None:
            return contextlib.nullcontext()
        return visual_positions(self.model, self.explicit_visual)


def build_case(family: str, backend: str, batch: int = 2, seed: int = 0, model_seed: int = 0) -> TinyCase:
    model = TINY_MODELS[family](backend, seed=model_seed)
    inputs = tiny_inputs(model, batch=batch, seed=seed)
    explicit = inputs.pop("visual_mask", None)
    return TinyCase(family, backend, model, inputs, explicit)


@pytest.fixture
def make_selector() -> Callable[..., Selector]:
    """`make_selector(model, keep_ratio, start_layer=0)`: a Selector for layers start_layer..L-1."""
    return weight_svd_selector


@pytest.fixture
def tiny_case() -> Callable[..., TinyCase]:
    """`tiny_case(family, backend, batch=2, seed=0, model_seed=0)`: a fresh model and its inputs."""
    return build_case


@pytest.fixture(autouse=True)
def _inference_mode() -> Iterator[None]:
    """Every test starts from the same global seed and runs without autograd (the solver re-enables it)."""
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def random_skip_updates(selector: Selector, rank: int = 4) -> Selector:
    """`selector` with seeded random skip-update maps on every layer (for runtimes that apply them)."""
    torch.manual_seed(0)
    selector.skip_updates = {
        index: SkipUpdate(layer.q_proj.in_features, rank) for index, layer in selector.layers.items()
    }
    return selector


def layer_one_io(
    case: TinyCase, selector: Selector | None, skipped_update: str = "none", skipped_keys: str = "drop"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input and output of decoder layer 1 and the logits of one prefill, routed by `selector` with that runtime
    (None: unpatched)."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).clone()
        seen["output"] = output.clone()

    if selector is not None:
        attach(case.model, selector, skipped_update=skipped_update, skipped_keys=skipped_keys)
    handle = decoder_layers(case.model)[1].register_forward_hook(hook, with_kwargs=True)
    try:
        with case.routing():
            logits = case.model(**case.inputs).logits
    finally:
        handle.remove()
        if selector is not None:
            detach(case.model)
    return seen["input"], seen["output"], logits


@pytest.fixture
def layer_io() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`layer_io(case, selector, skipped_update="none", skipped_keys="drop")`: layer 1's input and output and the
    logits of one prefill (`selector` None: unpatched)."""
    return layer_one_io


@pytest.fixture
def with_random_skip_updates() -> Callable[..., Selector]:
    """`with_random_skip_updates(selector, rank=4)`: seeded random skip-update maps on every layer."""
    return random_skip_updates


def linear_update_reference(
    case: TinyCase, before: torch.Tensor, after: torch.Tensor, processed: torch.Tensor, fitted: SkipUpdate
) -> torch.Tensor:
    """(B, L, D) what the `linear` update gives each token that skips layer 1, by hand: its input plus the mean
    update of the row's `processed` visual tokens (`after` - `before`) plus the fitted map of its normed input less
    theirs."""
    normed = decoder_layers(case.model)[1].input_layernorm(before)
    rows = []
    for row in range(before.shape[0]):
        mean_update = (after[row][processed[row]] - before[row][processed[row]]).mean(0)
        mean_normed = normed[row][processed[row]].mean(0)
        rows.append(before[row] + mean_update + fitted(normed[row]) - fitted(mean_normed))
    return torch.stack(rows)


@pytest.fixture
def linear_update() -> Callable[..., torch.Tensor]:
    """`linear_update(case, before, after, processed, fitted)`: the `linear` update of layer 1 by hand."""
    return linear_update_reference
