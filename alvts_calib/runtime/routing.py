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
from ..tokens import with_stand_in
from .context import ForwardContext, PassCounts
from .masks import routed_attention_mask
from .policies import LayerPolicy
from .routed_cache import existing_routed_layer, routed_cache_layer

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

CONTEXT_KWARG = "alvts_context"
SELECT_RANGE = "alvts.select"  # profiler ranges, for the share of routed time spent selecting and compacting
COMPACT_RANGE = "alvts.compact"
SCATTER_RANGE = "alvts.scatter"


@dataclass
class Compaction:
    """Which positions a layer processes: `index` (B, L_c) into the sequence; fillers point at slot L."""

    index: torch.Tensor
    filler: torch.Tensor  # (B, L_c) bool

    @classmethod
    def from_keep(
        cls, keep: torch.Tensor, compact_length: int | None = None, sort_keys: torch.Tensor | None = None
    ) -> Compaction:
        """From (B, L) kept positions; `compact_length` (the largest row count) saves a host sync when known.
        Kept positions keep their order, or the order of `sort_keys` (B, L) (integers below 2 L) if given."""
        length = keep.shape[1]
        if sort_keys is None:
            sort_keys = torch.arange(length, device=keep.device).expand_as(keep)
        order = torch.where(keep, sort_keys, sort_keys + 2 * length).argsort(dim=1, stable=True)
        kept = keep.sum(1)
        compact_length = int(kept.max()) if compact_length is None else compact_length
        filler = torch.arange(compact_length, device=keep.device)[None, :] >= kept[:, None]
        index = order[:, :compact_length].masked_fill(filler, length)
        return cls(index=index, filler=filler)

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) to (B, L_c, ...); filler rows read an appended copy of the last position."""
        states = torch.cat([states, states[:, -1:]], dim=1)
        index = self.index.view(*self.index.shape, *([1] * (states.dim() - 2))).expand(-1, -1, *states.shape[2:])
        return states.gather(1, index)

    def scatter(self, full: torch.Tensor, compact: torch.Tensor) -> torch.Tensor:
        """Write compact rows back into a copy of `full` (B, L, D); fillers land in a discarded extra slot."""
        extended = torch.cat([full, full[:, -1:]], dim=1)
        index = self.index[..., None].expand(-1, -1, full.shape[-1])
        return extended.scatter(1, index, compact.to(full.dtype))[:, :-1]


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
        cls, hidden_states: torch.Tensor, normed: torch.Tensor, context: ForwardContext, keep: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> Pool:
        """The stand-in of the visual tokens outside `keep` (B, L) in each row; `normed` is the layer's normed input."""
        visual = context.visual & context.valid
        skipped = visual & ~keep
        count = skipped.sum(-1)
        present = (count > 0) & (visual & keep).any(-1)
        share = (skipped / count.clamp(min=1)[:, None])[..., None]
        batch, length = keep.shape
        positions = torch.arange(length, device=keep.device).expand(batch, -1)
        last_visual = torch.where(visual, positions, -1).amax(-1, keepdim=True)

        def mean(values: torch.Tensor) -> torch.Tensor:  # accumulated in float32 whatever the model's dtype
            return (values.expand(batch, -1, -1).float() * share).sum(1, keepdim=True).to(values.dtype)

        return cls(
            state=mean(hidden_states),
            normed=mean(normed),
            cos=mean(cos),
            sin=mean(sin),
            log_count=count.clamp(min=1).float().log(),
            present=present,
            sort_keys=torch.cat([2 * positions, 2 * last_visual + 1], 1),
        )

    def extend(self, hidden_states: torch.Tensor, keep: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(states, keep, cos, sin) with the stand-in appended at slot L."""
        batch = hidden_states.shape[0]
        return (
            torch.cat([hidden_states, self.state.to(hidden_states.dtype)], 1),
            torch.cat([keep, self.present[:, None]], 1),
            torch.cat([cos.expand(batch, -1, -1), self.cos], 1),
            torch.cat([sin.expand(batch, -1, -1), self.sin], 1),
        )


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
    alvts_skipped_keys: SkippedKeys
    alvts_stand_in: tuple[torch.Tensor, torch.Tensor] | None  # (B, L_c, 1) stand-in slots and their normed input
    alvts_norm_hook: RemovableHandle
    alvts_mlp_compaction: tuple[Compaction, torch.Tensor] | None  # SkippedKeys.ALL, while the layer runs: `mlp_hooks`
    alvts_mlp_hooks: list[RemovableHandle]  # `mlp_hooks`, installed once (SkippedKeys.ALL only)
    alvts_layer_class: type  # the decoder layer class it was (set by `routed_class`)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        context: ForwardContext | None = kwargs.pop(CONTEXT_KWARG, None)
        if context is None or args:
            return super().forward(hidden_states, *args, **kwargs)
        align_tensors(context, hidden_states.device)
        counts = context.host_counts()
        policy = self.alvts_policy
        visual_keep = normed = None
        if counts.has_visual:
            with record_function(SELECT_RANGE):
                if not policy.keeps_all:
                    cos, sin = kwargs["position_embeddings"]
                    normed = self.input_layernorm(hidden_states) if policy.reads_states else None
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
        normed: torch.Tensor | None,
    ) -> torch.Tensor:
        """SkippedKeys.ALL: attention runs on every token, so the processed tokens read every token's own key and
        value and the layer caches every token; the MLP runs on the processed tokens only, and the skipped visual
        tokens keep their state plus the skipped update (`_compensate`)."""
        with record_function(COMPACT_RANGE):
            call = RoutedCall.compact(hidden_states, context, visual_keep, rows, normed)
        if call.dense or self.alvts_skipped_update is SkippedUpdate.EXACT:
            return super().forward(hidden_states, **kwargs)  # nothing skips, or the skipped get the layer's update
        compaction = Compaction.from_keep(call.keep, None if rows is None else max(rows))
        self.alvts_mlp_compaction = (compaction, hidden_states)
        try:
            output = super().forward(hidden_states, **kwargs)
        finally:
            self.alvts_mlp_compaction = None
        with record_function(SCATTER_RANGE):
            skipped = context.visual & context.valid & ~call.keep
            return self._compensate(call, torch.where(skipped[..., None], hidden_states, output), None)

    def _routed_forward(
        self,
        hidden_states: torch.Tensor,
        context: ForwardContext,
        visual_keep: torch.Tensor | None,
        kwargs: dict,
        rows: list[int] | None,
        normed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the layer on valid text tokens, the kept visual tokens and the last position (and, with
        SkippedKeys.POOL, one stand-in for the skipped visual tokens), in five steps: compact (which positions),
        pool (the stand-in), run (the layer on the compact sequence, with its masks and cache), scatter (back into
        place) and compensate (the skipped tokens' update).

        `rows` (positions processed per row, if known on the host) avoids host syncs for the compact length
        and for the masks. `normed` is the layer's normed input if selection already computed it.
        """
        exact = None
        if self.alvts_skipped_update is SkippedUpdate.EXACT and visual_keep is not None:
            uncached = {key: None if key in ("cache", "past_key_values") else value for key, value in kwargs.items()}
            exact = super().forward(hidden_states, **uncached)
        with record_function(COMPACT_RANGE):
            call = RoutedCall.compact(hidden_states, context, visual_keep, rows, normed)
            cos, sin = kwargs["position_embeddings"]
            if not call.dense and visual_keep is not None and self.alvts_skipped_keys is SkippedKeys.POOL:
                cos, sin = self._pool(call, cos, sin)
            compact = call.gather(hidden_states)
            cache = self._attention_inputs(call, compact, kwargs, cos, sin)
        output = self._run(call, compact, kwargs, cache)
        if call.dense:
            return output
        with record_function(SCATTER_RANGE):
            scattered = call.compaction.scatter(call.states, output)
            return self._compensate(call, scattered, exact)

    def _pool(self, call: RoutedCall, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the row's stand-in for the visual tokens it skips at slot L (`Pool`); the extended cos/sin."""
        if call.normed is None:
            call.normed = self.input_layernorm(call.hidden_states)
        call.pool = Pool.of(call.hidden_states, call.normed, call.context, call.keep, cos, sin)
        call.context.pooled[self.self_attn.layer_idx] = call.pool.present
        call.states, call.extended_keep, cos, sin = call.pool.extend(call.hidden_states, call.keep, cos, sin)
        call.rows = None if call.rows is None else _with_pool(call.rows, call.context.host_counts())
        return cos, sin

    def _attention_inputs(
        self, call: RoutedCall, compact: torch.Tensor, kwargs: dict, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple | None:
        """Set the compact sequence's attention mask and rotary tables in `kwargs`; the cache layer's bookkeeping
        to record once the layer ran (None without a cache)."""
        dense, compaction, length = call.dense, call.compaction, call.length
        new_valid = call.keep if dense else ~compaction.filler
        all_valid = True if dense else None if call.rows is None else min(call.rows) == max(call.rows)
        key_bias = None
        if call.pool is not None:
            key_bias = torch.where(compaction.index == length, call.pool.log_count[:, None], 0.0)
        cache = kwargs.get("cache")
        layer_cache = routed_cache_layer(cache, self.self_attn.layer_idx) if cache is not None else None
        key_valid = new_valid if layer_cache is None else layer_cache.append_validity(new_valid)
        keys_all_valid = all_valid if layer_cache is None else layer_cache.all_valid_after(all_valid)
        key_bias = key_bias if layer_cache is None else layer_cache.append_bias(key_bias, new_valid)
        kwargs["attention_mask"] = routed_attention_mask(
            key_valid, compact.shape[1], self.self_attn.config._attn_implementation, call.hidden_states.dtype,
            keys_all_valid, key_bias,
        )
        kwargs["position_ids"] = None
        if not dense:
            batch = call.hidden_states.shape[0]
            kwargs["position_embeddings"] = (
                compaction.gather(cos.expand(batch, -1, -1)),
                compaction.gather(sin.expand(batch, -1, -1)),
            )
        return None if layer_cache is None else (layer_cache, key_valid, keys_all_valid, key_bias)

    def _run(self, call: RoutedCall, compact: torch.Tensor, kwargs: dict, cache: tuple | None) -> torch.Tensor:
        """The layer on the compact sequence (its stand-ins' normed input replaced, see `stand_in_norm_hook`); then
        the cache layer records which of the keys it appended are real."""
        self.alvts_stand_in = None if call.pool is None else (
            ((call.compaction.index == call.length) & ~call.compaction.filler)[..., None], call.pool.normed
        )
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

    def _compensate(self, call: RoutedCall, scattered: torch.Tensor, exact: torch.Tensor | None) -> torch.Tensor:
        """The scattered outputs, with the skipped visual tokens given the layer's SkippedUpdate."""
        length, context, keep, pool = call.length, call.context, call.keep, call.pool
        merged = scattered[:, :length]
        if exact is not None:
            return torch.where((context.visual & context.valid & ~keep)[..., None], exact, merged)
        update = self.alvts_skipped_update
        if update is SkippedUpdate.NONE or (update is SkippedUpdate.STAND_IN and pool is None):
            return merged
        skip_module = self.alvts_skip_module if update is not SkippedUpdate.MEAN else None
        normed = call.normed
        if skip_module is not None and normed is None:
            normed = self.input_layernorm(call.hidden_states)
        if update is SkippedUpdate.STAND_IN:
            anchor = Anchor.of_stand_in(scattered[:, length:] - pool.state, pool)
        else:
            anchor = Anchor.of_processed(merged, call.hidden_states, keep, context, normed)
        return compensate_skipped(merged, keep, context, anchor, skip_module, normed)


@dataclass
class RoutedCall:
    """One call of a routed layer: which positions it processes and how its compact sequence maps back."""

    hidden_states: torch.Tensor  # (B, L, D) the layer's input
    context: ForwardContext
    keep: torch.Tensor  # (B, L) bool: the positions it processes
    rows: list[int] | None  # positions processed per row, when known on the host
    normed: torch.Tensor | None  # the layer's normed input, once computed
    dense: bool  # it processes every position: no compaction
    states: torch.Tensor  # what the compact sequence is gathered from: the input (and the stand-ins at slot L)
    extended_keep: torch.Tensor  # `keep` over `states`
    pool: Pool | None = None
    compaction: Compaction | None = None

    @classmethod
    def compact(
        cls, hidden_states: torch.Tensor, context: ForwardContext, visual_keep: torch.Tensor | None,
        rows: list[int] | None, normed: torch.Tensor | None,
    ) -> RoutedCall:
        keep = processed_positions(context, visual_keep)
        dense = bool(keep.all()) if rows is None else min(rows) == hidden_states.shape[1]
        return cls(hidden_states, context, keep, rows, normed, dense, hidden_states, keep)

    @property
    def length(self) -> int:
        return self.hidden_states.shape[1]

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The compact sequence (fixing `compaction` once the stand-in, if any, is in `states`)."""
        if self.dense:
            return hidden_states
        self.compaction = Compaction.from_keep(
            self.extended_keep, None if self.rows is None else max(self.rows),
            None if self.pool is None else self.pool.sort_keys,
        )
        return self.compaction.gather(self.states)


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
        cls, merged: torch.Tensor, before: torch.Tensor, keep: torch.Tensor, context: ForwardContext,
        normed: torch.Tensor | None,
    ) -> Anchor:
        """The mean update (output - input) and mean normed input of each row's processed visual tokens."""
        visual = context.visual & context.valid
        processed = (visual & keep)[..., None].to(merged.dtype)
        count = processed.sum(1, keepdim=True).clamp(min=1)
        update = ((merged - before) * processed).sum(1, keepdim=True) / count
        mean_normed = None if normed is None else (normed * processed).sum(1, keepdim=True) / count
        return cls(update, mean_normed, (visual & keep).any(-1))

    @classmethod
    def of_stand_in(cls, update: torch.Tensor, pool: Pool) -> Anchor:
        """The update the layer gave each row's pooled stand-in, whose input is the skipped tokens' mean."""
        return cls(update, pool.normed, pool.present)


def compensate_skipped(
    merged: torch.Tensor,
    keep: torch.Tensor,
    context: ForwardContext,
    anchor: Anchor,
    skip_module: nn.Module | None = None,
    normed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add to each skipped visual token its row's anchor update; with `skip_module` (and the layer's `normed`
    input) also the module's map of the token's normed input minus the anchor's. Rows without an anchor (the
    layer processed none of their visual tokens, or skipped none for a stand-in) stay as they are."""
    visual = context.visual & context.valid
    skipped = (visual & ~keep & anchor.rows[:, None])[..., None].to(merged.dtype)
    update = anchor.update.to(merged.dtype)
    if skip_module is not None:
        update = update + skip_module(normed) - skip_module(anchor.normed.to(normed.dtype))
    return merged + skipped * update


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
        return compaction.scatter(torch.zeros_like(full), output)

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
    layer.alvts_policy = policy
    layer.alvts_skipped_update = skipped_update
    layer.alvts_skip_module = skip_module
    layer.alvts_skipped_keys = SkippedKeys(skipped_keys)
    layer.alvts_stand_in = None
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
    del layer.alvts_skipped_keys
    layer.alvts_norm_hook.remove()
    del layer.alvts_norm_hook
    for hook in layer.alvts_mlp_hooks:
        hook.remove()
    del layer.alvts_mlp_hooks
    del layer.alvts_mlp_compaction
    del layer.alvts_stand_in
