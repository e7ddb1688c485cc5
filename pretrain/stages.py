"""Stages: phase 1 -> phase 2 (LR decay) -> long context, from one config.

A run with no `stages:` list is one stage named "main" with the run's `train`, `parallel` and `precision`.
Otherwise each StageConfig inherits every unset field from the run's sections, and takes its global batch and
sequence length(s) from its curriculum phase (the one source of truth; a stage value that disagrees is an error).
The LR schedule is per stage (iterations counted from the stage's first step) or, with
`train.lr_schedule_span: run`, one curve over the whole run of which each stage is a window (`lr_offset`: the
curve's iterations before the stage), so a decay can cross a phase boundary. Each stage starts from the previous
stage's final checkpoint (weights and optimizer moments; the layout may differ) and resumes from its own latest
checkpoint after any stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from model.precision import PrecisionConfig
from parallel.layout import ParallelLayout
from pretrain.config import ConfigError, PerformanceConfig, RunConfig, TrainConfig

_INHERITED = ("seq_length", "micro_batch_size", "global_batch_size", "lr", "min_lr", "lr_warmup_iters",
              "lr_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_style")
#: A stage's own schedule fields: on the run's LR curve (lr_schedule_span=run) a stage may not set them.
_LR_FIELDS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_style")


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    phase: Optional[str]
    train: TrainConfig  # train.seq_length is seq_lengths[0]; lr_decay_iters is the curve's length
    parallel: ParallelLayout
    precision: PrecisionConfig
    seq_lengths: tuple[int, ...] = ()  # per global batch, cycled (one entry unless the stage alternates)
    lr_offset: int = 0  # scheduler steps before this stage's first (on the run's LR curve; 0 for its own)
    on_run_curve: bool = False  # follows train.lr_schedule_span=run's curve
    performance: Optional[PerformanceConfig] = None  # None: the run's
    gpus: Optional[int] = None  # planned job size (stage's `gpus`, else cluster.gpus); None: any

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.seq_lengths or (self.train.seq_length,)

    def seq_length_at(self, iteration: int) -> int:
        """The sequence length of the stage's global batch `iteration` (0-based), as the loader cycles them."""
        return self.lengths[iteration % len(self.lengths)]

    def tokens(self, iterations: int) -> int:
        """Tokens trained by the stage's first `iterations` steps (each batch counted at its own length)."""
        L, g = self.lengths, self.train.global_batch_size
        full, rest = divmod(iterations, len(L))
        return g * (full * sum(L) + sum(L[:rest]))


def resolve(cfg: RunConfig, *, check_inputs: bool = True) -> list[Stage]:
    """The run's stages. With `check_inputs` (what a run does; off only to inspect a config on another machine)
    the files the run will read are checked first (`check_run_inputs`): nothing starts on a wrong path."""
    if check_inputs:
        check_run_inputs(cfg)
    stages, problems = stages_and_problems(cfg)
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))
    return stages


def stages_and_problems(cfg: RunConfig) -> tuple[list[Stage], list[str]]:
    """Every stage, and every problem of their batches, phases and schedules (each naming its stage and field):
    what `resolve` raises on at once, and what `foldtron preflight` lists beside its other checks."""
    problems: list[str] = []
    stages = _stages(cfg, problems)
    if not problems:
        for st in stages:
            problems += _schedule_problems(cfg, st, stages)
    return stages, problems


def _where(cfg: RunConfig, st) -> str:
    return "train" if not cfg.stages else f"stages.{st.index} ({st.name})"


def _schedule_problems(cfg: RunConfig, st: Stage, stages: list[Stage]) -> list[str]:
    """Each stage's schedule as Megatron's scheduler will take it, now rather than after the earlier stages
    trained: iterations to run, a warmup that fits, a WSD window that fits, a decay that ends inside the run."""
    from pretrain.schedules import scheduler_kwargs

    where, t = _where(cfg, st), st.train
    if t.train_iters < 1:
        return [f"{where}: train_iters is {t.train_iters}: nothing would be trained"]
    if st.on_run_curve:
        if st.lr_offset:  # the curve is checked once, on its first stage
            return []
        curve = sum(s.train.train_iters for s in stages if s.on_run_curve)
        on = "+".join(s.name for s in stages if s.on_run_curve)
        if t.lr_decay_iters > curve:
            return [f"train.lr_decay_iters ({t.lr_decay_iters}) is longer than the run's LR curve ({curve} "
                    f"iterations of stages {on}): the LR would never reach train.min_lr"]
        if t.lr_warmup_iters >= curve:
            return [f"train.lr_warmup_iters ({t.lr_warmup_iters}) is not shorter than the run's LR curve ({curve} "
                    f"iterations of stages {on}): the LR would never reach train.lr"]
        where = f"train (the LR curve over stages {on})"
    elif t.lr_warmup_iters > t.train_iters:
        return [f"{where}: lr_warmup_iters ({t.lr_warmup_iters}) is longer than the stage "
                f"(train_iters {t.train_iters}): the LR would never reach train.lr"]
    try:
        scheduler_kwargs(t)
    except ValueError as e:
        return [f"{where}: {e}"]
    return []


