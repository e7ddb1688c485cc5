"""Stages: phase 1 -> phase 2 (LR decay) -> long context, from one config.

A run with no `stages:` list is one stage named "main" with the run's `train`, `parallel` and `precision`.
Otherwise each StageConfig inherits every unset field from the run's sections. Each stage has its own schedule
(iterations and LR counted from 0 within the stage) and data phase; it starts from the previous stage's final
checkpoint (weights and optimizer moments; the layout may differ) and resumes from its own latest checkpoint
after any stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from model.precision import PrecisionConfig
from parallel.layout import ParallelLayout
from pretrain.config import RunConfig, TrainConfig

_INHERITED = ("seq_length", "micro_batch_size", "global_batch_size", "lr", "min_lr", "lr_warmup_iters",
              "lr_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_style")


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    phase: Optional[str]
    train: TrainConfig
    parallel: ParallelLayout
    precision: PrecisionConfig


def resolve(cfg: RunConfig) -> list[Stage]:
    if not cfg.stages:
        return [Stage(0, "main", None, cfg.train, cfg.parallel, cfg.precision)]
    out = []
    for i, s in enumerate(cfg.stages):
        fields = cfg.train.model_dump()
        fields["train_iters"] = s.train_iters
        fields["lr_decay_iters"] = None  # a stage's decay is measured within the stage
        for k in _INHERITED:
            v = getattr(s, k)
            if v is not None:
                fields[k] = v
        if s.lr_decay_style is not None and s.lr_decay_style != "WSD" and s.lr_wsd_decay_iters is None:
            fields["lr_wsd_decay_iters"] = None
        try:
            train = TrainConfig(**fields)
        except Exception as e:  # name the stage: the run's train section was valid on its own
            raise ValueError(f"stages.{i} ({s.name}): {e}") from None
        out.append(Stage(i, s.name, s.phase, train, s.parallel or cfg.parallel, s.precision or cfg.precision))
    return out
