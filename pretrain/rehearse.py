"""`foldtron rehearse`: a production run's life lived in miniature on CPU, before it is lived for real.

The production config (e.g. examples/configs/super-120b-a12b.yaml) is turned into a miniature with the same
*shape*, and that miniature goes through what the real run will go through, with the real code paths:

- the same stages in the same order, their curriculum phases with the plan's phase switches and blend shares
  (production sources mapped onto the embedded corpus's curated buckets, the mapping printed), the `phase:`
  mixtures (80% phase 2 + 20% long-document QA), alternating sequence lengths where the plan alternates them;
- the LR curve's shape compressed to the rehearsal's steps (one run-wide curve where the config has one: warmup,
  stable, a decay that crosses the same phase boundary; the long-context stages' own schedules);
- a proxy model with the preset's layer kinds (Mamba, attention, MoE, latent MoE, shared expert, MTP) at tiny
  widths, under each stage's precision policy (NVFP4/MXFP8 emulated) and recompute setting, with expert and
  context parallelism on gloo ranks where the stage uses them;
- checkpoints at stage boundaries and mid-stage, one checkpoint merge (the config's schedule, scaled, or one
  added), a kill -9 of every rank in the middle of a stage and a resume, then export to Hugging Face and verify.

Its summary says which real feature each step exercised, and checks what it can: the LR each step trained with
(read back from TensorBoard) equals the schedule; the resumed stage restarted from the checkpoint it was killed
after; the merge exists; the export reproduces Foldtron's logits.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from pretrain.config import ConfigError, RunConfig, load_config

#: Tiny widths of the proxy model (the tiny preset's); layer kinds, MoE routing style and MTP come from the preset.
PROXY_WIDTHS = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16, ffn_hidden_size=128,
                    mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2, mamba_conv_kernel=4,
                    mamba_chunk_size=8, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=64,
                    init_method_std=0.02)


def proxy_pattern(pattern: str) -> str:
    """The preset's layer pattern shortened to one of each repeating unit: runs of `ME` collapse to one, then the
    prefix through the first attention layer and its MoE, then the last two kinds ("MEM*EME" for Nano and Super:
    Mamba, MoE, attention, in the order and neighbourhood the real model has them)."""
    collapsed = re.sub(r"(ME)+", "ME", pattern)
    cut = collapsed.find("*")
    if cut < 0:
        return collapsed[:6]
    return collapsed[: cut + 2] + pattern[-2:]


def proxy_model(model_cfg) -> dict:
    """Model fields of the proxy: the preset's kinds at tiny widths (vocab set later from the tokenizer)."""
    pattern = proxy_pattern(model_cfg.hybrid_override_pattern)
    out = dict(PROXY_WIDTHS, hybrid_override_pattern=pattern, num_layers=len(pattern))
    out.update(moe_shared_expert_intermediate_size=64 if model_cfg.moe_shared_expert_intermediate_size else None,
               moe_latent_size=32 if model_cfg.moe_latent_size else None,
               moe_router_topk_scaling_factor=model_cfg.moe_router_topk_scaling_factor,
               moe_router_bias_update_rate=model_cfg.moe_router_bias_update_rate,
               moe_aux_loss_coeff=model_cfg.moe_aux_loss_coeff,
               mtp_num_layers=model_cfg.mtp_num_layers,
               mtp_hybrid_override_pattern=model_cfg.mtp_hybrid_override_pattern)
    if model_cfg.mtp_num_layers:
        out["mtp_loss_scaling_factor"] = model_cfg.mtp_loss_scaling_factor
    return out


