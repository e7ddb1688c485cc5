"""The one run-config schema: model, parallel layout, precision, data, training (optimizer + LR), stages,
checkpoint and logging, as typed pydantic models with commented defaults.

Loading order: YAML file -> dotted overrides (`train.lr=3e-4 parallel.tp=2`) -> preset expansion -> validation.
Every error names the field (dotted path) and, for unknown keys, the allowed ones; nothing starts before it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.config import ModelConfig
from model.fielddocs import documented
from model.precision import PrecisionConfig
from model.presets import preset_fields
from parallel.layout import ParallelLayout


class ConfigError(ValueError):
    """A bad run config; the message names every offending field."""


class _Section(BaseModel):
    # allow_inf_nan=False: `train.lr=inf` (or nan) is a config error, not a run that diverges at step 1.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


@documented
class DataConfig(_Section):
    """Where training data comes from: shards, curriculum and tokenizer (or synthetic tokens)."""

    # Directory of webdataset shards + manifests written by `foldtron shards`.
    shards_dir: Optional[str] = None
    # Curriculum YAML (phases, token budgets, batch, sequence lengths, blend weights); a relative path in a config
    # file is relative to that file (so a plan ships beside its run config). Stages take their batch and sequence
    # length from their phase: the curriculum is the one place they are set.
    curriculum: Optional[str] = None
    # tokenizer.json (HF tokenizers); None: token ids are taken as they are in the shards.
    tokenizer: Optional[str] = None
    seed: int = 1234  # the global sample order is a pure function of (seed, phase, global sample index)
    num_workers: int = Field(1, ge=0)  # prefetch worker processes per rank
    # Synthetic data for smoke tests when no shards exist: random tokens with a learnable pattern.
    mock: bool = False


@documented
class TrainConfig(_Section):
    """Optimizer, LR schedule and batch: Megatron-LM argument names."""

    seq_length: int = Field(256, ge=1)  # tokens per sample (packed)
    micro_batch_size: int = Field(1, ge=1)  # samples per forward pass per data-parallel rank
    global_batch_size: int = Field(8, ge=1)  # samples per optimizer step, over all data-parallel ranks
    train_iters: int = Field(100, ge=0)  # optimizer steps of the run (a stage sets its own)
    seed: int = 1234  # model init and dropout RNG (tracker seeds per TP rank from it)
    # AdamW (Nemotron 3: beta 0.9/0.95, eps 1e-8, wd 0.1), FP32 master weights and states.
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)  # 0 disables clipping
    # LR schedule: warmup, then constant / cosine / linear / WSD (warmup-stable-decay).
    lr_warmup_iters: int = Field(0, ge=0)
    lr_decay_style: Literal["constant", "cosine", "linear", "WSD"] = "cosine"
    lr_decay_iters: Optional[int] = Field(None, ge=1)  # None: train_iters
    lr_wsd_decay_style: Literal["minus_sqrt", "cosine", "linear", "exponential"] = "minus_sqrt"
    lr_wsd_decay_iters: Optional[int] = Field(None, ge=1)  # length of the final decay window of WSD
    # What the schedule's iterations count: `stage` (each stage has its own warmup and decay, counted from its first
    # step) or `run` (one curve over every stage without own_lr_schedule, of which each stage is a window: a decay
    # may cross a phase boundary, as Nano's last-5T decay does; lr_decay_iters defaults to those stages' total).
    lr_schedule_span: Literal["stage", "run"] = "stage"
    # Abort after this many consecutive skipped (NaN/Inf) updates.
    max_consecutive_nan_skips: int = Field(5, ge=1)
    # Stop cleanly (save, exit for requeue) after this many minutes of wall time; None: no limit.
    exit_duration_in_mins: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.lr_decay_style == "WSD" and self.lr_wsd_decay_iters is None:
            raise ValueError("train.lr_decay_style=WSD needs train.lr_wsd_decay_iters (the decay window)")
        return self


@documented
class PerformanceConfig(_Section):
    """GPU performance settings. `None` means: on for the GPU backends (te, local), off on the cpu backend, where
    gloo has nothing to overlap with."""

    overlap_grad_reduce: Optional[bool] = None  # DDP reduces each gradient bucket while backward continues
    overlap_param_gather: Optional[bool] = None  # distributed optimizer: all-gather next parameters during forward
    tp_comm_overlap: bool = False  # TE userbuffers overlap of TP all-gather/reduce-scatter with GEMMs (te only)
    # The planner's recompute options (foldtron plan ranks them): none | selective (norms, expert activation, core
    # attention: Megatron recompute_modules) | full (each layer recomputed from its input).
    recompute: Literal["none", "selective", "full"] = "none"

    def resolved(self, backend: str) -> dict:
        """The settings for `backend`, `None`s decided."""
        gpu = backend in ("te", "local")
        if self.tp_comm_overlap and backend != "te":
            raise ValueError(f"performance.tp_comm_overlap needs the te backend (Transformer Engine userbuffers); "
                             f"this run's backend is {backend}")
        return {"overlap_grad_reduce": gpu if self.overlap_grad_reduce is None else self.overlap_grad_reduce,
                "overlap_param_gather": gpu if self.overlap_param_gather is None else self.overlap_param_gather,
                "tp_comm_overlap": self.tp_comm_overlap, "recompute": self.recompute}


@documented
class StageConfig(_Section):
    """One stage of the schedule (phase 1, phase 2, long context); unset fields inherit the run's."""

    name: str  # the stage's name: its checkpoints live in <checkpoint.save>/<name>
    phase: Optional[str] = None  # curriculum phase this stage draws from
    train_iters: int = Field(..., ge=1)  # optimizer steps of this stage
    # None: the curriculum phase's, else train.seq_length. A list alternates per global batch (Super's long-context
    # stage 2: [1048576, 4096]); tokens are counted as trained. A value that disagrees with the phase is an error.
    seq_length: Optional[Union[int, list[int]]] = None
    micro_batch_size: Optional[int] = Field(None, ge=1)  # None: train.micro_batch_size
    # None: the curriculum phase's, else train.global_batch_size; a value that disagrees with the phase is an error.
    global_batch_size: Optional[int] = Field(None, ge=1)
    lr: Optional[float] = Field(None, gt=0)  # None: train.lr
    min_lr: Optional[float] = Field(None, ge=0)  # None: train.min_lr
    lr_warmup_iters: Optional[int] = Field(None, ge=0)  # None: train.lr_warmup_iters
    lr_decay_style: Optional[Literal["constant", "cosine", "linear", "WSD"]] = None  # None: train.lr_decay_style
    lr_wsd_decay_iters: Optional[int] = Field(None, ge=1)  # None: train.lr_wsd_decay_iters
    lr_wsd_decay_style: Optional[Literal["minus_sqrt", "cosine", "linear", "exponential"]] = None  # None: train's
    parallel: Optional[ParallelLayout] = None  # e.g. CP for long context
    precision: Optional[PrecisionConfig] = None  # None: the run's precision section
    # With train.lr_schedule_span=run: this stage leaves the run's LR curve and has its own schedule (its lr, min_lr,
    # warmup and decay fields, counted from its first step), e.g. long context at a constant LR. Without it, a stage
    # on the run's curve may not set LR fields (they would be ignored).
    own_lr_schedule: bool = False
    # Recompute / overlap for this stage (long context needs more recompute than phase 1); None: the run's.
    performance: Optional[PerformanceConfig] = None
    # GPUs (ranks) this stage is planned for; a job of another size is refused at the stage's start, and
    # `foldtron preflight` checks memory on it. None: cluster.gpus (or whatever the job has).
    gpus: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        lengths = self.seq_length if isinstance(self.seq_length, list) else [self.seq_length or 1]
        if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"seq_length must be a positive integer or a non-empty list of them, got "
                             f"{self.seq_length!r}")
        return self


