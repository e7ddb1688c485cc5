"""The result format every benchmark writes: its figure, the baseline measured in the same run, their ratio,
and the machine, so a table can compare runs on noisy machines by ratio rather than by absolute time."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_result(name: str, *, figure: dict[str, Any], baseline: dict[str, Any], ratio: float,
                 higher_is_better: bool, goal: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """figure/baseline: {"what": ..., "value": float, "unit": ...}. ratio: figure/baseline as the goal reads it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"name": name, "figure": figure, "baseline": baseline, "ratio": round(float(ratio), 4),
               "higher_is_better": higher_is_better, "goal": goal, "extra": extra or {},
               "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: payload[k] for k in ("name", "figure", "baseline", "ratio", "goal")}))
    return out
