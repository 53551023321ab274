"""Runtime routing: each routed decoder layer processes its selected visual tokens plus all text tokens.

The other visual tokens skip the layer unchanged and are put back in place before the next layer, where
they may be selected again. Layers are patched by swapping their class for a subclass, so isinstance checks
and hooks on the layer keep working; `detach` swaps it back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.profiler import record_function

from ..artifact.config import SkippedKeys, SkippedUpdate
from ..model.devices import align_tensors, execution_device, follow_class_forward
from ..tokens import at_positions, kept_positions, with_stand_in
from .context import ForwardContext, PassCounts
from .input_norm import NormedProjection, NormedSequence, SequenceNorm
from .key_bias import KEY_BIAS_KWARG, folds_key_bias
from .masks import routed_attention_mask
from .policies import LayerPolicy
from .routed_cache import existing_routed_layer, routed_cache_layer

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

CONTEXT_KWARG = "alvts_context"
# profiler ranges of a routed layer's own work (disjoint; the rest of its time is the decoder layer's), by step
ROUTED_RANGES = {step: f"alvts.{step}" for step in ("select", "compact", "pool", "mask", "scatter", "update")}


@dataclass
class Compaction:
    """Which positions a layer processes: `index` (B, L_c) into a sequence of length L, where L marks a pooled
    stand-in or a batch filler (`filler`: rows shorter than the longest)."""

    index: torch.Tensor
    filler: torch.Tensor  # (B, L_c) bool
    length: int  # L
    spare_slot: bool  # host-known: some index may be L, so a scatter needs a slot behind the sequence

    @classmethod
    def from_keep(
        cls, keep: torch.Tensor, length: int, compact_length: int | None = None,
        sort_keys: torch.Tensor | None = None, uniform: bool = False,
    ) -> Compaction:
        """From (B, L) kept positions, or (B, L + 1) with the stand-in at slot L. `compact_length` (the largest row
        count) saves a host sync when known; `uniform` says every row keeps that many. Kept positions keep their
        order, or the order of `sort_keys` (same shape as `keep`, integers below twice its width) if given."""
        index, filler = kept_positions(keep, compact_length, sort_keys, fill=length)
        return cls(index=index, filler=filler, length=length, spare_slot=keep.shape[1] > length or not uniform)

    def gather(self, states: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(B or 1, L, ...) to (B, L_c, ...); slot L reads `extra` (B, 1, ...) if given (states with a feature
        dimension), else the last position."""
        gathered = at_positions(states, self.index)
        if extra is None:
            return gathered
        at_extra = (self.index == self.length).view(*self.index.shape, *([1] * (states.dim() - 2)))
        return torch.where(at_extra, extra.to(gathered.dtype), gathered)

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised (B x L (+ 1 spare slot if needed), D) tensor to scatter into, flat so that its sequence
        part (`sequence`), which the caller fills first, is contiguous (an `out=` target)."""
        batch, length, width = like.shape
        return like.new_empty(batch * length + self.spare_slot, width)

    def sequence(self, buffer: torch.Tensor) -> torch.Tensor:
        """The (B, L, D) sequence part of a `buffer`."""
        batch = self.index.shape[0]
        return buffer[: batch * self.length].view(batch, self.length, buffer.shape[-1])

    def scatter(self, buffer: torch.Tensor, compact: torch.Tensor) -> torch.Tensor:
        """Write the compact rows into `buffer` (from `self.buffer`) in place; stand-ins and fillers land in the
        spare slot (several may share it). Returns its sequence part."""
        batch = self.index.shape[0]
        starts = torch.arange(batch, device=self.index.device)[:, None] * self.length
        flat = torch.where(self.index == self.length, batch * self.length, starts + self.index)
        buffer[flat.flatten()] = compact.flatten(0, 1).to(buffer.dtype)
        return self.sequence(buffer)


def processed_positions(context: ForwardContext, visual_keep: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool: valid text tokens, the kept visual tokens (None: all) and the last position."""
    keep = context.valid & (~context.visual | (visual_keep if visual_keep is not None else context.visual))
    keep[:, -1] = True
    return keep


