"""bench/device_check.py's CPU-verifiable parts: argument handling, the carried-wheel directory, imports, and the
proxy's config and memory prediction (`--dry-run`); the GPU measurements run on a GPU machine only."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bench.device_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_checks_wheels_and_writes_the_plan(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("megatron_core-0.19.2", "pydantic-2.14.4", "pydantic_core-2.50.5", "mamba_ssm-2.3.1"):
        (wheels / f"{name}-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "dc.json"
    r = _run("--dry-run", "--wheels", str(wheels), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["proxy_pattern"] and res["predicted_memory_gib"] > 0
    assert set(res["wheels"]) == {"megatron_core", "pydantic", "pydantic_core", "mamba_ssm"}


def test_missing_wheel_is_named(tmp_path):
    r = _run("--dry-run", "--wheels", str(tmp_path), "--out", str(tmp_path / "x.json"))
    assert r.returncode != 0 and "no megatron_core wheel" in (r.stderr + r.stdout)


def test_bad_arguments_are_refused(tmp_path):
    r = _run("--dry-run", "--seq", "4", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "--seq" in r.stderr
