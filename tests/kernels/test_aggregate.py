"""kernels._aggregate.default_denominator: the D of each aggregation without a normalizer (by hand), and the data-parallel
identity it exists for: with Σ_ranks D as normalizer, the ranks' losses sum to the loss of their union."""
import pytest
import torch

from fastrlhf import kernels
from kernels._aggregate import aggregate_ref
from tests.helpers.tolerances import FP64


def test_default_denominator_by_hand():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])
    assert float(kernels.default_denominator(mask, "token-mean")) == 6            # Σ m
    assert float(kernels.default_denominator(mask, "seq-mean-token-mean")) == 3   # rows with a valid token
    assert float(kernels.default_denominator(mask, "seq-mean-token-sum")) == 4    # B
    with pytest.raises(ValueError, match="agg"):
        kernels.default_denominator(mask, "mean")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_split_batch_with_summed_denominator_matches_the_whole(agg):
    loss = torch.randn(7, 5, dtype=torch.float64)
    mask = (torch.rand(7, 5) > 0.4).double()
    mask[2] = 0                                                               # an empty row
    parts = [slice(0, 3), slice(3, 7)]                                        # two "ranks"
    den = sum(kernels.default_denominator(mask[p], agg) for p in parts)             # the all-reduce
    split = sum(aggregate_ref(loss[p], mask[p], agg, normalizer=den) for p in parts)
    torch.testing.assert_close(split, aggregate_ref(loss, mask, agg), **FP64)
