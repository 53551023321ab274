"""Selector importance from the query rows it reads only (`query_rows`): the same scores as from every row, and the
runtime's selection projects queries for those rows alone."""

from __future__ import annotations

import pytest
import torch

from alvts_calib.model.adapters import AttentionGeometry, decoder_layers
from alvts_calib.runtime.attach import attach
from alvts_calib.runtime.policies import SelectorPolicy
from alvts_calib.selector.importance import Importance, query_rows
from alvts_calib.selector.layer import LayerSelector


def _rope(batch: int, length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(length)[:, None] * (10000 ** (-torch.arange(head_dim // 2) / (head_dim // 2)))
    angles = torch.cat([angles, angles], -1).expand(batch, -1, -1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("definition", list(Importance))
def test_scores_from_the_rows_read_equal_scores_from_every_row(definition):
    torch.manual_seed(0)
    batch, length, hidden, head_dim = 3, 20, 32, 8
    selector = LayerSelector(hidden, 2 * head_dim, head_dim)
    normed = torch.randn(batch, length, hidden)
    cos, sin = _rope(batch, length, head_dim)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, 4:14] = True
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :3] = False  # left padding: row 1 has fewer text rows than the others
    valid[2, :6] = False  # and row 2 starts inside the image
    text = int((~visual & valid).sum(1).max())
    positions = query_rows(visual, valid, definition, text)
    if definition is Importance.PAPER:
        assert positions is None
    full = selector.scores(normed, cos, sin, visual, valid, definition)
    reduced = selector.scores(normed, cos, sin, visual, valid, definition, positions)
    assert full[visual & valid].abs().min() > 0
    torch.testing.assert_close(reduced, full, atol=1e-6, rtol=1e-5)


def test_routed_selection_projects_queries_for_text_rows_only(tiny_case, make_selector):
    case = tiny_case("llava", "sdpa")
    selector = make_selector(case.model, 0.25)
    selector.importance = Importance.TEXT  # the default importance (the test builder uses the paper's)
    attach(case.model, selector)
    rows = []
    routed = [layer for layer in decoder_layers(case.model) if hasattr(layer, "alvts_policy")]
    handles = [layer.alvts_policy.selector.q_proj.register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[1])) for layer in routed]
    with case.routing():
        case.model(**case.inputs)
    for handle in handles:
        handle.remove()
    text = int((case.valid & ~case.visual).sum(1).max())
    assert rows == [text] * len(routed)


@pytest.mark.parametrize(("definition", "rows"), [(Importance.TEXT, 60), (Importance.LAST, 1), (Importance.PAPER, 636)])
def test_selection_flops_count_queries_at_the_rows_read(definition, rows):
    """What `alvts eval` charges a selector: keys at every position, queries and logits at the rows it reads."""
    geometry = AttentionGeometry(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128)
    policy = SelectorPolicy(LayerSelector(4096, 256, 128), 0.11, definition)
    keys, queries, logits = 2 * 636 * 4096 * 256, 2 * rows * 4096 * 256, 2 * rows * 636 * 256
    assert policy.selection_flops(636, 60, geometry) == keys + queries + logits
