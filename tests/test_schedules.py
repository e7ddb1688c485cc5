"""LR schedules follow the published formulas (Megatron-Core OptimizerParamScheduler, configured by Foldtron)."""
import math

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


@pytest.mark.parametrize("name", ["tiny", "nano-30b-a3b", "super-120b-a12b"])
def test_example_configs_resolve_to_stages(repo_root, name):
    from pretrain.config import load_config
    from pretrain.stages import resolve

    stages = resolve(load_config(repo_root / "examples" / "configs" / f"{name}.yaml"), check_inputs=False)
    assert [s.name for s in stages] == ["phase1", "phase2", "long-context"]
    p1, p2, lc = stages
    for s in stages:
        scheduler_kwargs(s.train)  # every stage's schedule is valid for Megatron's scheduler
    assert p2.train.lr_decay_style == "WSD" and p2.train.lr_wsd_decay_iters == p2.train.train_iters
    assert lc.train.lr_decay_style == "constant" and lc.parallel.cp > 1
    if name == "super-120b-a12b":
        assert p1.train.lr_warmup_iters == 7949 and p1.train.train_iters + p2.train.train_iters == 993404
        assert p2.train.lr_wsd_decay_style == "minus_sqrt" and p2.train.lr == 4.5e-4
        # end of phase 2 reaches min_lr, half way it is min + (1 - sqrt(1/2)) (max - min)
        lrs = lr_curve(p2.train.model_copy(update={"train_iters": 100, "lr_wsd_decay_iters": 100}), 101)
        assert lrs[50] == pytest.approx(4.5e-6 + (1 - math.sqrt(0.5)) * (4.5e-4 - 4.5e-6))
        assert lrs[100] == pytest.approx(4.5e-6)
