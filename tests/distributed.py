"""Run a function on N gloo ranks on 127.0.0.1 and collect per-rank results (or the failing rank's traceback).

The function must be importable (module level) because ranks are fresh interpreters as under torchrun: started
by a `forkserver` that has imported torch and Megatron-Core once (each rank would otherwise spend ~7 s of CPU
importing them; the suite starts ~100 ranks), or with `spawn` where CUDA is present (a process that may have
touched CUDA must not fork) or FOLDTRON_TEST_START=spawn. Either way a rank runs with the caller's environment
as it is at the call, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and an initialised default gloo process group.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

# Imported once by the forkserver, inherited by every rank it forks. Third-party modules only: Foldtron's own
# modules (and the adaptation layer's patches) are imported and applied by each rank itself, as in production.
PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "megatron.core",
           "megatron.core.models.gpt", "megatron.core.models.mamba", "megatron.core.ssm.mamba_layer",
           "megatron.core.ssm.mamba_mixer", "megatron.core.transformer.moe.moe_layer",
           "megatron.core.dist_checkpointing", "megatron.core.optimizer", "megatron.core.distributed",
           "megatron.core.pipeline_parallel", "megatron.core.tensor_parallel"]


class RankFailed(RuntimeError):
    """A rank raised; the message carries its rank number and full traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_method() -> str:
    method = os.environ.get("FOLDTRON_TEST_START", "")
    if method:
        return method
    import torch

    return "spawn" if torch.cuda.is_available() else "forkserver"


def _context():
    ctx = mp.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, kwargs: dict, env: dict, q,
            whole_env: bool = False) -> None:
    # A forked rank starts with the forkserver's environment (the caller's when the server started): make it the
    # caller's of now (`env` is all of it), as `spawn` would.
    if whole_env:
        os.environ.clear()
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        result = fn(*args, **kwargs)
        q.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - the parent re-raises with this traceback
        q.put((rank, "err", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0,
                 env: dict | None = None, **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results ordered by rank.

    Raises RankFailed with the first failing rank's traceback, or on timeout naming the silent ranks.
    """
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    full_env = {**os.environ, **(env or {})}
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, full_env, q, True),
                         daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world_size:
            try:
                rank, status, payload = q.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                raise RankFailed(f"ranks {missing} gave no result within {timeout:.0f} s") from None
            if status == "err":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
