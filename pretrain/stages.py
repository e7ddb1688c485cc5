"""Stages: phase 1 -> phase 2 (LR decay) -> long context, from one config.

A run with no `stages:` list is one stage named "main" with the run's `train`, `parallel` and `precision`.
Otherwise each StageConfig inherits every unset field from the run's sections. Each stage has its own schedule
(iterations and LR counted from 0 within the stage) and data phase; it starts from the previous stage's final
checkpoint (weights and optimizer moments; the layout may differ) and resumes from its own latest checkpoint
after any stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from model.precision import PrecisionConfig
from parallel.layout import ParallelLayout
from pretrain.config import ConfigError, RunConfig, TrainConfig

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


def resolve(cfg: RunConfig, *, check_inputs: bool = True) -> list[Stage]:
    """The run's stages. With `check_inputs` (what a run does; off only to inspect a config on another machine)
    the files the run will read are checked first (`check_run_inputs`): nothing starts on a wrong path."""
    if check_inputs:
        check_run_inputs(cfg)
    stages = _stages(cfg)
    for st in stages:
        _check_schedule(cfg, st)
    return stages


def _check_schedule(cfg: RunConfig, st: "Stage") -> None:
    """Each stage's schedule as Megatron's scheduler will take it, now rather than after the earlier stages
    trained: iterations to run, a warmup that fits, a WSD window that fits."""
    from pretrain.schedules import scheduler_kwargs

    where = "train" if not cfg.stages else f"stages.{st.index} ({st.name})"
    t = st.train
    if t.train_iters < 1:
        raise ConfigError(f"{where}: train_iters is {t.train_iters}: nothing would be trained")
    if t.lr_warmup_iters > t.train_iters:
        raise ConfigError(f"{where}: lr_warmup_iters ({t.lr_warmup_iters}) is longer than the stage "
                          f"(train_iters {t.train_iters}): the LR would never reach train.lr")
    try:
        scheduler_kwargs(t)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _stages(cfg: RunConfig) -> list[Stage]:
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
            raise ConfigError(f"stages.{i} ({s.name}): {e}") from None
        out.append(Stage(i, s.name, s.phase, train, s.parallel or cfg.parallel, s.precision or cfg.precision))
    return out


# ----------------------------------------------------------------------------------------------------------
# What the run reads, checked before any process group exists

def stage_names(cfg: RunConfig) -> list[str]:
    return [s.name for s in cfg.stages] or ["main"]


def check_run_inputs(cfg: RunConfig) -> None:
    """Every path the run reads exists, as a ConfigError naming the field: the data (unless data.mock), the
    tokenizer, and `checkpoint.load`, which must hold a checkpoint of one of the run's stages (else the run
    would train from scratch and exit 0 while the user thinks it resumed)."""
    problems = _data_problems(cfg) + _load_problems(cfg)
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))


def _data_problems(cfg: RunConfig) -> list[str]:
    d = cfg.data
    if d.mock:
        return []
    out = []
    if not d.shards_dir:
        out.append("data.shards_dir is not set: point it at `foldtron shards` output, or set data.mock=true for "
                   "synthetic data")
    elif not Path(d.shards_dir).is_dir():
        out.append(f"data.shards_dir: {d.shards_dir} does not exist or is not a directory")
    if not d.curriculum:
        out.append("data.curriculum is not set: the loader needs the curriculum YAML naming the phases")
    elif not Path(d.curriculum).is_file():
        out.append(f"data.curriculum: {d.curriculum} does not exist")
    if not d.tokenizer:
        out.append("data.tokenizer is not set: name the tokenizer.json the shards were written with (the "
                   "checkpoints record it and export-hf needs it)")
    else:
        path = Path(d.tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            out.append(f"data.tokenizer: {path} does not exist")
        else:
            from tokenizers import Tokenizer

            try:
                n = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
            except Exception as e:  # the Rust error names the JSON problem, not the file
                out.append(f"data.tokenizer: cannot load {path}: {e}")
            else:
                if n > cfg.model.vocab_size:
                    out.append(f"data.tokenizer: {path} has {n} tokens but model.vocab_size is "
                               f"{cfg.model.vocab_size}: its ids would index past the embedding")
    return out


def _load_problems(cfg: RunConfig) -> list[str]:
    load, save = cfg.checkpoint.load, cfg.checkpoint.save
    if load is None or (save is not None and Path(load).resolve() == Path(save).resolve()):
        return []  # resuming from `save` itself: an empty or new directory is a fresh run
    p = Path(load)
    if not p.is_dir():
        return [f"checkpoint.load: {load} does not exist (a typo would train from scratch); name the run "
                "directory of the run to resume (its checkpoint.save), or drop checkpoint.load"]
    if (p / ".metadata").is_file() or (p / "latest").is_file():
        return [f"checkpoint.load: {load} is a {'checkpoint' if (p / '.metadata').is_file() else 'stage'} "
                f"directory; name the run directory above it ({p.parent if (p / 'latest').is_file() else p.parent.parent})"]
    names = stage_names(cfg)
    if not any((p / n / "latest").is_file() for n in names):
        found = sorted(d.name for d in p.iterdir() if (d / "latest").is_file())
        return [f"checkpoint.load: {load} holds no checkpoint of this run's stages {names}"
                + (f" (it has stages {found})" if found else " (no stage directory with a `latest`)")
                + ": nothing to resume, the run would start from scratch"]
    return []
