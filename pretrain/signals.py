"""Stop requests: SIGTERM (Slurm's pre-emption / time limit warning) and SIGUSR1 (`#SBATCH --signal=USR1@120`)
set a flag; the loop finishes the current step, agrees across ranks that someone was signalled, saves and exits
with `checkpoint.requeue_exit_code` so the job chain requeues it. A second SIGTERM does not kill the save.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self, exit_duration_in_mins: Optional[float] = None, start_time: Optional[float] = None):
        self.received: Optional[int] = None
        self.start = time.time() if start_time is None else start_time
        self.limit_s = None if exit_duration_in_mins is None else exit_duration_in_mins * 60.0
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> "StopRequests":
        for s in HANDLED:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def check(self) -> Optional[str]:
        """Collective: every rank must call it at the same step. Returns the reason to stop, or None."""
        local = 0
        if self.received is not None:
            local = 1
        if self.limit_s is not None and time.time() - self.start > self.limit_s:
            local = max(local, 2)
        flag = torch.tensor([local], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        return {0: None, 1: "signal", 2: "exit-duration"}[code]