@dataclass
class Pool:
    """One stand-in per row for the visual tokens that skip a layer (SkippedKeys.POOL).

    What the layer's attention reads of it is exactly the mean of their keys and values before rotation: the layer's
    input norm gives it the mean of their normed inputs (`stand_in_norm_hook`); its hidden state, the residual the
    layer adds to, is the mean of theirs, so its output less that mean is the update the layer gives their average
    (what SkippedUpdate.STAND_IN passes on to them). Its rotary embedding is their mean rotary embedding, and its
    attention logits get log(count), so the processed tokens attend to it with about the mass the skipped keys would
    have drawn. It is appended at slot L of the sequence and sorted right after the row's last visual token, so
    causal attention lets only the tokens after the image (the text) see it. A row whose layer processes none of its
    visual tokens gets no stand-in: such a layer skips the image entirely.
    """

    state: torch.Tensor  # (B, 1, D) mean hidden state: the residual its update is added to
    normed: torch.Tensor  # (B, 1, D) mean normed input: what the layer's projections read
    cos: torch.Tensor  # (B, 1, d)
    sin: torch.Tensor
    log_count: torch.Tensor  # (B,) float32
    present: torch.Tensor  # (B,) bool: the row processed some of its visual tokens and skipped others
    sort_keys: torch.Tensor  # (B, L + 1) for Compaction.from_keep: position p sorts as 2p, the stand-in after the image

    @classmethod
    def of(
        cls, hidden_states: torch.Tensor, normed: NormedSequence, context: ForwardContext, keep: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> Pool:
        """The stand-in of the visual tokens outside `keep` (B, L) in each row; `normed` is the layer's normed input."""
        visual = context.visual & context.valid
        skipped = visual & ~keep
        count = skipped.sum(-1)
        present = (count > 0) & (visual & keep).any(-1)
        batch, length = keep.shape
        positions = torch.arange(length, device=keep.device).expand(batch, -1)
        last_visual = torch.where(visual, positions, -1).amax(-1, keepdim=True)

        weights = skipped.to(hidden_states.dtype)[:, None, :]  # (B, 1, L): 0/1, exact in any dtype
        divisor = count.clamp(min=1).float()[:, None, None]

        def mean(values: torch.Tensor) -> torch.Tensor:  # one read of `values`; the sum is divided in float32
            return divided(torch.bmm(weights.to(values.dtype), values.expand(batch, -1, -1)))

        def divided(total: torch.Tensor) -> torch.Tensor:
            return (total.float() / divisor).to(total.dtype)

        return cls(
            state=mean(hidden_states),
            normed=divided(normed.weighted_sum(weights)),
            cos=mean(cos),
            sin=mean(sin),
            log_count=count.clamp(min=1).float().log(),
            present=present,
            sort_keys=torch.cat([2 * positions, 2 * last_visual + 1], 1),
        )

    def extended_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, L + 1): `keep` with the stand-in's slot L (kept where the row has a stand-in)."""
        return torch.cat([keep, self.present[:, None]], 1)


def compact_rows(counts: PassCounts, policy: LayerPolicy | None) -> list[int] | None:
    """Positions each row processes, known on the host: its valid text tokens plus the visual tokens `policy`
    keeps (None: all of them). None when not known without a sync (a policy with data-dependent counts, or a
    row not ending in a valid text token)."""
    if not counts.last_text:
        return None
    rows = []
    for num_visual, num_text in zip(counts.visual, counts.text, strict=True):
        kept = num_visual if policy is None else policy.kept_visual(num_visual)
        if kept is None:
            return None
        rows.append(num_text + kept)
    return rows


