"""`foldtron preflight`: the shipped 25T plans pass on their published clusters, and planted mistakes are each
caught with a message naming the stage and the field (before any process group; no GPU, no data needed except
for the data checks, which use small real shards)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import load_config
from pretrain.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
NANO = ROOT / "examples" / "configs" / "nano-30b-a3b.yaml"
SUPER = ROOT / "examples" / "configs" / "super-120b-a12b.yaml"


def _check_passes(rep, stages):
    assert rep["ok"] and rep["problems"] == [], rep["problems"]
    assert [s["name"] for s in rep["stages"]] == stages
    total = sum(s["tokens"] for s in rep["stages"])
    assert 25.0e12 < total < 25.2e12  # 25T plus the long-context stages
    for s in rep["stages"]:
        assert s["memory_gib"] < s["hbm_gib"]  # the planner's estimate on the published GPU
        # steps x batch x sequence within one batch of the phase's token budget
        assert abs(s["tokens"] - s["phase_tokens"]) < s["global_batch_size"] * max(s["seq_lengths"])


def test_super_passes_on_its_published_clusters_through_the_cli(tmp_path):
    png = tmp_path / "lr.png"
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "preflight", "--config", str(SUPER), "--no-data",
                          "--plot", str(png), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)
    _check_passes(rep, ["phase1", "phase2", "long-context", "long-context-2"])
    assert png.is_file() and png.stat().st_size > 10_000
    assert [s["gpus"] for s in rep["stages"]] == [4096, 4096, 2048, 2048]
    assert rep["stages"][3]["seq_lengths"] == [1048576, 4096]


def test_nano_passes_on_its_published_cluster(tmp_path):
    from pretrain.preflight import json_report, plot_lr
    from pretrain.stages import resolve

    cfg = load_config(NANO)
    _check_passes(json.loads(json.dumps(json_report(preflight(cfg, data=False)))), ["phase1", "phase2", "long-context"])
    assert plot_lr(cfg, resolve(cfg, check_inputs=False), tmp_path / "lr.png").stat().st_size > 10_000


def _curriculum_copy(tmp_path, source: Path, edit) -> Path:
    raw = yaml.safe_load(source.read_text())
    edit(raw)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(raw))
    return path


SUPER_CUR = ROOT / "examples" / "configs" / "curriculum" / "super-25t.yaml"


def _set_phase(name, **kw):
    def edit(raw):
        next(p for p in raw["phases"] if p["name"] == name).update(kw)
    return edit


# (config, overrides, curriculum edit or None, expected message: stage and field named)
PLANTED = [
    ("phase name", NANO, ["stages.2.phase=long-context"], None,
     r"stages\.2 \(long-context\)\.phase: no phase 'long-context' in curriculum 'nano-25t'"),
    ("curriculum batch disagrees with the config", SUPER, ["stages.2.global_batch_size=32"], None,
     r"stages\.2 \(long-context\)\.global_batch_size: 32 disagrees with curriculum phase 'long1' \(16\)"),
    ("sequence length disagrees", NANO, ["stages.0.seq_length=4096"], None,
     r"stages\.0 \(phase1\)\.seq_length: 4096 disagrees with curriculum phase 'phase1'"),
    ("batch not divisible by the job's data parallelism", SUPER, ["stages.2.gpus=4096"], None,
     r"stages\.2 \(long-context\)\.parallel \(on 4096 GPUs, seq_length 1048576\): dp=32: global_batch_size 16 is "
     r"not divisible"),
    ("CP not dividing the sequence", SUPER, [], _set_phase("long1", seq_length=1000000),
     r"stages\.2 \(long-context\)\.parallel \(on 2048 GPUs, seq_length 1000000\): cp=64: seq_length 1000000 is not "
     r"divisible by 2\*cp = 128"),
    ("stage-2 mixed lengths that do not tile", SUPER, [], _set_phase("long2", seq_length=[1048576, 4000]),
     r"stages\.3 \(long-context-2\)\.parallel \(on 2048 GPUs, seq_length 4000\): cp=64"),
    ("memory over HBM", NANO, ["stages.2.performance.recompute=none"], None,
     r"stages\.2 \(long-context\): memory: .* with recompute=none \(stages\.2\.performance\.recompute\), over "
     r"H100 SXM's 74\.5 GiB; performance\.recompute=\w+ would fit"),
    ("format the GPU lacks", SUPER, ["cluster.gpu=h100"], None,
     r"stages\.0 \(phase1\)\.precision\.recipe: H100 SXM has no nvfp4 tensor cores"),
    ("LR decay longer than the run", NANO, ["train.lr_decay_iters=2000000"], None,
     r"train\.lr_decay_iters \(2000000\) is longer than the run's LR curve \(993412 iterations of stages "
     r"phase1\+phase2\)"),
    ("WSD window longer than the curve", SUPER, ["train.lr_wsd_decay_iters=993000"], None,
     r"train \(the LR curve over stages phase1\+phase2\): train\.lr_wsd_decay_iters \(993000\) must be set and fit"),
    ("token budget off by more than a batch", SUPER, ["stages.0.train_iters=794000"], None,
     r"stages\.0 \(phase1\)\.train_iters: 794000 steps train .* tokens but curriculum phase 'phase1' budgets "
     r".*set train_iters to 794722"),
    ("stage longer than its phase", NANO, ["stages.1.train_iters=60000"], None,
     r"stages\.1 \(phase2\)\.train_iters: 60000 steps but curriculum phase 'phase2' holds 59605 global batches"),
    ("an LR field on a stage of the run's curve", SUPER, ["stages.1.lr=1.0e-4"], None,
     r"stages\.1 \(phase2\): sets lr but follows the run's LR curve"),
    ("tensor parallelism the model cannot split", NANO, ["parallel.tp=16"], None,
     r"stages\.0 \(phase1\)\.parallel \(on 512 GPUs, seq_length 8192\): tp=16: Mamba groups"),
    ("unknown GPU kind", NANO, ["cluster.gpu=a100"], None, r"cluster\.gpu: unknown GPU 'a100'"),
]


@pytest.mark.parametrize("what,config,overrides,edit,expected", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_mistake_is_named(what, config, overrides, edit, expected, tmp_path):
    if edit is not None:
        overrides = overrides + [f"data.curriculum={_curriculum_copy(tmp_path, SUPER_CUR, edit)}"]
    rep = preflight(load_config(config, overrides), data=False)
    assert not rep.ok
    assert any(re.search(expected, p) for p in rep.problems), "\n".join(rep.problems)


def test_every_problem_is_listed_at_once():
    rep = preflight(load_config(SUPER, ["stages.2.gpus=4096", "cluster.gpu=h100", "stages.0.train_iters=794000"]),
                    data=False)
    joined = "\n".join(rep.problems)
    assert "stages.2 (long-context).parallel" in joined and "no nvfp4" in joined and "stages.0 (phase1).train_iters" in joined


# ---- data: manifests present, sources known, epochs per source (small real shards)

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.pipeline_data import build

    return build(tmp_path_factory.mktemp("preflight-data"))


def _tiny_run(shards, cur: Path, extra=()):
    return load_config(None, [
        "model.preset=tiny", "data.mock=false", f"data.shards_dir={shards['shards']}", f"data.curriculum={cur}",
        f"data.tokenizer={shards['tokenizer']}", "model.vocab_size=512", *extra])


def _tiny_stages(cfg_overrides_cur, iters=(32, 8, 15)):
    return [f"stages=[{{name: phase1, phase: phase1, train_iters: {iters[0]}}}, {{name: phase2, phase: phase2, "
            f"train_iters: {iters[1]}}}, {{name: long, phase: long, train_iters: {iters[2]}, parallel: {{cp: 2}}, "
            f"micro_batch_size: 1}}]"]


def test_data_checks_pass_on_real_shards_and_report_epochs(shards):
    cur = ROOT / "examples" / "configs" / "curriculum" / "tiny.yaml"
    rep = preflight(_tiny_run(shards, cur, _tiny_stages(None) + ["train.micro_batch_size=2", "cluster.gpus=2"]))
    assert rep.ok, rep.problems
    assert set(rep.epochs) == {"code", "email", "json"} and all(e > 0 for e in rep.epochs.values())
    assert [r.seq_lengths for r in rep.stages][-1] == (2048, 256)


def test_data_mistakes_are_named(shards, tmp_path):
    cur = _curriculum_copy(tmp_path, ROOT / "examples" / "configs" / "curriculum" / "tiny.yaml",
                           _set_phase("phase2", blend={"code": 0.5, "missing_source": 0.5}))
    rep = preflight(_tiny_run(shards, cur, _tiny_stages(None)))
    assert any(re.search(r"data\.curriculum: phase 'phase2': sources \['missing_source'\] have no shards", p)
               for p in rep.problems), rep.problems
    cur2 = _curriculum_copy(tmp_path / "x", ROOT / "examples" / "configs" / "curriculum" / "tiny.yaml",
                            lambda raw: raw.update(max_epochs=0.01)) if (tmp_path / "x").mkdir() is None else None
    rep = preflight(_tiny_run(shards, cur2, _tiny_stages(None)))
    assert any("repeats sources beyond max_epochs=0.01" in p for p in rep.problems), rep.problems
    rep = preflight(_tiny_run(shards, cur, ["data.shards_dir=/no/such/shards"] + _tiny_stages(None)))
    assert any(p.startswith("data.shards_dir:") and "/no/such/shards" in p for p in rep.problems), rep.problems


def test_train_runs_the_same_checks_before_the_first_step(shards, tmp_path):
    """A stage that would run dry 25T tokens in is refused by `foldtron train` before any stage trains."""
    cur = ROOT / "examples" / "configs" / "curriculum" / "tiny.yaml"
    from pretrain.config import ConfigError
    from pretrain.train import run_training

    cfg = _tiny_run(shards, cur, _tiny_stages(None, iters=(32, 8, 99)) + [
        "train.micro_batch_size=2", f"checkpoint.save={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"stages\.2 \(long\)\.train_iters: 99 steps but curriculum phase 'long' "
                                          r"holds 15 global batches"):
        run_training(cfg)
    assert not (tmp_path / "run" / "phase1").exists()  # nothing trained


def test_an_alternating_stage_counts_tokens_as_trained():
    """Super's long-context stage 2 alternates 1M and 4K sequences per global batch: each step is counted at its
    own length, in the order the loader cycles them."""
    from pretrain.stages import resolve

    st = resolve(load_config(SUPER), check_inputs=False)[3]
    assert [st.seq_length_at(i) for i in range(4)] == [1048576, 4096, 1048576, 4096]
    assert st.tokens(1) == 16 * 1048576 and st.tokens(2) == 16 * (1048576 + 4096)
    assert st.tokens(2019) == 16 * (1010 * 1048576 + 1009 * 4096)


@pytest.mark.multiproc
def test_a_job_stops_cleanly_before_a_stage_planned_for_another_size(tmp_path):
    """Super's long-context stages declare `gpus: 2048`: the 4,096-GPU job trains phases 1-2, then stops with exit 0
    naming the next stage and its size; a first stage planned for another size is an error (nothing silently
    skipped). In miniature: tiny's long-context stage planned for 2 ranks, the job has 1."""
    base = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(ROOT / "examples/configs/tiny.yaml"),
            "--nproc", "1", "logging.tensorboard_dir=null", "stages.0.train_iters=2", "stages.1.train_iters=2",
            "stages.1.lr_wsd_decay_iters=2"]
    summary = tmp_path / "s.json"
    out = subprocess.run(base + [f"checkpoint.save={tmp_path / 'a'}", "stages.2.gpus=2", "--summary", str(summary)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert [st["name"] for st in s["stages"]] == ["phase1", "phase2"] and all(st["completed"] for st in s["stages"])
    assert s["next_stage"] == {"name": "long-context", "gpus": 2}
    assert "stage long-context is planned for 2 GPUs and this job has 1" in out.stdout
    out = subprocess.run(base + [f"checkpoint.save={tmp_path / 'b'}", "stages.0.gpus=2", "stages.2.gpus=2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode != 0 and "stage phase1 is planned for 2 GPUs (stages.0.gpus) but this job has 1 ranks" in (
        out.stdout + out.stderr)
    assert not (tmp_path / "b" / "phase1").exists()
