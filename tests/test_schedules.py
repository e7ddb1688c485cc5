"""LR schedules follow the published formulas (Megatron-Core OptimizerParamScheduler, configured by Foldtron)."""
import math
from pathlib import Path

import pytest

from pretrain.config import TrainConfig
from pretrain.schedules import lr_curve, scheduler_kwargs


def _cfg(**kw):
    base = dict(lr=4.5e-4, min_lr=4.5e-6, train_iters=100, lr_warmup_iters=10)
    base.update(kw)
    return TrainConfig(**base)


def _warmup(i, w, peak):
    return peak * i / w


def test_linear_warmup_then_cosine():
    c = _cfg(lr_decay_style="cosine")
    lrs = lr_curve(c)
    for i, lr in enumerate(lrs):
        if i <= 10:
            want = _warmup(i, 10, c.lr)
        else:
            r = (i - 10) / 90
            want = c.min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (c.lr - c.min_lr)
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), i
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(c.lr)


def test_linear_decay():
    c = _cfg(lr_decay_style="linear", lr_warmup_iters=0)
    for i, lr in enumerate(lr_curve(c)):
        assert lr == pytest.approx(c.min_lr + (1 - i / 100) * (c.lr - c.min_lr), rel=1e-12)


def test_constant_for_long_context():
    c = _cfg(lr_decay_style="constant", lr=1e-5, min_lr=1e-5, lr_warmup_iters=0, train_iters=7)
    assert lr_curve(c, 20) == [1e-5] * 20


@pytest.mark.parametrize("style", ["minus_sqrt", "cosine", "linear", "exponential"])
def test_wsd(style):
    # Super's published shape: warmup, stable at peak, decay over the last window.
    c = _cfg(lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style=style)
    lrs = lr_curve(c, 110)
    shape = {
        "minus_sqrt": lambda r: 1 - math.sqrt(r),
        "cosine": lambda r: 0.5 * (1 + math.cos(math.pi * r)),
        "linear": lambda r: 1 - r,
        "exponential": lambda r: 2 * 0.5 ** r - 1,
    }[style]
    for i, lr in enumerate(lrs):
        if i <= 10:
            want = _warmup(i, 10, c.lr)
        elif i <= 80:
            want = c.lr
        elif i <= 100:
            want = c.min_lr + shape((i - 80) / 20) * (c.lr - c.min_lr)
        else:
            want = c.min_lr  # past the decay: Megatron holds min_lr
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), (i, lr, want)
    assert lrs[100] == pytest.approx(c.min_lr)


def test_wsd_window_must_fit():
    with pytest.raises(ValueError, match="lr_wsd_decay_iters"):
        scheduler_kwargs(_cfg(lr_decay_style="WSD", lr_wsd_decay_iters=95))


def test_scheduler_state_roundtrip():
    from pretrain.schedules import _Groups, build_scheduler

    c = _cfg(lr_decay_style="WSD", lr_wsd_decay_iters=20)
    a = build_scheduler(_Groups(), c)
    a.step(1)
    for _ in range(84):
        a.step(1)
    b = build_scheduler(_Groups(), c)
    b.load_state_dict(a.state_dict())
    assert b.num_steps == 85 and b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]


def test_tiny_config_resolves_to_per_stage_schedules(repo_root):
    from pretrain.config import load_config
    from pretrain.stages import resolve

    stages = resolve(load_config(repo_root / "examples" / "configs" / "tiny.yaml"), check_inputs=False)
    assert [s.name for s in stages] == ["phase1", "phase2", "long-context"]
    p1, p2, lc = stages
    for s in stages:
        scheduler_kwargs(s.train)  # every stage's schedule is valid for Megatron's scheduler
    assert p2.train.lr_decay_style == "WSD" and p2.train.lr_wsd_decay_iters == p2.train.train_iters
    assert lc.train.lr_decay_style == "constant" and lc.parallel.cp > 1


def _run_curve(stages):
    from pretrain.schedules import lr_curve

    return [lr for s in stages if s.on_run_curve for lr in lr_curve(s.train, offset=s.lr_offset)]


