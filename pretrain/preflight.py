"""Preflight: everything about a run that can be known before it starts, checked at once.

A 25T-token run that learns of a misnamed phase, a batch its layout cannot split or a long-context stage that
does not fit in HBM when it gets there has wasted months. Every check below is a pure function of the config,
the curriculum, the shards' manifests and the declared cluster, so it runs on a login node in seconds, lists
*every* problem (each naming its stage and field), and `foldtron train` runs the same checks (`check_before_run`)
for all stages before the first step:

- stages: batches and sequence lengths from their curriculum phase (disagreements are errors), LR schedules
  as Megatron's scheduler takes them, one run-wide LR curve that fits the run (`pretrain.stages`);
- curriculum: every stage's phase exists; each stage's tokens (steps x batch x sequence, each batch at its own
  length) match its phase's budget within one batch, and the phase holds the stage's steps;
- data: the manifests exist and hold every source of every phase; epochs per source over the run (the curriculum's
  `max_epochs` refuses over-repetition); the tokenizer exists and fits the vocabulary;
- layout: each stage's layout against the model, its job size and its batch, for every sequence length it trains
  (`ParallelLayout.problems`, the validation training uses) plus the planner's NVLink-domain rule;
- memory: per GPU per stage, the planner's model (`parallel/memory.py`) with the stage's recompute and precision
  on the declared GPU; a stage over HBM says which recompute setting would fit;
- precision: the stage's recipe exists on the declared GPU (NVFP4/MXFP8 need Blackwell);
- checkpoint merging: the merge schedule fits the run (`pretrain.merge.merge_problems`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pretrain.config import ConfigError, RunConfig
from pretrain.stages import Stage, _where, data_problems, load_problems, stages_and_problems


@dataclass
class StageCheck:
    """What preflight found out about one stage (printed as one row, and in the JSON)."""

    index: int
    name: str
    phase: Optional[str]
    gpus: Optional[int]
    layout: str
    global_batch_size: int
    seq_lengths: tuple[int, ...]
    train_iters: int
    tokens: int
    phase_tokens: Optional[int] = None
    phase_batches: Optional[int] = None
    lr_first: Optional[float] = None
    lr_last: Optional[float] = None
    memory_gib: Optional[float] = None  # planner estimate per GPU (the stage's longest sequence)
    hbm_gib: Optional[float] = None
    recompute: Optional[str] = None


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    stages: list[StageCheck] = field(default_factory=list)
    epochs: dict[str, float] = field(default_factory=dict)  # source -> passes over its data by the run's end
    plan_text: str = ""  # the curriculum plan per phase and source (with manifests: epochs)
    resolved: list[Stage] = field(default_factory=list)  # the stages, when their schedules are valid (for plot_lr)

    @property
    def ok(self) -> bool:
        return not self.problems


def preflight(cfg: RunConfig, *, gpus: Optional[int] = None, gpu: Optional[str] = None, data: bool = True,
              memory: bool = True) -> Report:
    """Check the run `cfg` whole. `gpus` / `gpu` stand for the cluster where the config declares none (a stage's
    own `gpus` wins: Super's long-context stages run on a job of another size). `data=False` skips what needs
    the data mounted (shards, tokenizer: a login node without /data); `memory=False` skips the planner."""
    rep = Report()
    stages, problems = stages_and_problems(cfg)
    rep.problems += problems
    rep.resolved = [] if problems else stages
    cur = _curriculum(cfg, rep)
    manifests = _manifests(cfg, rep) if data else None
    if not data:
        rep.notes.append("data: not checked (--no-data): shards, manifests, epochs per source and the tokenizer")
    else:
        rep.problems += [p for p in data_problems(cfg) if not p.startswith("data.curriculum")]
        rep.problems += load_problems(cfg)
    plans = _plans(cfg, cur, stages, manifests, rep)
    kind = cfg.cluster.gpu or gpu
    spec = None
    if kind is not None:
        from parallel.gpus import get_gpu

        try:
            spec = get_gpu(kind)
        except ValueError as e:
            rep.problems.append(f"cluster.gpu: {e}")
    lr = _lr_points(stages)
    for st in stages:
        row = _stage_row(cfg, st, gpus, lr)
        rep.stages.append(row)
        _check_budget(cfg, st, cur, plans, row, rep)
        _check_layout(cfg, st, row, spec, memory, rep)
    from pretrain.merge import merge_problems

    rep.problems += merge_problems(cfg)
    return rep


# ------------------------------------------------------------------------------------------------------------
# Curriculum and data

def _curriculum(cfg: RunConfig, rep: Report):
    from data_pipeline.curriculum import CurriculumError, load_curriculum

    if cfg.data.mock:
        rep.notes.append("data: synthetic (data.mock): no curriculum, shards or tokenizer to check")
        return None
    if not cfg.data.curriculum:
        rep.problems.append("data.curriculum is not set: the loader needs the curriculum YAML naming the phases")
        return None
    if not Path(cfg.data.curriculum).is_file():
        rep.problems.append(f"data.curriculum: curriculum file {cfg.data.curriculum} does not exist")
        return None
    try:
        return load_curriculum(cfg.data.curriculum)
    except CurriculumError:  # stages_and_problems read it first and listed the problem
        return None


def _manifests(cfg: RunConfig, rep: Report):
    from data_pipeline.manifest import ShardError, load_manifests

    if cfg.data.mock or not cfg.data.shards_dir:
        return None
    try:
        return load_manifests(cfg.data.shards_dir)
    except (ShardError, ValueError) as e:
        rep.problems.append(f"data.shards_dir: {e}")
        return None


def _plans(cfg: RunConfig, cur, stages: list[Stage], manifests, rep: Report) -> dict:
    """The curriculum's exact plan (with manifests: sources present, epochs), phase name -> PhasePlan."""
    from data_pipeline.curriculum import CurriculumError, format_plan, plan

    if cur is None:
        return {}
    try:
        plans = plan(cur, manifests, cfg.train.global_batch_size)
    except CurriculumError as e:
        rep.problems.append(f"data.curriculum: {e}")
        if manifests is None:
            return {}
        try:  # still plan without manifests, to check budgets
            plans = plan(cur, None, cfg.train.global_batch_size)
        except CurriculumError:
            return {}
        manifests = None
    rep.plan_text = format_plan(plans)
    if manifests is not None:
        for pp in plans:
            for sp in pp.sources.values():
                rep.epochs[sp.source] = max(rep.epochs.get(sp.source, 0.0), sp.epochs)
    used = {st.phase for st in stages if st.phase}
    unused = [p.name for p in plans if p.name not in used]
    if cfg.stages and unused:
        rep.notes.append(f"curriculum phases no stage trains: {unused}")
    return {p.name: p for p in plans}


def _check_budget(cfg: RunConfig, st: Stage, cur, plans: dict, row: StageCheck, rep: Report) -> None:
    """Steps x batch x sequence against the phase's token budget, within one batch either way; and the phase
    must hold the stage's steps (the loader would run dry otherwise)."""
    if cur is None or not st.phase or st.phase not in plans:
        return
    pp = plans[st.phase]
    budget = cur.phase(st.phase).tokens
    row.phase_tokens, row.phase_batches = budget, pp.batches
    where = _where(cfg, st)
    if st.train.train_iters > pp.batches:
        rep.problems.append(
            f"{where}.train_iters: {st.train.train_iters} steps but curriculum phase {pp.name!r} holds "
            f"{pp.batches} global batches ({pp.tokens:,} tokens): the data would run out; set train_iters to "
            f"{pp.batches} or raise the phase's tokens")
        return
    one_batch = st.train.global_batch_size * max(st.lengths)
    if abs(row.tokens - budget) >= one_batch:
        rep.problems.append(
            f"{where}.train_iters: {st.train.train_iters} steps train {row.tokens:,} tokens but curriculum phase "
            f"{pp.name!r} budgets {budget:,} ({pp.batches} batches of {st.train.global_batch_size} x "
            f"{'/'.join(map(str, st.lengths))}): more than one batch apart; set train_iters to {pp.batches}")


# ------------------------------------------------------------------------------------------------------------
# Layout, memory, precision

def _stage_row(cfg: RunConfig, st: Stage, gpus: Optional[int], lr: dict) -> StageCheck:
    L = st.parallel
    layout = f"tp{L.tp} cp{L.cp} pp{L.pp}{f' vpp{L.vpp}' if L.vpp else ''} ep{L.ep} etp{L.etp}" + (
        " sp" if L.sequence_parallel else "")
    first, last = lr.get(st.index, (None, None))
    return StageCheck(st.index, st.name, st.phase, st.gpus or gpus, layout, st.train.global_batch_size,
                      st.lengths, st.train.train_iters, st.tokens(st.train.train_iters), lr_first=first, lr_last=last)


def _check_layout(cfg: RunConfig, st: Stage, row: StageCheck, spec, memory: bool, rep: Report) -> None:
    where, t = _where(cfg, st), st.train
    world = row.gpus
    if world is None:
        if not any("cluster.gpus" in n for n in rep.notes):
            rep.notes.append("layout and memory: not checked (no cluster.gpus, stage gpus or --gpus)")
        return
    from parallel.planner import layout_problems

    seen = set()
    for seq in st.lengths:
        for p in layout_problems(cfg.model, st.parallel, world, seq, t.micro_batch_size, t.global_batch_size, spec):
            if p not in seen:
                seen.add(p)
                rep.problems.append(f"{where}.parallel (on {world} GPUs, seq_length {seq}): {p}")
    if seen or spec is None:
        if spec is None and not any("cluster.gpu " in n for n in rep.notes):
            rep.notes.append("memory and precision: not checked (no cluster.gpu or --gpu)")
        return
    fmts = {st.precision.recipe} - {"fp32"}
    for fmt in sorted(fmts):
        try:
            spec.peak_tflops(fmt)
        except ValueError as e:
            rep.problems.append(f"{where}.precision.recipe: {e}")
            return
    if memory:
        _check_memory(cfg, st, row, spec, world, rep)


def _check_memory(cfg: RunConfig, st: Stage, row: StageCheck, spec, world: int, rep: Report) -> None:
    from parallel.memory import GiB, MemoryOptions, fits, memory_per_gpu
    from parallel.planner import RECOMPUTE_ORDER

    where, t = _where(cfg, st), st.train
    rc = (st.performance or cfg.performance).recompute
    seq = max(st.lengths)

    def need(recompute: str):
        opts = MemoryOptions(seq_length=seq, micro_batch_size=t.micro_batch_size,
                             global_batch_size=t.global_batch_size, recompute=recompute, precision=st.precision)
        return memory_per_gpu(cfg.model, st.parallel, world, opts), opts.reserved_gib

    mem, reserved = need(rc)
    row.memory_gib, row.hbm_gib, row.recompute = mem.total / GiB, spec.hbm_gb * 1e9 / GiB, rc
    if fits(mem, spec.hbm_gb, reserved):
        return
    better = [(r, m) for r in RECOMPUTE_ORDER if r != rc for m in [need(r)[0]] if fits(m, spec.hbm_gb, reserved)]
    hint = (f"; performance.recompute={better[0][0]} would fit ({better[0][1].total / GiB:.1f} GiB)" if better
            else "; no recompute setting fits: more model parallelism (tp/cp/pp/ep) or a larger GPU")
    field = f"stages.{st.index}.performance.recompute" if cfg.stages else "performance.recompute"
    rep.problems.append(f"{where}: memory: {mem.total / GiB:.1f} GiB + {reserved:.0f} GiB reserved per GPU at "
                        f"seq_length {seq} with recompute={rc} ({field}), over {spec.name}'s "
                        f"{spec.hbm_gb * 1e9 / GiB:.1f} GiB{hint}")


# ------------------------------------------------------------------------------------------------------------
# The LR curve over the whole run

def _lr_points(stages: list[Stage], per_stage: int = 400) -> dict:
    """(first, last) LR of each stage, from Megatron's scheduler (stages whose schedule is invalid are skipped:
    their problem is already listed)."""
    out = {}
    for st in stages:
        try:
            _, ys = lr_samples(st, 2)
        except (ValueError, AssertionError):
            continue
        out[st.index] = (ys[0], ys[-1])
    return out


def lr_samples(st: Stage, n: int = 400) -> tuple[list[int], list[float]]:
    """`n` (iteration, LR) points spread over the stage, its first and last step included."""
    from pretrain.schedules import lr_at

    iters = st.train.train_iters
    steps = sorted({round(i * (iters - 1) / max(n - 1, 1)) for i in range(n)})
    return steps, lr_at(st.train, steps, st.lr_offset)


def plot_lr(cfg: RunConfig, stages: list[Stage], path: str | Path) -> Path:
    """The LR over the whole run against tokens seen, one colour per stage, each labelled with its tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_pipeline.curriculum import _fmt

    total = sum(st.tokens(st.train.train_iters) for st in stages) or 1
    scale, unit = next((f, u) for f, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                       if total >= 10 * f or f == 1)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    start = 0
    cmap = plt.get_cmap("tab10")
    for k, st in enumerate(stages):
        steps, lrs = lr_samples(st)
        tokens = st.tokens(st.train.train_iters)
        # step i trains the tokens between tokens(i) and tokens(i+1) at its LR: a step line to the stage's end
        xs = [(start + st.tokens(i)) / scale for i in steps] + [(start + tokens) / scale]
        lrs = lrs + lrs[-1:]
        ax.plot(xs, lrs, color=cmap(k % 10), lw=1.6, drawstyle="steps-post", label=f"{st.name}: {_fmt(tokens)} tokens, "
                                                          f"{st.train.train_iters:,} steps")
        ax.axvline(start / scale, color="k", lw=0.6, ls="--")
        ax.annotate(st.name, (start / scale, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                    ha="right", fontsize=8)
        start += tokens
    ax.set_xlabel(f"tokens seen ({unit})")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, total / scale)
    ax.set_title("LR over the run (Megatron-Core OptimizerParamScheduler, per stage as training builds it)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------------------------
# Output, and the check `foldtron train` runs

def format_report(cfg: RunConfig, rep: Report) -> str:
    from data_pipeline.curriculum import _fmt

    lines = [f"{'stage':<16}{'phase':<10}{'gpus':>6}  {'layout':<30}{'batch':>6}  {'seq':<14}{'steps':>9}"
             f"{'tokens':>9}{'phase':>9}{'LR first→last':>22}{'GiB/GPU':>14}"]
    for r in rep.stages:
        mem = "-" if r.memory_gib is None else f"{r.memory_gib:.0f}/{r.hbm_gib:.0f}"
        lr = "-" if r.lr_first is None else f"{r.lr_first:.3g}→{r.lr_last:.3g}"
        lines.append(f"{r.name:<16}{(r.phase or '-'):<10}{(r.gpus or '-')!s:>6}  {r.layout:<30}{r.global_batch_size:>6}  "
                     f"{'/'.join(map(str, r.seq_lengths)):<14}{r.train_iters:>9,}{_fmt(r.tokens):>9}"
                     f"{(_fmt(r.phase_tokens) if r.phase_tokens else '-'):>9}{lr:>22}{mem:>14}")
    total = sum(r.tokens for r in rep.stages)
    lines.append(f"total: {_fmt(total)} tokens, {sum(r.train_iters for r in rep.stages):,} steps in "
                 f"{len(rep.stages)} stages")
    if rep.epochs:
        worst = sorted(rep.epochs.items(), key=lambda kv: -kv[1])
        lines.append("epochs per source by the run's end: " + ", ".join(f"{s} {e:.2f}" for s, e in worst))
    for n in rep.notes:
        lines.append(f"note: {n}")
    if rep.problems:
        lines.append(f"{len(rep.problems)} problem(s):")
        lines += [f"  - {p}" for p in rep.problems]
    else:
        lines.append("preflight: OK")
    return "\n".join(lines)


def check_before_run(cfg: RunConfig, world_size: int) -> None:
    """What `foldtron train` checks for every stage before its first step: the same checks as preflight (data,
    budgets, layouts at each stage's job size: its planned `gpus`, else this job's) without the memory model,
    which estimates and should not block a run on a machine it was not made for."""
    rep = preflight(cfg, gpus=world_size, memory=False)
    if rep.problems:
        raise ConfigError("preflight found problems before the first step (`foldtron preflight` lists the same):"
                          "\n  " + "\n  ".join(rep.problems))


def json_report(rep: Report) -> dict:
    from dataclasses import asdict

    return {"ok": rep.ok, "problems": rep.problems, "notes": rep.notes,
            "stages": [asdict(r) for r in rep.stages],
            "epochs": {k: (None if math.isnan(v) else v) for k, v in rep.epochs.items()}}
