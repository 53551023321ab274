"""Runtime routing on the tiny models of every family: exactness, caches, padding, reference semantics, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from alvts_calib.errors import AlvtsError, ModelMismatchError
from alvts_calib.model.adapters import decoder_layers, get_adapter
from alvts_calib.model.visual import TRACKER_ATTRIBUTE, visual_positions
from alvts_calib.runtime.attach import RUNTIME_ATTRIBUTE, attach, detach, last_visual_pass
from alvts_calib.runtime.routed_cache import RoutedCacheLayer
from alvts_calib.runtime.routing import CONTEXT_KWARG, RoutedLayerMixin, processed_positions
from alvts_calib.selector.skip_map import SkipUpdate
from alvts_calib.testing.tiny_models import TINY_MODELS

ALL = pytest.mark.parametrize("backend", ["eager", "sdpa"])
FAMILY = pytest.mark.parametrize("family", list(TINY_MODELS))
RATIO = 0.25


# ----------------------------------------------------------------------------------------------------------- helpers


def greedy(case, inputs: dict | None = None, **kwargs):
    inputs = case.inputs if inputs is None else inputs
    return case.model.generate(**inputs, do_sample=False, **kwargs)


def kept_counts(case, ratio: float) -> torch.Tensor:
    """Per row: ceil(ratio * valid visual tokens) + valid text tokens (the last position is always valid text here)."""
    visual, valid = case.visual, case.valid
    assert bool((valid[:, -1] & ~visual[:, -1]).all()), "test inputs must end with a valid text token"
    num_visual = (visual & valid).sum(1)
    assert bool((num_visual > 0).all())
    k = torch.tensor([math.ceil(ratio * int(n)) for n in num_visual])
    assert bool((k < num_visual).all()), "the ratio must actually drop visual tokens"
    return k + (valid & ~visual).sum(1)


def forward_inputs(case, inputs: dict) -> dict:
    """Inputs for a plain forward that is invariant to left padding in every family."""
    if case.family == "qwen2_5_vl":  # M-RoPE positions come from the attention mask already
        return inputs
    mask = inputs["attention_mask"]
    return {**inputs, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def single_row(case, row: int):
    """Row `row` of the batch on its own: no padding, its own image tensors."""
    mask = case.inputs["attention_mask"][row].bool()
    start = int((~mask).sum())
    assert bool(mask[start:].all()), "inputs must be left-padded"
    ids = case.inputs["input_ids"]
    inputs = {
        "input_ids": ids[row : row + 1, start:],
        "attention_mask": case.inputs["attention_mask"][row : row + 1, start:],
    }
    if case.family in ("llava", "llava_next"):
        inputs["pixel_values"] = case.inputs["pixel_values"][row : row + 1]
    if case.family == "llava_next":
        inputs["image_sizes"] = case.inputs["image_sizes"][row : row + 1]
    if case.family == "qwen2_5_vl":
        grid = case.inputs["image_grid_thw"]
        patches = grid.prod(-1)
        offset = int(patches[:row].sum())
        inputs["pixel_values"] = case.inputs["pixel_values"][offset : offset + int(patches[row])]
        inputs["image_grid_thw"] = grid[row : row + 1]
        inputs["mm_token_type_ids"] = case.inputs["mm_token_type_ids"][row : row + 1, start:]
    explicit = None if case.explicit_visual is None else case.explicit_visual[row : row + 1, start:]
    return dataclasses.replace(case, inputs=inputs, explicit_visual=explicit)


def _pool_order(kept: int, at: int) -> torch.Tensor:
    """Order of [kept tokens..., pool] that puts the pool at position `at`."""
    return torch.cat([torch.arange(at), torch.tensor([kept]), torch.arange(at, kept)])


def pooled_causal_mask(length: int, at: int, count: float) -> torch.Tensor:
    """Additive causal mask whose column `at` (the pooled stand-in) carries log(count)."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    bias = torch.zeros(length)
    bias[at] = math.log(count)
    return torch.where(allowed, bias, torch.finfo(torch.float32).min)


