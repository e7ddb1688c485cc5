"""ParallelLayout validation: valid layouts pass, and each invalid one is rejected before any process group
exists with a message naming the dimension and the fix."""
import pytest

from model.presets import get_preset
from parallel.layout import LayoutError, ParallelLayout

TINY8 = dict(hybrid_override_pattern="M*-EM*-E", num_layers=8)  # every layer kind, splits over pp*vpp = 4


def tiny(**over):
    return get_preset("tiny", **{**TINY8, **over})


# (id, layout kwargs, model overrides, (world, seq, mbs, gbs), substrings every one of which must appear)
INVALID = [
    ("world-not-div-dense", dict(tp=2, pp=2), {}, (6, 32, 1, 8), ["world size 6", "tp*cp*pp", "multiple of 4"]),
    ("world-not-div-expert", dict(ep=4), {}, (6, 32, 1, 12), ["world size 6", "etp*ep*pp", "multiple of 4"]),
    ("attn-heads-tp", dict(tp=4, sequence_parallel=True), dict(num_attention_heads=6, num_query_groups=2),
     (4, 32, 1, 4), ["tp=4", "num_attention_heads=6", "use tp in [1, 2, 3, 6]"]),
    ("kv-heads-tp", dict(tp=4, sequence_parallel=True), dict(num_attention_heads=12, num_query_groups=6,
                                                            mamba_num_heads=8, mamba_num_groups=4),
     (4, 32, 1, 4), ["tp=4", "KV heads", "num_query_groups=6", "divide one another"]),
    ("mamba-heads-tp", dict(tp=2, sequence_parallel=True), dict(mamba_num_heads=3, mamba_num_groups=1),
     (2, 32, 1, 2), ["tp=2", "Mamba heads", "mamba_num_heads=3"]),
    ("mamba-groups-tp", dict(tp=2, sequence_parallel=True), dict(mamba_num_groups=1), (2, 32, 1, 2),
     ["tp=2", "Mamba groups", "mamba_num_groups=1"]),
    ("ffn-tp", dict(tp=2, sequence_parallel=True), dict(ffn_hidden_size=129), (2, 32, 1, 2),
     ["tp=2", "dense MLP", "ffn_hidden_size=129"]),
    ("shared-expert-tp", dict(tp=2, sequence_parallel=True), dict(moe_shared_expert_intermediate_size=33),
     (2, 32, 1, 2), ["tp=2", "shared-expert", "moe_shared_expert_intermediate_size=33"]),
    ("vocab-tp", dict(tp=2, sequence_parallel=True), dict(vocab_size=511), (2, 32, 1, 2),
     ["tp=2", "vocab_size=511"]),
    ("experts-ep", dict(ep=3), {}, (3, 32, 1, 3), ["ep=3", "4 experts", "use ep in [1, 2, 4]"]),
    ("expert-ffn-etp", dict(etp=2), dict(moe_ffn_hidden_size=63), (2, 32, 1, 2),
     ["etp=2", "expert FFN", "moe_ffn_hidden_size=63"]),
    ("ep-without-moe", dict(ep=2), dict(hybrid_override_pattern="M*-M*-M-", mtp_num_layers=0), (2, 32, 1, 2),
     ["ep=2", "no MoE", "set ep=1"]),
    ("etp-without-moe", dict(etp=2), dict(hybrid_override_pattern="M*-M*-M-", mtp_num_layers=0), (2, 32, 1, 2),
     ["etp=2", "no MoE", "set etp=1"]),
    ("moe-tp-needs-sp", dict(tp=2), {}, (2, 32, 1, 2), ["sequence_parallel", "tp=2", "set sequence_parallel=true"]),
    ("sp-without-tp", dict(sequence_parallel=True), {}, (1, 32, 1, 1), ["sequence_parallel", "tp=1"]),
    ("seq-2cp", dict(cp=2), {}, (2, 30, 1, 2), ["cp=2", "seq_length 30", "2*cp = 4", "multiple of 4"]),
    ("seq-sp-tp", dict(tp=2, sequence_parallel=True), {}, (2, 31, 1, 2), ["sequence_parallel", "tp=2", "multiple of 2"]),
    ("seq-cp-sp", dict(tp=4, cp=2, sequence_parallel=True),
     dict(num_query_groups=4, mamba_num_heads=8, mamba_num_groups=4), (8, 36, 1, 1),
     ["sequence_parallel", "(36/2)", "tp=4", "multiple of 8"]),
    ("mamba-heads-cp", dict(tp=2, cp=4, sequence_parallel=True), {}, (8, 64, 1, 8),
     ["cp=4", "Mamba heads per tp rank", "4/2 = 2"]),
    ("mamba-groups-cp", dict(cp=4), dict(mamba_num_heads=12, mamba_num_groups=6), (4, 64, 1, 4),
     ["cp=4", "Mamba groups per tp rank (6)"]),
    ("pattern-pp", dict(pp=3), {}, (3, 32, 1, 3), ["pp=3", "cannot be split into 3", "use pp in [1, 2, 4, 8]"]),
    ("pattern-pp-vpp", dict(pp=2, vpp=3), {}, (2, 32, 1, 6), ["pp*vpp = 2*3", "6 equal pipeline chunks"]),
    ("vpp-needs-pp", dict(vpp=2), {}, (1, 32, 1, 1), ["vpp=2", "pp >= 2"]),
    ("gbs-dp", dict(), {}, (4, 32, 2, 6), ["dp=4", "global_batch_size 6", "multiple of 8"]),
    ("gbs-dp-folded", dict(tp=2, sequence_parallel=True, ep=4), {}, (8, 32, 1, 6),
     ["dp=4", "global_batch_size 6", "multiple of 4"]),
    ("vpp-microbatches", dict(pp=2, vpp=2), {}, (2, 32, 1, 3), ["vpp=2", "micro-batches (3", "multiple of 2"]),
    ("bad-batch", dict(), {}, (1, 32, 0, 1), ["micro_batch_size (0)"]),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_layout_rejected(case):
    _, layout_kw, model_over, (world, seq, mbs, gbs), needles = case
    layout = ParallelLayout(**layout_kw)
    with pytest.raises(LayoutError) as err:
        layout.validate(tiny(**model_over), world, seq, mbs, gbs)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from:\n{msg}"


def test_at_least_twenty_distinct_rules():
    firsts = set()
    for _, layout_kw, model_over, (world, seq, mbs, gbs), _ in INVALID:
        probs = ParallelLayout(**layout_kw).problems(tiny(**model_over), world, seq, mbs, gbs)
        assert probs
        firsts.add(probs[0].split(":")[0] + "|" + probs[0][:40])
    assert len(INVALID) >= 20 and len(firsts) >= 20


def test_all_problems_listed_at_once():
    layout = ParallelLayout(tp=3, cp=3, pp=3, ep=3)
    probs = layout.problems(tiny(), 10, 31, 1, 5)
    joined = "\n".join(probs)
    for needle in ("tp*cp*pp", "etp*ep*pp", "num_attention_heads", "num_query_groups", "mamba_num_heads",
                   "ep=3", "seq_length 31", "pp=3", "set sequence_parallel=true"):
        assert needle in joined
    with pytest.raises(LayoutError) as err:
        layout.validate(tiny(), 10, 31, 1, 5)
    assert err.value.problems == probs and f"{len(probs)} problems" in str(err.value)


# The "Done when" matrix layouts, and the published models on their usual layouts, are valid.
VALID = [
    (dict(tp=2, sequence_parallel=True), 2), (dict(cp=2), 2), (dict(pp=2), 2), (dict(pp=2, vpp=2), 2),
    (dict(ep=2), 2), (dict(use_distributed_optimizer=True), 2),
    (dict(tp=2, sequence_parallel=True, ep=2, etp=1), 2), (dict(tp=2, cp=2, sequence_parallel=True), 4),
    (dict(tp=2, ep=2, pp=2, sequence_parallel=True), 8),
]


@pytest.mark.parametrize("kw,world", VALID, ids=[str(v) for v in VALID])
def test_matrix_layouts_valid(kw, world):
    layout = ParallelLayout(**kw)
    layout.validate(tiny(), world, 32, 1, 4 * layout.dp(world))
    assert layout.dp(world) * layout.tp * layout.cp * layout.pp == world
    assert layout.edp(world) * layout.etp * layout.ep * layout.pp == world


def test_folding_sizes():
    layout = ParallelLayout(tp=2, cp=2, pp=2, ep=4, etp=1, sequence_parallel=True)
    assert layout.dp(16) == 2 and layout.edp(16) == 2
    assert "edp2" in layout.describe(16)
    assert layout.num_microbatches(16, 2, 16) == 4


def test_published_models_on_production_layouts():
    # Both have 2 KV heads: tp=4 replicates each KV group over 2 ranks (Megatron-Core allows a multiple of the
    # group count); tp=3 divides neither way.
    nano = get_preset("nano-30b-a3b")
    ParallelLayout(tp=2, ep=8, sequence_parallel=True).validate(nano, 64, 8192, 1, 256)
    ParallelLayout(tp=4, ep=8, sequence_parallel=True).validate(nano, 64, 8192, 1, 256)
    probs = ParallelLayout(tp=3, ep=8, sequence_parallel=True).problems(nano, 48, 8192, 1, 256)
    assert any("num_query_groups=2" in p for p in probs), probs
    sup = get_preset("super-120b-a12b")
    ParallelLayout(tp=2, pp=4, ep=16, etp=1, sequence_parallel=True).validate(sup, 256, 8192, 1, 512)
    # Long context: cp=8 with tp=2 on Super (128 Mamba heads / 2 = 64 per tp rank, 8 per cp rank).
    ParallelLayout(tp=2, cp=8, ep=16, sequence_parallel=True).validate(sup, 512, 262144, 1, 32)
