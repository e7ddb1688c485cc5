"""Process groups with MoE parallel folding, and teardown: one process builds several layouts in a row."""
import pytest

from tests.distributed import run_on_ranks


def _layouts_in_one_process():
    import torch
    import torch.distributed as dist

    from parallel import groups
    from parallel.layout import ParallelLayout

    seen = []
    for kw in (dict(tp=2, ep=4, sequence_parallel=True), dict(tp=2, cp=2, sequence_parallel=True), dict(pp=2, ep=2),
               dict(ep=2, etp=2), dict()):
        groups.setup(ParallelLayout(**kw))
        d = groups.describe()
        # The groups are real communicators: a sum over each equals the sum of its member ranks.
        sums = {}
        for name in ("tp", "ep", "dp", "cp", "edp"):
            from megatron.core import parallel_state as ps

            g = {"tp": ps.get_tensor_model_parallel_group(), "ep": ps.get_expert_model_parallel_group(),
                 "dp": ps.get_data_parallel_group(), "cp": ps.get_context_parallel_group(),
                 "edp": ps.get_expert_data_parallel_group()}[name]
            t = torch.tensor([float(dist.get_rank())])
            dist.all_reduce(t, group=g)
            sums[name] = (t.item(), float(sum(d[name])))
        seen.append((kw, d, sums))
        groups.teardown()
    return seen


@pytest.mark.multiproc
@pytest.mark.slow
def test_folded_groups_and_teardown():
    res = run_on_ranks(_layouts_in_one_process, 4)
    for rank, seen in enumerate(res):
        for kw, d, sums in seen:
            assert all(a == b for a, b in sums.values()), (kw, sums)
            assert rank in d["tp"] and rank in d["ep"]
    # tp2 ep4 on 4 ranks (folded): TP pairs, while the EP group spans all 4 ranks and EDP is 1.
    kw, d, _ = res[0][0]
    assert d["tp"] == [0, 1] and d["ep"] == [0, 1, 2, 3] and d["edp"] == [0] and d["dp"] == [0, 2]
    # tp2 cp2: CP pairs across TP groups, dp 1, dp_cp spans the CP pair.
    kw, d, _ = res[0][1]
    assert d["tp"] == [0, 1] and d["cp"] == [0, 2] and d["dp"] == [0] and d["dp_cp"] == [0, 2]
    # pp2 ep2: stages {0,1} vs {2,3}; experts fold over the DP ranks of a stage.
    kw, d, _ = res[0][2]
    assert d["pp"] == [0, 2] and d["ep"] == [0, 1] and d["dp"] == [0, 1]
    # ep2 etp2: expert TP pairs, EP across them, the dense part is plain dp4.
    kw, d, _ = res[0][3]
    assert d["etp"] == [0, 1] and d["ep"] == [0, 2] and d["dp"] == [0, 1, 2, 3]
    assert res[0][4][1]["dp"] == [0, 1, 2, 3]
