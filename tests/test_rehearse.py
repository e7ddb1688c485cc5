"""`foldtron rehearse` of both shipped production configs, in a shorter setting (fewer steps; the data built once
and shared): the same stages in order, a kill -9 mid-stage and a resume from that checkpoint, the trained LRs on
the run's schedule, a merge, and an export that verifies. The full-length outputs are in the README."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.rehearse import Rehearsal, proxy_pattern

ROOT = Path(__file__).resolve().parents[1]


def test_proxy_keeps_the_layer_kinds_in_their_neighbourhood():
    for name in ("nano-30b-a3b", "super-120b-a12b"):
        pattern = load_config(ROOT / "examples" / "configs" / f"{name}.yaml").model.hybrid_override_pattern
        proxy = proxy_pattern(pattern)
        assert set(proxy) == set(pattern) and proxy == "MEM*EME"
    assert set(proxy_pattern("M*-EM*E")) == set("M*-E")  # the dense MLP kind is kept too


@pytest.mark.slow
@pytest.mark.multiproc
def test_rehearse_both_production_configs(tmp_path):
    data = None
    for name, stages in (("super-120b-a12b", ["phase1", "phase2", "long-context", "long-context-2"]),
                         ("nano-30b-a3b", ["phase1", "phase2", "long-context"])):
        out = tmp_path / name
        r = Rehearsal(ROOT / "examples" / "configs" / f"{name}.yaml", out, main_steps=10, side_steps=1,
                      data_from=data, log=lambda m: None)
        res = r.run()
        data = data or out / "data"
        assert [s["name"] for s in res["train"]["stages"]] == stages
        assert all(s.get("completed") for s in res["train"]["stages"])
        assert res["train"]["killed"]["stage"] in ("phase1", "phase2") and res["train"]["killed"]["after"] > 0
        assert res["lr"]["checked"] >= 10 and res["lr"]["max_rel_diff"] < 1e-5
        assert res["merge"]["inputs"] >= 2
        assert res["export"]["logits_max_rel_diff"] < 1e-4
        assert [s["step"] for s in res["steps"]] == ["preflight", "data", "miniature", "kill -9", "resume", "LR",
                                                      "merge", "export"]
        assert json.loads((out / "rehearsal.json").read_text())["config"].endswith(f"{name}.yaml")
        run = load_config(out / "run.yaml")
        assert [s.name for s in run.stages] == stages
        if name == "super-120b-a12b":  # the alternating 1M/4K stage stays alternating, the MTP heads train
            assert isinstance(run.stages[3].seq_length, (list, type(None)))
            assert run.model.mtp_num_layers == 2 and run.stages[0].precision.recipe == "nvfp4"
    with pytest.raises(ConfigError, match="a rehearsal starts from nothing"):
        Rehearsal(ROOT / "examples" / "configs" / "nano-30b-a3b.yaml", tmp_path / "nano-30b-a3b",
                  log=lambda m: None).run()


def test_a_production_config_that_fails_preflight_is_not_rehearsed(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "examples" / "configs" / "nano-30b-a3b.yaml").read_text().replace("phase: long\n",
                                                                                     "phase: long-context\n")
    bad.write_text(text.replace("curriculum/nano-25t.yaml", str(ROOT / "examples/configs/curriculum/nano-25t.yaml")))
    with pytest.raises(ConfigError, match=r"fails preflight[\s\S]*stages\.2 \(long-context\)\.phase"):
        Rehearsal(bad, tmp_path / "out", log=lambda m: None).run()
    assert not (tmp_path / "out" / "run").exists()