def causal_mask(length: int, backend: str) -> torch.Tensor:
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if backend == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def reference_routed_logits(case, selector, ratio: float, pooled: bool = False, stand_in_update=None) -> torch.Tensor:
    """Slow reference on the *unpatched* model: hooks replace each routed layer's output, row by row.

    For each row: keep every valid text token, the last position and the top-k valid visual tokens by the selector's
    scores (k = ceil(ratio * n_visual)); run the original layer on just those tokens (their own RoPE angles, a plain
    causal mask, no cache) and leave every other position exactly as it came in. With `pooled`, one more token
    right after the last visual token stands for the skipped ones: the layer's input norm gives it the mean of their
    normed inputs (so its key and value are the mean of theirs before rotation), it has their mean RoPE angles, and
    it is attended to with log(number skipped) added to its logits. With `stand_in_update` (layer -> fitted map W),
    each skipped token then gets the stand-in's output less its input (their mean hidden state), plus W of its own
    normed input less W of the stand-in's.
    """
    model = case.model
    assert getattr(model, RUNTIME_ATTRIBUTE, None) is None
    visual, valid = case.visual, case.valid
    layers = decoder_layers(model)

    def make_hook(index: int):
        layer_selector = selector.layers[index]

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            batch = hidden.shape[0]
            cos, sin = (t.expand(batch, -1, -1) for t in kwargs["position_embeddings"])
            scores = layer_selector.scores(
                module.input_layernorm(hidden), cos, sin, visual, valid, selector.importance
            )
            result = hidden.clone()
            for row in range(batch):
                candidates = (visual[row] & valid[row]).nonzero().flatten()
                k = math.ceil(ratio * candidates.numel())
                keep = valid[row] & ~visual[row]
                keep[candidates[scores[row, candidates].topk(k).indices]] = True
                keep[-1] = True
                index_kept = keep.nonzero().flatten()
                states, row_cos, row_sin = hidden[row, index_kept], cos[row, index_kept], sin[row, index_kept]
                mask = causal_mask(index_kept.numel(), case.backend)
                stand_in = None
                if pooled:
                    skipped = visual[row] & valid[row] & ~keep
                    at = int((index_kept <= candidates.max()).sum())  # right after the last visual token
                    states, row_cos, row_sin = (
                        torch.cat([kept, everything[skipped].mean(0, keepdim=True).to(kept.dtype)]).index_select(
                            0, _pool_order(kept.shape[0], at)
                        )
                        for kept, everything in ((states, hidden[row]), (row_cos, cos[row]), (row_sin, sin[row]))
                    )
                    mask = pooled_causal_mask(states.shape[0], at, float(skipped.sum()))
                    mean_normed = module.input_layernorm(hidden[row][skipped]).mean(0)

                    def stand_in(norm, norm_args, normed, at=at, mean_normed=mean_normed):
                        normed = normed.clone()
                        normed[0, at] = mean_normed
                        return normed

                    stand_in = module.input_layernorm.register_forward_hook(stand_in)
                try:
                    out = module.forward(
                        states[None],
                        attention_mask=mask,
                        position_ids=None,
                        position_embeddings=(row_cos[None], row_sin[None]),
                        cache=None,
                        use_cache=False,
                    )
                finally:
                    if stand_in is not None:
                        stand_in.remove()
                result[row, index_kept] = torch.cat([out[0][:at], out[0][at + 1 :]]) if pooled else out[0]
                if stand_in_update is not None:
                    fitted = stand_in_update[index]
                    update = out[0][at] - states[at] + fitted(module.input_layernorm(hidden[row][skipped]))
                    result[row, skipped] = hidden[row][skipped] + update - fitted(mean_normed)
            return result

        return hook

    handles = [
        layers[index].register_forward_hook(make_hook(index), with_kwargs=True) for index in selector.layers
    ]
    try:
        return model(**forward_inputs(case, case.inputs), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def assert_unpatched(model, classes: list[type]) -> None:
    assert [type(layer) for layer in decoder_layers(model)] == classes
    assert getattr(model, RUNTIME_ATTRIBUTE, None) is None
    assert getattr(model, TRACKER_ATTRIBUTE, None) is None
    assert not any(isinstance(layer, RoutedLayerMixin) for layer in decoder_layers(model))


# ------------------------------------------------------------------------------------------------ 1. exactness at 1.0


@FAMILY
@ALL
def test_keep_ratio_one_is_exact(tiny_case, make_selector, family, backend):
    case = tiny_case(family, backend)
    model = case.model
    assert bool((~case.valid).any()), "the batch must be left-padded"
    ref_logits = model(**case.inputs).logits
    ref_gen = greedy(case, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)

    attach(model, make_selector(model, 1.0))
    with case.routing():
        logits = model(**case.inputs).logits
        gen = greedy(case, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)

    assert torch.equal(logits, ref_logits)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert len(gen.scores) == len(ref_gen.scores) > 0
    for step, (scores, ref_scores) in enumerate(zip(gen.scores, ref_gen.scores, strict=True)):
        assert torch.equal(scores, ref_scores), f"step {step}"


# ----------------------------------------------------------------------------------------------------- 2. detach


@FAMILY
@ALL
def test_detach_restores_the_model(tiny_case, make_selector, family, backend):
    case = tiny_case(family, backend)
    model = case.model
    classes = [type(layer) for layer in decoder_layers(model)]
    keys = set(model.state_dict().keys())
    module_names = {name for name, _ in model.named_modules()}
    owner = get_adapter(model).placeholder_owner(model)
    text_model = get_adapter(model).text_model(model)
    pre_hooks = (len(model._forward_pre_hooks), len(text_model._forward_pre_hooks))
    ref = model(**case.inputs).logits

    attach(model, make_selector(model, RATIO))
    assert all(isinstance(decoder_layers(model)[i], RoutedLayerMixin) for i in range(1, len(classes)))
    if owner is not None:
        assert "get_placeholder_mask" in vars(owner)
    with case.routing():
        routed = model(**case.inputs).logits
    assert not torch.equal(routed, ref), "routing at 0.25 should change the logits"
    detach(model)

    assert_unpatched(model, classes)
    assert not any("alvts" in name for name, _ in model.named_modules())
    assert {name for name, _ in model.named_modules()} == module_names
    assert set(model.state_dict().keys()) == keys
    assert not any(hasattr(layer, "alvts_policy") for layer in decoder_layers(model))
    if owner is not None:
        assert "get_placeholder_mask" not in vars(owner)
    assert (len(model._forward_pre_hooks), len(text_model._forward_pre_hooks)) == pre_hooks
    assert torch.equal(model(**case.inputs).logits, ref)


# -------------------------------------------------------------------------------------------- 3. KV cache lengths


@FAMILY
@ALL
@pytest.mark.parametrize("ratio", [RATIO, 0.3])
def test_routed_cache_holds_only_processed_tokens(tiny_case, make_selector, family, backend, ratio):
    case = tiny_case(family, backend)
    model = case.model
    padded = case.inputs["input_ids"].shape[1]
    counts = kept_counts(case, ratio)
    expected = int(counts.max())
    attach(model, make_selector(model, ratio))

    with case.routing():
        cache = model(**case.inputs, use_cache=True).past_key_values
    layers = cache.layers
    assert cache.get_seq_length() == padded  # what transformers reads: every position, skipped ones too
    for index in range(len(layers)):  # layer 0 is routed too (the default start layer)
        layer = layers[index]
        assert isinstance(layer, RoutedCacheLayer), index
        assert layer.keys.shape[-2] == layer.values.shape[-2] == expected < padded, index
        assert layer.key_valid.shape == (counts.numel(), expected)
        assert torch.equal(layer.key_valid.sum(1), counts), index
        # real keys first, batch fillers after
        assert torch.equal(layer.key_valid, torch.arange(expected)[None] < counts[:, None])

    new_tokens = 4
    with case.routing():
        out = greedy(case, max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_dict_in_generate=True)
    assert out.sequences.shape[1] == padded + new_tokens
    layers = out.past_key_values.layers
    assert out.past_key_values.get_seq_length() == padded + new_tokens - 1
    for index in range(len(layers)):
        layer = layers[index]
        assert layer.keys.shape[-2] == expected + new_tokens - 1 < padded, index
        assert torch.equal(layer.key_valid.sum(1), counts + new_tokens - 1), index


def test_layers_before_start_layer_stay_unrouted(tiny_case, make_selector):
    case = tiny_case("llava", "sdpa")
    model = case.model
    padded = case.inputs["input_ids"].shape[1]
    expected = int(kept_counts(case, RATIO).max())
    attach(model, make_selector(model, RATIO, start_layer=2))
    layers = decoder_layers(model)
    assert [isinstance(layer, RoutedLayerMixin) for layer in layers] == [False, False, True, True]
    cache = model(**case.inputs, use_cache=True).past_key_values
    assert [type(layer) is DynamicLayer for layer in cache.layers] == [True, True, False, False]
    assert [layer.keys.shape[-2] for layer in cache.layers] == [padded, padded, expected, expected]


# ------------------------------------------------------------------------------------ 4. padding / batch invariance


@FAMILY
@ALL
def test_rows_are_independent_of_batching_and_padding(tiny_case, make_selector, family, backend):
    case = tiny_case(family, backend)
    model = case.model
    rows = [single_row(case, row) for row in range(2)]
    # the unpatched model itself must be padding invariant with these inputs, or the comparison means nothing
    batched_ref = model(**forward_inputs(case, case.inputs)).logits
    for row, single in enumerate(rows):
        alone = model(**forward_inputs(single, single.inputs)).logits
        width = alone.shape[1]
        torch.testing.assert_close(batched_ref[row, -width:], alone[0], atol=1e-4, rtol=1e-4)

    attach(model, make_selector(model, RATIO))
    with case.routing():
        batched = model(**forward_inputs(case, case.inputs)).logits
        batched_gen = greedy(
            case, max_new_tokens=5, min_new_tokens=5, output_scores=True, return_dict_in_generate=True
        )
    assert (batched[:, -1] - batched_ref[:, -1]).abs().max() > 1e-3, "routing should change the logits"
    for row, single in enumerate(rows):
        with single.routing():
            alone = model(**forward_inputs(single, single.inputs)).logits
            alone_gen = greedy(
                single, max_new_tokens=5, min_new_tokens=5, output_scores=True, return_dict_in_generate=True
            )
        width = alone.shape[1]
        torch.testing.assert_close(batched[row, -1], alone[0, -1], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched[row, -width:], alone[0], atol=1e-4, rtol=0)
        assert torch.equal(batched_gen.sequences[row, -5:], alone_gen.sequences[0, -5:]), f"row {row}"
        # every decoding step attends over the routed caches, fillers and padding included
        for step, (scores, alone_scores) in enumerate(zip(batched_gen.scores, alone_gen.scores, strict=True)):
            torch.testing.assert_close(scores[row], alone_scores[0], atol=1e-4, rtol=0, msg=f"row {row} step {step}")


# ---------------------------------------------------------------------------------------- 5. reference semantics


@FAMILY
@ALL
@pytest.mark.parametrize("ratio", [RATIO, 0.3])
def test_skipped_tokens_pass_through_unchanged(tiny_case, make_selector, family, backend, ratio):
    case = tiny_case(family, backend)
    model = case.model
    counts = kept_counts(case, ratio)
    attach(model, make_selector(model, ratio))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs[CONTEXT_KWARG]
            cos, sin = kwargs["position_embeddings"]
            selected = module.alvts_policy.select(module, module.alvts_sequence_norm(hidden), context, cos, sin)
            keep = processed_positions(context, selected)
            changed = (output != hidden).any(-1)
            seen[index] = (keep, changed)
            assert torch.equal(output[~keep], hidden[~keep])

        return hook

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(make_hook(i), with_kwargs=True) for i in range(1, len(layers))]
    try:
        with case.routing():
            model(**case.inputs)
    finally:
        for handle in handles:
            handle.remove()

    assert sorted(seen) == list(range(1, len(layers)))
    for index, (keep, changed) in seen.items():
        assert torch.equal(changed, keep), index
        assert torch.equal(changed.sum(1), counts), index
        assert not bool((keep & ~case.valid).any()), "padding is never processed"
        assert bool((keep & ~case.visual & case.valid).sum(1).eq((~case.visual & case.valid).sum(1)).all())


