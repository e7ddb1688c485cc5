"""`foldtron quickstart`: the whole pipeline, for real, on an embedded corpus on a laptop CPU.

Each step writes its outputs under --output and a record in `<output>/quickstart/<step>.json`; a rerun reuses
finished steps (delete a step's record, or pass --fresh, to redo it). Steps run in order:
corpus -> curate -> tokenizer -> shards -> curriculum (then training and export, as they land).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml


@dataclass
class Quickstart:
    output: Path
    steps: int = 30  # optimizer steps of the first training stage (later stages scale from it)
    cpus: int = 2  # processes for curation / sharding
    vocab_size: int = 2048
    seq_length: int = 128
    global_batch_size: int = 8
    seed: int = 1234
    log: Callable[[str], None] = print
    results: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ plumbing
    @property
    def records(self) -> Path:
        return self.output / "quickstart"

    def run_step(self, name: str, fn: Callable[[], dict]) -> dict:
        record = self.records / f"{name}.json"
        if record.exists():
            result = json.loads(record.read_text())
            self.log(f"[{name}] reused from a previous run ({record})")
        else:
            self.log(f"[{name}] ...")
            t0 = time.time()
            result = fn()
            result["seconds"] = round(time.time() - t0, 2)
            self.records.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(record)
            self.log(f"[{name}] done in {result['seconds']:.1f} s")
        self.results[name] = result
        return result

    # ------------------------------------------------------------------------------------------ steps
    def corpus(self) -> dict:
        from data_pipeline.corpus import build_default_corpus

        sources = build_default_corpus(self.output)
        names = [s["name"] for s in yaml.safe_load(sources.read_text())["sources"]]
        return {"sources_yaml": str(sources), "sources": names}

    def curate(self) -> dict:
        from data_pipeline.curate import run_curation

        report = run_curation(self.results["corpus"]["sources_yaml"], self.output / "curate", cpus=self.cpus,
                              progress=True)
        per_source = {s: {"input": v["input"]["docs"], "kept": v["kept"]["docs"]}
                      for s, v in report.get("sources", {}).items()}
        return {"curated_dir": str(self.output / "curate" / "curated"),
                "report": str(self.output / "curate" / "reports" / "run.json"),
                "input_docs": report["input"]["docs"], "kept_docs": report["kept"]["docs"],
                "exact_duplicates": report["exact_duplicates"]["docs"],
                "fuzzy_duplicates": report["fuzzy_duplicates"]["docs"],
                "filtered_docs": sum(v["docs"] for v in report["filtered"].values()),
                "filtered_by_reason": {k: v["docs"] for k, v in report["filtered"].items()}, "per_source": per_source}

    def tokenizer(self) -> dict:
        from data_pipeline.sources import iter_curated
        from data_pipeline.tokenizer import TrainConfig, train_bpe

        texts = (r["text"] for r in iter_curated(self.results["curate"]["curated_dir"]))
        tok = train_bpe(texts, TrainConfig(vocab_size=self.vocab_size))
        path = self.output / "tokenizer" / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(path)
        return {"tokenizer": str(path), **tok.describe()}

    def shards(self) -> dict:
        from data_pipeline.shards import write_shards

        out = self.output / "shards"
        manifests = write_shards(self.results["curate"]["curated_dir"], out, self.results["tokenizer"]["tokenizer"],
                                 shard_bytes=1 << 20, workers=self.cpus, progress=True)
        return {"shards_dir": str(out),
                "sources": {s: {"shards": len(m.shards), "documents": m.documents, "tokens": m.tokens}
                            for s, m in manifests.items()},
                "tokens": sum(m.tokens for m in manifests.values())}

    def curriculum(self) -> dict:
        """Two phases plus a long-context phase at 4x the sequence length, sized to the training steps."""
        from data_pipeline.curriculum import format_plan, load_curriculum, plan, plot_plan
        from data_pipeline.manifest import load_manifests

        sources = list(self.results["shards"]["sources"])
        code = "python_code"
        prose = [s for s in sources if s != code]
        g, s = self.global_batch_size, self.seq_length
        p1, p2, p3 = self.steps, max(2, self.steps // 2), max(2, self.steps // 3)
        phase1 = {code: 0.4, **{p: 0.6 / len(prose) for p in prose}}  # diversity
        phase2 = {code: 0.2, **{p: 0.8 / len(prose) for p in prose}}  # quality: more prose
        spec = {
            "name": "quickstart",
            "max_epochs": None,
            "phases": [
                {"name": "phase1", "tokens": p1 * g * s, "seq_length": s, "global_batch_size": g, "blend": phase1},
                {"name": "phase2", "tokens": p2 * g * s, "seq_length": s, "global_batch_size": g, "blend": phase2},
                {"name": "long_context", "tokens": p3 * (g // 2) * 4 * s, "seq_length": 4 * s,
                 "global_batch_size": g // 2, "blend": {"phase:phase2": 0.8, code: 0.2}},
            ],
        }
        path = self.output / "curriculum.yaml"
        path.write_text("# Written by `foldtron quickstart`; see examples/configs/curriculum/ for the 25T plans.\n"
                        + yaml.safe_dump(spec, sort_keys=False))
        plans = plan(load_curriculum(path), load_manifests(self.results["shards"]["shards_dir"]))
        self.log(format_plan(plans))
        png = plot_plan(plans, self.output / "curriculum.png", title="quickstart curriculum")
        return {"curriculum": str(path), "plot": str(png),
                "phases": {p.name: {"batches": p.batches, "seq_lengths": p.seq_lengths} for p in plans}}

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> dict:
        t0 = time.time()
        for name in ("corpus", "curate", "tokenizer", "shards", "curriculum"):
            self.run_step(name, getattr(self, name))
        self.results["total_seconds"] = round(time.time() - t0, 1)
        self.log(self.summary())
        return self.results

    def summary(self) -> str:
        r = self.results
        cur, sh = r["curate"], r["shards"]
        phases = ", ".join(f"{k}: {v['batches']} batches" for k, v in r["curriculum"]["phases"].items())
        lines = [
            "",
            "Foldtron quickstart — what ran, and where it is",
            f"  corpus      {', '.join(r['corpus']['sources'])}  ({r['corpus']['sources_yaml']})",
            f"  curate      {cur['input_docs']} documents in -> {cur['kept_docs']} kept "
            f"({cur['filtered_docs']} filtered, {cur['exact_duplicates']} exact + {cur['fuzzy_duplicates']} fuzzy "
            f"duplicates); report {cur['report']}",
            f"  tokenizer   byte-level BPE, vocab {r['tokenizer'].get('vocab_size')}  ({r['tokenizer']['tokenizer']})",
            f"  shards      {sh['tokens']:,} tokens in "
            f"{sum(v['shards'] for v in sh['sources'].values())} webdataset shards  ({sh['shards_dir']})",
            f"  curriculum  {phases}  (plot {r['curriculum']['plot']})",
            f"  total       {r['total_seconds']:.0f} s",
            "",
            "Next: scale up with examples/slurm/ and examples/configs/{nano-30b-a3b,super-120b-a12b}.yaml.",
        ]
        return "\n".join(lines)


def run_quickstart(output: str | Path = "runs/quickstart", *, steps: int = 30, cpus: int = 2, fresh: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> dict:
    out = Path(output)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return Quickstart(out, steps=steps, cpus=cpus, log=log or print).run()
