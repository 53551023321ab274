"""The calibrated skipped-token update: reduced-rank ridge regression on streamed moments."""

from __future__ import annotations

import torch

from alvts_calib.selector.skip_map import SkipUpdate, UpdateMoments, fit_update, row_centred


def _low_rank_data(rank: int, noise: float = 0.01, rows: int = 3000, hidden: int = 16):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(rows, hidden, generator=generator)
    mapping = torch.randn(hidden, rank, generator=generator) @ torch.randn(rank, hidden, generator=generator)
    bias = torch.randn(hidden, generator=generator)
    updates = inputs @ mapping + bias + noise * torch.randn(rows, hidden, generator=generator)
    return inputs, updates


def _moments(inputs: torch.Tensor, updates: torch.Tensor, chunks: int = 3) -> UpdateMoments:
    moments = UpdateMoments.empty(inputs.shape[1])
    for x, y in zip(inputs.chunk(chunks), updates.chunk(chunks), strict=True):
        moments.add(x, y)
    return moments


def test_a_low_rank_affine_update_is_recovered_from_streamed_moments():
    inputs, updates = _low_rank_data(rank=3)
    fitted = fit_update(_moments(inputs, updates), rank=3)
    predicted = SkipUpdate.from_tensors(fitted.tensors)(inputs)
    assert fitted.explained > 0.999
    assert torch.allclose(predicted, updates, rtol=0.01, atol=0.1)


def test_explained_variance_matches_held_out_error_and_grows_with_rank():
    inputs, updates = _low_rank_data(rank=6, noise=0.5)
    explained = []
    for rank in (1, 3, 6):
        fitted = fit_update(_moments(inputs, updates), rank=rank)
        residual = (SkipUpdate.from_tensors(fitted.tensors)(inputs) - updates).pow(2).sum(-1).mean()
        centred = (updates - updates.mean(0)).pow(2).sum(-1).mean()
        assert abs(fitted.explained - (1 - residual / centred).item()) < 1e-3
        explained.append(fitted.explained)
    assert explained[0] < explained[1] < explained[2]


def test_an_update_unrelated_to_the_input_explains_nothing_beyond_its_mean():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4000, 8, generator=generator)
    updates = 3.0 + torch.randn(4000, 8, generator=generator)
    fitted = fit_update(_moments(inputs, updates), rank=4)
    assert fitted.explained < 0.02


def test_row_centring_subtracts_each_rows_mean_over_its_tokens_only():
    values = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    tokens = torch.tensor([[True, True, False], [True, True, True]])
    assert row_centred(values, tokens).flatten().tolist() == [-1.0, 1.0, -2.0, 0.0, 2.0]