@pytest.mark.parametrize("name", ["nano-30b-a3b", "super-120b-a12b"])
def test_production_configs_are_windows_of_one_run_curve(repo_root, name):
    """The shipped 25T plans: one LR curve over phase 1 + phase 2 (stages are windows of it), batches and sequence
    lengths from the curriculum beside the config, the long-context stages on their own constant LR."""
    from pretrain.config import load_config
    from pretrain.schedules import lr_at
    from pretrain.stages import resolve

    cfg = load_config(repo_root / "examples" / "configs" / f"{name}.yaml")
    assert Path(cfg.data.curriculum).is_file()  # relative to the config file, shipped beside it
    stages = resolve(cfg, check_inputs=False)
    p1, p2, *lcs = stages
    assert p1.on_run_curve and p2.on_run_curve and p2.lr_offset == p1.train.train_iters
    assert all(not s.on_run_curve and s.train.lr_decay_style == "constant" and s.parallel.cp > 1 for s in lcs)
    total = p1.train.train_iters + p2.train.train_iters
    decay = p1.train.lr_wsd_decay_iters
    assert decay == 198682 and p1.train.lr_decay_iters == total
    peak, low = p1.train.lr, p1.train.min_lr
    # stable until the decay starts, min_lr at the end of phase 2; continuous across the stage boundary
    last1, first2 = lr_at(p1.train, [p1.train.train_iters - 1], 0)[0], lr_at(p2.train, [0], p2.lr_offset)[0]
    assert lr_at(p1.train, [total - decay - 1], 0)[0] == pytest.approx(peak)
    assert lr_at(p2.train, [p2.train.train_iters], p2.lr_offset)[0] == pytest.approx(low)
    assert abs(first2 - last1) < 1e-8
    if name == "super-120b-a12b":
        assert p1.train.lr_warmup_iters == 7949 and total == 993404
        assert p2.train.lr_wsd_decay_style == "minus_sqrt" and p1.train.train_iters == total - decay
        mid = lr_at(p2.train, [decay // 2], p2.lr_offset)[0]  # minus-sqrt: min + (1 - sqrt(1/2)) (max - min)
        assert mid == pytest.approx(low + (1 - math.sqrt(0.5)) * (peak - low), rel=1e-4)
        assert [s.seq_lengths for s in lcs] == [(1048576,), (1048576, 4096)]
        assert all(s.train.global_batch_size == 16 and s.gpus == 2048 for s in lcs)
    else:  # Nano: the decay of the last 5T starts inside phase 1 and crosses into phase 2
        assert total - decay < p1.train.train_iters
        assert low < last1 < peak
        assert lcs[0].train.global_batch_size == 48 and lcs[0].seq_lengths == (1048576,)


def test_run_curve_in_miniature_equals_one_scheduler_and_resumes(tmp_path):
    """Three stages on one curve: the concatenated per-stage LRs are exactly one Megatron scheduler over the
    total, and a scheduler rebuilt from a mid-stage state_dict continues on the same curve."""
    from pretrain.config import TrainConfig, load_config
    from pretrain.schedules import _Groups, build_scheduler, lr_curve, restore_scheduler
    from pretrain.stages import resolve

    cfg = load_config(None, ["data.mock=true", "train.lr_schedule_span=run", "train.lr_warmup_iters=3",
                             "train.lr_decay_style=WSD", "train.lr_wsd_decay_iters=8", "train.lr_wsd_decay_style=cosine"])
    raw = cfg.model_dump(mode="json")
    raw["stages"] = [{"name": "a", "train_iters": 6}, {"name": "b", "train_iters": 5},
                     {"name": "c", "train_iters": 3, "own_lr_schedule": True, "lr": 1e-5, "min_lr": 1e-5,
                      "lr_decay_style": "constant", "lr_warmup_iters": 0}]
    from pretrain.config import build_config

    stages = resolve(build_config(raw), check_inputs=False)
    whole = lr_curve(TrainConfig(**{**cfg.train.model_dump(), "train_iters": 11, "lr_decay_iters": 11,
                                    "lr_schedule_span": "stage"}))
    assert _run_curve(stages) == whole
    assert lr_curve(stages[2].train) == [1e-5] * 3
    b = stages[1]
    s1 = build_scheduler(_Groups(), b.train, b.lr_offset)
    s1.step(2)
    s2 = build_scheduler(_Groups(), b.train, b.lr_offset)
    restore_scheduler(s2, s1.state_dict())  # Megatron's load_state_dict alone would add the offset twice
    s2.step(1)
    assert s2.optimizer.param_groups[0]["lr"] == whole[b.lr_offset + 3]


@pytest.mark.parametrize("overrides,expected", [
    (["train.lr_decay_iters=40"], r"train\.lr_decay_iters \(40\) is longer than the run's LR curve \(11 iterations"),
    (["train.lr_wsd_decay_iters=20"], r"train \(the LR curve over stages a\+b\): train\.lr_wsd_decay_iters \(20\)"),
    (["stages.1.lr=1e-4"], r"stages\.1 \(b\): sets lr but follows the run's LR curve"),
    (["train.lr_schedule_span=stage", "stages.1.own_lr_schedule=true"], r"stages\.1 \(b\)\.own_lr_schedule"),
])
def test_run_curve_mistakes_name_the_field(overrides, expected):
    from pretrain.config import ConfigError, build_config, load_config
    from pretrain.stages import resolve

    cfg = load_config(None, ["data.mock=true", "train.lr_schedule_span=run", "train.lr_warmup_iters=3",
                             "train.lr_decay_style=WSD", "train.lr_wsd_decay_iters=8"])
    raw = cfg.model_dump(mode="json")
    raw["stages"] = [{"name": "a", "train_iters": 6}, {"name": "b", "train_iters": 5}]
    from pretrain.config import apply_overrides

    with pytest.raises(ConfigError, match=expected):
        resolve(build_config(apply_overrides(raw, overrides)), check_inputs=False)
