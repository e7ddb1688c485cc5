"""One Foldtron training iteration against a bare Megatron-Core forward/backward/optimizer step of the same
model, in the same process (one CPU rank, the `tiny` hybrid preset, fp32, synthetic data).

Foldtron: `run_training` (DDP + distributed optimizer, the forward-backward schedule over 4 micro-batches,
cross-rank NaN/Inf check, optimizer step with clipping, scheduler, Megatron trackers, logging every 10 steps as a real run would), its
steady-state wall time per iteration. Baseline: the same model from the same provider, wrapped in the same DDP and
`get_megatron_optimizer`, driven by a bare loop: zero grads, `get_forward_backward_func()` over the same micro-
batches (pre-generated, so data generation is not in the baseline), `optimizer.step()`. Ratio = Foldtron / bare
(goal <= 1.05).
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.common import write_result

ITERS, WARMUP = 12, 3
OVERRIDES = ["model.preset=tiny", "model.mtp_num_layers=0", "data.mock=true", "train.seq_length=128",
             "train.micro_batch_size=2", "train.global_batch_size=8", f"train.train_iters={ITERS}",
             "train.lr_warmup_iters=1", "precision.recipe=fp32", "logging.log_interval=10",
             "logging.peak_tflops_per_device=1.0"]


def bare_step_times(cfg, stage) -> list[float]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from parallel import groups
    from pretrain.optimizer import optimizer_step
    from pretrain.train import _build, _forward_step, default_model_provider, make_loader

    groups.setup(stage.parallel, seed=stage.train.seed)
    try:
        model, optimizer, _ = _build(cfg, stage, default_model_provider)
        loader = make_loader(cfg, stage, 0, 1)
        micro = stage.train.global_batch_size // stage.train.micro_batch_size
        it = iter(loader)
        batches = [[next(it) for _ in range(micro)] for _ in range(ITERS)]
        fwd_bwd = get_forward_backward_func()
        times = []
        for b in batches:
            t0 = time.perf_counter()
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            fwd_bwd(forward_step_func=_forward_step, data_iterator=iter(b), model=model, num_microbatches=micro,
                    seq_length=stage.train.seq_length, micro_batch_size=stage.train.micro_batch_size,
                    forward_only=False)
            optimizer_step(optimizer)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        groups.teardown()


def main() -> None:
    torch.set_num_threads(1)
    from pretrain.config import load_config
    from pretrain.stages import resolve
    from pretrain.train import run_training

    cfg = load_config(None, OVERRIDES)
    summary = run_training(cfg)  # starts the 1-rank gloo world
    ours = summary["stages"][0]["step_times"][WARMUP:]
    base = bare_step_times(cfg, resolve(cfg)[0])[WARMUP:]
    f, b = statistics.median(ours), statistics.median(base)
    write_result(
        "train",
        figure={"what": "Foldtron training iteration (run_training, tiny preset, 1 CPU rank)", "value": f * 1e3,
                "unit": "ms"},
        baseline={"what": "bare Megatron-Core fwd/bwd (get_forward_backward_func) + optimizer.step, same model",
                  "value": b * 1e3, "unit": "ms"},
        ratio=f / b, higher_is_better=False, goal="<= 1.05",
        extra={"iterations": ITERS, "warmup": WARMUP, "tokens_per_iteration": 8 * 128,
               "ours_ms": [round(x * 1e3, 2) for x in ours], "bare_ms": [round(x * 1e3, 2) for x in base]})


if __name__ == "__main__":
    main()
