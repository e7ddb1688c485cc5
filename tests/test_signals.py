"""SIGTERM/SIGUSR1 the way Slurm sends them, to every process of the task (the process group here): the trainer
saves and exits with the requeue code, Megatron's checkpoint-writer helper survives, and a signal during start-up
is kept until the loop can honour it."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiproc

HELPER = textwrap.dedent("""
    import os, signal, sys, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from pretrain.signals import StopRequests

    stop = StopRequests().install() if sys.argv[1] == "install" else None
    queue = filesystem_async.get_write_results_queue()  # what the first save does (public since 0.19)
    kids = [int(d) for d in os.listdir("/proc") if d.isdigit()
            and f"PPid:\\t{os.getpid()}\\n" in open(f"/proc/{d}/status").read()]
    assert kids, "no helper process"
    for pid in kids + [os.getpid()]:
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    queue.put("alive")
    print("queue:", queue.get(timeout=10), "received:", stop and stop.received, flush=True)
""")


def _helper(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HELPER, mode], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_checkpoint_writer_helper_survives_signals():
    """With StopRequests installed, the write-results Manager (and multiprocessing's resource tracker) live
    through SIGUSR1 + SIGTERM and the queue still works; the trainer's own handler recorded the signal. Without
    it (the control) the same signals kill the helper: this is what broke the save on a Slurm signal."""
    r = _helper("install")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"queue: alive received: {int(signal.SIGTERM)}" in r.stdout
    control = _helper("bare")
    assert control.returncode != 0 and "queue: alive" not in control.stdout


BASE = ["model.preset=tiny", "model.mtp_num_layers=0", "data.mock=true", "train.seq_length=32",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=10000", "precision.recipe=fp32",
        "checkpoint.save_interval=2", "checkpoint.keep_last=1", "logging.log_interval=1"]


def _start(run_dir: Path, out: Path) -> subprocess.Popen:
    # A session of its own: os.killpg signals the trainer and every helper, as Slurm does with a task.
    return subprocess.Popen([sys.executable, "-m", "pretrain.cli", "train", *BASE, f"checkpoint.save={run_dir}"],
                            cwd=ROOT, stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, cond, what: str, out: Path) -> None:
    deadline = time.monotonic() + 300
    while not cond():
        assert proc.poll() is None, f"trainer exited ({proc.returncode}) before {what}:\n{out.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in 300 s:\n{out.read_text()[-3000:]}"
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, out: Path) -> tuple[str, int]:
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert rc == 3, f"exit {rc}, not the requeue code 3:\n{text[-3000:]}"
    assert "BrokenPipeError" not in text and "Traceback" not in text, text[-3000:]
    (stopped,) = re.findall(r"stopping at iteration (\d+) \(signal\)", text)
    return text, int(stopped)


def _latest(run_dir: Path) -> int:
    stage = next(p for p in run_dir.iterdir() if (p / "latest").is_file())
    return int((stage / "latest").read_text().strip().removeprefix("iter_"))


@pytest.mark.slow
def test_sigterm_to_the_process_group_after_a_save_saves_and_requeues(tmp_path):
    """SIGTERM to every process after the first periodic checkpoint (the writer's helper exists by then): the
    loop finishes its step, saves that iteration and exits 3; a second SIGTERM during the stop changes nothing."""
    run_dir, out = tmp_path / "run", tmp_path / "out.log"
    proc = _start(run_dir, out)
    _wait_for(proc, lambda: "saved checkpoint" in out.read_text(), "first checkpoint", out)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    text, stopped = _finish(proc, out)
    assert 2 <= stopped < 10000 and _latest(run_dir) == stopped
    assert f"iter_{stopped:07d}" in text


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
def test_sigterm_during_startup_stops_after_the_first_step(tmp_path):
    """A SIGTERM while the trainer still imports torch is recorded (the handler is the command's first act), not
    fatal: the loop runs one step, saves it and exits with the requeue code."""
    run_dir, out = tmp_path / "run", tmp_path / "out.log"
    proc = _start(run_dir, out)
    _wait_for(proc, lambda: _catches_sigterm(proc.pid), "SIGTERM handler", out)
    os.killpg(proc.pid, signal.SIGTERM)
    text, stopped = _finish(proc, out)
    assert "SIGTERM arrived during start-up" in text
    assert stopped == 1 and _latest(run_dir) == 1


@pytest.mark.slow
def test_sigint_saves_and_requeues_like_sigterm(tmp_path):
    """Ctrl-C (SIGINT to the process group) is a stop request: the step finishes, the iteration is saved and the
    exit code asks for a requeue; it was a KeyboardInterrupt traceback with nothing saved (issue 20)."""
    run_dir, out = tmp_path / "run", tmp_path / "out.log"
    proc = _start(run_dir, out)
    _wait_for(proc, lambda: "saved checkpoint" in out.read_text(), "first checkpoint", out)
    os.killpg(proc.pid, signal.SIGINT)
    text, stopped = _finish(proc, out)
    assert 2 <= stopped < 10000 and _latest(run_dir) == stopped