@dataclass
class Rehearsal:
    config: Path
    output: Path
    main_steps: int = 24  # steps of the stages on the run's LR curve (or of all per-stage-schedule stages), together
    side_steps: int = 3  # steps of each stage with its own LR schedule (the long-context stages)
    seq_length: int = 64  # stands for the main phases' sequence length (8192)
    long_seq_length: int = 256  # stands for every length above it (1M)
    global_batch_size: int = 8  # stands for the main phases' batch (3072)
    long_batch_size: int = 4  # stands for every other batch (48, 16)
    nproc: int = 2
    data_from: Optional[Path] = None  # a quickstart output whose curated shards to reuse (else built here)
    log: Callable[[str], None] = print
    results: dict[str, Any] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)  # (step, what happened, real feature) for the summary

    # ------------------------------------------------------------------------------------------ helpers
    def note(self, step: str, what: str, feature: str) -> None:
        self.steps.append({"step": step, "what": what, "feature": feature})
        self.log(f"[rehearse] {step}: {what}")

    def _prod(self) -> RunConfig:
        return load_config(self.config)

    # ------------------------------------------------------------------------------------------ 1. preflight
    def preflight(self, prod: RunConfig) -> None:
        from pretrain.preflight import preflight

        has_data = bool(prod.data.shards_dir) and Path(prod.data.shards_dir).is_dir()
        rep = preflight(prod, data=has_data)
        if not rep.ok:
            raise ConfigError("the production config fails preflight; fix it before rehearsing:\n  "
                              + "\n  ".join(rep.problems))
        self.note("preflight", f"{self.config.name}: {len(rep.stages)} stages, "
                  f"{sum(r.tokens for r in rep.stages) / 1e12:.2f}T tokens, OK"
                  + ("" if has_data else " (data not mounted here: not checked)"),
                  "foldtron preflight (the checks `foldtron train` repeats before step one)")

    # ------------------------------------------------------------------------------------------ 2. data
    def data(self) -> dict:
        from pretrain.quickstart import Quickstart

        root = self.data_from or (self.output / "data")
        qs = Quickstart(Path(root).resolve(), log=self.log)
        for name in ("corpus", "classifiers", "curate", "tokenizer", "shards"):
            qs.run_step(name, getattr(qs, name))
        sh = qs.results["shards"]
        self.note("data", f"embedded corpus curated (langid, 2 quality classifiers, buckets), BPE "
                  f"{qs.results['tokenizer']['vocab_size']}, {sh['tokens']:,} tokens in shards of "
                  f"{len(sh['sources'])} sources", "curate -> tokenizer -> shards (webdataset, manifests)")
        return {"shards_dir": sh["shards_dir"], "tokenizer": qs.results["tokenizer"]["tokenizer"],
                "vocab_size": qs.results["tokenizer"]["vocab_size"], "sources": sorted(sh["sources"])}

    # ------------------------------------------------------------------------------------------ 3. miniature
    def _length(self, n: int, main: int) -> int:
        if n > main:
            return self.long_seq_length
        return max(16, (self.seq_length * n // main) // 16 * 16)

    def _iters(self, prod: RunConfig, stages) -> dict[str, int]:
        """Rehearsal steps per stage: the run curve's (or all per-stage) stages share main_steps in proportion to
        their production steps (at least 2 each); stages with their own schedule get side_steps."""
        main = [s for s in stages if s.on_run_curve] or [s for s in stages if max(s.lengths) <= stages[0].lengths[0]]
        total = sum(s.train.train_iters for s in main)
        out = {s.name: max(2, round(self.main_steps * s.train.train_iters / total)) for s in main}
        for s in stages:
            out.setdefault(s.name, self.side_steps * len(s.lengths))  # whole cycles of alternating lengths
        return out

    def miniature(self, prod: RunConfig, data: dict) -> dict:
        from data_pipeline.curriculum import PHASE_REF, load_curriculum
        from pretrain.stages import resolve

        stages = resolve(prod, check_inputs=False)
        cur = load_curriculum(prod.data.curriculum) if prod.data.curriculum else None
        if cur is None:
            raise ConfigError(f"{self.config}: data.curriculum is not set: a rehearsal replays the curriculum")
        main_len, main_g = stages[0].lengths[0], stages[0].train.global_batch_size
        iters = self._iters(prod, stages)
        # production sources -> the embedded corpus's curated sources, round-robin in sorted order
        prod_sources = sorted({k for p in cur.phases for k in p.blend if not k.startswith(PHASE_REF)})
        ours = data["sources"]
        mapping = {s: ours[i % len(ours)] for i, s in enumerate(prod_sources)}
        by_phase = {st.phase: st for st in stages if st.phase}
        phases = []
        for p in cur.phases:
            st = by_phase.get(p.name)
            lengths = [self._length(n, main_len) for n in p.seq_lengths]
            g = self.global_batch_size if (p.global_batch_size or main_g) == main_g else self.long_batch_size
            n = iters[st.name] if st else 2
            blend: dict[str, float] = {}
            for k, w in p.blend.items():
                key = k if k.startswith(PHASE_REF) else mapping[k]
                blend[key] = blend.get(key, 0.0) + float(w)
            tokens = g * (n // len(lengths) * sum(lengths) + sum(lengths[: n % len(lengths)]))
            phases.append({"name": p.name, "tokens": tokens,
                           "seq_length": lengths if len(lengths) > 1 else lengths[0],
                           "global_batch_size": g, "blend": blend})
        curriculum = {"name": f"rehearsal-of-{cur.name}", "max_epochs": None, "phases": phases}
        cur_path = self.output / "curriculum.yaml"
        cur_path.parent.mkdir(parents=True, exist_ok=True)
        cur_path.write_text(f"# `foldtron rehearse` of {self.config}: {cur.name} in miniature.\n"
                            + yaml.safe_dump(curriculum, sort_keys=False))

        curve = [s for s in stages if s.on_run_curve]
        curve_prod = sum(s.train.train_iters for s in curve)
        curve_mini = sum(iters[s.name] for s in curve)

        def scaled(n: Optional[int], prod_total: int, mini_total: int, floor: int = 1) -> Optional[int]:
            return None if n is None else (0 if n == 0 else max(floor, round(n * mini_total / prod_total)))

        t = prod.train
        train = {"micro_batch_size": 1, "seed": t.seed, "lr": t.lr, "min_lr": t.min_lr,
                 "weight_decay": t.weight_decay, "adam_beta1": t.adam_beta1, "adam_beta2": t.adam_beta2,
                 "adam_eps": t.adam_eps, "clip_grad": t.clip_grad, "lr_schedule_span": t.lr_schedule_span,
                 "lr_decay_style": t.lr_decay_style, "lr_wsd_decay_style": t.lr_wsd_decay_style,
                 "seq_length": self.seq_length, "global_batch_size": self.global_batch_size}
        if curve:
            train["lr_warmup_iters"] = scaled(t.lr_warmup_iters, curve_prod, curve_mini)
            train["lr_wsd_decay_iters"] = scaled(t.lr_wsd_decay_iters, curve_prod, curve_mini)
        else:
            train["lr_warmup_iters"] = t.lr_warmup_iters and 1
        out_stages = []
        n_layers = len(proxy_pattern(prod.model.hybrid_override_pattern))
        for st, sc in zip(stages, prod.stages or [None]):
            d: dict[str, Any] = {"name": st.name, "phase": st.phase, "train_iters": iters[st.name]}
            if not st.on_run_curve:
                tt, n = st.train, iters[st.name]
                d.update(lr=tt.lr, min_lr=tt.min_lr, lr_decay_style=tt.lr_decay_style,
                         lr_warmup_iters=scaled(tt.lr_warmup_iters, tt.train_iters, n, 0) or 0)
                if tt.lr_decay_style == "WSD":
                    d.update(lr_wsd_decay_iters=scaled(tt.lr_wsd_decay_iters, tt.train_iters, n),
                             lr_wsd_decay_style=tt.lr_wsd_decay_style)
                if curve:
                    d["own_lr_schedule"] = True
            # the stage's parallel features on 2 ranks: CP where it has CP, else expert parallelism folded over DP
            d["parallel"] = {"cp": 2} if st.parallel.cp > 1 else {"ep": 2}
            prec = st.precision.model_dump()
            if prec.get("num_layers_at_end_in_bf16"):
                prec["num_layers_at_end_in_bf16"] = max(1, round(prec["num_layers_at_end_in_bf16"] * n_layers
                                                                 / prod.model.num_layers))
            if prec.get("num_layers_at_start_in_bf16"):
                prec["num_layers_at_start_in_bf16"] = max(1, round(prec["num_layers_at_start_in_bf16"] * n_layers
                                                                   / prod.model.num_layers))
            d["precision"] = prec
            d["performance"] = {"recompute": (st.performance or prod.performance).recompute}
            out_stages.append(d)
        first = stages[0]
        merge = prod.checkpoint.merge
        save_interval = max(2, iters[first.name] // 4)
        first_tokens = iters[first.name] * self.global_batch_size * self.seq_length
        per_save = save_interval * self.global_batch_size * self.seq_length
        if merge.every_tokens:  # the config's schedule, scaled to the rehearsal's tokens
            scale = first_tokens / first.tokens(first.train.train_iters)
            every = max(2 * per_save, round(merge.every_tokens * scale / per_save) * per_save)
            merge_cfg = {"every_tokens": every, "stages": merge.stages}
            merge_cfg.update({"window_tokens": max(2 * per_save, round(merge.window_tokens * scale / per_save)
                                                   * per_save)} if merge.window_tokens else {"last": merge.last})
            merge_how = f"the config's schedule scaled ({merge.every_tokens:,} -> {every:,} tokens)"
        else:
            merge_cfg = {"every_tokens": 2 * per_save, "last": 2, "stages": [first.name]}
            merge_how = f"added (the config has none): last 2 of {first.name} every {2 * per_save:,} tokens"
        run = {
            "model": {**proxy_model(prod.model), "vocab_size": data["vocab_size"]},
            "data": {"shards_dir": data["shards_dir"], "curriculum": str(cur_path), "tokenizer": data["tokenizer"],
                     "seed": prod.data.seed, "num_workers": 0},
            "train": train, "stages": out_stages, "parallel": {"ep": 2},
            "checkpoint": {"save": str(self.output / "run"), "save_interval": save_interval, "keep_last": 8,
                           "merge": merge_cfg},
            "logging": {"log_interval": 1, "tensorboard_dir": str(self.output / "tb")},
            "backend": "cpu",
        }
        path = self.output / "run.yaml"
        path.write_text(f"# `foldtron rehearse` of {self.config}: rerun with foldtron train --config THIS "
                        f"--nproc {self.nproc}\n" + yaml.safe_dump(run, sort_keys=False))
        mini = load_config(path)
        from pretrain.preflight import plot_lr, preflight

        rep = preflight(mini, gpus=self.nproc, memory=False)
        if not rep.ok:
            raise ConfigError("the rehearsal's own config fails preflight (a Foldtron bug):\n  "
                              + "\n  ".join(rep.problems))
        png = plot_lr(mini, rep.resolved, self.output / "lr_rehearsal.png")
        plot_lr(prod, stages, self.output / "lr_production.png")
        shape = ", ".join(f"{s['name']} {s['train_iters']}" for s in out_stages)
        recipes = sorted({s["precision"]["recipe"] for s in out_stages})
        self.note("miniature", f"same {len(out_stages)} stages ({shape} steps), proxy "
                  f"{run['model']['hybrid_override_pattern']}"
                  + (f" + MTP {mini.model.mtp_hybrid_override_pattern} x{mini.model.mtp_num_layers}"
                     if mini.model.mtp_num_layers else "")
                  + f"; {'/'.join(recipes)} (emulated); sources mapped {len(prod_sources)} -> {len(ours)}; "
                  f"LR curve {png.name} "
                  f"(production: lr_production.png)",
                  "stages, curriculum phases and blends, run-wide LR curve, precision policy, recompute")
        self.results["mapping"] = mapping
        self.results["merge_how"] = merge_how
        return {"run_config": str(path), "config": mini, "iters": iters, "stages": out_stages,
                "save_interval": save_interval}

    # ------------------------------------------------------------------------------------------ 4. train, kill, resume
    def _train_cmd(self, run_config: str, summary: Path) -> list[str]:
        return [sys.executable, "-m", "pretrain.cli", "train", "--config", run_config, "--nproc", str(self.nproc),
                "--summary", str(summary)]

    def train(self, mini: dict) -> dict:
        """Train until the first mid-stage checkpoint of the stage the kill lands in, kill -9 every rank, resume."""
        run_config = mini["run_config"]
        names = [s["name"] for s in mini["stages"]]
        # Mid-run, inside a stage: the second stage when it has a checkpoint before its end, else the first.
        victim = names[1] if len(names) > 1 and mini["iters"][names[1]] > mini["save_interval"] else names[0]
        n_victim = mini["iters"][victim]
        log_path = self.output / "train.log"
        pattern = re.compile(rf"\[{re.escape(victim)}\] saved checkpoint .*iter_(\d+)")
        killed_at = None
        with open(log_path, "w") as log:
            proc = subprocess.Popen(self._train_cmd(run_config, self.output / "summary_killed.json"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                m = pattern.search(line)
                if m and 0 < int(m.group(1)) < n_victim:
                    killed_at = int(m.group(1))
                    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, no chance to save
                    break
            proc.wait()
        if killed_at is None:
            raise RuntimeError(f"the rehearsal never saw a mid-stage checkpoint of {victim} to kill after "
                               f"(see {log_path}); exit code {proc.returncode}")
        self._reap(run_config)
        self.note("kill -9", f"every rank killed (SIGKILL, no save) after {victim}'s checkpoint at iteration "
                  f"{killed_at} of {n_victim}", "crash without warning (node loss)")
        summary_path = self.output / "summary.json"
        with open(log_path, "a") as log:
            rc = subprocess.call(self._train_cmd(run_config, summary_path), stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            raise RuntimeError(f"the resumed training failed (exit code {rc}); see {log_path}")
        summary = json.loads(summary_path.read_text())
        resumed = next(s for s in summary["stages"] if s["name"] == victim)
        if resumed.get("resumed_from") != killed_at:
            raise RuntimeError(f"{victim} resumed from {resumed.get('resumed_from')}, not from the checkpoint at "
                               f"{killed_at} it was killed after")
        done = [s["name"] for s in summary["stages"] if s.get("completed")]
        self.note("resume", f"same command again: {victim} resumed from iteration {killed_at}; stages completed: "
                  f"{', '.join(done)}", "resume from the latest complete checkpoint (the Slurm requeue path)")
        losses = {s["name"]: (s["losses"][0], s["losses"][-1]) for s in summary["stages"] if s.get("losses")}
        return {"summary": str(summary_path), "log": str(log_path), "killed": {"stage": victim, "after": killed_at},
                "losses": losses, "stages": summary["stages"]}

    def _reap(self, run_config: str) -> None:
        """A killed run's ranks are gone with their session; wait until no process still holds the run's lock."""
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["pgrep", "-f", run_config], capture_output=True, text=True).stdout.split()
            if not [p for p in out if int(p) != os.getpid()]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"ranks of the killed rehearsal still run after 30 s: pgrep -f {run_config}")

    # ------------------------------------------------------------------------------------------ 5. checks
    def check_lr(self, mini: dict) -> dict:
        """The LR each step logged (TensorBoard `learning-rate` at the run's step: after iteration k's update, the
        LR of update k+1) against the schedule, across the kill and the resume."""
        from pretrain.schedules import lr_at
        from pretrain.stages import resolve

        cfg = mini["config"]
        events = _scalars(Path(cfg.logging.tensorboard_dir), "learning-rate")
        worst, n, step0 = 0.0, 0, 0
        for st in resolve(cfg):
            ks = list(range(1, st.train.train_iters + 1))
            for k, want in zip(ks, lr_at(st.train, ks, st.lr_offset)):
                got = events.get(step0 + k)
                if got is not None:
                    worst = max(worst, abs(got - want) / max(want, 1e-12))
                    n += 1
            step0 += st.train.train_iters
        if n < step0 // 2:
            raise RuntimeError(f"only {n} of {step0} learning-rate scalars found in {cfg.logging.tensorboard_dir}")
        if worst > 1e-5:
            raise RuntimeError(f"the trained LR is off the schedule by up to {worst:.2g} (relative)")
        self.note("LR", f"{n} logged LRs (the resumed stage included) equal the run's schedule (max rel. diff "
                  f"{worst:.1e})", "Megatron-Core OptimizerParamScheduler over the run, restored on resume")
        return {"checked": n, "max_rel_diff": worst}

    def check_merge(self, mini: dict) -> dict:
        merged = sorted((self.output / "run" / "merged").glob("*/iter_*"))
        if not merged:
            raise RuntimeError(f"no merged checkpoint under {self.output / 'run' / 'merged'} "
                               f"({self.results.get('merge_how')})")
        meta = json.loads((merged[-1] / "foldtron.json").read_text())
        inputs = meta.get("merge", {}).get("inputs") or meta.get("merged_from") or []
        self.note("merge", f"{merged[-1].relative_to(self.output)} averages {len(inputs) or '?'} checkpoints "
                  f"({self.results['merge_how']})", "checkpoint.merge on a token schedule (streaming fp32 mean)")
        return {"merged": [str(m) for m in merged], "inputs": len(inputs)}

    def export(self, mini: dict) -> dict:
        from pretrain.export_hf import export_hf, verify_export

        cfg = mini["config"]
        last = [s["name"] for s in mini["stages"]][-1]
        run = Path(cfg.checkpoint.save)
        out = self.output / "hf"
        export_hf(run / last, out, dtype="fp32", config=mini["run_config"], overwrite=True)
        check = verify_export(out, run / last, config=mini["run_config"])
        if not (check["greedy_equal"] and check["logits_max_rel_diff"] < 1e-4):
            raise RuntimeError(f"the export does not reproduce Foldtron: max rel |dlogits| "
                               f"{check['logits_max_rel_diff']:.3g}, greedy equal {check['greedy_equal']}")
        self.note("export", f"{out.relative_to(self.output)} from {last}'s final checkpoint; verify: max rel "
                  f"|dlogits| {check['logits_max_rel_diff']:.1e}, greedy tokens equal, "
                  f"{check.get('mtp_tensors_exported', 0)} MTP tensors", "export-hf + verify-hf (NemotronH)")
        return {"hf_dir": str(out), "logits_max_rel_diff": check["logits_max_rel_diff"]}

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> dict:
        t0 = time.time()
        prod = self._prod()
        self.output.mkdir(parents=True, exist_ok=True)
        if (self.output / "run").exists():
            raise ConfigError(f"{self.output / 'run'} exists: a rehearsal starts from nothing (choose another "
                              f"--output or remove that directory yourself)")
        self.preflight(prod)
        data = self.data()
        mini = self.miniature(prod, data)
        tr = self.train(mini)
        lr = self.check_lr(mini)
        merge = self.check_merge(mini)
        exp = self.export(mini)
        self.results.update(config=str(self.config), train=tr, lr=lr, merge=merge, export=exp, steps=self.steps,
                            seconds=round(time.time() - t0, 1))
        (self.output / "rehearsal.json").write_text(json.dumps(self.results, indent=1, default=str))
        self.log(self.summary())
        return self.results

    def summary(self) -> str:
        lines = ["", f"Foldtron rehearsal of {self.config} — what ran, and which real feature it exercised"]
        for s in self.steps:
            lines.append(f"  {s['step']:<10} {s['what']}")
            lines.append(f"  {'':<10}   -> {s['feature']}")
        losses = self.results["train"]["losses"]
        for st in self.results["train"]["stages"]:
            a_b = losses.get(st["name"])
            lines.append(f"  loss       {st['name']:<16} " + (f"{a_b[0]:.3f} -> {a_b[1]:.3f}" if a_b else
                                                             "trained before the kill (train.log)"))
        lines.append("  sources    " + ", ".join(f"{k}->{v}" for k, v in self.results["mapping"].items()))
        lines.append(f"  total      {self.results['seconds']:.0f} s  ({self.output / 'rehearsal.json'})")
        return "\n".join(lines)


def _scalars(path: Path, name: str) -> dict[int, float]:
    """Scalar `name` by step from every event file under `path` (a resumed run appends a new file; the newest
    file's value wins for a step logged twice)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[int, float] = {}
    for f in sorted(path.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.tag == name:
                    out[ev.step] = float(v.tensor.float_val[0]) if v.HasField("tensor") else float(v.simple_value)
    return out


def run_rehearsal(config: str | Path, output: str | Path, **kw) -> dict:
    return Rehearsal(Path(config).resolve(), Path(output).resolve(), **kw).run()
