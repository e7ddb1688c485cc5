"""Where this process sits in the job: read torchrun's or Slurm's environment, then start torch.distributed.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. `srun` (one task per GPU) sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST; the master is the first host of the node list
(`scontrol show hostnames`) and the port is derived from SLURM_JOB_ID, so every task of a job agrees without
talking. When both are present, torchrun's variables win (torchrun inside an allocation). Inconsistent values
(rank >= world size, a half-set environment) are errors that name the variables.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

#: Ports derived from a Slurm job id fall in [BASE, BASE + SPAN): above the well-known and registered ranges
#: that are commonly taken, below Linux's default ephemeral range (32768+).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 12000, 20000


class LaunchError(RuntimeError):
    """The launcher environment is missing or inconsistent; the message names the variables."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def slurm_master_addr(nodelist: str) -> str:
    """First host of a Slurm node list such as `node[03-05,9]` (expanded by `scontrol show hostnames`)."""
    if "[" not in nodelist and "," not in nodelist:
        return nodelist
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
    except FileNotFoundError:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} needs `scontrol show hostnames` to expand, "
                          "but scontrol is not on PATH; set MASTER_ADDR") from None
    except subprocess.CalledProcessError as e:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: {e.stderr.strip()}") from None
    if not out:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` printed no host")
    return out[0]


def read_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """This process's rank, world and rendezvous address, from torchrun's or Slurm's variables."""
    env = os.environ if env is None else env
    torchrun = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if torchrun:
        if len(torchrun) != 2:
            raise LaunchError("RANK and WORLD_SIZE must be set together (torchrun sets both); "
                              f"only {torchrun[0]} is set")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
            raise LaunchError(f"WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT (torchrun sets them)")
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500"))
        source = "torchrun"
    elif "SLURM_PROCID" in env:
        missing = [k for k in ("SLURM_NTASKS", "SLURM_LOCALID") if k not in env]
        if missing:
            raise LaunchError(f"SLURM_PROCID is set but {', '.join(missing)} is not: launch with srun")
        rank, world, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = slurm_master_addr(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        elif world == 1:
            addr = "127.0.0.1"
        else:
            raise LaunchError("Slurm launch without SLURM_JOB_NODELIST: cannot find the master host; set MASTER_ADDR")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        elif world == 1:
            port = 29500
        else:
            raise LaunchError("Slurm launch without SLURM_JOB_ID: cannot derive MASTER_PORT; set it")
        source = "slurm"
    else:
        # One process: a fixed port could meet another job's store on this machine and wait forever.
        rank, world, local, addr, port, source = 0, 1, 0, "127.0.0.1", free_port(), "single"
    if world < 1:
        raise LaunchError(f"world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside the world of {world} processes ({source} environment)")
    if local < 0 or local > rank:
        raise LaunchError(f"local rank {local} is inconsistent with rank {rank} ({source} environment)")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT {port} is not a TCP port")
    return DistEnv(rank, world, local, addr, port, source)


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> DistEnv:
    """Start the default process group (NCCL with CUDA, gloo without) unless it already runs."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 0) or 0),
                       "existing")
    e = read_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        n_gpus = torch.cuda.device_count()
        if e.local_rank >= n_gpus:
            raise LaunchError(f"local rank {e.local_rank} but this node has {n_gpus} GPU(s): NCCL runs one GPU per "
                              "rank (several ranks on one GPU fail); start at most that many ranks per node, or set "
                              "backend=cpu for gloo ranks on the CPU")
        torch.cuda.set_device(e.local_rank)
    dist.init_process_group(backend, init_method=f"tcp://{e.master_addr}:{e.master_port}", rank=e.rank,
                            world_size=e.world_size, timeout=timedelta(seconds=timeout_s))
    return e
