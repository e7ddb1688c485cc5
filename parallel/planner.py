"""Layout planner: enumerate folded layouts (TP x CP x PP x DP for the dense part, ETP x EP x EDP for experts) for
N GPUs, keep those `ParallelLayout.problems` accepts, give each the cheapest recompute option that fits in HBM, and
rank by predicted tokens/s per GPU (memory/time models: parallel/memory.py, parallel/steptime.py)."""
from __future__ import annotations

from typing import Optional, Sequence

from pydantic import BaseModel

from model.config import ModelConfig
from model.precision import PrecisionConfig

from .gpus import GPUSpec
from .layout import ParallelLayout
from .memory import GiB, MemoryBreakdown, MemoryOptions, fits, memory_per_gpu
from .steptime import SpeedOptions, StepTime, step_time

RECOMPUTE_ORDER = ("none", "selective", "full")


class Plan(BaseModel):
    layout: ParallelLayout
    world_size: int
    micro_batch_size: int
    recompute: str
    memory: MemoryBreakdown
    time: StepTime
    hbm_gb: float

    def row(self) -> dict:
        L, w = self.layout, self.world_size
        m = self.memory
        return {"tp": L.tp, "cp": L.cp, "pp": L.pp, "vpp": L.vpp, "dp": L.dp(w), "ep": L.ep, "etp": L.etp,
                "edp": L.edp(w), "sp": L.sequence_parallel, "mbs": self.micro_batch_size, "recompute": self.recompute,
                "mem_gib": {k: round(getattr(m, k) / GiB, 2) for k in
                            ("weights", "grads", "optimizer", "weight_cache", "activations", "total")},
                "in_flight_microbatches": m.in_flight, "hbm_gib": round(self.hbm_gb * 1e9 / GiB, 1),
                "step_s": round(self.time.step_s, 4), "mfu": round(self.time.mfu, 4),
                "tokens_per_s_per_gpu": round(self.time.tokens_per_s_per_gpu, 1),
                "time_s": {k: round(getattr(self.time, k), 4) for k in
                           ("compute_s", "tp_s", "cp_s", "ep_s", "pp_p2p_s", "bubble_s", "dp_exposed_s")},
                "overrides": self.overrides()}

    def overrides(self) -> list[str]:
        """The `foldtron train` overrides that run this plan (layout, micro-batch, recompute)."""
        L = self.layout
        out = [f"parallel.tp={L.tp}", f"parallel.cp={L.cp}", f"parallel.pp={L.pp}", f"parallel.ep={L.ep}",
               f"parallel.etp={L.etp}", f"parallel.sequence_parallel={str(L.sequence_parallel).lower()}",
               f"train.micro_batch_size={self.micro_batch_size}", f"performance.recompute={self.recompute}"]
        return out + ([f"parallel.vpp={L.vpp}"] if L.vpp else [])


def layout_problems(cfg: ModelConfig, layout: ParallelLayout, world_size: int, seq_length: int,
                    micro_batch_size: int, global_batch_size: int, gpu: Optional[GPUSpec] = None) -> list[str]:
    out = layout.problems(cfg, world_size, seq_length, micro_batch_size, global_batch_size)
    if gpu is not None and layout.tp * layout.etp > 1 and max(layout.tp, layout.etp) > gpu.nvlink_domain:
        out.append(f"tp/etp: tensor parallelism beyond the NVLink domain ({gpu.nvlink_domain} GPUs) is not planned")
    return out


