"""NVFP4 recipe on CPU: final-loss gap NVFP4 vs BF16 on the tiny preset, the cost of emulation, and telemetry.

Figure: final training loss (mean of the last 10 of ``--steps`` steps, default 200) of the ``tiny`` preset with
the emulated NVFP4 recipe (NVFP4 linears; attention QKV/out, latent projections, MTP, head and the last layer
BF16; Mamba out_proj MXFP8; RHT + SR + 2-D weights). Baseline, same run, same data and initial weights: every
linear in emulated BF16. Ratio = NVFP4 / BF16 final loss (the paper reports ~1-1.5% relative gap at scale;
a 7-layer, 64-wide model on a synthetic Markov-chain corpus is a smoke test of the recipe, not that number).

Extras: quantize throughput (NVFP4 1x16, 16x16, MXFP8) against a same-size tensor copy; fwd+bwd time of one
emulated NVFP4 / MXFP8 linear against a plain fp32 linear; training step time NVFP4 vs BF16; telemetry
(flush-to-zero, saturation, relative error) averaged per tensor role at the last recording step.
Run: python -m bench.bench_nvfp4 [--steps 200]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from bench.common import write_result


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def quantize_throughput(n: int = 2048, reps: int = 5) -> dict:
    from kernels.mxfp8 import quantize_mxfp8
    from kernels.nvfp4 import TILE_2D, quantize_nvfp4

    x = torch.randn(n, n)
    copy = _median_time(lambda: x.clone(), reps)
    out = {"elements": n * n, "copy_s": copy}
    for name, fn in (("nvfp4_1x16", lambda: quantize_nvfp4(x)), ("nvfp4_16x16", lambda: quantize_nvfp4(x, tile=TILE_2D)),
                     ("mxfp8", lambda: quantize_mxfp8(x))):
        t = _median_time(fn, reps)
        out[name] = {"s": t, "gelem_per_s": n * n / t / 1e9, "x_copy_time": t / copy}
    return out


def linear_cost(tokens: int = 2048, k: int = 1024, n: int = 1024, reps: int = 3) -> dict:
    from kernels.lowp_linear import lowp_linear

    x = torch.randn(tokens, k, requires_grad=True)
    w = (torch.randn(n, k) * 0.02).requires_grad_(True)
    dy = torch.randn(tokens, n)

    def step(fn):
        def run():
            x.grad = w.grad = None
            fn().backward(dy)
        return run

    base = _median_time(step(lambda: torch.nn.functional.linear(x, w)), reps)
    out = {"shape": [tokens, k, n], "fp32_s": base}
    for fmt in ("bf16", "mxfp8", "nvfp4"):
        t = _median_time(step(lambda: lowp_linear(x, w, fmt=fmt, seed=1)), reps)
        out[fmt] = {"s": t, "x_fp32": t / base}
    return out


class MarkovCorpus:
    """Token stream from a fixed sparse random Markov chain: learnable structure with a known loss floor."""

    def __init__(self, vocab: int, branching: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.next_tokens = torch.randint(0, vocab, (vocab, branching), generator=g)
        self.probs = torch.softmax(torch.randn(vocab, branching, generator=g) * 1.5, dim=-1)
        self.entropy = float(-(self.probs * self.probs.log()).sum(-1).mean())
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed + 1)

    def batch(self, b: int, s: int) -> torch.Tensor:
        ids = torch.empty(b, s, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab, (b,), generator=self.g)
        for t in range(1, s):
            choice = torch.multinomial(self.probs[ids[:, t - 1]], 1, generator=self.g).squeeze(1)
            ids[:, t] = self.next_tokens[ids[:, t - 1], choice]
        return ids


def train(recipe: str, steps: int, *, batch: int = 4, seq: int = 64, telemetry_interval: int = 50) -> dict:
    from kernels.telemetry import QuantTelemetry
    from model.adapt.lowp import apply_precision
    from model.build import build_model, init_single_process
    from model.precision import PrecisionConfig
    from model.presets import get_preset

    init_single_process(seed=1234)
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = build_model(cfg)
    if recipe == "nvfp4":  # Super's policy shape, scaled: last ~15% of 7 layers = 1 layer BF16
        policy = PrecisionConfig(recipe="nvfp4", first_last_layers_bf16=True, num_layers_at_end_in_bf16=1,
                                 telemetry_interval=telemetry_interval)
    else:
        policy = PrecisionConfig(recipe=recipe)
    tel = QuantTelemetry(policy.telemetry_interval)
    apply_precision(model, policy, num_layers=cfg.num_layers, seed=0, telemetry=tel)
    corpus = MarkovCorpus(cfg.vocab_size)
    pos = torch.arange(seq).expand(batch, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    losses, times, last_tel = [], [], {}
    for step in range(steps):
        ids = corpus.batch(batch, seq + 1)
        tel.step(step)
        t = time.perf_counter()
        opt.zero_grad()
        loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if tel.active:
            last_tel = tel.read()
    by_role = defaultdict(list)
    for (_, role), stats in last_tel.items():
        by_role[role].append(stats)
    telemetry = {role: {k: statistics.mean(s[k] for s in ss) for k in ("flushed", "saturated", "rel_error")}
                 for role, ss in sorted(by_role.items())}
    return {"final_loss": statistics.mean(losses[-10:]), "first_loss": losses[0],
            "step_s": statistics.median(times[1:]), "loss_floor": corpus.entropy, "telemetry": telemetry,
            "losses_every_20": losses[::20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    quant = quantize_throughput()
    lin = linear_cost()
    bf16 = train("bf16", args.steps)
    nvfp4 = train("nvfp4", args.steps)
    gap = (nvfp4["final_loss"] - bf16["final_loss"]) / bf16["final_loss"]
    write_result(
        "nvfp4",
        figure={"what": f"tiny preset final loss after {args.steps} steps, emulated NVFP4 recipe",
                "value": nvfp4["final_loss"], "unit": "nats/token"},
        baseline={"what": "same run, every linear emulated BF16", "value": bf16["final_loss"], "unit": "nats/token"},
        ratio=nvfp4["final_loss"] / bf16["final_loss"],
        higher_is_better=False,
        goal="NVFP4/BF16 final loss within ~1.5% (paper, 12B at 10T tokens)",
        extra={"relative_gap": gap, "train_step_s": {"bf16": bf16["step_s"], "nvfp4": nvfp4["step_s"],
                                                     "nvfp4_x_bf16": nvfp4["step_s"] / bf16["step_s"]},
               "quantize": quant, "linear_fwd_bwd": lin, "nvfp4_run": nvfp4, "bf16_run": bf16},
    )


if __name__ == "__main__":
    main()
