"""Run a function on N gloo ranks on 127.0.0.1 and collect per-rank results (or the failing rank's traceback).

The function must be importable (module level) because ranks are started with the `spawn` method, like
torchrun would start fresh interpreters. Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its
environment and an initialised default gloo process group.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised; the message carries its rank number and full traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, kwargs: dict, env: dict, q) -> None:
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
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, env or {}, q), daemon=False)
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
