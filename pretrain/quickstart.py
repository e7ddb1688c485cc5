"""`foldtron quickstart`: the whole pipeline, for real, on an embedded corpus on a laptop CPU.

Each step writes its outputs under --output and a record in `<output>/quickstart/<step>.json`; a rerun reuses
finished steps (delete a step's record, or pass --fresh, to redo it). Steps run in order:
corpus -> classifiers -> curate (langid, 2 quality classifiers, buckets) -> tokenizer -> shards -> curriculum
-> train (3 stages, 4 gloo ranks) -> export -> generate -> mtp (the MTP block as a speculative drafter, on held-out
prompts) -> nvfp4 (NVFP4 serving export calibrated on held-out windows of the run's shards, perplexity vs BF16).
Everything the summary prints is also in `<output>/quickstart/summary.json`.
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
    steps: int = 120  # optimizer steps of the first training stage (later stages scale from it)
    cpus: int = 2  # processes for curation / sharding
    vocab_size: int = 2048
    seq_length: int = 128
    global_batch_size: int = 8
    seed: int = 1234
    precision: str = "nvfp4"  # the recipe the training stages emulate (NVFP4 with the published carve-outs)
    mtp_depth: int = 2  # MTP depths of the tiny preset's shared '*E' block
    # the serving checks, kept small (seconds on a laptop): held-out prompts x tokens for MTP drafting, held-out
    # windows for NVFP4 calibration and for its quality check, and the export's perplexity bar
    mtp_prompts: int = 4
    mtp_prompt_len: int = 32
    mtp_new_tokens: int = 12
    nvfp4_calib_windows: int = 8
    nvfp4_eval_windows: int = 8
    nvfp4_max_ppl_increase: float = 0.10
    log: Callable[[str], None] = print
    results: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ plumbing
    @property
    def records(self) -> Path:
        return self.output / "quickstart"

    def run_step(self, name: str, fn: Callable[[], dict]) -> dict:
        record = self.records / f"{name}.json"
        if record.exists() and not json.loads(record.read_text()).get("skipped"):  # a skipped step is retried
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

    def classifiers(self) -> dict:
        """Two small fastText classifiers from labelled sets derived from the corpus (`write_quality_sets` says
        what the labels mean: how much a document reads like the reference manual's prose, not quality at
        large)."""
        from data_pipeline.corpus import write_quality_sets
        from data_pipeline.quality import train_classifier

        sets = write_quality_sets(self.output / "classifiers" / "data")
        p = sets["paths"]
        out = {"documents": sets["documents"], "models": {}}
        for name, negative in (("fluency", "shuffled_prose"), ("prose", "api_listings")):
            m = train_classifier([p["reference_prose"]], [p[negative]], self.output / "classifiers" / f"{name}.bin")
            out["models"][name] = {k: m[k] for k in ("model", "precision", "recall", "held_out_docs")}
        return out

    def curate_config(self) -> dict:
        """Heuristic filters and dedup at their defaults, English kept by langid, the prose sources scored by both
        classifiers (mean) into two buckets: `<source>_hq` (score >= 16 of 0..19) and `<source>_mq`. The prose
        classifier calls nearly all of them prose (p ~ 1), so the split is mostly the fluency score: how much a
        document reads like the reference manual's ordered prose."""
        models = self.results["classifiers"]["models"]
        return {"langid": {"enabled": True, "keep": ["en"]},
                "quality": {"classifiers": [{"name": n, "path": m["model"]} for n, m in models.items()],
                            "combine": "mean", "buckets": [{"name": "hq", "min_score": 16},
                                                           {"name": "mq", "min_score": 0}]}}

    def curate(self) -> dict:
        from data_pipeline.curate import CurateConfig, run_curation

        report = run_curation(self.results["corpus"]["sources_yaml"], self.output / "curate",
                              CurateConfig.model_validate(self.curate_config()), cpus=self.cpus, progress=True)
        per_source = {s: {"input": v["input"]["docs"], "kept": v["kept"]["docs"]}
                      for s, v in report.get("sources", {}).items()}
        return {"curated_dir": str(self.output / "curate" / "curated"),
                "report": str(self.output / "curate" / "reports" / "run.json"),
                "input_docs": report["input"]["docs"], "kept_docs": report["kept"]["docs"],
                "exact_duplicates": report["exact_duplicates"]["docs"],
                "fuzzy_duplicates": report["fuzzy_duplicates"]["docs"],
                "filtered_docs": sum(v["docs"] for v in report["filtered"].values()),
                "filtered_by_reason": {k: v["docs"] for k, v in report["filtered"].items()}, "per_source": per_source,
                "buckets": {k: v["docs"] for k, v in report["kept_by_bucket"].items()},
                "languages": {k: v["docs"] for k, v in report["languages"].items()}}

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
        p1, p2, p3 = self.steps, max(2, self.steps // 2), max(2, self.steps // 4)
        phase1 = {code: 0.4, **{p: 0.6 / len(prose) for p in prose}}  # diversity: every bucket alike
        # quality: more prose, and within it the high-quality buckets weighted 3:1 over the medium ones
        pw = {p: 3.0 if p.endswith("_hq") else 1.0 for p in prose}
        phase2 = {code: 0.2, **{p: 0.8 * w / sum(pw.values()) for p, w in pw.items()}}
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

    def run_config(self) -> dict:
        """Three stages on 4 gloo ranks: phase 1 and 2 under a folded layout (TP2 + SP for attention/Mamba/dense,
        EP2 for the experts, DP2), then long context at 4x the sequence length with CP2 x TP2; NVFP4 emulated."""
        g, s = self.global_batch_size, self.seq_length
        phases = self.results["curriculum"]["phases"]
        folded = {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True, "use_distributed_optimizer": True}
        return {
            "model": {"preset": "tiny", "vocab_size": self.results["tokenizer"]["vocab_size"],
                      "mtp_num_layers": self.mtp_depth},
            "parallel": folded,
            "precision": {"recipe": self.precision, "telemetry_interval": 5},
            "data": {"shards_dir": self.results["shards"]["shards_dir"],
                     "curriculum": self.results["curriculum"]["curriculum"],
                     "tokenizer": self.results["tokenizer"]["tokenizer"], "seed": self.seed, "num_workers": 0},
            "train": {"seq_length": s, "micro_batch_size": 2, "global_batch_size": g, "seed": self.seed,
                      "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 3, "lr_decay_style": "constant",
                      "train_iters": phases["phase1"]["batches"]},
            "stages": [
                {"name": "phase1", "phase": "phase1", "train_iters": phases["phase1"]["batches"]},
                {"name": "phase2", "phase": "phase2", "train_iters": phases["phase2"]["batches"],
                 "lr_warmup_iters": 0, "lr_decay_style": "cosine"},
                {"name": "long_context", "phase": "long_context", "train_iters": phases["long_context"]["batches"],
                 "seq_length": 4 * s, "global_batch_size": g // 2, "micro_batch_size": 1, "lr": 1e-3,
                 "min_lr": 1e-3, "lr_warmup_iters": 0, "lr_decay_style": "constant",
                 "parallel": {"tp": 2, "cp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}},
            ],
            "checkpoint": {"save": str(self.output / "checkpoints"), "save_interval": 10, "keep_last": 2},
            "logging": {"log_interval": 5, "tensorboard_dir": str(self.output / "tensorboard")},
        }

    def train(self) -> dict:
        import subprocess
        import sys

        from pretrain.config import build_config

        raw = self.run_config()
        build_config(raw)  # a bad config fails here, before 4 processes start
        path = self.output / "run.yaml"
        path.write_text("# Written by `foldtron quickstart`: rerun with `foldtron train --config THIS --nproc 4`.\n"
                        + yaml.safe_dump(raw, sort_keys=False))
        summary_path = self.output / "train_summary.json"
        cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", str(path), "--nproc", "4",
               "--summary", str(summary_path)]
        rc = subprocess.call(cmd)
        if rc != 0:
            raise RuntimeError(f"training failed (exit code {rc}); rerun `{' '.join(cmd)}` to see or resume it")
        summary = json.loads(summary_path.read_text())
        stages = {}
        for st in summary["stages"]:
            losses = st.get("losses") or []
            stages[st["name"]] = {"first_loss": losses[0] if losses else None,
                                  "last_loss": losses[-1] if losses else None,
                                  "iterations": len(losses), "tokens_per_sec": st.get("tokens_per_sec"),
                                  "checkpoint": st.get("checkpoint")}
        return {"run_config": str(path), "summary": str(summary_path), "stages": stages,
                "checkpoints": str(self.output / "checkpoints"), "tensorboard": str(self.output / "tensorboard")}

    def export(self) -> dict:
        """Hugging Face NemotronH export of the final checkpoint, verified against Foldtron's own forward."""
        from pretrain.export_hf import export_hf, verify_export

        out = self.output / "hf"
        res = export_hf(self.results["train"]["checkpoints"], out, dtype="fp32",
                        config=self.results["train"]["run_config"], overwrite=True)
        check = verify_export(out, self.results["train"]["checkpoints"], config=self.results["train"]["run_config"])
        if not (check["greedy_equal"] and check["logits_max_rel_diff"] < 1e-4):
            raise RuntimeError(f"the export does not reproduce Foldtron: max |dlogits| {check['logits_max_abs_diff']:.3g}"
                               f", greedy tokens equal: {check['greedy_equal']}")
        return {"hf_dir": str(out), "export": {k: v for k, v in res.items() if isinstance(v, (int, float, str))},
                "verify": {k: check[k] for k in ("logits_max_abs_diff", "logits_max_rel_diff", "per_layer_kind",
                                                 "greedy_equal", "mtp_tensors_exported")}}

    def generate(self) -> dict:
        """Load the export with plain `transformers` (as a serving stack would) and continue a prompt."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = self.results["export"]["hf_dir"]
        tok = AutoTokenizer.from_pretrained(hf)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        prompt = "def read_file(path):\n    "
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
        text = tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)
        return {"model_class": type(model).__name__, "prompt": prompt, "completion": text,
                "parameters": sum(p.numel() for p in model.parameters())}

    def mtp(self) -> dict:
        """Self-speculative greedy decoding with the export's own MTP block drafting (`foldtron eval-mtp --hf`'s
        library function, the exported mtp.* tensors in transformers' NemotronH blocks) on held-out prompts of the
        last stage's phase; the output is checked against plain greedy decoding token for token."""
        from pretrain.commands.eval_mtp import held_out_prompts
        from pretrain.config import load_config
        from pretrain.mtp_eval import HFDrafter, evaluate

        cfg = load_config(self.results["train"]["run_config"])
        prompts, meta = held_out_prompts(cfg, shards=None, curriculum=None, phase=None, data_seed=None,
                                         prompts=self.mtp_prompts, prompt_len=self.mtp_prompt_len, seed=self.seed)
        report = evaluate(HFDrafter(self.results["export"]["hf_dir"]), prompts, self.mtp_new_tokens)
        if report["greedy_equal"] is not True:
            raise RuntimeError("speculative decoding with the MTP drafter did not reproduce plain greedy decoding: "
                               f"{report['outputs']}")
        report.pop("outputs")
        return {"source": self.results["export"]["hf_dir"], **report,
                "held_out": {k: meta[k] for k in ("phase", "seed", "seq_length", "sizes")}}

    def nvfp4(self) -> dict:
        """NVFP4 serving export of the HF export (modelopt PTQ, MTP kept BF16) calibrated on held-out windows of the
        last stage's phase, its perplexity and top-1 agreement vs BF16 on other held-out windows, held to
        `nvfp4_max_ppl_increase`. Needs nvidia-modelopt (the `quant` extra): without it the step says so and is
        skipped (retried on the next run)."""
        try:
            import modelopt.torch.quantization  # noqa: F401
        except ImportError as e:
            return {"skipped": f"nvidia-modelopt is not importable ({e}); it is the `quant` extra: "
                               "pip install -e '.[quant]' (make venv installs it), then rerun"}
        from pretrain.export_nvfp4 import calibration_from_run, export_nvfp4

        calib, evals, meta = calibration_from_run(self.results["train"]["run_config"],
                                                  calib_size=self.nvfp4_calib_windows,
                                                  eval_size=self.nvfp4_eval_windows, seq_length=self.seq_length,
                                                  seed=self.seed)
        res = export_nvfp4(self.results["export"]["hf_dir"], self.output / "hf-nvfp4", calib_tokens=calib,
                           eval_tokens=evals, calibration_meta=meta, max_ppl_increase=self.nvfp4_max_ppl_increase,
                           min_top1_agreement=0.5,
                           overwrite=True)
        q = res["quality"]
        return {"output": res["output"], "quant_algo": res["quant_algo"], "mtp_tensors_bf16": res["mtp_tensors_bf16"],
                "calibration": {"phase": meta["phase"], "windows": list(calib.shape), "seed": meta["seed"]},
                "evaluation_windows": list(evals.shape),
                "quality": {k: q[k] for k in ("tokens", "bf16_loss", "nvfp4_loss", "bf16_ppl", "nvfp4_ppl",
                                              "loss_delta", "ppl_increase", "top1_agreement", "max_ppl_increase",
                                              "numerics", "emulated_modules", "bf16_modules")}}

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> dict:
        t0 = time.time()
        for name in ("corpus", "classifiers", "curate", "tokenizer", "shards", "curriculum", "train", "export",
                     "generate", "mtp", "nvfp4"):
            self.run_step(name, getattr(self, name))
        self.results["total_seconds"] = round(time.time() - t0, 1)
        text = self.summary()
        (self.records / "summary.json").write_text(json.dumps({**self.results, "summary": text}, indent=2))
        self.log(text)
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
            f"  buckets     {', '.join(f'{k} {v}' for k, v in cur['buckets'].items())}  (langid: "
            f"{cur['filtered_by_reason'].get('language', 0)} not English; classifiers fluency + prose, "
            f"held-out P/R " + ", ".join(f"{n} {m['precision']:.2f}/{m['recall']:.2f}"
                                         for n, m in r['classifiers']['models'].items()) + ")",
            f"  tokenizer   byte-level BPE, vocab {r['tokenizer'].get('vocab_size')}  ({r['tokenizer']['tokenizer']})",
            f"  shards      {sh['tokens']:,} tokens in "
            f"{sum(v['shards'] for v in sh['sources'].values())} webdataset shards  ({sh['shards_dir']})",
            f"  curriculum  {phases}  (plot {r['curriculum']['plot']})",
            f"  train       4 gloo ranks; phase 1/2: TP2+SP x EP2 (folded) x DP2, long context: TP2 x CP2 x EP2;"
            f" {self.precision}",
        ]
        for name, st in r["train"]["stages"].items():
            tps = f"{st['tokens_per_sec']:.0f} tokens/s" if st.get("tokens_per_sec") else ""
            first = f"{st['first_loss']:.3f}" if st["first_loss"] is not None else "?"
            last = f"{st['last_loss']:.3f}" if st["last_loss"] is not None else "?"
            lines.append(f"    {name:<14} loss {first} -> {last} over {st['iterations']} steps  {tps}")
        lines += [
            f"  checkpoints {r['train']['checkpoints']}",
            f"  export      {r['export']['hf_dir']} (NemotronHForCausalLM; max |dlogits| vs Foldtron "
            f"{r['export']['verify']['logits_max_abs_diff']:.2g}, greedy tokens equal: "
            f"{r['export']['verify']['greedy_equal']})",
            f"  generate    transformers {r['generate']['model_class']}: {r['generate']['prompt']!r} -> "
            f"{r['generate']['completion']!r}",
            self._mtp_line(r["mtp"]),
            self._nvfp4_line(r["nvfp4"]),
            f"  tensorboard tensorboard --logdir {r['train']['tensorboard']} --host 127.0.0.1",
            f"  total       {r['total_seconds']:.0f} s",
            "",
            "Next: scale up with examples/slurm/ and examples/configs/{nano-30b-a3b,super-120b-a12b}.yaml.",
        ]
        return "\n".join(lines)


    @staticmethod
    def _mtp_line(m: dict) -> str:
        acc = " / ".join(f"{a:.2f}" for a in m["acceptance_per_position"])
        pos = " / ".join(str(i + 1) for i in range(m["draft_tokens"]))
        return (f"  mtp         MTP drafter acceptance {acc} at draft position {pos}, mean accepted length "
                f"{m['mean_tokens_per_verify']:.2f} tokens per verify; speculative == greedy: {m['greedy_equal']}"
                f"  ({m['prompts']} held-out {m['held_out']['phase']} prompts x {m['new_tokens']} tokens)")

    @staticmethod
    def _nvfp4_line(n: dict) -> str:
        if n.get("skipped"):
            return f"  nvfp4       skipped: {n['skipped']}"
        q = n["quality"]
        return (f"  nvfp4       {n['output']}: held-out ppl {q['bf16_ppl']:.1f} (BF16) -> {q['nvfp4_ppl']:.1f} (NVFP4), "
                f"{100 * q['ppl_increase']:+.2f} % (bar {100 * q['max_ppl_increase']:.0f} %), top-1 agreement "
                f"{q['top1_agreement']:.3f}  (calibrated on {n['calibration']['windows'][0]} x "
                f"{n['calibration']['windows'][1]} held-out {n['calibration']['phase']} tokens)")


def run_quickstart(output: str | Path = "runs/quickstart", *, steps: int = 120, cpus: int = 2, fresh: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> dict:
    out = Path(output).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return Quickstart(out, steps=steps, cpus=cpus, log=log or print).run()