def _phases(cfg: RunConfig, problems: list[str]):
    """The curriculum, or None when there is none to read (mock data; a missing path, which `check_run_inputs` /
    preflight reports; an invalid file, added to `problems`)."""
    from data_pipeline.curriculum import CurriculumError, load_curriculum

    if cfg.data.mock or not cfg.data.curriculum or not Path(cfg.data.curriculum).is_file():
        return None
    try:
        return load_curriculum(cfg.data.curriculum)
    except CurriculumError as e:
        problems.append(f"data.curriculum: {e}")
        return None


def _stages(cfg: RunConfig, problems: list[str]) -> list[Stage]:
    if not cfg.stages:
        return [Stage(0, "main", None, cfg.train, cfg.parallel, cfg.precision, (cfg.train.seq_length,),
                      performance=cfg.performance, gpus=cfg.cluster.gpus)]
    cur = _phases(cfg, problems)
    span_run = cfg.train.lr_schedule_span == "run"
    curve_iters = sum(s.train_iters for s in cfg.stages if not s.own_lr_schedule) if span_run else 0
    out, offset = [], 0
    for i, s in enumerate(cfg.stages):
        where = f"stages.{i} ({s.name})"
        on_curve = span_run and not s.own_lr_schedule
        if on_curve:
            own = [k for k in _LR_FIELDS if getattr(s, k) is not None]
            if own:
                problems.append(f"{where}: sets {', '.join(own)} but follows the run's LR curve "
                                f"(train.lr_schedule_span=run); set own_lr_schedule: true to give it its own "
                                f"schedule, or set them in train")
                continue
        elif s.own_lr_schedule and not span_run:
            problems.append(f"{where}.own_lr_schedule: only means something with train.lr_schedule_span=run "
                            f"(every stage has its own schedule with span 'stage')")
        fields = cfg.train.model_dump()
        fields["train_iters"] = s.train_iters
        # A stage's decay is measured within the stage; on the run's curve, over the whole curve.
        fields["lr_decay_iters"] = (cfg.train.lr_decay_iters or curve_iters) if on_curve else None
        for k in _INHERITED:
            v = getattr(s, k)
            if v is not None:
                fields[k] = v
        lengths = _batch_from_phase(cfg, cur, s, i, fields, problems)
        if s.lr_decay_style is not None and s.lr_decay_style != "WSD" and s.lr_wsd_decay_iters is None:
            fields["lr_wsd_decay_iters"] = None
        try:
            train = TrainConfig(**fields)
        except Exception as e:  # name the stage: the run's train section was valid on its own
            problems.append(f"{where}: {e}")
            continue
        out.append(Stage(i, s.name, s.phase, train, s.parallel or cfg.parallel, s.precision or cfg.precision,
                         lengths, offset if on_curve else 0, on_curve, s.performance or cfg.performance,
                         s.gpus or cfg.cluster.gpus))
        if on_curve:
            offset += s.train_iters
    return out


def _batch_from_phase(cfg: RunConfig, cur, s, i: int, fields: dict, problems: list[str]) -> tuple[int, ...]:
    """The stage's global batch and sequence lengths: its phase's (the curriculum is their one source of truth),
    else the stage's or the run's. Writes `fields` and returns the lengths."""
    where = f"stages.{i} ({s.name})"
    lengths = s.seq_length if isinstance(s.seq_length, list) else [fields["seq_length"]]
    if cur is not None and s.phase is not None:
        try:
            ph = cur.phase(s.phase)
        except Exception as e:
            problems.append(f"{where}.phase: {e}")
            return tuple(lengths)
        if s.global_batch_size is not None and ph.global_batch_size not in (None, s.global_batch_size):
            problems.append(f"{where}.global_batch_size: {s.global_batch_size} disagrees with curriculum phase "
                            f"{ph.name!r} ({ph.global_batch_size}); set the batch in one place (the curriculum)")
        if s.seq_length is not None and list(ph.seq_lengths) != (s.seq_length if isinstance(s.seq_length, list)
                                                                  else [s.seq_length]):
            problems.append(f"{where}.seq_length: {s.seq_length} disagrees with curriculum phase {ph.name!r} "
                            f"({ph.seq_length}); set the sequence length in one place (the curriculum)")
        if ph.global_batch_size is not None:
            fields["global_batch_size"] = ph.global_batch_size
        lengths = list(ph.seq_lengths)
    fields["seq_length"] = lengths[0]
    return tuple(lengths)


# ----------------------------------------------------------------------------------------------------------
# What the run reads, checked before any process group exists

def stage_names(cfg: RunConfig) -> list[str]:
    return [s.name for s in cfg.stages] or ["main"]


def check_run_inputs(cfg: RunConfig) -> None:
    """Every path the run reads exists, as a ConfigError naming the field: the data (unless data.mock), the
    tokenizer, and `checkpoint.load`, which must hold a checkpoint of one of the run's stages (else the run
    would train from scratch and exit 0 while the user thinks it resumed)."""
    problems = data_problems(cfg) + load_problems(cfg)
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))


def data_problems(cfg: RunConfig) -> list[str]:
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


def load_problems(cfg: RunConfig) -> list[str]:
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
