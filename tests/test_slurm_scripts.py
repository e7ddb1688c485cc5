"""The Slurm scripts without a cluster: shellcheck on every shell script, the ready geometries (env files) checked
against their configs' parallel layouts, and what submit_chain.sh would submit."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
ENV_FILES = sorted(SLURM.glob("*.env"))


def shell_scripts() -> list[Path]:
    """Every shell script of the repository: *.sh, *.sbatch, *.env, and .ci/ files with a shell shebang."""
    found = set()
    for pattern in ("*.sh", "*.sbatch", "*.env"):
        found |= {p for p in ROOT.rglob(pattern) if ".venv" not in p.parts and ".git" not in p.parts}
    for p in (ROOT / ".ci").iterdir():
        if p.is_file() and p.read_text(errors="replace").startswith(("#!/bin/bash", "#!/usr/bin/env bash", "#!/bin/sh")):
            found.add(p)
    return sorted(found)


def test_the_slurm_scripts_exist():
    names = {p.name for p in shell_scripts()}
    assert {"slurm.sh", "run", "pretrain.sbatch", "submit_chain.sh", "long_context.sbatch", "curate_array.sbatch",
            "dedup_reduce.sbatch", "submit_curation.sh", "export_hf.sbatch"} <= names
    assert {"nano-64x8.env", "super-512x8.env"} <= {p.name for p in ENV_FILES}


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="needs shellcheck: `apt-get install shellcheck` (.ci/slurm.sh start installs it)")
def test_shellcheck_passes_on_every_script():
    scripts = shell_scripts()
    out = subprocess.run(["shellcheck", "-x", "--severity=info", *map(str, scripts)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, f"shellcheck on {len(scripts)} scripts:\n{out.stdout}{out.stderr}"


def read_env_file(path: Path) -> dict:
    """Source the env file with bash, as submit_chain.sh does, and read back its variables."""
    script = (f". {shlex.quote(str(path))}; printf '%s\\n' \"$FOLDTRON_CONFIG\" \"$FOLDTRON_NODES\" "
              "\"$FOLDTRON_GPUS_PER_NODE\" \"$FOLDTRON_JOB_NAME\"; printf '%s\\n' \"${FOLDTRON_OVERRIDES[@]}\"")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, timeout=30)
    lines = out.stdout.split("\n")
    return {"config": lines[0], "nodes": int(lines[1]), "gpus": int(lines[2]), "name": lines[3],
            "overrides": [x for x in lines[4:] if x]}


# Problems that depend on the number of GPUs; the others (a model/layout mismatch) are the layout's own tests.
GEOMETRY = ("world size", "dp=", "vpp=", "batch:")


@pytest.mark.parametrize("env_file", ENV_FILES, ids=[p.stem for p in ENV_FILES])
def test_env_geometry_fits_every_stage_layout(env_file):
    """Every stage a job of this size runs fits its layout, at every sequence length the stage trains; stages the
    config plans for another job size (`gpus`) are not run by this job (it stops before them)."""
    from pretrain.config import load_config
    from pretrain.stages import resolve

    env = read_env_file(env_file)
    cfg = load_config(ROOT / env["config"], env["overrides"])
    world = env["nodes"] * env["gpus"]
    ran = 0
    for stage in resolve(cfg, check_inputs=False):  # the cluster paths (/data/...) are not here
        if stage.gpus is not None and stage.gpus != world:
            continue
        ran += 1
        t = stage.train
        for seq in stage.lengths:
            probs = stage.parallel.problems(cfg.model, world, seq, t.micro_batch_size, t.global_batch_size)
            assert [p for p in probs if p.startswith(GEOMETRY)] == [], \
                f"{env_file.name}: stage {stage.name} on {world} GPUs at seq_length {seq}"
    assert ran, f"{env_file.name}: no stage of {env['config']} is planned for {world} GPUs"


def test_every_stage_of_the_production_configs_has_a_job_of_its_size():
    """Super: phases 1/2 on the 4,096-GPU env, the two long-context stages (published batch 16, 1M and 1M/4K) on
    the 2,048-GPU env with the same job name (one run directory); no env overrides the plan."""
    from pretrain.config import load_config
    from pretrain.stages import resolve

    envs = [read_env_file(p) for p in ENV_FILES]
    for cfg_path in sorted({e["config"] for e in envs}):
        sizes = {e["nodes"] * e["gpus"] for e in envs if e["config"] == cfg_path}
        assert all(e["overrides"] == [] for e in envs if e["config"] == cfg_path)
        cfg = load_config(ROOT / cfg_path)
        for stage in resolve(cfg, check_inputs=False):
            assert (stage.gpus or cfg.cluster.gpus) in sizes, f"{cfg_path}: stage {stage.name}"
    published = resolve(load_config(ROOT / "examples/configs/super-120b-a12b.yaml"), check_inputs=False)
    lc = [s for s in published if s.name.startswith("long-context")]
    assert [(s.parallel.cp, s.parallel.tp, s.parallel.ep, s.train.global_batch_size, s.lengths) for s in lc] == [
        (64, 2, 64, 16, (1048576,)), (64, 2, 64, 16, (1048576, 4096))]
    exact = read_env_file(SLURM / "super-long-context-256x8.env")
    assert exact["nodes"] * exact["gpus"] == 2048 and exact["name"] == read_env_file(SLURM / "super-512x8.env")["name"]


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLURM / "submit_chain.sh"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=30)


def test_submit_chain_singleton_and_requeue_commands():
    out = submit("--dry-run", "--env", str(SLURM / "nano-64x8.env"), "--partition=batch", "3", "train.lr=1e-4")
    assert out.returncode == 0, out.stderr
    cmds = [shlex.split(line) for line in out.stdout.splitlines()]
    assert len(cmds) == 3
    for c in cmds:
        assert c[0] == "sbatch" and "--dependency=singleton" in c
        assert {"--job-name=nano-30b-a3b", "--nodes=64", "--ntasks-per-node=8", "--gpus-per-node=8",
                "--time=04:00:00", "--partition=batch"} <= set(c)
        assert c[-3:] == [str(SLURM / "pretrain.sbatch"), "examples/configs/nano-30b-a3b.yaml", "train.lr=1e-4"]
    (one,) = [shlex.split(x) for x in submit("--dry-run", "--requeue", "--env", str(SLURM / "super-512x8.env"),
                                             "4").stdout.splitlines()]
    assert "--requeue" in one and "--export=ALL,FOLDTRON_REQUEUE=1,FOLDTRON_MAX_RESTARTS=3" in one
    assert one[-1] == "examples/configs/super-120b-a12b.yaml"  # the plan as shipped: no overrides


@pytest.mark.parametrize("args, message", [
    (["0", "examples/configs/tiny.yaml"], "N must be a positive number"),
    (["2"], "no config"),
    (["2", "nope.yaml"], "config nope.yaml does not exist"),
    (["--env", "nope.env", "2"], "env file nope.env does not exist"),
    (["-x", "2"], "unknown option -x"),
])
def test_submit_chain_bad_input_is_named(args, message):
    out = submit("--dry-run", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_batch_scripts_refuse_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), "examples/configs/tiny.yaml"], capture_output=True,
                         text=True, env=dict(env, FOLDTRON_RUN_ROOT=str(tmp_path)), cwd=ROOT, timeout=30)
    assert out.returncode != 0 and "submit it with sbatch" in out.stderr
    out = subprocess.run(["bash", str(SLURM / "curate_array.sbatch"), "map", "s.yaml", "out"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=30)
    assert out.returncode != 0 and "runs as a job array" in out.stderr
    out = subprocess.run(["bash", str(SLURM / "curate_array.sbatch"), "reduce", "s.yaml", "out"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert out.returncode == 2 and "dedup_reduce.sbatch" in out.stderr