@ALL
def test_last_position_is_always_processed(tiny_case, make_selector, backend):
    case = tiny_case("llama", backend)
    model = case.model
    visual = case.explicit_visual.clone()
    visual[:, -3:] = True  # the prompt now ends with visual tokens
    case = dataclasses.replace(case, explicit_visual=visual)
    attach(model, make_selector(model, RATIO))
    changes: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        changes.append((output != hidden).any(-1))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in decoder_layers(model)[1:]]
    try:
        with case.routing():
            model(**case.inputs)
    finally:
        for handle in handles:
            handle.remove()
    valid_visual = (visual & case.valid).sum(1)
    k = torch.ceil(valid_visual * RATIO).long()
    text = (case.valid & ~visual).sum(1)
    assert len(changes) == len(decoder_layers(model)) - 1
    for changed in changes:
        assert bool(changed[:, -1].all())
        processed_visual = (changed & visual).sum(1)
        assert bool(((processed_visual == k) | (processed_visual == k + 1)).all())
        assert torch.equal((changed & ~visual).sum(1), text)


@FAMILY
@ALL
@pytest.mark.parametrize("skipped_keys", ["drop", "pool"])
def test_routed_forward_matches_slow_reference(tiny_case, make_selector, family, backend, skipped_keys):
    case = tiny_case(family, backend)
    model = case.model
    selector = make_selector(model, RATIO)
    unrouted = model(**forward_inputs(case, case.inputs)).logits
    dropped = reference_routed_logits(case, selector, RATIO)
    reference = reference_routed_logits(case, selector, RATIO, pooled=skipped_keys == "pool")
    attach(model, selector, skipped_keys=skipped_keys)
    with case.routing():
        routed = model(**forward_inputs(case, case.inputs)).logits
        counts = last_visual_pass(model).processed_counts()
    valid = case.valid
    assert (dropped[valid] - unrouted[valid]).abs().max() > 1e-3, "the reference must differ from no routing"
    if skipped_keys == "pool":
        assert (reference[valid] - dropped[valid]).abs().max() > 1e-3, "the stand-in must change the result"
    torch.testing.assert_close(routed[valid], reference[valid], atol=1e-4, rtol=0)
    stand_in = int(skipped_keys == "pool")  # the stand-in counts as a processed visual token
    assert torch.equal(counts[1], kept_counts(case, RATIO) - (valid & ~case.visual).sum(1) + stand_in)


