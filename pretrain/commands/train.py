"""`foldtron train --config FILE [key=value ...]`: run every stage of a run config, resuming where it stopped.

Under torchrun or srun each process runs this command (the launcher's environment says which rank it is).
`--nproc N` starts N local CPU/gloo ranks itself (a laptop, CI, the quickstart). Exit code 0: all stages done;
`checkpoint.requeue_exit_code` (default 3): stopped by SIGTERM/SIGUSR1 or exit-duration after saving, run the
same command again (Slurm chains requeue on it); 1: a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from pretrain.commands.config import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model through all stages of a run config", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N local gloo ranks (CPU) instead of reading torchrun/srun's environment")
    p.add_argument("--summary", metavar="FILE", help="write the run summary (losses per stage, tokens/s) as JSON")
    p.set_defaults(func=_train)


def _spawn(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # fail fast, before any process starts
    if args.nproc < 1:
        print(f"foldtron train: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pretrain.cli", "train"] + (["--config", args.config] if args.config else [])
    cmd += list(args.overrides) + (["--summary", args.summary] if args.summary else [])
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):  # Slurm/the user signals the launcher: every rank must see it
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Before the first rank starts, so that no signal finds the launcher without its handler.
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        # The ranks start with SIGTERM/SIGUSR1 blocked (a mask survives exec) until their catch_early(): one
        # forwarded while a rank still starts Python waits for its handler. Here it waits for all ranks to exist.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))
        try:
            for r in range(args.nproc):
                env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(r),
                           LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
                procs.append(subprocess.Popen(cmd, env=env))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        codes: dict[int, int] = {}
        while len(codes) < len(procs):
            for r, p in enumerate(procs):
                if r not in codes and p.poll() is not None:
                    codes[r] = p.returncode
                    if p.returncode not in (0, cfg.checkpoint.requeue_exit_code):
                        time.sleep(5)  # let the others report their own error first
                        for q in procs:
                            if q.poll() is None:
                                q.kill()
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    bad = [c for c in codes.values() if c not in (0, cfg.checkpoint.requeue_exit_code)]
    if bad:
        return 1
    return max(codes.values())


def _train(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return _spawn(args)
    from pretrain import signals

    signals.catch_early()  # before torch is imported: a signal during start-up stops after step one, saved
    import torch.distributed as dist

    from pretrain import checkpoint
    from pretrain.config import load_config
    from pretrain.train import run_training

    cfg = load_config(args.config, args.overrides)
    checkpoint.record_run(cfg)  # checkpoints name their model and tokenizer: export-hf needs no --config
    summary = run_training(cfg)
    if args.summary and dist.get_rank() == 0:
        tmp = args.summary + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, args.summary)
    dist.barrier()
    dist.destroy_process_group()
    return int(summary["exit_code"])
