"""Curriculum: phases with token budgets, sequence lengths and blend weights, and the exact plan they imply.

A curriculum YAML (examples/configs/curriculum/*.yaml):

    name: nano-25t
    max_epochs: null          # refuse a plan that repeats any source more often; null: report only
    phases:
      - name: phase1
        tokens: 23.5T         # token budget (plain numbers or K/M/B/T suffixes)
        seq_length: 8192      # or a list, cycled per global batch: [1048576, 4096] alternates 1M and 4K
        global_batch_size: 3072   # samples per optimizer step; optional (the loader's argument otherwise)
        blend: {cc_synth_hq: 14.9, pdfs: 6.1, code: 14}   # weights, normalized per phase
      - name: long
        tokens: 34B
        seq_length: 1048576
        blend: {"phase:phase2": 0.8, long_docs: 0.2}      # 80% phase 2's blend + 20% one source

Why the plan is exact: every global batch gets `floor(w*G)` or `ceil(w*G)` samples of each source
(`BlendSchedule`: largest accumulated remainder first), so the blend holds per step, not just on average,
and the cumulative count never drifts by a sample. Each source is one endless token stream (epochs of
shuffled shards); each phase continues where the previous phase stopped reading it, so phase 2 sees new
documents before any repeats. Both follow from integers in the plan, so any rank, any DP size, any restart
computes the same numbers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PHASE_REF = "phase:"
_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


class CurriculumError(ValueError):
    """A curriculum that cannot be planned; the message names the phase and the source or field."""


def parse_tokens(value: Union[int, float, str]) -> int:
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMBGT]?)\s*", value)
        if not m:
            raise ValueError(f"token count {value!r}: use a number with an optional K/M/B/T suffix")
        return int(round(float(m.group(1)) * _SUFFIX.get(m.group(2), 1)))
    return int(round(value))


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    tokens: int = Field(gt=0)  # budget: the phase runs ceil(tokens / tokens per batch) global batches
    seq_length: Union[int, list[int]] = 8192  # a list cycles per global batch (alternating 1M/4K stages)
    global_batch_size: Optional[int] = Field(None, ge=1)  # None: the loader's / run config's value
    blend: dict[str, float]  # source (or "phase:<name>") -> non-negative weight

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v):
        return parse_tokens(v)

    @field_validator("seq_length")
    @classmethod
    def _seq(cls, v):
        lengths = v if isinstance(v, list) else [v]
        if not lengths or any(s < 1 for s in lengths):
            raise ValueError("seq_length must be a positive integer or a non-empty list of them")
        return v

    @field_validator("blend")
    @classmethod
    def _blend(cls, v):
        if not v:
            raise ValueError("blend is empty: name at least one source")
        bad = {k: w for k, w in v.items() if not (w >= 0 and math.isfinite(w))}
        if bad:
            raise ValueError(f"blend weights must be finite and >= 0, got {bad}")
        if sum(v.values()) <= 0:
            raise ValueError(f"blend weights sum to zero ({v})")
        return v

    @property
    def seq_lengths(self) -> list[int]:
        return list(self.seq_length) if isinstance(self.seq_length, list) else [self.seq_length]


class Curriculum(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "curriculum"
    max_epochs: Optional[float] = Field(None, gt=0)  # None: repeating a source is reported, not refused
    phases: list[Phase] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "Curriculum":
        names = [p.name for p in self.phases]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate phase names {dup}")
        for i, p in enumerate(self.phases):
            for key in p.blend:
                if key.startswith(PHASE_REF) and key[len(PHASE_REF):] not in names[:i]:
                    raise ValueError(f"phase {p.name!r}: blend entry {key!r} must name an earlier phase "
                                     f"(earlier: {names[:i]})")
        return self

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise CurriculumError(f"no phase {name!r} in curriculum {self.name!r} (phases: "
                              f"{[p.name for p in self.phases]})")

    def phase_index(self, name: str) -> int:
        return self.phases.index(self.phase(name))

    def weights(self, name: str) -> dict[str, Fraction]:
        """Normalized exact weights per source, `phase:` references expanded; sources sorted by name."""
        p = self.phase(name)
        total = sum(Fraction(str(w)) for w in p.blend.values())
        out: dict[str, Fraction] = {}
        for key, w in p.blend.items():
            share = Fraction(str(w)) / total
            if key.startswith(PHASE_REF):
                for s, ws in self.weights(key[len(PHASE_REF):]).items():
                    out[s] = out.get(s, Fraction(0)) + share * ws
            else:
                out[key] = out.get(key, Fraction(0)) + share
        return {s: out[s] for s in sorted(out) if out[s] > 0}


def load_curriculum(source: Union[str, Path, dict, Curriculum]) -> Curriculum:
    if isinstance(source, Curriculum):
        return source
    if isinstance(source, dict):
        raw, where = source, "curriculum"
    else:
        path = Path(source)
        if not path.is_file():
            raise CurriculumError(f"curriculum file {path} does not exist")
        raw, where = yaml.safe_load(path.read_text()), str(path)
    try:
        return Curriculum.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc']) or '<top>'}: {err['msg']}" for err in e.errors()]
        raise CurriculumError(f"{where}: " + "; ".join(lines)) from None


class BlendSchedule:
    """Per-global-batch source counts: floor(w*G) each, plus one for the R sources furthest behind their
    cumulative target. The carry (how far each source is behind) is a pure function of (batches done, samples
    drawn per source), which is exactly the loader's state, so a restart needs no replay."""

    def __init__(self, weights: dict[str, Fraction], global_batch_size: int):
        self.sources = list(weights)
        self.global_batch_size = g = int(global_batch_size)
        quotas = [Fraction(w) * g for w in weights.values()]
        self.den = math.lcm(*(q.denominator for q in quotas))
        self.num = [int(q * self.den) for q in quotas]  # quota_s = num_s / den samples per batch
        self.base = [n // self.den for n in self.num]
        self.extra = g - sum(self.base)
        if sum(self.num) != g * self.den:
            raise CurriculumError("blend weights do not sum to one after normalization")

    def counts(self, batches_done: int, drawn: list[int]) -> list[int]:
        """Samples of each source in global batch `batches_done`, given the samples drawn before it."""
        carry = [n * (batches_done + 1) - self.den * c for n, c in zip(self.num, drawn)]
        resid = [c - self.den * b for c, b in zip(carry, self.base)]
        order = sorted(range(len(resid)), key=lambda i: (-resid[i], i))
        out = list(self.base)
        for i in order[: self.extra]:
            out[i] += 1
        return out

    def totals(self, n_batches: int, seq_lengths: list[int]) -> tuple[list[int], list[int]]:
        """(samples, tokens) per source after `n_batches`; uses the schedule's period (it divides `den`)."""
        S, L = len(self.sources), len(seq_lengths)
        drawn, tokens = [0] * S, [0] * S
        b = 0
        period = None
        while b < n_batches:
            c = self.counts(b, drawn)
            for i in range(S):
                drawn[i] += c[i]
                tokens[i] += c[i] * seq_lengths[b % L]
            b += 1
            if period is None and b % L == 0 and all(n * b == self.den * d for n, d in zip(self.num, drawn)):
                period = b
                reps = (n_batches - b) // period
                drawn = [d * (reps + 1) for d in drawn]
                tokens = [t * (reps + 1) for t in tokens]
                b += reps * period
        return drawn, tokens


@dataclass
class SourcePlan:
    source: str
    weight: float
    samples: int  # windows drawn in this phase
    tokens: int  # tokens of those windows (each window is seq_length tokens + 1 look-ahead label)
    offset: int  # token position in the source's stream where this phase starts reading
    available: int  # tokens in the source's shards (0 when planned without manifests)

    @property
    def epochs(self) -> float:
        """Passes over the source's data by the end of this phase (cumulative over the run)."""
        return (self.offset + self.tokens) / self.available if self.available else float("nan")


@dataclass
class PhasePlan:
    name: str
    index: int
    batches: int
    global_batch_size: int
    seq_lengths: list[int]
    tokens: int
    sources: dict[str, SourcePlan] = field(default_factory=dict)
    weights: dict[str, Fraction] = field(default_factory=dict)


def batches_for(tokens: int, global_batch_size: int, seq_lengths: list[int]) -> int:
    per_cycle = global_batch_size * sum(seq_lengths)
    full, rest = divmod(tokens, per_cycle)
    n = full * len(seq_lengths)
    for s in seq_lengths:
        if rest <= 0:
            break
        rest -= global_batch_size * s
        n += 1
    return max(n, 1)


def plan(curriculum: Curriculum, manifests: Optional[dict] = None, global_batch_size: Optional[int] = None,
         allow_repeat: Optional[bool] = None) -> list[PhasePlan]:
    """The exact per-phase, per-source plan. `global_batch_size` is the fallback for phases that set none (a
    phase's own value wins: stages may change the batch, e.g. for long context). With manifests: unknown sources are refused, and sources read
    more than `max_epochs` times are refused (with the epochs shown in the error)."""
    curriculum = load_curriculum(curriculum)
    available = {s: m.tokens for s, m in (manifests or {}).items()}
    offsets: dict[str, int] = {}
    plans = []
    for i, p in enumerate(curriculum.phases):
        weights = curriculum.weights(p.name)
        if manifests is not None:
            unknown = sorted(set(weights) - set(available))
            if unknown:
                raise CurriculumError(f"phase {p.name!r}: sources {unknown} have no shards (known: "
                                      f"{sorted(available)})")
            empty = sorted(s for s in weights if available[s] == 0)
            if empty:
                raise CurriculumError(f"phase {p.name!r}: sources {empty} have zero tokens in their shards")
        g = p.global_batch_size or global_batch_size
        if g is None:
            raise CurriculumError(f"phase {p.name!r} has no global_batch_size: set it in the curriculum or "
                                  f"pass one (train.global_batch_size)")
        n = batches_for(p.tokens, g, p.seq_lengths)
        sched = BlendSchedule(weights, g)
        samples, toks = sched.totals(n, p.seq_lengths)
        pp = PhasePlan(p.name, i, n, g, p.seq_lengths, sum(toks), weights=weights)
        for s, c, t in zip(sched.sources, samples, toks):
            pp.sources[s] = SourcePlan(s, float(weights[s]), c, t, offsets.get(s, 0), available.get(s, 0))
            offsets[s] = offsets.get(s, 0) + t
        plans.append(pp)
    limit = curriculum.max_epochs
    if manifests is not None and limit is not None and allow_repeat is not True:
        over = [(pp.name, sp.source, sp.epochs) for pp in plans for sp in pp.sources.values() if sp.epochs > limit]
        if over:
            worst = ", ".join(f"{s} in {ph}: {e:.2f} epochs" for ph, s, e in over[:5])
            raise CurriculumError(f"curriculum {curriculum.name!r} repeats sources beyond max_epochs={limit}: "
                                  f"{worst}")
    return plans


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plans: list[PhasePlan]) -> str:
    lines = []
    for pp in plans:
        seq = "/".join(str(s) for s in pp.seq_lengths)
        lines.append(f"phase {pp.name}: {_fmt(pp.tokens)} tokens, {pp.batches} batches x {pp.global_batch_size} "
                     f"x seq {seq}")
        lines.append(f"  {'source':<28}{'weight':>8}{'tokens':>11}{'share':>8}{'epochs':>9}")
        for sp in pp.sources.values():
            ep = "-" if math.isnan(sp.epochs) else f"{sp.epochs:.2f}"
            lines.append(f"  {sp.source:<28}{sp.weight:>8.4f}{_fmt(sp.tokens):>11}"
                         f"{sp.tokens / pp.tokens:>8.1%}{ep:>9}")
    return "\n".join(lines)


