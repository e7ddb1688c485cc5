"""`make bench`: run every bench/bench_*.py in its own process, then print (and write) a markdown table of the
figures, baselines and ratios from bench/results/*.json."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table() -> str:
    rows = ["| benchmark | figure | baseline (same run) | ratio | goal |", "|---|---|---|---|---|"]
    machine = None
    for path in sorted((HERE / "results").glob("*.json")):
        r = json.loads(path.read_text())
        f, b = r.get("figure", {}), r.get("baseline", {})
        fmt = lambda d: f"{d.get('value', '?'):.4g} {d.get('unit', '')} ({d.get('what', '')})" if isinstance(
            d.get("value"), (int, float)) else str(d)
        rows.append(f"| {r.get('name', path.stem)} | {fmt(f)} | {fmt(b)} | {r.get('ratio')} | {r.get('goal') or ''} |")
        machine = machine or r.get("machine")
    if machine:
        rows.append("")
        rows.append(f"Machine: {machine.get('cpu', '?')}, {machine.get('cpu_count')} cores, torch {machine.get('torch')}"
                    + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"))
    return "\n".join(rows)


def main() -> int:
    failed = []
    only = sys.argv[1:]
    for script in sorted(HERE.glob("bench_*.py")):
        if only and script.stem.removeprefix("bench_") not in only:
            continue
        t0 = time.time()
        print(f"== {script.stem}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"bench.{script.stem}"], cwd=HERE.parent)
        print(f"== {script.stem}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(script.stem)
    md = table()
    (HERE / "results" / "SUMMARY.md").write_text(md + "\n")
    print(md)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
