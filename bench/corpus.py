"""The benchmark corpus for the data pipeline: every Python stdlib module as curated JSONL (real, varied text)."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path


def write_stdlib_corpus(root: Path, repeat: int = 1) -> Path:
    lib = Path(sysconfig.get_paths()["stdlib"])
    groups: dict[str, list[Path]] = {"top": sorted(lib.glob("*.py"))}
    for sub in ("asyncio", "email", "json", "unittest", "concurrent", "importlib", "xml", "http", "multiprocessing"):
        groups.setdefault("pkgs", []).extend(sorted((lib / sub).rglob("*.py")))
    groups["tests"] = sorted((lib / "test").glob("test_*.py"))[:400]
    cur = root / "curated"
    for source, files in groups.items():
        d = cur / source
        d.mkdir(parents=True, exist_ok=True)
        for r in range(repeat):
            with open(d / f"part{r}.jsonl", "w") as f:
                for p in files:
                    try:
                        text = p.read_text()
                    except UnicodeDecodeError:
                        continue
                    f.write(json.dumps({"id": f"{r}/{p.name}", "source": source, "text": text}) + "\n")
    return cur
