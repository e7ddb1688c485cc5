"""A shortened quickstart end to end, checking every artifact is there and valid: curated report, shards
readable with webdataset, TensorBoard scalars, a checkpoint training resumes from, an export transformers loads."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.multiproc
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    # The production CPU path, Megatron-Core's torch.compile'd fused functions included (conftest.py turns
    # compilation off for the rest of the suite).
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", "quickstart", "--output", str(out), "--steps", "6",
                          "--cpus", "2"], capture_output=True, text=True, cwd=ROOT, timeout=1500, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "Foldtron quickstart" in res.stdout and "tensorboard --logdir" in res.stdout

    # curation accounting closes
    report = json.loads((out / "curate" / "reports" / "run.json").read_text())
    removed = report["exact_duplicates"]["docs"] + report["fuzzy_duplicates"]["docs"] + sum(
        v["docs"] for v in report["filtered"].values()) + len(report.get("bad_input") or [])
    assert report["input"]["docs"] == report["kept"]["docs"] + removed

    # shards are readable with plain webdataset
    import webdataset as wds

    tars = sorted((out / "shards").rglob("*.tar"))
    assert tars
    first = next(iter(wds.WebDataset(str(tars[0]), shardshuffle=False)))
    assert any(k.startswith("tokens") for k in first)

    # TensorBoard scalars with Megatron's names, per stage
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm"} <= tags

    # every stage trained and wrote a final checkpoint; training picks up from them: with the long-context
    # stage's checkpoints gone, a rerun starts it from phase 2's final checkpoint and reproduces its losses
    summary = json.loads((out / "train_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["phase1", "phase2", "long_context"]
    assert all(s["completed"] for s in summary["stages"])
    shutil.rmtree(out / "checkpoints" / "long_context")
    resume = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--config", str(out / "run.yaml"),
                             "--nproc", "4", "--summary", str(tmp_path / "resume.json")], capture_output=True,
                            text=True, cwd=ROOT, timeout=900, env=env)
    assert resume.returncode == 0, resume.stderr[-5000:]
    again = json.loads((tmp_path / "resume.json").read_text())["stages"]
    assert again[0].get("skipped_already_done") and again[1].get("skipped_already_done")
    assert "phase2" in str(again[2]["started_from"])
    assert again[2]["losses"] == summary["stages"][2]["losses"]

    # the export loads in transformers and reproduced Foldtron's logits
    qs = json.loads((out / "quickstart" / "export.json").read_text())
    assert qs["verify"]["greedy_equal"] and qs["verify"]["logits_max_rel_diff"] < 1e-4
    gen = json.loads((out / "quickstart" / "generate.json").read_text())
    assert gen["model_class"] == "NemotronHForCausalLM"
