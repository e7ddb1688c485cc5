"""LR schedules: Megatron-Core's own `OptimizerParamScheduler`, configured from a stage's TrainConfig.

Megatron-LM counts scheduler steps in samples; Foldtron counts them in iterations (one `step(1)` per successful
update), which is the same schedule because a stage has a fixed global batch. Skipped (NaN/Inf) updates do not
advance the schedule, exactly as in Megatron-LM's `train_step`.

Shapes (Megatron names): linear warmup from 0 to `lr` over `lr_warmup_iters`, then
`constant` (long-context stages), `cosine` / `linear` decay to `min_lr` at `lr_decay_iters`, or `WSD`
(warmup-stable-decay): stable at `lr` until the last `lr_wsd_decay_iters` of `lr_decay_iters`, then a decay of
style `lr_wsd_decay_style` (Nemotron 3 Super: `minus_sqrt`, lr = min + (max-min)(1 - sqrt(t/T))).
"""
from __future__ import annotations

from typing import Any

from pretrain.config import TrainConfig


def scheduler_kwargs(train: TrainConfig) -> dict[str, Any]:
    """OptimizerParamScheduler arguments for one stage; errors name the field."""
    decay_iters = train.lr_decay_iters or train.train_iters
    if decay_iters <= train.lr_warmup_iters:
        # Megatron asserts lr_warmup_steps < lr_decay_steps; a constant schedule never decays, so only the
        # warmup must fit in the stage.
        if train.lr_decay_style != "constant":
            raise ValueError(
                f"train.lr_warmup_iters ({train.lr_warmup_iters}) must be < train.lr_decay_iters "
                f"(or train_iters) ({decay_iters}) for lr_decay_style={train.lr_decay_style}")
        decay_iters = train.lr_warmup_iters + 1
    wsd = None
    if train.lr_decay_style == "WSD":
        wsd = train.lr_wsd_decay_iters
        if wsd is None or wsd > decay_iters - train.lr_warmup_iters:
            raise ValueError(
                f"train.lr_wsd_decay_iters ({wsd}) must be set and fit after the warmup: <= "
                f"{decay_iters - train.lr_warmup_iters} (lr_decay_iters - lr_warmup_iters)")
    return dict(
        init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters, lr_decay_steps=decay_iters, lr_decay_style=train.lr_decay_style,
        # Weight decay is constant in Nemotron 3 (0.1): Megatron's wd increment machinery stays at start=end.
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=max(train.train_iters, 1),
        wd_incr_style="constant",
        # A resumed stage keeps its checkpointed schedule (Megatron's --use-checkpoint-opt_param-scheduler).
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
        wsd_decay_steps=wsd, lr_wsd_decay_style=train.lr_wsd_decay_style if wsd else None,
    )


def build_scheduler(optimizer: Any, train: TrainConfig, offset: int = 0):
    """The Megatron-Core scheduler driving `optimizer.param_groups[*]['lr']` for one stage, positioned `offset`
    steps into its curve (a stage that is a window of the run's LR curve starts where the previous one ended; a
    resumed stage then loads its checkpointed `num_steps`, which counts from the curve's start too)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    sched = OptimizerParamScheduler(optimizer, **scheduler_kwargs(train))
    if offset:
        sched.step(offset)
    return sched


class _Groups:
    """Just enough of an optimizer (param_groups) to evaluate a schedule without a model."""

    def __init__(self) -> None:
        self.param_groups: list[dict] = [{}]


def restore_scheduler(sched: Any, state: dict) -> None:
    """Load a checkpointed scheduler state. Megatron's `load_state_dict` *adds* the saved `num_steps` to the
    current count (megatron/core/optimizer_param_scheduler.py:390, `self.step(increment=num_steps)`): it expects a
    fresh scheduler at 0, and one built `offset` steps into the run's curve would land offset steps too far."""
    sched.num_steps = 0
    sched.load_state_dict(state)


def lr_curve(train: TrainConfig, iters: int | None = None, offset: int = 0) -> list[float]:
    """LR at iterations 0..iters-1 (the LR used by the update of iteration i+1), for plots and checks."""
    sched = build_scheduler(_Groups(), train, offset)
    out = []
    for _ in range(train.train_iters if iters is None else iters):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.step(1)
    return out


def lr_at(train: TrainConfig, steps: list[int], offset: int = 0) -> list[float]:
    """LR at the given iterations of a stage (0-based, in the stage), from Megatron's own `get_lr`: for plotting
    a million-step run at a few thousand points without stepping through every one."""
    sched = build_scheduler(_Groups(), train, offset)
    group = sched.optimizer.param_groups[0]
    out = []
    for i in steps:
        sched.num_steps = offset + i
        out.append(float(sched.get_lr(group)))
    return out