def evaluate(cfg: ModelConfig, layout: ParallelLayout, world_size: int, gpu: GPUSpec, seq_length: int,
             global_batch_size: int, micro_batch_size: int = 1, precision: Optional[PrecisionConfig] = None,
             recompute: Optional[str] = None, speed: Optional[SpeedOptions] = None,
             reserved_gib: float = 6.0) -> tuple[Optional[Plan], list[str]]:
    """(plan, []) with the cheapest recompute that fits (or the given one), or (None, reasons it cannot run)."""
    problems = layout_problems(cfg, layout, world_size, seq_length, micro_batch_size, global_batch_size, gpu)
    if problems:
        return None, problems
    last: Optional[MemoryBreakdown] = None
    for rc in ([recompute] if recompute else RECOMPUTE_ORDER):
        opts = MemoryOptions(seq_length=seq_length, micro_batch_size=micro_batch_size,
                             global_batch_size=global_batch_size, recompute=rc,
                             precision=precision or PrecisionConfig(), reserved_gib=reserved_gib)
        mem = memory_per_gpu(cfg, layout, world_size, opts)
        last = mem
        if fits(mem, gpu.hbm_gb, reserved_gib):
            return Plan(layout=layout, world_size=world_size, micro_batch_size=micro_batch_size, recompute=rc,
                        memory=mem, time=step_time(cfg, layout, world_size, gpu, opts, speed),
                        hbm_gb=gpu.hbm_gb), []
    assert last is not None
    return None, [f"memory: needs {last.total / GiB:.1f} GiB + {reserved_gib:.0f} GiB reserved per GPU even with "
                  f"recompute={rc} (stage {last.stage}), {gpu.name} has {gpu.hbm_gb * 1e9 / GiB:.1f} GiB"]


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def candidates(cfg: ModelConfig, world_size: int, gpu: GPUSpec, max_pp: int = 16) -> list[ParallelLayout]:
    """Layouts worth evaluating: TP/ETP inside the NVLink domain, CP and EP powers of two (EP also every divisor
    of the expert count), PP dividing the layer count."""
    tps = [t for t in (1, 2, 4, 8) if t <= gpu.nvlink_domain and t <= world_size]
    cps = _powers_of_two(min(world_size, 256))
    pps = [p for p in range(1, max_pp + 1) if cfg.num_layers % p == 0 and world_size % p == 0]
    has_moe = "E" in cfg.all_symbols
    if has_moe:
        E = cfg.num_moe_experts
        eps = sorted({e for e in range(1, E + 1) if E % e == 0} & set(range(1, world_size + 1)))
        etps = [1, 2, 4]
    else:
        eps, etps = [1], [1]
    out = []
    for tp in tps:
        for cp in cps:
            for pp in pps:
                if world_size % (tp * cp * pp):
                    continue
                for ep in eps:
                    for etp in etps:
                        if world_size % (ep * etp * pp):
                            continue
                        out.append(ParallelLayout(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, sequence_parallel=tp > 1))
    return out


def plan(cfg: ModelConfig, world_size: int, gpu: GPUSpec, seq_length: int, global_batch_size: int,
         micro_batch_sizes: Sequence[int] = (1,), precision: Optional[PrecisionConfig] = None,
         speed: Optional[SpeedOptions] = None, reserved_gib: float = 6.0) -> tuple[list[Plan], dict]:
    """All feasible plans, fastest first, and counts of what was discarded and why."""
    plans: list[Plan] = []
    discarded = {"invalid": 0, "out_of_memory": 0}
    for layout in candidates(cfg, world_size, gpu):
        for mbs in micro_batch_sizes:
            p, why = evaluate(cfg, layout, world_size, gpu, seq_length, global_batch_size, mbs, precision,
                              speed=speed, reserved_gib=reserved_gib)
            if p is not None:
                plans.append(p)
            elif why and why[0].startswith("memory"):
                discarded["out_of_memory"] += 1
            else:
                discarded["invalid"] += 1
    plans.sort(key=lambda p: (-p.time.tokens_per_s_per_gpu, p.memory.total))
    return plans, discarded


def format_table(plans: Sequence[Plan], top: int = 10) -> str:
    head = (f"{'#':>3} {'tp':>3} {'cp':>3} {'pp':>3} {'dp':>5} {'ep':>4} {'etp':>3} {'edp':>5} {'mbs':>3} "
            f"{'recompute':>9} | {'weights':>7} {'grads':>6} {'optim':>6} {'wcache':>6} {'activ':>6} {'total':>6} GiB "
            f"| {'step s':>7} {'MFU':>6} {'tok/s/GPU':>10}")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plans[:top], 1):
        r = p.row()
        m = r["mem_gib"]
        lines.append(f"{i:>3} {r['tp']:>3} {r['cp']:>3} {r['pp']:>3} {r['dp']:>5} {r['ep']:>4} {r['etp']:>3} "
                     f"{r['edp']:>5} {r['mbs']:>3} {r['recompute']:>9} | {m['weights']:>7.1f} {m['grads']:>6.1f} "
                     f"{m['optimizer']:>6.1f} {m['weight_cache']:>6.1f} {m['activations']:>6.1f} {m['total']:>6.1f}     "
                     f"| {r['step_s']:>7.3f} {r['mfu'] * 100:>5.1f}% {r['tokens_per_s_per_gpu']:>10,.0f}")
    return "\n".join(lines)
