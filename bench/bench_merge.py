"""Checkpoint merging (`foldtron merge-checkpoints`): time and peak memory, streaming vs holding the checkpoints.

Checkpoints: 3 synthetic Megatron-Core dist_checkpointing checkpoints shaped like a training checkpoint (per
parameter: the model weight, the distributed optimizer's fp32 master copy, exp_avg, exp_avg_sq; 10 parameters of
up to 8M fp32 elements, 32 MiB, the largest item), 0.4 GB each, with foldtron.json and checksums as
checkpoint.save writes them. Figure: `pretrain.merge.merge` of the 3 (inputs' sha256 verified first) in a fresh
process: peak RSS (ru_maxrss) above the process's RSS after imports, and seconds. Baseline, same run, fresh
process: the non-streaming way (torch.distributed.checkpoint.load of every tensor of every input into memory,
average, torch.distributed.checkpoint.save), which needs all inputs in memory at once. Ratio: baseline peak /
streaming peak (higher is better). A streaming peak of a few items, not a few checkpoints, is the point.
Run: python -m bench.bench_merge
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_result

K = 3
SHAPES = [(2048, 4096)] + [(1024, 1024)] * 4  # x2 layers below: 10 parameters, 24M elements


def _save_all(root: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from model.build import init_single_process
    from pretrain import checkpoint as ckpt

    init_single_process()
    cpu = torch.device("cpu")
    for it in range(1, K + 1):
        g = torch.Generator(device=cpu).manual_seed(it)
        sd, n = {}, 0
        for layer in range(2):
            for j, shape in enumerate(SHAPES):
                name = f"module.decoder.layers.{layer}.p{j}.weight"
                for key in (name, *(f"optimizer.state.{s}.{name}" for s in ("param", "exp_avg", "exp_avg_sq"))):
                    sd[key] = ShardedTensor.from_rank_offsets(key, torch.randn(shape, generator=g, device=cpu),
                                                              replica_id=0)
                n += shape[0] * shape[1]
        path = Path(root) / "run" / "main" / ckpt.iter_name(it)
        path.mkdir(parents=True)
        dist_checkpointing.save(sd, str(path))
        files = ckpt.file_checksums(path)
        (path / ckpt.META).write_text(json.dumps({"stage": "main", "iteration": it, "consumed_tokens": 1000 * it,
                                                  "files": files}))
        (path.parent / "latest").write_text(path.name + "\n")
    return {"params": n, "bytes": sum(r["bytes"] for r in files.values())}


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stream(root: str) -> dict:
    import time

    import torch.distributed.checkpoint  # noqa: F401 - imports out of the measurement, as in _whole

    from pretrain import merge as mg

    base = _rss()
    t = time.perf_counter()
    infos = mg.select(Path(root) / "run", "main", last=K)
    rep = mg.merge(infos, Path(root) / "merged")
    return {"seconds": time.perf_counter() - t, "peak_above_imports": _rss() - base,
            "largest_item": rep["largest_averaged_item_bytes"], "checkpoint_bytes": rep["checkpoint_bytes"]}


def _whole(root: str) -> dict:
    import time

    import torch
    import torch.distributed.checkpoint as dcp

    base = _rss()
    t = time.perf_counter()
    sums: dict = {}
    for it in range(1, K + 1):
        reader = dcp.FileSystemReader(str(Path(root) / "run" / "main" / f"iter_{it:07d}"))
        meta = reader.read_metadata().state_dict_metadata
        sd = {k: torch.empty(v.size, dtype=v.properties.dtype, device=torch.device("cpu")) for k, v in meta.items()
              if hasattr(v, "size")}
        dcp.load(sd, storage_reader=reader, no_dist=True)
        for k, v in sd.items():
            sums.setdefault(k, []).append(v)
    out = {k: torch.stack([x.double() for x in v]).mean(0).float() for k, v in sums.items()}
    dcp.save(out, storage_writer=dcp.FileSystemWriter(str(Path(root) / "whole")), no_dist=True)
    return {"seconds": time.perf_counter() - t, "peak_above_imports": _rss() - base}


def _in_fresh_process(fn: str, root: str) -> dict:
    code = f"import json, sys; from bench.bench_merge import {fn}; print(json.dumps({fn}(sys.argv[1])))"
    r = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    if r.returncode:
        raise RuntimeError(f"{fn} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    root = tempfile.mkdtemp(prefix="bench_merge_")
    try:
        made = _in_fresh_process("_save_all", root)
        s = _in_fresh_process("_stream", root)
        w = _in_fresh_process("_whole", root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = 2**20
    write_result(
        "merge",
        figure={"what": f"merge-checkpoints of {K} checkpoints of {made['bytes'] / 1e9:.2f} GB: peak RSS above "
                        "imports", "value": round(s["peak_above_imports"] / mib, 1), "unit": "MiB"},
        baseline={"what": "dcp.load all inputs, mean, dcp.save: peak RSS above imports",
                  "value": round(w["peak_above_imports"] / mib, 1), "unit": "MiB"},
        ratio=w["peak_above_imports"] / max(s["peak_above_imports"], 1), higher_is_better=True,
        goal="streaming: peak memory a few items (the largest averaged item here: "
             f"{s['largest_item'] / mib:.0f} MiB), independent of checkpoint size and K",
        extra={"checkpoint_bytes": made["bytes"], "params": made["params"], "inputs": K,
               "merge_seconds": round(s["seconds"], 2), "baseline_seconds": round(w["seconds"], 2),
               "merge_GBps_read": round(K * made["bytes"] / s["seconds"] / 1e9, 3),
               "largest_averaged_item_bytes": s["largest_item"]})


if __name__ == "__main__":
    main()
