"""A run config naming something that is not there fails before anything starts (issue 20): `checkpoint.load`
that does not exist or holds no checkpoint of the run's stages (it trained from scratch and exited 0), real data
without `data.tokenizer` or with paths that do not exist. `resolve()` is what `run_training` calls before any
process group; each error names the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.stages import resolve

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"


def _stage_checkpoint(run: Path, stage: str, it: int = 4) -> None:
    d = run / stage / f"iter_{it:07d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"x")
    (d / "foldtron.json").write_text(json.dumps({"iteration": it, "stage": stage}))
    (run / stage / "latest").write_text(d.name + "\n")


def test_checkpoint_load_that_does_not_exist(tmp_path):
    cfg = load_config(TINY, [f"checkpoint.save={tmp_path / 'run'}", "checkpoint.load=/no/such/run"])
    with pytest.raises(ConfigError, match=r"checkpoint\.load: /no/such/run does not exist"):
        resolve(cfg)


def test_checkpoint_load_without_a_checkpoint_of_the_runs_stages(tmp_path):
    other = tmp_path / "other"
    _stage_checkpoint(other, "pretrained")
    cfg = load_config(TINY, [f"checkpoint.load={other}"])
    with pytest.raises(ConfigError, match=r"checkpoint\.load: .* holds no checkpoint of this run's stages "
                                          r"\['phase1', 'phase2', 'long-context'\] \(it has stages \['pretrained'\]\)"):
        resolve(cfg)
    _stage_checkpoint(other, "phase1")
    with pytest.raises(ConfigError, match=rf"checkpoint\.load: .*phase1 is a stage directory; name the run "
                                          rf"directory above it \({other}\)"):
        resolve(load_config(TINY, [f"checkpoint.load={other / 'phase1'}"]))
    with pytest.raises(ConfigError, match=r"is a checkpoint directory"):
        resolve(load_config(TINY, [f"checkpoint.load={other / 'phase1' / 'iter_0000004'}"]))
    assert [s.name for s in resolve(cfg)] == ["phase1", "phase2", "long-context"]


def test_load_equal_to_save_may_be_new(tmp_path):
    run = tmp_path / "new-run"
    resolve(load_config(TINY, [f"checkpoint.save={run}", f"checkpoint.load={run}"]))


def test_real_data_needs_an_existing_tokenizer_and_paths(tmp_path):
    shards, cur = tmp_path / "shards", tmp_path / "cur.yaml"
    shards.mkdir()
    cur.write_text("phases: []\n")
    base = ["data.mock=false", f"data.shards_dir={shards}", f"data.curriculum={cur}"]
    with pytest.raises(ConfigError, match=r"data\.tokenizer is not set"):
        resolve(load_config(TINY, base))
    with pytest.raises(ConfigError, match=rf"data\.tokenizer: {tmp_path / 'tok.json'} does not exist"):
        resolve(load_config(TINY, base + [f"data.tokenizer={tmp_path / 'tok.json'}"]))
    with pytest.raises(ConfigError, match=r"data\.shards_dir: /no/shards does not exist[\s\S]*"
                                          r"data\.curriculum: /no/cur\.yaml does not exist"):
        resolve(load_config(TINY, ["data.mock=false", "data.shards_dir=/no/shards", "data.curriculum=/no/cur.yaml",
                                   f"data.tokenizer={tmp_path / 'tok.json'}"]))
    (tmp_path / "tok.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"data\.tokenizer: cannot load"):
        resolve(load_config(TINY, base + [f"data.tokenizer={tmp_path / 'tok.json'}"]))
    from data_pipeline.tokenizer import TrainConfig, train_bpe

    train_bpe(["some text to learn from " * 50], TrainConfig(vocab_size=400, min_frequency=1)).save(
        tmp_path / "tok.json")
    with pytest.raises(ConfigError, match=r"has \d+ tokens but model\.vocab_size is 256"):
        resolve(load_config(TINY, base + [f"data.tokenizer={tmp_path / 'tok.json'}", "model.vocab_size=256"]))
    # The curriculum is read before any stage: an unplannable one is an error now, not at its stage's start.
    with pytest.raises(ConfigError, match=r"data\.curriculum: .*cur\.yaml: phases: List should have at least 1"):
        resolve(load_config(TINY, base + [f"data.tokenizer={tmp_path / 'tok.json'}"]))
    cur.write_text("phases:\n" + "".join(
        f"  - {{name: {n}, tokens: 10000, seq_length: {s}, global_batch_size: {g}, blend: {{a: 1}}}}\n"
        for n, s, g in (("phase1", 32, 8), ("phase2", 32, 8), ("long-context", 128, 4))))
    stages = resolve(load_config(TINY, base + [f"data.tokenizer={tmp_path / 'tok.json'}"]))
    assert len(stages) == 3
    resolve(load_config(TINY))  # mock data needs none of it


@pytest.mark.parametrize("overrides, expected", [
    (["train.lr=inf"], r"train\.lr: Input should be a finite number"),
    (["train.lr=nan"], r"train\.lr: Input should be a finite number"),
    (["stages.1.lr=.inf"], r"stages\.1\.lr: Input should be a finite number"),
    (["stages=[]", "train.train_iters=0"], r"train: train_iters is 0: nothing would be trained"),
    (["stages=[]", "train.train_iters=5", "train.lr_warmup_iters=8"],
     r"train: lr_warmup_iters \(8\) is longer than the stage \(train_iters 5\)"),
    (["stages.2.lr_warmup_iters=3"], r"stages\.2 \(long-context\): lr_warmup_iters \(3\) is longer than the stage"),
    (["stages.0.lr_warmup_iters=6", "stages.0.lr_decay_style=cosine"],
     r"stages\.0 \(phase1\): train\.lr_warmup_iters \(6\) must be < train\.lr_decay_iters"),
    (["stages.1.lr_wsd_decay_iters=9"], r"stages\.1 \(phase2\): train\.lr_wsd_decay_iters \(9\) must be set and fit"),
])
def test_wrong_schedules_are_config_errors_before_any_stage(overrides, expected):
    """Accepted before (lr=inf diverged at step 1, train_iters=0 exited 0 having trained nothing, a warmup longer
    than its stage never reached the LR) or failing late in Megatron's scheduler assert after earlier stages."""
    with pytest.raises(ConfigError, match=expected):
        resolve(load_config(TINY, overrides))
