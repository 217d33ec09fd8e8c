"""lowmem.testing's comparison harness itself: both sides train on every row at any world size."""

import pytest
import torch

from lowmem.testing import comparison_batch, train_steps


def test_the_comparison_batch_splits_over_every_world_size_and_an_uneven_one_is_refused():
    assert [comparison_batch(n) for n in (1, 2, 3, 4, 6)] == [8, 8, 24, 8, 24]
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"a batch of 8 rows does not split over 3 processes; use comparison_batch\(3\) = 24"):
        train_steps(model, torch.optim.SGD(model.parameters()), 1, batch=8, rank=0, world_size=3)
