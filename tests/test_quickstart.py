"""A shortened quickstart end to end, checking every artifact is there and valid: curated report, shards
readable with webdataset, TensorBoard scalars, a checkpoint training resumes from, an export transformers loads."""
import json
import math
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

    # the serving checks in the summary (printed and in quickstart/summary.json): the MTP block drafting on held-out
    # prompts reproduces greedy decoding, and the NVFP4 export calibrated on held-out shard windows has its quality
    summary_json = json.loads((out / "quickstart" / "summary.json").read_text())
    mtp = summary_json["mtp"]
    acc = mtp["acceptance_per_position"]
    assert mtp["greedy_equal"] is True and mtp["draft_tokens"] == 2 and mtp["held_out"]["phase"] == "long_context"
    assert len(acc) == 2 and 0 <= acc[1] <= acc[0] <= 1  # draft 2 is accepted only after draft 1
    assert mtp["mean_tokens_per_verify"] == pytest.approx(1 + mtp["mean_accepted_drafts"])
    assert 1 <= mtp["mean_tokens_per_verify"] <= 3 and "MTP drafter acceptance" in res.stdout
    nv = summary_json["nvfp4"]
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        assert "quant" in nv["skipped"] and "nvfp4       skipped" in res.stdout
    else:
        q = nv["quality"]
        assert math.isfinite(q["ppl_increase"]) and math.isfinite(q["bf16_ppl"]) and q["bf16_ppl"] > 1
        assert q["ppl_increase"] <= q["max_ppl_increase"] == 0.10 and 0 < q["top1_agreement"] <= 1
        assert nv["calibration"]["windows"] == [8, 128] and nv["evaluation_windows"] == [8, 128]
        assert q["bf16_modules"] == 0 and q["emulated_modules"] > 0 and nv["mtp_tensors_bf16"] > 0
        assert (Path(nv["output"]) / "hf_quant_config.json").is_file() and "held-out ppl" in res.stdout
