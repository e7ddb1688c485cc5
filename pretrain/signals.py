"""Stop requests: SIGTERM (Slurm's pre-emption / time limit warning) and SIGUSR1 (`#SBATCH --signal=USR1@120`)
set a flag; the loop finishes the current step, agrees across ranks that someone was signalled, saves and exits
with `checkpoint.requeue_exit_code` so the job chain requeues it. A second SIGTERM does not kill the save.

Two ways a signal used to end a job with exit 1 instead of a checkpoint:
- Slurm signals every process of a task, helpers included. Megatron's checkpoint writer keeps a spawned
  multiprocessing Manager (`filesystem_async.get_write_results_queue()`) for the rest of the process's life;
  under the default disposition a later SIGUSR1/SIGTERM killed it and the save on that signal died with
  BrokenPipeError. `install()` starts that helper itself with the handled signals blocked, a mask the spawned
  process inherits and never lifts: the signal stays pending there forever, the helper lives on.
- A signal while the trainer still imports torch or builds the model met the default action and killed it.
  `catch_early()` (first thing in `foldtron train`) records such a signal; `install()` takes it over, so the
  loop saves and stops after its first step.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

# SIGINT (Ctrl-C) too: it saves and exits like SIGTERM instead of a traceback with nothing saved.
HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

#: A signal that arrived between `catch_early()` and `StopRequests.install()`.
_early_signal: Optional[int] = None


def _early_handler(signum, frame) -> None:
    global _early_signal
    _early_signal = signum


def catch_early() -> None:
    """Record SIGTERM/SIGUSR1 from process start on (no heavy imports here: this runs before torch's)."""
    for s in HANDLED:
        signal.signal(s, _early_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # `foldtron train --nproc` starts its ranks blocked


def start_checkpoint_helper() -> None:
    """Start Megatron's checkpoint-writer helper (a spawned Manager, created once per process) now, with the
    handled signals blocked so that it inherits them blocked. multiprocessing's resource tracker, started on the
    way, unblocks SIGINT/SIGTERM in the caller after starting itself, so it is started first and the mask set
    again. Signals that arrive meanwhile stay pending in this process and reach its handler afterwards."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        resource_tracker.ensure_running()  # ignores SIGTERM itself; inherits SIGUSR1 blocked
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        filesystem_async.get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopRequests:
    def __init__(self, exit_duration_in_mins: Optional[float] = None, start_time: Optional[float] = None):
        self.received: Optional[int] = None
        self.start = time.time() if start_time is None else start_time
        self.limit_s = None if exit_duration_in_mins is None else exit_duration_in_mins * 60.0
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> "StopRequests":
        global _early_signal
        for s in HANDLED:
            self._old[s] = signal.signal(s, self._handler)
        if _early_signal is not None:  # read after our handler is in place: no signal falls between the two
            self.received, _early_signal = _early_signal, None
            print(f"foldtron: {signal.Signals(self.received).name} arrived during start-up; stopping with a "
                  "checkpoint after the first step", flush=True)
        start_checkpoint_helper()
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def check(self) -> Optional[str]:
        """Collective: every rank must call it at the same step. Returns the reason to stop, or None."""
        import torch
        import torch.distributed as dist

        local = 0
        if self.received is not None:
            local = 1
        if self.limit_s is not None and time.time() - self.start > self.limit_s:
            local = max(local, 2)
        from model.adapt import current_device

        # On the backend's device: NCCL has no CPU tensors (gloo takes either).
        flag = torch.tensor([local], dtype=torch.int32, device=current_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        return {0: None, 1: "signal", 2: "exit-duration"}[code]
