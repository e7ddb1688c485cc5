"""The scripts in examples/slurm/ submitted to a real one-node Slurm (`bash .ci/slurm.sh start`), at tiny scale on
CPU tasks: srun geometry, curation job arrays with the dependent dedup reduce, and training chains that are
signalled, save, and resume to the same losses as an uninterrupted run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
# The command the jobs run; FOLDTRON_TEST_BIN points the tests at another build (e.g. inside a container).
FOLDTRON = Path(os.environ.get("FOLDTRON_TEST_BIN", ROOT / ".venv" / "bin" / "foldtron"))
ENABLE = "start the test cluster with `bash .ci/slurm.sh start` (Debian slurmctld slurmd slurm-client munge)"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def cluster() -> dict:
    """A Slurm that answers, with the CPU count of its node; skip (saying how to start one) when it does not."""
    if shutil.which("sbatch") is None:
        pytest.skip(f"sbatch is not installed: {ENABLE}")
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %c"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip(f"slurmctld does not answer: {ENABLE}")
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not nodes:
        pytest.skip(f"no Slurm cluster answers ({out.stderr.strip()[:200]}): {ENABLE}")
    up = [n for n in nodes if n[1].rstrip("*~#") in ("idle", "mixed", "allocated", "completing")]
    if not up:
        pytest.skip(f"no Slurm node is up ({nodes}): {ENABLE}")
    return {"node": up[0][0], "cpus": int(up[0][2])}


def job_env(**extra: str) -> dict:
    env = dict(os.environ, FOLDTRON_HOME=str(ROOT), FOLDTRON_BIN=str(FOLDTRON))
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env or job_env(),
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, f"sbatch {args} failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def jobs(job_id: str) -> list[dict]:
    """Every record `scontrol show job` has for a job (one per array element), as dicts of its fields."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    recs = []
    for line in out.stdout.splitlines():
        recs.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
    return recs


def wait(job_ids: list[str], limit_s: float = 300, logs: list[Path] = ()) -> dict[str, list[dict]]:
    """Poll until every job (and every array element) has ended; their final records."""
    deadline = time.monotonic() + limit_s
    while True:
        recs = {j: jobs(j) for j in job_ids}
        if all(r["JobState"] in TERMINAL for rs in recs.values() for r in rs):
            return recs
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], timeout=30)
            tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"jobs {job_ids} still not done after {limit_s} s: "
                                 f"{[(r['JobId'], r['JobState']) for rs in recs.values() for r in rs]}\n{tails}")
        time.sleep(0.5)


def exit_code(rec: dict) -> int:
    return int(rec["ExitCode"].split(":")[0])


def test_srun_runs_one_task_per_slot(cluster, tmp_path):
    if cluster["cpus"] < 2:
        pytest.skip("needs a node with 2 CPUs for 2 tasks")
    out = tmp_path / "out.txt"
    jid = sbatch(["--ntasks=2", f"--output={out}", "--wrap",
                  "srun bash -c 'echo rank=$SLURM_PROCID of=$SLURM_NTASKS local=$SLURM_LOCALID "
                  "nodes=$SLURM_JOB_NODELIST'"])
    (rec,) = wait([jid], 60, [out])[jid]
    assert rec["JobState"] == "COMPLETED", out.read_text()
    lines = sorted(out.read_text().split("\n"))
    assert [ln for ln in lines if ln] == [f"rank={r} of=2 local={r} nodes={cluster['node']}" for r in (0, 1)]


# ---------------------------------------------------------------------------------------------------- curation

