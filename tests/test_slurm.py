"""The scripts in examples/slurm/ submitted to a real one-node Slurm (`bash .ci/slurm.sh start`), at tiny scale on
CPU tasks: srun geometry, curation job arrays with the dependent dedup reduce, and training chains that are
signalled, save, and resume to the same losses as an uninterrupted run."""
from __future__ import annotations

import hashlib
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
FOLDTRON = ROOT / ".venv" / "bin" / "foldtron"
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
