"""Forward+backward time of the hybrid test model on CPU vs a bare Megatron-Core GPTModel of similar size.

Figure: median seconds per fwd+bwd of the `tiny` preset widened to hidden 256 (M * - E(latent) + 2-deep MTP)
at batch 4 x seq 256. Baseline, same run: Megatron-Core's own GPTModel (local spec, dense MLP, squared ReLU,
same hidden/layers/vocab, FFN chosen so both have about the same parameter count). The ratio (hybrid/GPT time)
shows what the CPU Mamba-2 path, the MoE dispatcher and MTP cost over plain attention+MLP layers.
Run: python -m bench.bench_model
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.common import write_result


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(reps: int = 5, batch: int = 4, seq: int = 256) -> None:
    from model.build import build_model, init_single_process, transformer_config
    from model.presets import get_preset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    init_single_process(seed=0)
    cfg = get_preset("tiny", hidden_size=256, num_attention_heads=8, num_query_groups=2, kv_channels=32,
                     ffn_hidden_size=512, mamba_num_heads=8, mamba_head_dim=32, mamba_state_dim=32,
                     mamba_chunk_size=64, num_moe_experts=8, moe_ffn_hidden_size=256,
                     moe_shared_expert_intermediate_size=256, moe_latent_size=128, vocab_size=4096)
    hybrid = build_model(cfg)
    n_hybrid = sum(p.numel() for p in hybrid.parameters())

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    dense_params_per_layer = 4 * cfg.hidden_size ** 2
    ffn = max(64, int((n_hybrid - 2 * cfg.vocab_size * cfg.hidden_size) / cfg.num_layers - dense_params_per_layer)
              // (2 * cfg.hidden_size))
    gcfg = transformer_config(cfg.model_copy(update=dict(hybrid_override_pattern="*" * cfg.num_layers,
                                                         mtp_num_layers=0, mtp_hybrid_override_pattern=None,
                                                         ffn_hidden_size=ffn, num_query_groups=8)))
    gpt = GPTModel(config=gcfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                   vocab_size=cfg.vocab_size, max_sequence_length=seq, position_embedding_type="none")
    n_gpt = sum(p.numel() for p in gpt.parameters())

    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    pos = torch.arange(seq).expand(batch, seq)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(ids, pos, None, labels=ids).mean().backward()
        return run

    t_hybrid = _time(step(hybrid), reps)
    t_gpt = _time(step(gpt), reps)
    write_result(
        "model",
        figure={"what": f"hybrid tiny-256 fwd+bwd, batch {batch} x seq {seq}, CPU", "value": round(t_hybrid, 4), "unit": "s"},
        baseline={"what": "Megatron-Core GPTModel (local spec) of similar size, same batch", "value": round(t_gpt, 4),
                  "unit": "s"},
        ratio=t_hybrid / t_gpt, higher_is_better=False,
        goal="hybrid step within a small factor of a same-size GPTModel on CPU",
        extra={"hybrid_params": n_hybrid, "gpt_params": n_gpt, "gpt_ffn": ffn, "pattern": cfg.hybrid_override_pattern,
               "mtp": f"{cfg.mtp_hybrid_override_pattern} x{cfg.mtp_num_layers}", "tokens_per_step": batch * seq})


if __name__ == "__main__":
    main()
