"""The gloo rank runner itself: results come back ordered, and a failing rank's traceback surfaces."""
import pytest

from tests.distributed import RankFailed, run_on_ranks


def _allreduce_rank():
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank 1")
    return "fine"


@pytest.mark.multiproc
def test_results_per_rank():
    assert run_on_ranks(_allreduce_rank, 2) == [(0, 3.0), (1, 3.0)]


@pytest.mark.multiproc
def test_failing_rank_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed.*planted failure on rank 1"):
        run_on_ranks(_fail_on_one, 2, timeout=60)