class RoutedLayerMixin:
    """Mixed into a decoder layer's class by `route_layer` (which sets `alvts_policy`)."""

    alvts_policy: LayerPolicy
    alvts_skipped_update: SkippedUpdate
    alvts_skip_module: nn.Module | None  # the fitted map for SkippedUpdate.LINEAR and STAND_IN
    alvts_skip_down: NormedProjection | None  # its down-projection, as a map of the layer's `NormedSequence`
    alvts_skipped_keys: SkippedKeys
    alvts_stand_in: tuple[torch.Tensor, torch.Tensor] | None  # (B, L_c, 1) stand-in slots and their normed input
    alvts_norm_hook: RemovableHandle
    alvts_mlp_compaction: tuple[Compaction, torch.Tensor] | None  # SkippedKeys.ALL, while the layer runs: `mlp_hooks`
    alvts_mlp_hooks: list[RemovableHandle]  # `mlp_hooks`, installed once (SkippedKeys.ALL only)
    alvts_layer_class: type  # the decoder layer class it was (set by `routed_class`)
    alvts_sequence_norm: SequenceNorm  # the input norm over whole sequences (`input_norm`)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        context: ForwardContext | None = kwargs.pop(CONTEXT_KWARG, None)
        if context is None or args:
            return super().forward(hidden_states, *args, **kwargs)
        align_tensors(context, hidden_states.device)
        counts = context.host_counts()
        policy = self.alvts_policy
        visual_keep = normed = None
        if counts.has_visual:
            with record_function(ROUTED_RANGES["select"]):
                if not policy.keeps_all:
                    cos, sin = kwargs["position_embeddings"]
                    normed = self.alvts_sequence_norm(hidden_states) if policy.reads_states else None
                    visual_keep = policy.select(self, normed, context, cos, sin)
                context.selected[self.self_attn.layer_idx] = visual_keep
        compacted_before = existing_routed_layer(kwargs.get("cache"), self.self_attn.layer_idx) is not None
        if visual_keep is None and not compacted_before:
            return super().forward(hidden_states, **kwargs)
        rows = compact_rows(counts, None if visual_keep is None else policy)
        if self.alvts_skipped_keys is SkippedKeys.ALL:
            return self._keys_all_forward(hidden_states, context, visual_keep, kwargs, rows, normed)
        return self._routed_forward(hidden_states, context, visual_keep, kwargs, rows, normed)

    def _keys_all_forward(
        self,
        hidden_states: torch.Tensor,
        context: ForwardContext,
        visual_keep: torch.Tensor,
        kwargs: dict,
        rows: list[int] | None,
        normed: NormedSequence | None,
    ) -> torch.Tensor:
        """SkippedKeys.ALL: attention runs on every token, so the processed tokens read every token's own key and
        value and the layer caches every token; the MLP runs on the processed tokens only, and the skipped visual
        tokens keep their state plus the skipped update (`_compensate`)."""
        with record_function(ROUTED_RANGES["compact"]):
            call = RoutedCall.compact(hidden_states, context, visual_keep, rows, normed)
        if call.dense or self.alvts_skipped_update is SkippedUpdate.EXACT:
            return super().forward(hidden_states, **kwargs)  # nothing skips, or the skipped get the layer's update
        compact_length, uniform = call.compact_shape()
        compaction = call.compaction = Compaction.from_keep(call.keep, call.length, compact_length, uniform=uniform)
        self.alvts_mlp_compaction = (compaction, hidden_states)
        try:
            output = super().forward(hidden_states, **kwargs)
        finally:
            self.alvts_mlp_compaction = None
        with record_function(ROUTED_RANGES["update"]):
            skipped = (context.visual & context.valid & ~call.keep)[..., None]
            base = torch.where(skipped, hidden_states, output)
            return self._compensate(call, base, compaction.gather(hidden_states), compaction.gather(output), base)

    def _routed_forward(
        self,
        hidden_states: torch.Tensor,
        context: ForwardContext,
        visual_keep: torch.Tensor | None,
        kwargs: dict,
        rows: list[int] | None,
        normed: NormedSequence | None = None,
    ) -> torch.Tensor:
        """Run the layer on valid text tokens, the kept visual tokens and the last position (and, with
        SkippedKeys.POOL, one stand-in for the skipped visual tokens), in five steps: compact (which positions),
        pool (the stand-in), run (the layer on the compact sequence, with its masks and cache), compensate (the
        skipped tokens' update, written into the output buffer) and scatter (the processed rows into place).

        `rows` (positions processed per row, if known on the host) avoids host syncs for the compact length
        and for the masks. `normed` is the layer's normed input if selection already computed it.
        """
        exact = None
        if self.alvts_skipped_update is SkippedUpdate.EXACT and visual_keep is not None:
            uncached = {key: None if key in ("cache", "past_key_values") else value for key, value in kwargs.items()}
            exact = super().forward(hidden_states, **uncached)
        with record_function(ROUTED_RANGES["compact"]):
            call = RoutedCall.compact(hidden_states, context, visual_keep, rows, normed)
        if not call.dense and visual_keep is not None and self.alvts_skipped_keys is SkippedKeys.POOL:
            with record_function(ROUTED_RANGES["pool"]):
                self._pool(call, *kwargs["position_embeddings"])
        with record_function(ROUTED_RANGES["compact"]):
            compact = call.gather()
        with record_function(ROUTED_RANGES["mask"]):
            cache = self._attention_inputs(call, kwargs)
        output = self._run(call, compact, kwargs, cache)
        if call.dense:
            return output
        with record_function(ROUTED_RANGES["update"]):
            buffer = call.compaction.buffer(hidden_states)
            self._compensate(call, hidden_states, compact, output, call.compaction.sequence(buffer), exact)
        with record_function(ROUTED_RANGES["scatter"]):
            return call.compaction.scatter(buffer, output)

    def _pool(self, call: RoutedCall, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Add the row's stand-in for the visual tokens it skips at slot L (`Pool`)."""
        normed = call.normed_input(self.alvts_sequence_norm)
        call.pool = Pool.of(call.hidden_states, normed, call.context, call.keep, cos, sin)
        call.context.pooled[self.self_attn.layer_idx] = call.pool.present
        call.rows = None if call.rows is None else _with_pool(call.rows, call.context.host_counts())

    def _attention_inputs(self, call: RoutedCall, kwargs: dict) -> tuple | None:
        """Set the compact sequence's attention mask, stand-in bias and rotary tables in `kwargs`; the cache layer's
        bookkeeping to record once the layer ran (None without a cache)."""
        dense, compaction = call.dense, call.compaction
        new_valid = call.keep if dense else ~compaction.filler
        all_valid = True if dense else None if call.rows is None else min(call.rows) == max(call.rows)
        key_bias = None
        if call.pool is not None:
            key_bias = torch.where(call.stand_in_slots, call.pool.log_count[:, None], 0.0)
        cache = kwargs.get("cache")
        layer_cache = routed_cache_layer(cache, self.self_attn.layer_idx) if cache is not None else None
        key_valid = new_valid if layer_cache is None else layer_cache.append_validity(new_valid)
        keys_all_valid = all_valid if layer_cache is None else layer_cache.all_valid_after(all_valid)
        key_bias = key_bias if layer_cache is None else layer_cache.append_bias(key_bias, new_valid)
        implementation = self.self_attn.config._attn_implementation
        kwargs["attention_mask"] = routed_attention_mask(
            key_valid, call.compact_length, implementation, call.hidden_states.dtype, keys_all_valid,
            None if folds_key_bias(implementation) else key_bias,
        )
        if key_bias is not None and folds_key_bias(implementation):
            kwargs[KEY_BIAS_KWARG] = key_bias
        kwargs["position_ids"] = None
        if not dense:
            cos, sin = kwargs["position_embeddings"]
            pool = call.pool
            kwargs["position_embeddings"] = (
                compaction.gather(cos, None if pool is None else pool.cos),
                compaction.gather(sin, None if pool is None else pool.sin),
            )
        return None if layer_cache is None else (layer_cache, key_valid, keys_all_valid, key_bias)

    def _run(self, call: RoutedCall, compact: torch.Tensor, kwargs: dict, cache: tuple | None) -> torch.Tensor:
        """The layer on the compact sequence (its stand-ins' normed input replaced, see `stand_in_norm_hook`); then
        the cache layer records which of the keys it appended are real."""
        self.alvts_stand_in = None if call.pool is None else (call.stand_in_slots[..., None], call.pool.normed)
        try:
            output = super().forward(compact, **kwargs)
        finally:
            self.alvts_stand_in = None
        if cache is not None:
            layer_cache, key_valid, keys_all_valid, key_bias = cache
            layer_cache.key_valid, layer_cache.keys_all_valid = key_valid, keys_all_valid
            layer_cache.key_bias = key_bias
            layer_cache.seen += call.length
        return output

    def _compensate(
        self, call: RoutedCall, base: torch.Tensor, compact: torch.Tensor, output: torch.Tensor, out: torch.Tensor,
        exact: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write into `out` (B, L, D) `base` with the skipped visual tokens given the layer's SkippedUpdate, read
        off the compact input and `output` of the layer (the processed rows of `out` are left to the scatter)."""
        context, pool = call.context, call.pool
        skipped = context.visual & context.valid & ~call.keep
        if exact is not None:
            return torch.where(skipped[..., None], exact, base, out=out)
        update = self.alvts_skipped_update
        if update is SkippedUpdate.NONE or (update is SkippedUpdate.STAND_IN and pool is None):
            return out.copy_(base)
        skip_module = self.alvts_skip_module if update is not SkippedUpdate.MEAN else None
        normed = None if skip_module is None else call.normed_input(self.alvts_sequence_norm)
        if update is SkippedUpdate.STAND_IN:
            slots = call.stand_in_slots[..., None].to(output.dtype)
            anchor = Anchor.of_stand_in((output * slots).sum(1, keepdim=True) - pool.state, pool)
        else:
            compact_normed = None if normed is None else normed.gathered(call.compaction.gather, compact)
            anchor = Anchor.of_processed(compact, output, call.processed_visual(), compact_normed)
        fitted = None
        if skip_module is not None:
            deviation = self.alvts_skip_down(normed) - skip_module.down(anchor.normed.to(skip_module.down.weight.dtype))
            fitted = FittedDeviation(deviation, skip_module.up.weight.T)
        return compensate_skipped(base, skipped, anchor, fitted, out=out)


@dataclass
class RoutedCall:
    """One call of a routed layer: which positions it processes and how its compact sequence maps back."""

    hidden_states: torch.Tensor  # (B, L, D) the layer's input
    context: ForwardContext
    keep: torch.Tensor  # (B, L) bool: the positions it processes
    rows: list[int] | None  # positions processed per row (stand-ins included once pooled), when known on the host
    normed: NormedSequence | None  # the layer's normed input, once computed
    dense: bool  # it processes every position: no compaction
    pool: Pool | None = None
    compaction: Compaction | None = None
    stand_in_slots: torch.Tensor | None = None  # (B, L_c) bool: the compact rows that hold a stand-in (pooled only)

    @classmethod
    def compact(
        cls, hidden_states: torch.Tensor, context: ForwardContext, visual_keep: torch.Tensor | None,
        rows: list[int] | None, normed: NormedSequence | None,
    ) -> RoutedCall:
        keep = processed_positions(context, visual_keep)
        dense = bool(keep.all()) if rows is None else min(rows) == hidden_states.shape[1]
        return cls(hidden_states, context, keep, rows, normed, dense)

    @property
    def length(self) -> int:
        return self.hidden_states.shape[1]

    @property
    def compact_length(self) -> int:
        """Positions of the sequence the layer runs on."""
        return self.length if self.dense else self.compaction.index.shape[1]

    def compact_shape(self) -> tuple[int | None, bool]:
        """`Compaction.from_keep`'s compact length and uniformity, from the host-known rows."""
        if self.rows is None:
            return None, False
        return max(self.rows), min(self.rows) == max(self.rows)

    def normed_input(self, norm: SequenceNorm) -> NormedSequence:
        """The layer's normed input over the whole sequence, computed by `norm` once per call."""
        if self.normed is None:
            self.normed = norm(self.hidden_states)
        return self.normed

    def gather(self) -> torch.Tensor:
        """The compact sequence (fixing `compaction`; with a stand-in, its state at slot L)."""
        hidden_states = self.hidden_states
        if self.dense:
            return hidden_states
        compact_length, uniform = self.compact_shape()
        pool = self.pool
        keep = self.keep if pool is None else pool.extended_keep(self.keep)
        compaction = self.compaction = Compaction.from_keep(
            keep, self.length, compact_length, None if pool is None else pool.sort_keys, uniform
        )
        if pool is None:
            return compaction.gather(hidden_states)
        self.stand_in_slots = (compaction.index == self.length) & ~compaction.filler
        return compaction.gather(hidden_states, pool.state)

    def processed_visual(self) -> torch.Tensor:
        """(B, L_c) bool: the compact rows that hold one of the row's own visual tokens."""
        context, compaction = self.context, self.compaction
        return compaction.gather(context.visual & context.valid) & (compaction.index < self.length)


def _with_pool(rows: list[int], counts: PassCounts) -> list[int]:
    """Positions processed per row (text and selected visual tokens) once each row's stand-in is added."""
    return [
        text + with_stand_in(processed - text, visual)
        for processed, visual, text in zip(rows, counts.visual, counts.text, strict=True)
    ]


@dataclass
class Anchor:
    """Per row, the update a layer's skipped visual tokens start from, and the normed input it belongs to."""

    update: torch.Tensor  # (B, 1, D)
    normed: torch.Tensor | None  # (B, 1, D); None when no fitted map reads it
    rows: torch.Tensor  # (B,) bool: rows that have an anchor (the others' skipped tokens stay as they are)

    @classmethod
    def of_processed(
        cls, compact: torch.Tensor, output: torch.Tensor, processed: torch.Tensor, normed: NormedSequence | None
    ) -> Anchor:
        """The mean update (output - input) and mean normed input of each row's processed visual tokens, from the
        layer's compact input, output and normed input (B, L_c, D) and which compact rows are such tokens."""
        weights = processed[..., None].to(output.dtype)
        count = weights.sum(1, keepdim=True).clamp(min=1)
        update = ((output - compact.to(output.dtype)) * weights).sum(1, keepdim=True) / count
        mean_normed = None if normed is None else normed.weighted_sum(weights.transpose(1, 2)) / count
        return cls(update, mean_normed, processed.any(-1))

    @classmethod
    def of_stand_in(cls, update: torch.Tensor, pool: Pool) -> Anchor:
        """The update the layer gave each row's pooled stand-in, whose input is the skipped tokens' mean."""
        return cls(update, pool.normed, pool.present)


@dataclass
class FittedDeviation:
    """The fitted map's term of each skipped token's update, `map(normed) - map(anchor's normed)`, factored as (B, L, R)
    coefficients times an (R, D) basis, so that it joins the anchor update in one batched matmul."""

    coefficients: torch.Tensor
    basis: torch.Tensor


def compensate_skipped(
    base: torch.Tensor,
    skipped: torch.Tensor,
    anchor: Anchor,
    fitted: FittedDeviation | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`base` (B, L, D) with each `skipped` (B, L) token given its row's anchor update, and with `fitted` also its
    fitted map's term, in one batched matmul written to `out` if given. Rows without an anchor (the layer processed
    none of their visual tokens, or skipped none for a stand-in) stay as they are."""
    weights = (skipped & anchor.rows[:, None])[..., None].to(base.dtype)  # (B, L, 1)
    update = anchor.update.to(base.dtype)  # (B, 1, D)
    if fitted is None:
        coefficients, basis = weights, update
    else:
        coefficients = torch.cat([fitted.coefficients.to(base.dtype) * weights, weights], -1)  # (B, L, R + 1)
        basis = torch.cat([fitted.basis.to(base.dtype).expand(base.shape[0], -1, -1), update], 1)  # (B, R + 1, D)
    return torch.baddbmm(base, coefficients, basis, out=out)


def stand_in_norm_hook(layer: nn.Module):
    """A forward hook for `layer`'s input norm: while the layer runs with pooled stand-ins, their normed input is
    the mean of the skipped tokens' (see `Pool`), which no hidden state would normalise to."""

    def replace_stand_ins(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if layer.alvts_stand_in is None:
            return None
        slots, normed = layer.alvts_stand_in
        return torch.where(slots, normed.to(output.dtype), output)

    return replace_stand_ins


def mlp_hooks(layer: nn.Module) -> tuple:
    """A forward pre-hook and a forward hook for `layer`'s MLP (SkippedKeys.ALL): while the layer runs with
    `alvts_mlp_compaction` set, the MLP reads only the processed positions and its output is scattered back into
    zeros. Installed once rather than per call, so a compiled layer registers no hooks while it runs."""

    def gather(module: nn.Module, args: tuple) -> tuple | None:
        if layer.alvts_mlp_compaction is None:
            return None
        return (layer.alvts_mlp_compaction[0].gather(args[0]),)

    def scatter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if layer.alvts_mlp_compaction is None:
            return None
        compaction, full = layer.alvts_mlp_compaction
        return compaction.scatter(compaction.buffer(full).zero_(), output)

    return gather, scatter


_ROUTED_CLASSES: dict[type, type] = {}


def routed_class(layer_class: type) -> type:
    """The routed subclass of a decoder layer class (one per class, created on first use)."""
    if layer_class not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[layer_class] = type(
            f"Routed{layer_class.__name__}", (RoutedLayerMixin, layer_class), {"alvts_layer_class": layer_class}
        )
    return _ROUTED_CLASSES[layer_class]


def route_layer(
    layer: nn.Module,
    policy: LayerPolicy,
    skipped_update: SkippedUpdate = SkippedUpdate.NONE,
    skip_module: nn.Module | None = None,
    skipped_keys: SkippedKeys = SkippedKeys.DROP,
) -> None:
    """Patch one decoder layer in place; the policy's (and `skip_module`'s) tensors move to the layer's device
    and dtype. `skip_module` is required for SkippedUpdate.LINEAR unless the policy keeps every token."""
    weight = layer.self_attn.q_proj.weight
    device = execution_device(layer)
    skipped_update = SkippedUpdate(skipped_update)
    if skipped_update.fitted and skip_module is None:
        if not policy.keeps_all:
            raise ValueError(f"SkippedUpdate.{skipped_update.name} needs the layer's fitted skip module")
        skipped_update = SkippedUpdate.NONE  # the layer keeps every visual token: none skips it
    policy = policy.to(device=device, dtype=weight.dtype)  # everything that may fail comes before the layer changes
    skip_module = None if skip_module is None else copy.deepcopy(skip_module).to(device, weight.dtype)
    norm = SequenceNorm(layer.input_layernorm)
    if not policy.keeps_all:
        policy.bind_norm(norm)
    layer.alvts_policy = policy
    layer.alvts_skipped_update = skipped_update
    layer.alvts_skip_module = skip_module
    layer.alvts_skip_down = None if skip_module is None else norm.projection(skip_module.down)
    layer.alvts_skipped_keys = SkippedKeys(skipped_keys)
    layer.alvts_stand_in = None
    layer.alvts_sequence_norm = norm
    layer.alvts_norm_hook = layer.input_layernorm.register_forward_hook(stand_in_norm_hook(layer))
    layer.alvts_mlp_compaction = None
    layer.alvts_mlp_hooks = []
    if layer.alvts_skipped_keys is SkippedKeys.ALL:
        gather, scatter = mlp_hooks(layer)
        layer.alvts_mlp_hooks = [layer.mlp.register_forward_pre_hook(gather), layer.mlp.register_forward_hook(scatter)]
    layer.__class__ = routed_class(type(layer))
    follow_class_forward(layer)


def unroute_layer(layer: nn.Module) -> None:
    """Undo `route_layer`."""
    if not isinstance(layer, RoutedLayerMixin):
        return
    layer.__class__ = layer.alvts_layer_class
    follow_class_forward(layer)
    del layer.alvts_policy
    del layer.alvts_skipped_update
    del layer.alvts_skip_module
    del layer.alvts_skip_down
    del layer.alvts_skipped_keys
    layer.alvts_norm_hook.remove()
    del layer.alvts_norm_hook
    for hook in layer.alvts_mlp_hooks:
        hook.remove()
    del layer.alvts_mlp_hooks
    del layer.alvts_mlp_compaction
    del layer.alvts_stand_in
    del layer.alvts_sequence_norm
