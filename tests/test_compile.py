"""torch.compile with an attached selector: no graph break inside a routed layer, shapes fixed by the host-known
token counts, and compiled output equal to eager (prefill logits and greedy generate) for the default runtime
(pooled stand-in, linear update) and the paper's (skipped keys dropped, no update)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch._dynamo
from torch import nn

from alvts_calib.model.adapters import decoder_layers
from alvts_calib.model.visual import visual_positions
from alvts_calib.runtime.attach import attach, detach
from alvts_calib.runtime.context import PassCounts

RATIO = 0.5
TOKENS = 4
RUNTIMES = {"default": ("pool", "linear"), "paper": ("drop", "none"), "all-keys": ("all", "linear")}
# Compiling each decoder layer on its own recompiles per layer and cache state (prefill, first and later decode
# steps); the default limit of 8 per code object is for whole models.
LAYER_RECOMPILES = 64


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def routed_case(tiny_case, make_selector, with_random_skip_updates, runtime: str, family: str = "llava"):
    """A tiny model with a selector attached (layers 1+ at RATIO) under one of RUNTIMES."""
    case = tiny_case(family, "sdpa")
    keys, update = RUNTIMES[runtime]
    selector = make_selector(case.model, RATIO, start_layer=1)
    if update == "linear":
        with_random_skip_updates(selector)
    attach(case.model, selector, skipped_keys=keys, skipped_update=update)
    return case


def eager_outputs(case) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits and greedy tokens, uncompiled."""
    with case.routing():
        return case.model(**case.inputs).logits, generate(case.model, case.inputs)


def generate(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)


@contextmanager
def layers_compiled(model: nn.Module, backend: str) -> Iterator[None]:
    """Every decoder layer compiled on its own with fullgraph=True: any graph break inside one raises."""
    layers = decoder_layers(model)
    with torch._dynamo.config.patch(recompile_limit=LAYER_RECOMPILES):
        for layer in layers:
            layer.compile(fullgraph=True, backend=backend)
        try:
            yield
        finally:
            for layer in layers:
                layer._compiled_call_impl = None


@pytest.mark.parametrize(
    "runtime", ["default", *(pytest.param(name, marks=pytest.mark.slow) for name in RUNTIMES if name != "default")]
)
def test_routed_layers_compile_without_graph_breaks(tiny_case, make_selector, with_random_skip_updates, runtime):
    check_layers_compile(routed_case(tiny_case, make_selector, with_random_skip_updates, runtime))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "llama"])
def test_routed_layers_of_every_family_compile_without_graph_breaks(
    tiny_case, make_selector, with_random_skip_updates, family
):
    check_layers_compile(routed_case(tiny_case, make_selector, with_random_skip_updates, "default", family))


def check_layers_compile(case) -> None:
    """With every decoder layer compiled fullgraph, prefill logits and greedy tokens are the eager ones exactly."""
    logits, tokens = eager_outputs(case)
    with layers_compiled(case.model, "eager"), case.routing():
        torch.testing.assert_close(case.model(**case.inputs).logits, logits, rtol=0, atol=0)
        assert torch.equal(generate(case.model, case.inputs), tokens)


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_decoding_steps_read_no_counts_from_the_device(
    tiny_case, make_selector, with_random_skip_updates, monkeypatch, family
):
    case = routed_case(tiny_case, make_selector, with_random_skip_updates, "default", family)
    reads = []
    of = PassCounts.of.__func__
    monkeypatch.setattr(PassCounts, "of", classmethod(lambda cls, *args: reads.append(1) or of(cls, *args)))
    with case.routing():
        generate(case.model, case.inputs)
    assert len(reads) == 1  # the prefill's: a decoding step's counts are known on the host (no graph break)


def graph_breaks_in(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[list[str]]:
    """The user stack of each graph break in one compiled prefill, innermost last; frames of this package as
    `module.py:function`, others as ''."""
    explanation = torch._dynamo.explain(model)(**inputs)
    return [
        [f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}" if "alvts_calib" in frame.filename else ""
         for frame in reason.user_stack]
        for reason in explanation.break_reasons
    ]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["default", "paper"])
