"""The training loop: Megatron-Core DDP + optimizer + forward-backward schedules, stage after stage.

    summary = run_training(cfg)          # on every rank of an initialised (or torchrun/srun) world

One iteration is Megatron-LM's `train_step`: zero the grad buffers, run `get_forward_backward_func()` over the
global batch's micro-batches (so PP runs its 1F1B schedule and grads are finalized once: DP reduce, SP norm
grads, per-token scaling by the global number of loss tokens, MoE expert-bias update), then the optimizer step
(clipping inside) and one scheduler step. The loss is Megatron's per-token loss: sum(loss * mask) over the
global batch / number of mask tokens (`calculate_per_token_loss`), so micro-batch and DP splits do not change it.
A NaN/Inf in the loss or in any gradient on any rank skips the update for every rank (the iteration and its data
still count, as in Megatron), and `train.max_consecutive_nan_skips` in a row abort with a clear error.

The model comes from a provider, `provider(model_cfg, *, pre_process, post_process, parallel_kwargs, precision)`,
default `model.build.build_model`; tests and benchmarks may pass another one. Under interleaved pipelining
(`parallel.vpp`) the provider is called once per virtual stage with `vp_stage=v` as well, and every chunk reads its
own copy of the micro-batch stream (Megatron-LM builds one data iterator per chunk over the same data). The
provider always gets a high-precision policy: `precision.recipe: nvfp4|mxfp8` builds BF16 and routes the linears through the emulated
recipe (`model.adapt.lowp.apply_precision`); with `precision.telemetry_interval` > 0 the quantization statistics go to
TensorBoard as `<recipe>/<module>/<role>/{flushed,saturated,rel_error}` every that many (run-global) steps.
"""
from __future__ import annotations

import itertools
import logging
import math
import re
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig
from pretrain.stages import Stage, resolve

log = logging.getLogger("foldtron.train")
ModelProvider = Callable[..., torch.nn.Module]


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite iterations, or an unusable resume state."""


def default_model_provider(model_cfg, *, pre_process: bool, post_process: bool, parallel_kwargs: dict,
                           precision=None, vp_stage: Optional[int] = None) -> torch.nn.Module:
    from model.build import build_model, transformer_config

    return build_model(model_cfg, pre_process=pre_process, post_process=post_process, precision=precision,
                       vp_stage=vp_stage, config=transformer_config(model_cfg, **parallel_kwargs))


def _backend_name(cfg: RunConfig) -> str:
    """The backend `run_training` resolved and installed the patches for (resolved once per run); outside a run
    (tests, `foldtron plan`), the config's, resolved now."""
    from model import adapt
    from model.backend import resolve_backend

    return adapt.active_backend() or resolve_backend(cfg.backend).name


def performance_kwargs(cfg: RunConfig, stage: Optional[Stage] = None) -> dict:
    """TransformerConfig fields of the stage's (else the run's) performance settings (recompute, TP comm overlap)."""
    perf = ((stage.performance if stage else None) or cfg.performance).resolved(_backend_name(cfg))
    kw: dict = {"tp_comm_overlap": perf["tp_comm_overlap"]}
    if perf["recompute"] == "selective":
        # Megatron-Core's selective recompute modules matching the planner's `selective` (parallel/memory.py).
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn", "moe_act", "layernorm"])
    elif perf["recompute"] == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return kw


def parallel_kwargs(stage: Stage) -> dict:
    lay, bf16 = stage.parallel, stage.precision.recipe != "fp32"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return dict(tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
                virtual_pipeline_model_parallel_size=lay.vpp, context_parallel_size=lay.cp, expert_model_parallel_size=lay.ep,
                expert_tensor_parallel_size=lay.etp, sequence_parallel=lay.sequence_parallel,
                params_dtype=dtype, bf16=bf16, pipeline_dtype=dtype, calculate_per_token_loss=True)