@FAMILY
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_stand_in_update_matches_slow_reference(tiny_case, make_selector, family, backend):
    case = tiny_case(family, backend)
    model = case.model
    hidden = model.config.get_text_config(decoder=True).hidden_size
    selector = make_selector(model, RATIO)
    torch.manual_seed(0)
    selector.skip_updates = {index: SkipUpdate(hidden, 4) for index in selector.layers}
    pooled = reference_routed_logits(case, selector, RATIO, pooled=True)
    reference = reference_routed_logits(case, selector, RATIO, pooled=True, stand_in_update=selector.skip_updates)
    attach(model, selector, skipped_keys="pool", skipped_update="stand-in")
    with case.routing():
        routed = model(**forward_inputs(case, case.inputs)).logits
    valid = case.valid
    assert (reference[valid] - pooled[valid]).abs().max() > 1e-3, "the update must change the result"
    torch.testing.assert_close(routed[valid], reference[valid], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- 6. sampling and beams


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_sampling_and_beam_search(tiny_case, make_selector, family):
    case = tiny_case(family, "eager")
    model = case.model
    width = case.inputs["input_ids"].shape[1]
    gen = dict(max_new_tokens=5, min_new_tokens=5)

    ref_beam = model.generate(**case.inputs, num_beams=3, do_sample=False, **gen)
    torch.manual_seed(123)
    ref_sample = model.generate(**case.inputs, do_sample=True, top_k=5, **gen)

    attach(model, make_selector(model, 1.0))
    beam = model.generate(**case.inputs, num_beams=3, do_sample=False, **gen)
    torch.manual_seed(123)
    sample = model.generate(**case.inputs, do_sample=True, top_k=5, **gen)
    detach(model)
    assert torch.equal(beam, ref_beam)
    assert torch.equal(sample, ref_sample)

    attach(model, make_selector(model, RATIO))
    torch.manual_seed(7)
    sample = model.generate(**case.inputs, do_sample=True, top_k=5, **gen)
    torch.manual_seed(7)
    again = model.generate(**case.inputs, do_sample=True, top_k=5, **gen)
    beam = model.generate(**case.inputs, num_beams=3, do_sample=False, **gen)
    beam_many = model.generate(**case.inputs, num_beams=3, num_return_sequences=3, do_sample=False, **gen)
    for out in (sample, beam):
        assert out.shape == (2, width + 5)
        assert torch.equal(out[:, :width], case.inputs["input_ids"])
    assert torch.equal(sample, again)
    assert beam_many.shape == (6, width + 5)
    assert torch.equal(beam_many[::3], beam), "the best returned beam is the num_return_sequences=1 result"

    # beam search reorders the routed caches (key validity included): each row must match searching it alone
    for row in range(2):
        single = single_row(case, row)
        alone = model.generate(**single.inputs, num_beams=3, do_sample=False, **gen)
        assert torch.equal(beam[row, -5:], alone[0, -5:]), f"row {row}"


# ---------------------------------------------------------------------------------------- 7. pooled skipped keys


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_pooled_keys_are_exact_at_keep_ratio_one_and_consistent_in_generate(tiny_case, make_selector, backend):
    case = tiny_case("llava", backend)
    model = case.model
    reference = greedy(case, max_new_tokens=4)
    attach(model, make_selector(model, 1.0), skipped_keys="pool")
    assert torch.equal(greedy(case, max_new_tokens=4), reference)
    detach(model)
    attach(model, make_selector(model, RATIO), skipped_keys="pool")
    batch = greedy(case, max_new_tokens=4, num_beams=2)
    for row in range(2):  # padding, batching and beam reordering keep each row's stand-in and its bias
        alone = greedy(single_row(case, row), max_new_tokens=4, num_beams=2)
        assert torch.equal(batch[row, -4:], alone[0, -4:]), f"row {row}"


def test_unknown_skipped_keys_are_rejected(tiny_case, make_selector):
    case = tiny_case("llava", "sdpa")
    with pytest.raises(AlvtsError, match="skipped_keys must be one of drop, pool"):
        attach(case.model, make_selector(case.model, RATIO), skipped_keys="merge")


# ------------------------------------------------------------------------------------------------------ 8. errors


def test_attach_twice_and_detach_unpatched_raise(tiny_case, make_selector):
    case = tiny_case("llava", "eager")
    model = case.model
    classes = [type(layer) for layer in decoder_layers(model)]
    with pytest.raises(AlvtsError):
        detach(model)
    attach(model, make_selector(model, RATIO))
    routed_classes = [type(layer) for layer in decoder_layers(model)]
    with pytest.raises(AlvtsError):
        attach(model, make_selector(model, RATIO))
    assert [type(layer) for layer in decoder_layers(model)] == routed_classes
    detach(model)
    assert_unpatched(model, classes)
    with pytest.raises(AlvtsError):
        detach(model)


def test_continuing_an_unrouted_cache(tiny_case, make_selector):
    """Text-only steps after attaching run unrouted (exact); a pass with visual tokens needs a routed cache."""
    case = tiny_case("llama", "eager")
    model = case.model
    mask = torch.cat([case.inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    next_token = torch.full((2, 1), 5)
    cache = model(**case.inputs, use_cache=True).past_key_values
    reference = model(input_ids=next_token, attention_mask=mask, cache=cache).logits
    cache = model(**case.inputs, use_cache=True).past_key_values
    attach(model, make_selector(model, RATIO))
    continued = model(input_ids=next_token, attention_mask=mask, cache=cache, use_cache=True).logits
    assert torch.equal(continued, reference)
    longer = torch.cat([mask, mask[:, -1:]], 1)
    visual = torch.zeros_like(longer, dtype=torch.bool)
    visual[:, -1] = True  # the next position is visual
    with visual_positions(model, visual), pytest.raises(AlvtsError, match="cache"):
        model(input_ids=next_token, attention_mask=longer, cache=cache)


def test_last_visual_pass_forgets_an_earlier_prompt(tiny_case, make_selector):
    """A new prompt without visual tokens clears the previous prompt's context (its counts would describe another
    batch); decoding steps of a visual prompt keep it."""
    case = tiny_case("llama", "eager")
    model = case.model
    attach(model, make_selector(model, RATIO))
    with case.routing():
        cache = model(**case.inputs, use_cache=True).past_key_values
    assert last_visual_pass(model) is not None
    mask = torch.cat([case.inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    model(input_ids=torch.full((2, 1), 5), attention_mask=mask, cache=cache)
    assert last_visual_pass(model) is not None, "a decoding step continues the visual prompt"
    model(**case.inputs)  # the same tokens, but nothing marked visual: a text-only prompt
    assert last_visual_pass(model) is None


@pytest.mark.parametrize(
    ("source", "target"),
    [(("llava", 0), ("llava", 1)), (("llama", 0), ("llama", 1)), (("llava", 0), ("llama", 0)),
     (("llama", 0), ("qwen2_5_vl", 0)), (("qwen2_5_vl", 0), ("llava_next", 0))],
)
def test_attach_to_another_model_raises_mismatch(tiny_case, make_selector, source, target):
    selector = make_selector(tiny_case(source[0], "eager", model_seed=source[1]).model, RATIO)
    model = tiny_case(target[0], "eager", model_seed=target[1]).model
    classes = [type(layer) for layer in decoder_layers(model)]
    with pytest.raises(ModelMismatchError):
        attach(model, selector)
    assert_unpatched(model, classes)


@pytest.mark.parametrize("keep_ratio", [0.0, -0.5, 1.5])
def test_attach_rejects_bad_keep_ratio(tiny_case, make_selector, keep_ratio):
    model = tiny_case("llava", "eager").model
    classes = [type(layer) for layer in decoder_layers(model)]
    with pytest.raises(AlvtsError):
        attach(model, make_selector(model, RATIO), keep_ratio=keep_ratio)
    assert_unpatched(model, classes)
    attach(model, make_selector(model, RATIO), keep_ratio=0.5)  # a failed attach leaves the model attachable
    assert all(decoder_layers(model)[i].alvts_policy.keep_ratio == 0.5 for i in range(1, 4))


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_attach_rejects_unsupported_attention_backend(tiny_case, make_selector, family):
    model = tiny_case(family, "eager").model
    selector = make_selector(model, RATIO)
    classes = [type(layer) for layer in decoder_layers(model)]
    model.config.get_text_config(decoder=True)._attn_implementation = "flex_attention"
    if model.config.get_text_config(decoder=True)._attn_implementation != "flex_attention":
        pytest.skip("this transformers version does not let the attention implementation be overridden")
    with pytest.raises(AlvtsError):
        attach(model, selector)
    assert_unpatched(model, classes)


# --------------------------------------------------------------------------------------------- 8. use_cache=False


@FAMILY
@ALL
def test_no_cache_forward_matches_cached_prefill(tiny_case, make_selector, family, backend):
    case = tiny_case(family, backend)
    model = case.model
    attach(model, make_selector(model, RATIO))
    with case.routing():
        cached = model(**case.inputs, use_cache=True)
        uncached = model(**case.inputs, use_cache=False)
    assert uncached.past_key_values is None
    vocab = model.config.get_text_config(decoder=True).vocab_size
    assert uncached.logits.shape == cached.logits.shape == (*case.inputs["input_ids"].shape, vocab)
    assert bool(torch.isfinite(uncached.logits).all())
    torch.testing.assert_close(uncached.logits, cached.logits, atol=1e-5, rtol=0)


@FAMILY
def test_routing_layer_zero_leaves_generation_positions_unchanged(tiny_case, make_selector, family):
    """transformers sizes masks and positions from layer 0's cache; a routed layer 0 must still count every
    position, so each decoding step gets the same rotary positions as without routing and a layer that processes
    every token gets a mask of the right size."""
    case = tiny_case(family, "sdpa")
    model = case.model
    rotary = next(module for name, module in model.named_modules() if name.endswith("rotary_emb"))

    def positions(routed: bool) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        def record(module, args, kwargs, output):
            seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone())

        handle = rotary.register_forward_hook(record, with_kwargs=True)
        try:
            with case.routing() if routed else contextlib.nullcontext():
                greedy(case, max_new_tokens=4, min_new_tokens=4)
        finally:
            handle.remove()
        return seen

    reference = positions(routed=False)
    selector = make_selector(model, RATIO)
    selector.keep_ratios[max(selector.keep_ratios)] = 1.0  # a later layer that processes every token reads the mask
    attach(model, selector)
    assert isinstance(decoder_layers(model)[0], RoutedLayerMixin)
    routed = positions(routed=True)
    detach(model)
    assert len(routed) == len(reference) == 4
    for step, (got, expected) in enumerate(zip(routed, reference, strict=True)):
        assert torch.equal(got, expected), step