def test_curation_arrays_and_dedup_reduce_match_local_run(cluster, tmp_path):
    """submit_curation.sh: map array (3 tasks, 2 at once) -> dependent dedup reduce (2 tasks) -> write array;
    the curated shards and reports are byte-identical to one local `foldtron curate`."""
    from tests.test_curate import make_corpus, tree_digest

    sources = make_corpus(tmp_path / "corpus")
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(yaml.safe_dump({"unit_bytes": 60_000, "batch_docs": 16, "dedup": {"partitions": 4}}))
    local = tmp_path / "local"
    run = subprocess.run([str(FOLDTRON), "curate", "--sources", str(sources), "--output", str(local),
                          "--config", str(cfg), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((local / "reports" / "run.json").read_text())
    assert report["units"] >= 3  # so three map tasks each own input

    dist = tmp_path / "slurm"
    logs = tmp_path / "logs"
    logs.mkdir()
    sub = subprocess.run([str(SLURM / "submit_curation.sh"), "--reduce-tasks=2", "--cpus-per-task=1",
                          "--mem=0", "--time=10", f"--output={logs}/%x-%A_%a.out",
                          "2", "2", str(sources), str(dist), str(cfg)],
                         capture_output=True, text=True, env=job_env(), cwd=ROOT, timeout=60)
    assert sub.returncode == 0, sub.stderr
    map_id, reduce_id, write_id = sub.stdout.split()
    recs = wait([map_id, reduce_id, write_id], 300, sorted(logs.glob("*")))
    for jid, n in ((map_id, 3), (reduce_id, 2), (write_id, 3)):
        assert len(recs[jid]) == n, recs[jid]
        for r in recs[jid]:
            assert (r["JobState"], exit_code(r)) == ("COMPLETED", 0), \
                (r["JobId"], r["JobState"], [p.read_text()[-2000:] for p in logs.glob("*")])
    # the dedup reduce really waited for every map task, and write for the reduce
    start = lambda jid: min(r["StartTime"] for r in recs[jid])
    end = lambda jid: max(r["EndTime"] for r in recs[jid])
    assert end(map_id) <= start(reduce_id) and end(reduce_id) <= start(write_id)
    assert json.loads((dist / "reports" / "run.json").read_text()) == report
    assert tree_digest(dist) == tree_digest(local)


def test_failed_map_task_cancels_the_dependent_jobs(cluster, tmp_path):
    """A map task that fails (sources file unreadable) never lets the reduce or write run: they are cancelled."""
    sources = tmp_path / "sources.yaml"
    sources.write_text(yaml.safe_dump([{"name": "x", "kind": "jsonl", "paths": ["missing/*.jsonl"]}]))
    logs = tmp_path / "logs"
    logs.mkdir()
    sub = subprocess.run([str(SLURM / "submit_curation.sh"), "--reduce-tasks=1", "--cpus-per-task=1", "--mem=0",
                          "--time=5", f"--output={logs}/%x-%A_%a.out", "0", "1", str(sources), str(tmp_path / "o")],
                         capture_output=True, text=True, env=job_env(), cwd=ROOT, timeout=60)
    assert sub.returncode == 0, sub.stderr
    map_id, reduce_id, write_id = sub.stdout.split()
    recs = wait([map_id, reduce_id, write_id], 120)
    (m,) = recs[map_id]
    assert m["JobState"] == "FAILED" and exit_code(m) == 2, m
    out = "".join(p.read_text() for p in logs.glob("*"))
    assert "missing/*.jsonl" in out  # the error names what is missing
    for jid in (reduce_id, write_id):
        assert [r["JobState"] for r in recs[jid]] == ["CANCELLED"], recs[jid]
        assert not any(logs.glob(f"*-{jid}_*"))  # never started


# ---------------------------------------------------------------------------------------------------- training

TRAIN_ITERS, SAVE_EVERY = 40, 8
GEOMETRY = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


def tiny_config(path: Path) -> Path:
    """The tiny preset as one stage at 2 CPU ranks (gloo), mock data, fp32, a checkpoint every few steps."""
    cfg = {
        "model": {"preset": "tiny", "mtp_num_layers": 0},
        "precision": {"recipe": "fp32"},
        "data": {"mock": True, "seed": 1234},
        "train": {"seq_length": 64, "micro_batch_size": 2, "global_batch_size": 4, "train_iters": TRAIN_ITERS,
                  "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 2, "lr_decay_style": "cosine"},
        "checkpoint": {"save_interval": SAVE_EVERY, "keep_last": 2},
        "logging": {"log_interval": 1, "peak_tflops_per_device": 1.0},  # no peak-FLOPs probe at start-up
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def lm_losses(tb_dir: Path) -> dict[int, float]:
    """Step -> `lm loss` from every TensorBoard event file of a run (all jobs of a chain write there)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[int, float] = {}
    for f in sorted(tb_dir.rglob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.tag == "lm loss":
                    val = float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                    assert ev.step not in out, f"step {ev.step} logged twice in {tb_dir}"
                    out[ev.step] = val
    return out


def submit_chain(n: int, name: str, config: Path, runs: Path, *args: str) -> list[str]:
    """submit_chain.sh with the test geometry; `args`: its options (--x) first, then config overrides."""
    opts = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    sub = subprocess.run([str(SLURM / "submit_chain.sh"), f"--name={name}", *opts, *GEOMETRY, str(n), str(config),
                          *overrides],
                         capture_output=True, text=True, env=job_env(FOLDTRON_RUN_ROOT=str(runs)), cwd=ROOT,
                         timeout=60)
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.split()


def log_of(runs: Path, name: str, job: str) -> Path:
    return runs / name / "logs" / f"{name}-{job}.out"


def signal_after_first_save(job: str, log: Path) -> None:
    """Send SIGUSR1 to the batch shell (what `#SBATCH --signal=B:USR1@...` does before the time limit) once the
    job has written its first periodic checkpoint, so the trainer's helper processes exist when it arrives."""
    deadline = time.monotonic() + 300
    while f"iter_{SAVE_EVERY:07d}" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"job {job} never saved iteration {SAVE_EVERY}"
        assert jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-3000:] if log.exists() else job
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)


@pytest.fixture(scope="module")
def training(cluster, tmp_path_factory) -> dict:
    """The tiny config and the losses of one uninterrupted job (run by long_context.sbatch, which execs the
    shared pretrain.sbatch body; exit 0 ends its chain)."""
    if cluster["cpus"] < 2:
        pytest.skip("needs a node with 2 CPUs for 2 ranks")
    tmp = tmp_path_factory.mktemp("train")
    config = tiny_config(tmp / "tiny.yaml")
    runs = tmp / "runs"
    (ref,) = submit_chain(1, "ref", config, runs, f"--script={SLURM / 'long_context.sbatch'}",
                          f"checkpoint.save_interval={10 * TRAIN_ITERS}")  # saves cost seconds here: one, at the end
    # The export job waits for training to succeed, as in the README.
    export_log = tmp / "export.out"
    export = sbatch([f"--dependency=afterok:{ref}", "--kill-on-invalid-dep=yes", "--cpus-per-task=1", "--mem=0",
                     "--time=10", f"--output={export_log}", str(SLURM / "export_hf.sbatch"),
                     str(runs / "ref" / "checkpoints"), str(tmp / "hf"), "--dtype=fp32", "--verify",
                     "--config", str(config)])
    rec = wait([ref], 400, [log_of(runs, "ref", ref)])[ref][0]
    assert (rec["JobState"], exit_code(rec)) == ("COMPLETED", 0), log_of(runs, "ref", ref).read_text()[-3000:]
    assert "training complete" in log_of(runs, "ref", ref).read_text()
    losses = lm_losses(runs / "ref" / "tensorboard")
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    return {"config": config, "runs": runs, "losses": losses, "export": export, "export_log": export_log,
            "hf": tmp / "hf", "ref": rec}


@pytest.mark.slow
def test_export_job_runs_after_training_and_verifies(training):
    """export_hf.sbatch, submitted with --dependency=afterok on the training job: starts after it, writes a
    NemotronH directory, and `--verify` (transformers vs Foldtron logits and greedy tokens) passes."""
    log = training["export_log"]
    (rec,) = wait([training["export"]], 300, [log])[training["export"]]
    assert (rec["JobState"], exit_code(rec)) == ("COMPLETED", 0), log.read_text()[-3000:]
    assert rec["StartTime"] >= training["ref"]["EndTime"]
    config = json.loads((training["hf"] / "config.json").read_text())
    assert config["model_type"] == "nemotron_h"
    assert list(training["hf"].glob("*.safetensors"))
    assert '"greedy_equal": true' in log.read_text()


@pytest.mark.slow
def test_signalled_chain_resumes_to_the_uninterrupted_losses(training):
    """Singleton chain of 3: job 1 is signalled after a periodic checkpoint, saves and exits with the requeue
    code; job 2 resumes and completes; job 3 is cancelled; the losses are the uninterrupted run's, bit for bit."""
    runs = training["runs"]
    first, second, third = submit_chain(3, "chain", training["config"], runs)
    log1, log2 = log_of(runs, "chain", first), log_of(runs, "chain", second)
    signal_after_first_save(first, log1)
    recs = wait([first, second, third], 400, [log1, log2])

    text1, text2 = log1.read_text(), log2.read_text() if log2.exists() else "(job 2 never started)"
    (r1,), (r2,), (r3,) = recs[first], recs[second], recs[third]
    assert exit_code(r1) == 3, text1[-3000:]  # checkpoint.requeue_exit_code: "continue"
    stopped = int(re.search(r"stopping at iteration (\d+) \(signal\)", text1).group(1))
    assert SAVE_EVERY <= stopped < TRAIN_ITERS
    assert "got SIGUSR1" in text1 and "the next job of chain 'chain' resumes" in text1
    assert (r2["JobState"], exit_code(r2)) == ("COMPLETED", 0), text2[-3000:]
    assert f"resumed from {runs}/chain/checkpoints/main/iter_{stopped:07d}" in text2
    assert r1["EndTime"] <= r2["StartTime"]  # singleton: one job of the chain at a time
    assert r3["JobState"] == "CANCELLED" and not log_of(runs, "chain", third).exists()  # done: chain ended
    assert lm_losses(runs / "chain" / "tensorboard") == training["losses"]


@pytest.mark.slow
def test_requeue_chain_resumes_to_the_uninterrupted_losses(training):
    """`submit_chain.sh --requeue`: one job that requeues itself after the requeue exit and completes."""
    runs = training["runs"]
    (job,) = submit_chain(3, "rq", training["config"], runs, "--requeue")
    log = log_of(runs, "rq", job)
    signal_after_first_save(job, log)
    (rec,) = wait([job], 400, [log])[job]
    text = log.read_text()  # --open-mode=append: both runs of the job
    assert (rec["JobState"], exit_code(rec), rec["Restarts"]) == ("COMPLETED", 0, "1"), text[-3000:]
    stopped = int(re.search(r"stopping at iteration (\d+) \(signal\)", text).group(1))
    assert f"requeueing job {job} (restart 1 of 2)" in text
    assert f"resumed from {runs}/rq/checkpoints/main/iter_{stopped:07d}" in text
    assert lm_losses(runs / "rq" / "tensorboard") == training["losses"]