@documented
class MergeConfig(_Section):
    """Checkpoint merging on a token schedule (pretrain/merge.py; `foldtron merge-checkpoints` by hand): after a save
    that crosses a multiple of every_tokens, the stage's checkpoints inside the window (or its last K) are averaged
    into <save>/merged/<stage>/iter_N (N: the newest's iteration; resumable with checkpoint.load=<save>/merged).
    Token counts take K/M/B/T suffixes ("500B")."""

    # Merge after the first save at or past each multiple of this many consumed tokens (the run's count); None: no
    # scheduled merges (Nemotron 3 Super: 500B during its stable phase).
    every_tokens: Optional[int] = Field(None, ge=1)
    # Average the stage's checkpoints whose consumed tokens lie in (T - window_tokens, T], T the newest's; keep_last
    # must keep them all (checked by merge_problems / foldtron preflight).
    window_tokens: Optional[int] = Field(None, ge=1)
    last: Optional[int] = Field(None, ge=2)  # instead of a window: average the newest `last` checkpoints
    stages: Optional[list[str]] = None  # stages whose saves are merged (e.g. the stable phase); None: every stage
    keep_last: Optional[int] = Field(None, ge=1)  # merge outputs kept per stage (older ones deleted); None: all

    @field_validator("every_tokens", "window_tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        from data_pipeline.curriculum import parse_tokens

        return v if v is None else parse_tokens(v)

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if self.every_tokens is not None and (self.window_tokens is None) == (self.last is None):
            raise ValueError("checkpoint.merge: with every_tokens, set exactly one of window_tokens and last (what "
                             "a merge averages)")
        return self


@documented
class CheckpointConfig(_Section):
    """Where checkpoints are written and read, how often, and how many are kept."""

    save: Optional[str] = None  # run directory for checkpoints; None: no checkpoints
    load: Optional[str] = None  # resume from here (default: `save` when it holds a checkpoint)
    save_interval: int = Field(100, ge=1)  # iterations between checkpoints (and at each stage's end)
    keep_last: int = Field(2, ge=1)  # older checkpoints are deleted after a successful save
    # Exit code for "saved on a signal, requeue me" (Slurm chains read it; see examples/slurm).
    requeue_exit_code: int = Field(3, ge=1, le=255)
    merge: MergeConfig = Field(default_factory=MergeConfig)  # averaged checkpoints on a token schedule


@documented
class LoggingConfig(_Section):
    """Stdout and TensorBoard logging."""

    log_interval: int = Field(1, ge=1)  # iterations between stdout/TensorBoard lines
    tensorboard_dir: Optional[str] = None  # TensorBoard event files; None: no TensorBoard
    log_moe_expert_load: bool = True  # log max/mean tokens per expert for every MoE layer
    # Peak TFLOP/s per device for 'mfu'; None: datasheet BF16 peak of known GPUs, else a measured GEMM peak (CPU).
    peak_tflops_per_device: Optional[float] = Field(None, gt=0)


@documented
class ClusterConfig(_Section):
    """The cluster the run is planned for: what `foldtron preflight` checks memory on, and (gpus) the job size
    training expects, so a stage is not started on a job its layout was not planned for."""

    gpus: Optional[int] = Field(None, ge=1)  # GPUs (ranks) of the job; None: any (tests, laptops)
    gpu: Optional[str] = None  # GPU kind for memory and step-time estimates: h100, h200, b200, gb200



@documented
class RunConfig(_Section):
    """One run: model, layout, precision, data, schedule (stages), checkpoints and logging."""

    backend: Literal["auto", "te", "local", "cpu"] = Field(
        "auto", description="compute backend: te (Transformer Engine on CUDA), local (Megatron-Core local layers "
        "on CUDA, mamba-ssm kernels when present), cpu (gloo; tests, laptops); auto picks te > local > cpu by what "
        "imports. A backend that is not installed is an error before any process group.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelLayout = Field(default_factory=ParallelLayout)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageConfig] = Field(default_factory=list)  # the schedule in order; empty: one stage from `train`
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stages: duplicate stage names {dup}; each stage needs its own name")
        return self


# ----------------------------------------------------------------------------------------------------------
# Loading, overrides, errors

def _parse_value(text: str) -> Any:
    """A CLI override value is read as YAML: `3e-4` -> float, `true` -> bool, `[1,2]` -> list, `null` -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict; a list element is addressed by index (`stages.0.lr`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. train.lr=3e-4)")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} is not an index of a {len(node)}-element list")
                node = node[int(part)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {last} is not an index of a {len(node)}-element list")
            node[int(last)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
    return raw


def _expand_preset(raw: dict) -> dict:
    """`model: {preset: nano-30b-a3b, hidden_size: ...}` -> the preset's fields, then the explicit ones."""
    model = raw.get("model")
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        try:
            fields = preset_fields(str(name))
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from None
        fields.update(model)
        raw = dict(raw, model=fields)
    return raw


def _section_class(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic class that holds the field at `loc` (to list allowed keys for an unknown one)."""
    cls: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            inner = getattr(cand, "__args__", ())
            for c in inner + (cand,):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    cls = c
                    break
            else:
                continue
            break
        else:
            return None
    return cls


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        where = ".".join(str(x) for x in loc) or "config"
        if e["type"] == "extra_forbidden":
            cls = _section_class(loc)
            allowed = ", ".join(sorted(cls.model_fields)) if cls is not None else "?"
            lines.append(f"{where}: unknown key; allowed keys here: {allowed}")
        elif e["type"] == "literal_error":
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(msg if where in ("config", "model") or msg.startswith(where.split(".")[0]) else f"{where}: {msg}")
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid run config:\n  " + "\n  ".join(lines)


def build_config(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(_expand_preset(raw))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


#: Paths that, written relative in a config file, are read relative to that file: a plan ships beside its config.
#: (On the command line, `data.curriculum=...` is relative to the working directory, as every shell path is.)
_FILE_RELATIVE = (("data", "curriculum"),)


def _relative_to_file(raw: dict, path: Path) -> dict:
    for section, key in _FILE_RELATIVE:
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            raw = dict(raw, **{section: dict(raw[section], **{key: str(path.parent / value)})})
    return raw


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML run config (or start from the defaults), apply dotted overrides, validate."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    if path is not None:
        raw = _relative_to_file(raw, Path(path))
    raw = apply_overrides(raw, list(overrides or []))
    return build_config(raw)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False, width=120)
