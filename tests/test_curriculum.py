"""Curriculum: the published plans parse and plan, validation refuses what cannot be trained, the blend schedule
is within one sample per batch and exact cumulatively, and `curriculum show --plot` writes a PNG."""
from __future__ import annotations

import random
from fractions import Fraction

import pytest

from data_pipeline.curriculum import BlendSchedule, CurriculumError, load_curriculum, plan

EXAMPLES = ["nano-25t", "super-25t", "tiny"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_plan(repo_root, name):
    cur = load_curriculum(repo_root / "examples/configs/curriculum" / f"{name}.yaml")
    plans = plan(cur)
    for pp in plans:
        assert pp.tokens >= cur.phase(pp.name).tokens
        assert sum(sp.samples for sp in pp.sources.values()) == pp.batches * pp.global_batch_size
    if name == "super-25t":  # 993,404 published steps for the 25T main phases (ceil per phase adds a few)
        assert abs(plans[0].batches + plans[1].batches - 993_404) < 16
        assert plans[3].seq_lengths == [1048576, 4096]
        lc = plans[2].weights
        assert lc["long_doc_qa"] == Fraction(1, 5) and abs(sum(lc.values()) - 1) == 0


def test_validation_names_the_problem(tmp_path):
    base = {"name": "x", "phases": [{"name": "a", "tokens": "1M", "seq_length": 128, "global_batch_size": 4,
                                     "blend": {"s1": 1.0, "s2": 1.0}}]}
    with pytest.raises(CurriculumError, match="sum to zero"):
        load_curriculum({**base, "phases": [{**base["phases"][0], "blend": {"s1": 0}}]})
    with pytest.raises(CurriculumError, match=r"must name an earlier phase"):
        load_curriculum({**base, "phases": [{**base["phases"][0], "blend": {"phase:b": 1}}]})
    with pytest.raises(CurriculumError, match="phases.0.blend"):
        load_curriculum({**base, "phases": [{**base["phases"][0], "blend": {"s1": -1, "s2": 2}}]})

    class M:  # a manifest's one field the planner reads
        def __init__(self, tokens):
            self.tokens = tokens

    with pytest.raises(CurriculumError, match=r"sources \['s2'\] have no shards"):
        plan(load_curriculum(base), {"s1": M(10**6)})
    plans = plan(load_curriculum(base), {"s1": M(10**6), "s2": M(10**5)})
    assert plans[0].sources["s2"].epochs == pytest.approx(5.0, rel=1e-3)
    with pytest.raises(CurriculumError, match=r"s2 in a: 5\.0\d epochs"):
        plan(load_curriculum({**base, "max_epochs": 2}), {"s1": M(10**6), "s2": M(10**5)})


def test_blend_schedule_within_one_per_batch_and_exact_cumulatively():
    rng = random.Random(0)
    for _ in range(60):
        k, g = rng.randint(1, 9), rng.randint(1, 200)
        raw = {f"s{i}": Fraction(str(round(rng.uniform(0.01, 15), 2))) for i in range(k)}
        total = sum(raw.values())
        w = {s: v / total for s, v in raw.items()}
        sched = BlendSchedule(w, g)
        drawn = [0] * k
        for b in range(300):
            counts = sched.counts(b, drawn)
            assert sum(counts) == g
            drawn = [d + c for d, c in zip(drawn, counts)]
            for s, c, d in zip(w, counts, drawn):
                assert abs(c - w[s] * g) < 1 and abs(d - w[s] * g * (b + 1)) < 1
        n = rng.randint(1, 2000)  # the period shortcut equals stepping batch by batch
        drawn, toks = [0] * k, [0] * k
        for b in range(n):
            c = sched.counts(b, drawn)
            drawn = [d + x for d, x in zip(drawn, c)]
            toks = [t + x * (64 if b % 2 == 0 else 16) for t, x in zip(toks, c)]
        assert sched.totals(n, [64, 16]) == (drawn, toks)


def test_show_and_plot(repo_root, tmp_path, capsys):
    from pretrain.cli import main
    from tests.pipeline_data import build

    data = build(tmp_path / "d")
    png = tmp_path / "plan.png"
    rc = main(["curriculum", "show", str(repo_root / "examples/configs/curriculum/tiny.yaml"),
               "--manifests", str(data["shards"]), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and "phase phase2" in out and "epochs" in out and "email" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases:\n  - {name: a, tokens: 1K, global_batch_size: 2, blend: {nosuch: 1}}\n")
    assert main(["curriculum", "show", str(bad), "--manifests", str(data["shards"])]) == 2
    assert "nosuch" in capsys.readouterr().err