def _print(msg: str) -> None:
    """Megatron prints from the last rank (it holds the loss under PP)."""
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(msg, flush=True)


# --------------------------------------------------------------------------------------------------------
# Data

def make_loader(cfg: RunConfig, stage: Stage, dp_rank: int, dp_size: int):
    t = stage.train
    if cfg.data.mock:
        from pretrain.synthetic import SyntheticLoader

        return SyntheticLoader(seq_length=list(stage.lengths), vocab_size=cfg.model.vocab_size,
                               micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                               dp_rank=dp_rank, dp_size=dp_size, seed=cfg.data.seed, phase=stage.phase or stage.name)
    if not cfg.data.shards_dir:
        raise ValueError("data.shards_dir is not set: point it at `foldtron shards` output, or set data.mock=true "
                         "for synthetic data")
    if not cfg.data.curriculum:
        raise ValueError("data.curriculum is not set: the loader needs the curriculum YAML naming the phases")
    from data_pipeline.loader import BlendedLoader

    return BlendedLoader(cfg.data.shards_dir, cfg.data.curriculum, phase=stage.phase or stage.name,
                         seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                         global_batch_size=t.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         seed=cfg.data.seed, num_workers=cfg.data.num_workers)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's pretrain loss_func with per-token averaging: (sum, tokens, report)."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def _forward_step(data_iterator, model):
    """Megatron-LM's forward_step: the micro-batch on the model's device, this CP rank's chunks of it (the CP
    group passed explicitly: with cp_group=None, 0.19's get_batch_on_this_cp_rank splits over the whole world,
    utils.py:2612), then the model with the loss mask (the MTP losses are masked by it too)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from model.adapt import current_device

    batch = next(data_iterator)
    device = current_device()
    batch = {k: batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    batch["cu_seqlens"] = None
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=ps.get_context_parallel_group())
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
    return out, partial(_loss_func, batch["loss_mask"])


def _chunk_iterators(loader, n_chunks: int):
    """The micro-batch stream for the schedule: one iterator, or under interleaved pipelining one per model chunk,
    all yielding the same micro-batches in the same order (each chunk pulls every micro-batch of the global batch
    once, in micro-batch order, so the first chunk's embedding and the last chunk's loss see the same samples).
    A tee of the one loader iterator: every chunk has pulled the whole global batch when a step ends, so the tee
    holds nothing between steps and the loader's state_dict is the step's, as with one chunk."""
    it = iter(loader)
    return it if n_chunks == 1 else list(itertools.tee(it, n_chunks))


# --------------------------------------------------------------------------------------------------------
# MoE expert load: counts are read just before finalize_model_grads consumes them (expert-bias update).

class _ExpertLoadProbe:
    def __init__(self, model, finalize):
        self.routers = []
        for chunk in model:
            for name, m in chunk.named_modules():
                if getattr(m, "local_tokens_per_expert", None) is not None:
                    hit = re.search(r"^(.*?layers\.(\d+))\.", name)
                    tag = f"layer_{hit.group(2)}" if hit and not name.startswith(("mtp", "module.mtp")) else name
                    if hit and "mtp" not in name:
                        # the global layer index: module names restart at 0 in every pipeline chunk
                        number = getattr(chunk.get_submodule(hit.group(1)), "layer_number", None)
                        tag = tag if number is None else f"layer_{number - 1}"
                    self.routers.append((tag if "mtp" not in name else "mtp_" + tag, m))
        self.finalize, self.want, self.counts = finalize, False, None

    def __call__(self, *args, **kwargs):
        if self.want and self.routers:
            self.counts = torch.stack([m.local_tokens_per_expert.detach().float().clone() for _, m in self.routers])
        return self.finalize(*args, **kwargs)

    def scalars(self) -> dict[str, float]:
        """Collective over TPxCPxDP: every rank calls it on log steps."""
        if self.counts is None:
            return {}
        from megatron.core import parallel_state as ps

        c = self.counts
        dist.all_reduce(c, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        self.counts = None
        ratio = c.max(dim=1).values / c.mean(dim=1).clamp(min=1e-9)
        return {f"moe/{tag}/expert-load-max-over-mean": float(r) for (tag, _), r in zip(self.routers, ratio)}


# --------------------------------------------------------------------------------------------------------
# One stage

def make_telemetry(stage: Stage):
    """Quantization telemetry for a low-precision stage (`precision.telemetry_interval` > 0), else None."""
    from model.precision import LOW_PRECISION

    prec = stage.precision
    if prec.recipe not in LOW_PRECISION or prec.telemetry_interval == 0:
        return None
    from kernels.telemetry import QuantTelemetry

    return QuantTelemetry(prec.telemetry_interval)


def place_on_device(chunk: torch.nn.Module) -> torch.nn.Module:
    """Megatron-LM's get_model moves every chunk to the current GPU (`model_module.cuda(torch.cuda.current_device())`,
    megatron/training/training.py): Megatron-Core's own parameters are made there already, Foldtron's and any a
    provider makes elsewhere are not. On the cpu backend everything is on the CPU."""
    from model.adapt import current_device

    device = current_device()
    if device.type != "cpu":
        chunk.to(device)
    return chunk


def _build(cfg: RunConfig, stage: Stage, provider: ModelProvider, telemetry=None):
    """The stage's model chunk(s), DDP-wrapped, with optimizer and scheduler.

    One chunk per virtual pipeline stage (`parallel.vpp`, else one), each with the embedding / output layer where
    Megatron puts them (first / last virtual stage of the first / last pipeline rank), in DDP like Megatron-LM's
    get_model (bucketing only on chunk 0).

    A low-precision recipe (nvfp4/mxfp8) is built with the BF16 policy (build_model only builds high-precision
    models) and then has its linears routed through the emulated recipe by `model.adapt.lowp.apply_precision`, on the
    bare chunk: the policy matches Megatron names (`decoder.layers.N.`, `mtp.`), which Float16Module and DDP
    prefix with `module.`. The patch is per instance and keeps parameters, so DDP buffers and checkpoints are
    the BF16 model's."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from model import adapt
    from model.adapt.lowp import apply_precision
    from model.adapt.te_precision import apply_te_precision
    from model.precision import LOW_PRECISION
    from pretrain.optimizer import build_optimizer, install_grad_sync, wrap_ddp
    from pretrain.schedules import build_scheduler

    bf16 = stage.precision.recipe != "fp32"
    lowp = stage.precision.recipe in LOW_PRECISION
    build_precision = stage.precision.model_copy(update={"recipe": "bf16"}) if lowp else stage.precision
    vpp = stage.parallel.vpp
    chunks = []
    for v in range(vpp or 1):
        vp = v if vpp else None
        extra = {} if vp is None else {"vp_stage": vp}  # providers without vpp support keep their signature
        chunk = provider(cfg.model, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                         post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                         parallel_kwargs={**parallel_kwargs(stage), **performance_kwargs(cfg, stage)},
                         precision=build_precision, **extra)
        chunk.config.calculate_per_token_loss = True
        place_on_device(chunk)
        if lowp and adapt.active_backend() == "te":
            # Transformer Engine's own recipes, one autocast per module (model/adapt/te_precision.py).
            from megatron.core import parallel_state as mps

            apply_te_precision(chunk, stage.precision, num_layers=cfg.model.num_layers,
                               amax_group=mps.get_amax_reduction_group(with_context_parallel=True))
        elif lowp:
            # The chunk already computes in BF16: BF16-policy linears need no emulated rounding.
            apply_precision(chunk, stage.precision, num_layers=cfg.model.num_layers, seed=stage.train.seed,
                            telemetry=telemetry, emulate_bf16=False)
        if bf16:
            chunk = Float16Module(chunk.config, chunk)
        chunks.append(chunk)
    perf = (stage.performance or cfg.performance).resolved(_backend_name(cfg))
    model = wrap_ddp(chunks, stage.parallel, bf16, overlap_grad_reduce=perf["overlap_grad_reduce"],
                     overlap_param_gather=perf["overlap_param_gather"])
    install_grad_sync(model)
    optimizer = build_optimizer(model, stage.train, stage.parallel, bf16)
    scheduler = build_scheduler(optimizer, stage.train, offset=stage.lr_offset)
    return model, optimizer, scheduler


