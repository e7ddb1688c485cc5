"""HF export throughput (GB/s) and peak memory, streaming vs holding the whole model.

Model: a ~1.2B-parameter hybrid (M, *, E with 16 experts) saved in BF16 (2.3 GB) with Megatron-Core
dist_checkpointing, in its own process. Figure: `export_hf` (reads one layer at a time, writes 500 MB shards),
run in a fresh process: peak RSS (ru_maxrss) and GB written per second. Baseline, same run, fresh process: the
non-streaming way (load every tensor with one dist_checkpointing.load, map all names, write one safetensors
file), which needs the whole model in memory at once. Ratio: baseline peak RSS / streaming peak RSS (higher is
better). A streaming peak below the checkpoint's own size shows the export never holds the model even once.
Run: python -m bench.bench_export
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_result

CFG = dict(hybrid_override_pattern="MEMEM*EMEM*E", num_layers=12, hidden_size=2048, vocab_size=32768,
           num_attention_heads=16, num_query_groups=2, kv_channels=128, ffn_hidden_size=4096,
           mamba_num_heads=32, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=8, mamba_chunk_size=128,
           num_moe_experts=16, moe_router_topk=4, moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=4096,
           moe_latent_size=None, mtp_num_layers=0)
SHARD = 500 * 10**6


def _save(path: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing

    from model.build import build_model, init_single_process, transformer_config
    from model.config import ModelConfig

    init_single_process()
    Path(path).mkdir(parents=True)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg, config=transformer_config(cfg, params_dtype=torch.bfloat16, perform_initialization=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
    (Path(path) / "foldtron.json").write_text(json.dumps({"iteration": 0, "model": cfg.model_dump()}))
    return {"params": sum(p.numel() for p in model.parameters())}


def _stream(ckpt: str, out: str) -> dict:
    from megatron.core import dist_checkpointing  # noqa: F401 - imports out of the timing, as in _whole

    from model.build import init_single_process
    from pretrain.export_hf import export_hf

    init_single_process()

    r = export_hf(ckpt, out, "bf16", max_shard_bytes=SHARD)
    return {k: r[k] for k in ("bytes", "seconds", "gb_per_s", "peak_rss_bytes", "shards", "tensors")}


def _whole(ckpt: str, out: str) -> dict:
    import resource
    import time

    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from model.build import init_single_process
    from model.config import ModelConfig
    from model.hf_mapping import megatron_to_hf
    from pretrain.export_hf import CheckpointReader

    init_single_process()
    t0 = time.perf_counter()
    reader = CheckpointReader(ckpt, ModelConfig(**CFG))
    sub = {}
    import copy

    import torch

    for name, ent in reader.entries.items():
        e = copy.copy(ent)
        e.data = torch.empty(ent.data.shape, dtype=reader.dtypes[name])
        sub[name] = e
    state = dist_checkpointing.load(sub, ckpt)
    hf = {k: v.contiguous() for k, v in megatron_to_hf(state, reader.cfg).items()}
    Path(out).mkdir()
    save_file(hf, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    n = sum(v.numel() * v.element_size() for v in hf.values())
    secs = time.perf_counter() - t0
    return {"bytes": n, "seconds": secs, "gb_per_s": n / secs / 1e9,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _child(fn: str, *args: str) -> dict:
    """Run one step in a fresh interpreter so its peak RSS is its own."""
    code = (f"import json, sys; from bench.bench_export import {fn}; "
            f"print('RESULT' + json.dumps({fn}(*sys.argv[1:])))")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    if p.returncode:
        raise RuntimeError(f"{fn} failed:\n{p.stderr[-3000:]}")
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT"))[6:])


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        saved = _child("_save", str(tmp / "ckpt"))
        ckpt_bytes = sum(f.stat().st_size for f in (tmp / "ckpt").iterdir() if f.suffix == ".distcp")
        stream = _child("_stream", str(tmp / "ckpt"), str(tmp / "hf"))
        whole = _child("_whole", str(tmp / "ckpt"), str(tmp / "hf_whole"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gib = 2**30
    write_result(
        "export",
        figure={"what": "export_hf peak RSS (streaming, 500 MB shards)", "value": stream["peak_rss_bytes"] / gib,
                "unit": "GiB", "gb_per_s": round(stream["gb_per_s"], 3)},
        baseline={"what": "whole-model load + map + one safetensors file", "value": whole["peak_rss_bytes"] / gib,
                  "unit": "GiB", "gb_per_s": round(whole["gb_per_s"], 3)},
        ratio=whole["peak_rss_bytes"] / stream["peak_rss_bytes"], higher_is_better=True,
        goal="peak memory bounded by one shard plus one layer, below the checkpoint size",
        extra={"params": saved["params"], "checkpoint_bytes": ckpt_bytes, "stream": stream, "whole": whole,
               "stream_peak_over_checkpoint": stream["peak_rss_bytes"] / ckpt_bytes,
               "throughput_ratio_stream_over_whole": stream["gb_per_s"] / whole["gb_per_s"]})


if __name__ == "__main__":
    main()