def test_a_compiled_model_breaks_only_where_the_pass_counts_are_read(
    tiny_case, make_selector, with_random_skip_updates, runtime
):
    case = routed_case(tiny_case, make_selector, with_random_skip_updates, runtime)
    stacks = graph_breaks_in(case.model, case.inputs)
    assert not any(frame.startswith("routing.py:") for stack in stacks for frame in stack)
    # the toolkit's own: PassCounts.of in the hook before the decoder layers (the others are transformers')
    assert {stack[-1] for stack in stacks} - {""} == {"context.py:of"}


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["default", "paper"])
def test_a_compiled_model_gives_the_eager_logits_and_tokens(
    tiny_case, make_selector, with_random_skip_updates, runtime
):
    case = routed_case(tiny_case, make_selector, with_random_skip_updates, runtime)
    logits, tokens = eager_outputs(case)
    compiled = torch.compile(case.model.forward, backend="aot_eager")
    torch.testing.assert_close(compiled(**case.inputs).logits, logits)
    case.model.forward = compiled
    try:
        assert torch.equal(generate(case.model, case.inputs), tokens)
    finally:
        del case.model.forward


@pytest.mark.slow
def test_inductor_gives_the_eager_logits_and_tokens(tiny_case, make_selector, with_random_skip_updates):
    case = routed_case(tiny_case, make_selector, with_random_skip_updates, "default")
    logits, tokens = eager_outputs(case)
    case.model.forward = torch.compile(case.model.forward)
    try:
        torch.testing.assert_close(case.model(**case.inputs).logits, logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(generate(case.model, case.inputs), tokens)
    finally:
        del case.model.forward


class GraphShapes:
    """A compile backend that records whether each graph it gets has only static shapes, and runs it as is."""

    def __init__(self) -> None:
        self.static: list[bool] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.static.append(not any(isinstance(value, torch.SymInt) for value in _shape_values(example_inputs)))
        return graph.forward


def _shape_values(example_inputs: list) -> list:
    values = []
    for value in example_inputs:
        values.extend(value.shape if isinstance(value, torch.Tensor) else [value])
    return values


@pytest.mark.slow
def test_static_compilation_gives_one_fixed_shape_graph_set_per_visual_count(
    tiny_case, make_selector, with_random_skip_updates
):
    case = routed_case(tiny_case, make_selector, with_random_skip_updates, "default", family="llama")
    backend = GraphShapes()
    compiled = torch.compile(case.model, backend=backend, dynamic=False)
    length = case.inputs["input_ids"].shape[1]
    graphs = []
    for width in (16, 12, 16, 12):
        visual = torch.zeros(2, length, dtype=torch.bool)
        visual[:, -5 - width : -5] = True
        with visual_positions(case.model, visual):
            torch.testing.assert_close(compiled(**case.inputs).logits, case.model(**case.inputs).logits)
        graphs.append(len(backend.static))
    assert graphs[0] < graphs[1] == graphs[2] == graphs[3]  # a new visual count compiles once, a seen one reruns
    assert all(backend.static)


@pytest.mark.slow
def test_a_model_compiled_before_attach_follows_attach_and_detach(tiny_case, make_selector, with_random_skip_updates):
    case = tiny_case("llava", "sdpa")
    selector = with_random_skip_updates(make_selector(case.model, RATIO, start_layer=1))
    plain = case.model(**case.inputs).logits
    attach(case.model, selector, skipped_keys="pool", skipped_update="linear")
    routed = case.model(**case.inputs).logits
    detach(case.model)
    compiled = torch.compile(case.model, backend="eager")
    assert torch.equal(compiled(**case.inputs).logits, plain)
    attach(case.model, selector, skipped_keys="pool", skipped_update="linear")
    assert torch.equal(compiled(**case.inputs).logits, routed)  # the class swap and hooks fail guards: recompiled
    detach(case.model)
    assert torch.equal(compiled(**case.inputs).logits, plain)