def train_step(model: list, optimizer, data_iterator, *, num_micro: int, seq_length: int, micro_batch_size: int,
               before_update: Optional[Callable[[], None]] = None) -> dict:
    """One iteration, Megatron-LM's `train_step`: zero the grad buffers, run `get_forward_backward_func()` over the
    global batch's micro-batches (PP runs its schedule; grads are finalized once: DP reduce, SP norm grads,
    per-token scaling by the global number of loss tokens, MoE expert-bias update), then the optimizer step
    (clipping inside). A NaN/Inf in the loss or in any gradient on any rank skips the update on every rank.
    `foldtron train` and the parallel-equivalence matrix both call this; `before_update` runs after the
    gradients are final and before the optimizer touches them (the matrix saves them there).

    Returns {"loss": global per-token loss, "grad_norm", "nonfinite_ranks": how many ranks saw NaN/Inf,
    "updated": whether the optimizer applied the step}."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model.adapt import current_device
    from pretrain.optimizer import grads_finite, optimizer_step

    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=data_iterator, model=model, num_microbatches=num_micro,
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False)
    device = current_device()
    # The loss lives on the last pipeline stage; TP ranks hold the same value, so one of them reports it.
    contributes = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    if contributes and reduced:
        rep = torch.stack([r["lm loss"].to(device) for r in reduced]).double().sum(0)
    else:
        rep = torch.zeros(2, dtype=torch.float64, device=device)
    finite = bool(torch.isfinite(rep).all()) and grads_finite(model)
    red = torch.cat([rep, torch.tensor([0.0 if finite else 1.0], dtype=torch.float64, device=device)])
    dist.all_reduce(red)  # on the backend's device: NCCL takes no CPU tensors
    loss = float(red[0] / red[1].clamp(min=1))
    if red[2] > 0:
        return {"loss": loss, "grad_norm": None, "nonfinite_ranks": int(red[2]), "updated": False}
    if before_update is not None:
        before_update()
    ok, grad_norm, _ = optimizer_step(optimizer)
    return {"loss": loss, "grad_norm": None if grad_norm is None else float(grad_norm), "nonfinite_ranks": 0,
            "updated": bool(ok)}


def _moe_metric_names(config) -> list[str]:
    """The MoE losses every rank reduces, in one order, as Megatron-LM's training.py lists them."""
    kinds = config.moe_router_load_balancing_type
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    names = [n for k, n in (("aux_loss", "load_balancing_loss"), ("seq_aux_loss", "seq_load_balancing_loss"),
                            ("global_aux_loss", "global_load_balancing_loss")) if k in kinds]
    if config.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def _report_moe_metrics(config, model_cfg, num_micro: int, iteration: int, out: dict) -> None:
    """Megatron-Core 0.19's MoE metrics tracker (transformer/moe/moe_logging.py:130 `report`): reduces over the
    pipeline / TP x CP / DP groups, averages, adds the losses to `out`, and clears. `force_initialize` gives a
    pipeline rank without MoE layers zero entries of the same size, or its peers' all-reduce would hang (e.g. the
    chunks "M*" under pp2-vpp2 of "M*-EM*-E")."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    # Averaged over the main MoE layers plus one per MTP depth (upstream's count, moe_logging.py:291).
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / num_micro, iteration=iteration, writer=None, force_initialize=True,
        track_names=_moe_metric_names(config), num_layers=config.num_layers,
        moe_layer_freq=[1] * model_cfg.hybrid_override_pattern.count("E"),
        mtp_num_layers=config.mtp_num_layers if model_cfg.mtp_num_layers else None, total_loss_dict=out)


def _clear_trackers() -> None:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    get_moe_metrics_tracker().clear()
    MTPLossLoggingHelper.tracker.clear()


def train_stage(cfg: RunConfig, stages: list[Stage], stage: Stage, provider: ModelProvider, stop,
                run_state: dict) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from model.adapt.lowp import set_sr_step
    from model.counting import forward_flops
    from parallel import groups
    from pretrain.merge import after_save as merge_after_save
    from pretrain.optimizer import params_norm
    from pretrain.schedules import restore_scheduler
    from pretrain.tensorboard_log import TrainLogger, memory_scalars, peak_tflops, stdout_line

    t = stage.train
    save_dir, load_dir = cfg.checkpoint.save, cfg.checkpoint.load or cfg.checkpoint.save
    # Megatron-Core's own checks are bare asserts deep inside (pattern split into pp*vpp chunks, heads over tp,
    # micro-batches a multiple of pp, ...): every layout is validated against the model and batch first, so the
    # error names the field to change, before any group exists.
    if stage.gpus is not None and dist.get_world_size() != stage.gpus:
        field = f"stages.{stage.index}.gpus" if cfg.stages and cfg.stages[stage.index].gpus else "cluster.gpus"
        raise TrainingAborted(
            f"stage {stage.name} is planned for {stage.gpus} GPUs ({field}) but this job has "
            f"{dist.get_world_size()} ranks: submit it on its planned size, or change that field (and check the "
            f"layout with `foldtron preflight`)")
    for seq in stage.lengths:  # (the CP chunking of every length is part of the validation)
        stage.parallel.validate(cfg.model, dist.get_world_size(), seq, t.micro_batch_size, t.global_batch_size)
    groups.setup(stage.parallel, seed=t.seed, backend=cfg.backend)
    try:
        world = dist.get_world_size()
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(f"stage {stage.name}: global_batch_size {t.global_batch_size} is not a multiple of "
                             f"micro_batch_size {t.micro_batch_size} x data-parallel size {dp}")
        num_micro = t.global_batch_size // (t.micro_batch_size * dp)
        telemetry = make_telemetry(stage)
        model, optimizer, scheduler = _build(cfg, stage, provider, telemetry)
        loader = make_loader(cfg, stage, dp_rank, dp)
        phase_batches = getattr(loader, "num_batches", None)
        if isinstance(phase_batches, int) and phase_batches < t.train_iters:
            # Said before the first step, not as a bare StopIteration after the phase's last batch.
            raise TrainingAborted(
                f"stage {stage.name}: train_iters={t.train_iters} but curriculum phase "
                f"{stage.phase or stage.name!r} holds only {phase_batches} global batches of {t.global_batch_size} x "
                f"{t.seq_length} tokens; lower the stage's train_iters or raise the phase's token budget")

        # ---- where to start
        iteration, resumed_from, start_from = 0, None, None
        tokens_before = run_state.get("consumed_tokens", 0)
        counters = {"skipped": 0, "nan": 0}
        info = ckpt.latest(load_dir, stage.name)
        if info is not None:
            common = ckpt.load(info, model, optimizer, layout=stage.parallel, full=True)
            restore_scheduler(scheduler, common["scheduler"])  # counts from the curve's start
            loader.load_state_dict(common["loader"])
            iteration, resumed_from = int(common["iteration"]), int(common["iteration"])
            tokens_before = int(common["consumed_tokens"]) - int(common["stage_tokens"])
            counters = dict(common.get("counters", counters))
            if not common["_rng_restored"]:
                ckpt.reseed(t.seed, iteration)
            _print(f" [{stage.name}] resumed from {info.path} (iteration {iteration}"
                   f"{'' if common['_rng_restored'] else ', new layout: RNG reseeded'})")
        elif stage.index > 0:
            prev = stages[stage.index - 1]
            pinfo = ckpt.latest(load_dir, prev.name)
            if pinfo is None or pinfo.iteration != prev.train.train_iters:
                raise TrainingAborted(
                    f"stage {stage.name} starts from the final checkpoint of stage {prev.name}, but "
                    f"{Path(load_dir or '?') / prev.name} has "
                    + ("none" if pinfo is None else f"only iteration {pinfo.iteration}/{prev.train.train_iters}"))
            ckpt.load(pinfo, model, optimizer, layout=stage.parallel, full=False)
            scheduler.step(0)  # the loaded param groups carry the old stage's LR
            tokens_before = int(pinfo.meta.get("consumed_tokens", tokens_before))
            start_from = str(pinfo.path)
            _print(f" [{stage.name}] starting from {pinfo.path}")
        step_offset = sum(s.train.train_iters for s in stages[: stage.index])

        # ---- logging set-up
        is_last = dist.get_rank() == world - 1
        logger = TrainLogger(cfg.logging.tensorboard_dir, is_last, stage.name)
        # The one FLOP model (model/counting.py, held to torch's FlopCounterMode): the planner's MFU uses it too.
        # Per sequence length: a stage may alternate them (tokens are counted as trained, batch by batch).
        flops_per_token = {n: forward_flops(cfg.model, n)["training_total"] for n in stage.lengths}
        peak, peak_src = peak_tflops(cfg.logging.peak_tflops_per_device,
                                     torch.float32 if stage.precision.recipe == "fp32" else torch.bfloat16)
        n_moe = cfg.model.all_symbols.count("E") if cfg.model.mtp_num_layers else cfg.model.hybrid_override_pattern.count("E")
        probe = _ExpertLoadProbe(model, model[0].config.finalize_model_grads_func)
        model[0].config.finalize_model_grads_func = probe
        data_iter = _chunk_iterators(loader, len(model))
        history: list[tuple[int, float]] = []
        times: list[float] = []
        consecutive, exit_reason, last_path = 0, None, info.path if info else None
        for m in model:
            m.train()
        while iteration < t.train_iters:
            log_step = (iteration + 1) % cfg.logging.log_interval == 0 or iteration + 1 == t.train_iters
            probe.want = log_step and cfg.logging.log_moe_expert_load
            t0 = time.perf_counter()
            # Arms the probes for this step; counted over the whole run so the interval spans stages.
            quant_step = telemetry is not None and telemetry.step(step_offset + iteration + 1)
            set_sr_step(model, step_offset + iteration + 1)  # SR stream positioned by step: resumes are exact
            seq = stage.seq_length_at(iteration)  # the loader cycles the phase's lengths the same way
            tokens_per_iter = t.global_batch_size * seq
            step = train_step(model, optimizer, data_iter, num_micro=num_micro, seq_length=seq,
                              micro_batch_size=t.micro_batch_size)
            loss, grad_norm = step["loss"], step["grad_norm"]
            if step["nonfinite_ranks"]:
                consecutive += 1
                counters["nan"] += 1
                counters["skipped"] += 1
                _print(f" [{stage.name}] iteration {iteration + 1}: non-finite loss or gradient on "
                       f"{step['nonfinite_ranks']} rank(s); update skipped ({consecutive} in a row)")
                if consecutive >= t.max_consecutive_nan_skips:
                    raise TrainingAborted(
                        f"stage {stage.name}: {consecutive} consecutive iterations had a NaN/Inf loss or gradient "
                        f"(train.max_consecutive_nan_skips={t.max_consecutive_nan_skips}); last at iteration "
                        f"{iteration + 1}. Lower train.lr, check the data, or resume from an earlier checkpoint.")
            else:
                consecutive = 0
                if step["updated"]:
                    scheduler.step(1)
                else:
                    counters["skipped"] += 1
            iteration += 1
            dt = time.perf_counter() - t0
            history.append((iteration, loss))
            stage_tokens = stage.tokens(iteration)
            consumed = tokens_before + stage_tokens

            # Megatron's trackers reduce across ranks every step (they accumulate otherwise).
            aux: dict[str, Any] = {}
            if n_moe:
                _report_moe_metrics(model[0].config, cfg.model, num_micro, iteration, aux)
            if cfg.model.mtp_num_layers:
                MTPLossLoggingHelper.track_mtp_metrics(1.0 / num_micro, iteration, None, total_loss_dict=aux)
            if log_step:
                values = {
                    "lm loss": loss, "learning-rate": _lr(optimizer),
                    "grad-norm": None if grad_norm is None else float(grad_norm),
                    "params-norm": params_norm(model), "batch-size": float(t.global_batch_size),
                    "iteration-time": dt, "tokens-per-sec": tokens_per_iter / dt,
                    "throughput": flops_per_token[seq] * tokens_per_iter / dt / world / 1e12,
                    "consumed-tokens": float(consumed), "skipped-iterations": float(counters["skipped"]),
                    "nan-iterations": float(counters["nan"]),
                }
                values["mfu"] = values["throughput"] / peak
                mtp = [float(v) for k, v in aux.items() if re.fullmatch(r"mtp_\d+ loss", k)]
                for k, v in aux.items():
                    values[k] = float(v)
                if mtp:
                    values["mtp loss"] = sum(mtp) / len(mtp)
                values.update(memory_scalars())
                values.update(probe.scalars())
                for src, n in getattr(loader, "source_counts", {}).items():
                    values[f"data/source-fraction/{src}"] = n / t.global_batch_size
                logger.scalars(values, step_offset + iteration, consumed)
                _print(stdout_line(stage.name, iteration, t.train_iters, values))

            if quant_step:
                # Every rank reads (and resets) its own accumulators; the last rank's are logged (its layers).
                logger.scalars(telemetry.scalars(prefix=stage.precision.recipe), step_offset + iteration, consumed,
                               vs_tokens=False)
                telemetry.active = False

            reason = stop.check()
            times.append(time.perf_counter() - t0)  # the whole iteration: checks, trackers, logging included
            done = iteration == t.train_iters
            periodic = iteration % cfg.checkpoint.save_interval == 0
            if periodic and consecutive and not (done or reason):
                # Inside a NaN/Inf streak: the weights are the ones that produced it. Saving would rotate the last
                # good checkpoints out (keep_last) and a rerun would resume into the same divergence.
                _print(f" [{stage.name}] iteration {iteration}: not saving during a non-finite streak "
                       f"({consecutive} in a row); the last good checkpoint is kept")
                periodic = False
            if save_dir and (done or reason or periodic):
                common = {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                          "consumed_samples": iteration * t.global_batch_size, "stage_tokens": stage_tokens,
                          "consumed_tokens": consumed, "counters": dict(counters)}
                last_path = ckpt.save(save_dir, stage.name, iteration, model, optimizer, common=common,
                                      layout=stage.parallel, keep_last=cfg.checkpoint.keep_last)
                _print(f" [{stage.name}] saved checkpoint {last_path}")
                merge_after_save(cfg, stage.name, consumed)  # checkpoint.merge's token schedule (pretrain/merge.py)
            if reason and not done:
                exit_reason = reason
                _print(f" [{stage.name}] stopping at iteration {iteration} ({reason}); "
                       f"exit code {cfg.checkpoint.requeue_exit_code} asks for a requeue")
                break
        logger.close()
        run_state["consumed_tokens"] = tokens_before + stage.tokens(iteration)
        steady = times[1:] or times
        steady_tokens = stage.tokens(iteration) - stage.tokens(iteration - len(steady)) if steady else 0
        return {
            "name": stage.name, "iterations": [i for i, _ in history], "losses": [v for _, v in history],
            "resumed_from": resumed_from, "started_from": start_from, "final_iteration": iteration,
            "completed": iteration == t.train_iters, "exit": exit_reason,
            "tokens_per_sec": (steady_tokens / sum(steady)) if steady else None,
            "checkpoint": None if last_path is None else str(last_path), "layout": stage.parallel.model_dump(),
            "skipped_iterations": counters["skipped"], "peak_tflops": peak, "peak_source": peak_src,
            "step_times": times,
        }
    finally:
        _clear_trackers()
        groups.teardown()


def _lr(optimizer) -> float:
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])


# --------------------------------------------------------------------------------------------------------
# The run

def run_training(cfg: RunConfig, *, model_provider: Optional[ModelProvider] = None) -> dict:
    """Run (or resume) every stage of `cfg`; returns a summary (losses per stage, tokens/s, paths, exit).

    Starts torch.distributed from torchrun's/Slurm's environment (or as one process) unless it already runs.
    `summary["exit_code"]` is 0 when all stages completed, `checkpoint.requeue_exit_code` after a signal or
    the exit-duration limit (the state is saved; run the same command again to continue)."""
    from model import adapt
    from model.backend import resolve_backend
    from pretrain.launch import init_distributed
    from pretrain.signals import StopRequests

    backend = resolve_backend(cfg.backend)  # a backend that is not installed: an error before any process group
    adapt.apply(backend.name)
    stages = resolve(cfg)  # config errors before any process group starts
    init_distributed(backend=backend.dist_backend)
    from pretrain.preflight import check_before_run

    check_before_run(cfg, dist.get_world_size())  # every stage's phase, budget, data and layout, before step one
    _print(f" foldtron: {backend.describe()}; megatron-core {'.'.join(map(str, adapt.mcore_version()))}")
    lock = ckpt.acquire_run_lock(cfg.checkpoint.save)  # one run per checkpoint directory (names the holder)
    stop = StopRequests(cfg.train.exit_duration_in_mins).install()
    summary: dict[str, Any] = {"stages": [], "run_dir": cfg.checkpoint.save,
                               "tensorboard_dir": cfg.logging.tensorboard_dir, "world_size": dist.get_world_size()}
    run_state: dict[str, Any] = {}
    exit_reason = None
    try:
        for stage in stages:
            info = ckpt.latest(cfg.checkpoint.load or cfg.checkpoint.save, stage.name)
            if info is not None and info.iteration >= stage.train.train_iters:
                run_state["consumed_tokens"] = int(info.meta.get("consumed_tokens", 0))
                summary["stages"].append({"name": stage.name, "completed": True, "skipped_already_done": True,
                                          "checkpoint": str(info.path), "iterations": [], "losses": []})
                continue
            if stage.gpus is not None and stage.gpus != dist.get_world_size() and stage.index > 0:
                # Super's long-context stages run on a job of another size: this job's part is done (every stage
                # before this one is). A first stage planned for another size is an error (train_stage says it).
                _print(f" foldtron: stage {stage.name} is planned for {stage.gpus} GPUs and this job has "
                       f"{dist.get_world_size()}: the stages before it are done; submit it on its own job size "
                       f"(e.g. examples/slurm/long_context.sbatch)")
                summary["next_stage"] = {"name": stage.name, "gpus": stage.gpus}
                break
            res = train_stage(cfg, stages, stage, model_provider or default_model_provider, stop, run_state)
            summary["stages"].append(res)
            if res["exit"]:
                exit_reason = res["exit"]
                break
    finally:
        stop.uninstall()
        ckpt.release_run_lock(lock)
    summary["exit"] = exit_reason or "completed"
    summary["exit_code"] = cfg.checkpoint.requeue_exit_code if exit_reason else 0
    summary["consumed_tokens"] = run_state.get("consumed_tokens", 0)
    if any(math.isnan(x) for s in summary["stages"] for x in s.get("losses", [])):
        summary["has_nan_losses"] = True
    return summary