def plot_plan(plans: list[PhasePlan], path: str | Path, title: str = "") -> Path:
    """Two panels: tokens per source stacked across the run (x: tokens seen, phases marked), and each
    phase's share per source on equal-width bars, so a 100B-token long-context stage is as readable as a
    20T-token phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({s for pp in plans for s in pp.sources})
    cmap = plt.get_cmap("tab20")
    colors = {s: cmap(i % 20) for i, s in enumerate(sources)}
    total = sum(pp.tokens for pp in plans)
    scale, unit = next((f, u) for f, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                       if total >= 10 * f or f == 1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    xs, ys, start = [0.0], {s: [0.0] for s in sources}, 0
    for pp in plans:
        start += pp.tokens
        xs.append(start / scale)
        for s in sources:
            sp = pp.sources.get(s)
            ys[s].append(ys[s][-1] + (sp.tokens if sp else 0) / scale)
    ax.stackplot(xs, [ys[s] for s in sources], labels=sources, colors=[colors[s] for s in sources], alpha=0.9)
    start = 0
    for pp in plans:
        ax.axvline(start / scale, color="k", lw=0.8, ls="--")
        ax.annotate(pp.name, (start / scale, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8)
        start += pp.tokens
    ax.set_xlim(0, total / scale)
    ax.set_xlabel(f"tokens seen ({unit})")
    ax.set_ylabel(f"tokens drawn per source, cumulative ({unit})")
    ax.set_title("token schedule across the run")
    bottoms = [0.0] * len(plans)
    for s in sources:
        shares = [(pp.sources[s].tokens / pp.tokens if s in pp.sources else 0.0) for pp in plans]
        bx.bar(range(len(plans)), shares, bottom=bottoms, color=colors[s], label=s)
        bottoms = [b + v for b, v in zip(bottoms, shares)]
    bx.set_xticks(range(len(plans)), [f"{pp.name}\n{_fmt(pp.tokens)}" for pp in plans], fontsize=8)
    bx.set_ylim(0, 1)
    bx.set_ylabel("share of the phase's tokens")
    bx.set_title("blend per phase")
    bx.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(title or "curriculum")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
