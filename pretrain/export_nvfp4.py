"""NVFP4 serving export: an HF NemotronH export (from `export_hf`) -> an NVFP4-quantized HF checkpoint with the
quantization config vLLM and TensorRT-LLM read (`hf_quant_config.json`, `quantization_config` in config.json,
packed E2M1 weights + E4M3 block scales + FP32 global scales), made by NVIDIA Model Optimizer (nvidia-modelopt).

What runs where (measured with nvidia-modelopt 0.47.0, transformers 5, torch CPU): modelopt's NVFP4 fake-quant
calibration and `export_hf_checkpoint` both run on CPU; no GPU is needed to *produce* the checkpoint, only to serve
it (NVFP4 GEMMs need Blackwell). Not streamed: transformers loads the whole BF16 model (one copy in memory).

Two things modelopt leaves to us, fixed here:
- transformers ignores `mtp.*` on load, so modelopt's output has no MTP weights: they are copied over in BF16
  (Nemotron 3 Super keeps its MTP layers in BF16) into `mtp.safetensors`, listed in the index.
- With transformers 5's checkpoint key mapping modelopt 0.47 writes excluded-module names with a
  "\\x00backbone.pt_name_sentinel" tail; they are cut back to the module names (`lm_head`, `backbone.layers.3.mixer.gate`).
Calibration and the quality bar: `calib_tokens` are the calibration windows (for a serving checkpoint: held-out
windows of a curriculum phase, `calibration_from_run` / data_pipeline/heldout.py, recorded with size, seed and phase
in `foldtron_export.json`); without them random tokens are used and the result says so (a format check only).
With `eval_tokens` (held-out windows disjoint from the calibration ones) the export measures what quantization
costs: the same BF16 model is run on them before and after `mtq.quantize` (modelopt's fake-quant NVFP4 weights and
activations, i.e. the numbers the NVFP4 GEMMs compute), giving next-token loss, perplexity of both, the relative
perplexity increase and the top-1 agreement of the two; `max_ppl_increase` refuses the export (ExportError, nothing
written) when the increase is above it. Measured on the quickstart model (CPU, 16 x 128 calibration and 16 x 128
evaluation tokens): the README's serving-export section has the numbers.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

from pretrain.export_hf import ExportError, ShardWriter, check_output, install_output, write_marker

#: Kept in high precision besides modelopt's defaults (router gate, conv1d, embeddings, lm_head are already).
DEFAULT_EXCLUDE: tuple = ()


def _clean(name: str) -> str:
    return name.split("\x00", 1)[0].rstrip(".")


@torch.no_grad()
def next_token_quality(model, tokens: torch.Tensor) -> Dict[str, Any]:
    """Mean next-token loss over windows [N, L] (every position but the last of each window), and the argmax tokens."""
    losses, preds = [], []
    for row in tokens:
        logits = model(input_ids=row.unsqueeze(0)).logits[0, :-1].float()
        losses.append(torch.nn.functional.cross_entropy(logits, row[1:], reduction="none"))
        preds.append(logits.argmax(-1))
    loss = torch.cat(losses).mean().item()
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(sum(x.numel() for x in losses)), "preds": torch.cat(preds)}


class _CPUEmulation:
    """modelopt 0.47's NVFP4 activation fake-quant asserts CUDA (modelopt/torch/quantization/tensor_quant.py
    `_dynamic_block_quantize_impl`: "amax must be a CUDA tensor for dynamic block quantization"), so on CPU the
    quantized model is run with modelopt's quantizers switched off and Foldtron's bit-exact NVFP4 emulation
    (kernels/nvfp4.py `nvfp4_fake_quantize`, 16-element E4M3-scaled blocks) applied to every quantized 2-D Linear's
    weight and input, with the global amax modelopt calibrated (input) or measured (weight). transformers 5's fused
    routed experts (3-D `up_proj` / `down_proj`, modelopt's _QuantFusedExperts: one weight quantizer per expert, one
    input quantizer per projection shared by the experts) are emulated too: each expert's weight quantized on its
    own, the up-projection input at the experts' input (NVFP4 blocks run along the feature dimension, so quantizing
    the tokens before routing equals quantizing each expert's gathered rows) and the down-projection input at
    `act_fn`'s output. A quantized module neither form fits keeps BF16 and is counted in `bf16_modules`."""

    def __init__(self, model):
        self.model, self.handles, self.restore = model, [], []
        self.emulated = self.bf16 = 0

    def __enter__(self):
        from kernels.nvfp4 import nvfp4_fake_quantize

        self.off = [q for q in self.model.modules()
                    if type(q).__name__.endswith("TensorQuantizer") and getattr(q, "is_enabled", False)]

        def quantize_input(amax):
            def pre(_m, args):
                x = args[0]
                return (nvfp4_fake_quantize(x, amax=amax).to(x.dtype).view_as(x), *args[1:])
            return pre

        for _, m in self.model.named_modules():
            if self._fused_experts(m, nvfp4_fake_quantize, quantize_input):
                continue
            iq, wq = getattr(m, "input_quantizer", None), getattr(m, "weight_quantizer", None)
            if iq is None or wq is None or wq not in self.off:
                if any(q in self.off for q in m.children()) and not hasattr(m, "input_quantizer") \
                        and type(m).__name__.endswith("Experts"):
                    self.bf16 += 1
                continue
            w = getattr(m, "weight", None)
            if w is None or w.dim() != 2 or getattr(iq, "amax", None) is None:
                self.bf16 += 1
                continue
            old = w.data
            w.data = nvfp4_fake_quantize(old).to(old.dtype).view_as(old)
            amax = iq.amax.detach().to(torch.float32).max()
            self.handles.append(m.register_forward_pre_hook(quantize_input(amax)))
            self.restore.append((m, old))
            self.emulated += 1
        for q in self.off:
            q.disable()
        return self

    def _fused_experts(self, m, fake_quantize, quantize_input) -> bool:
        iq_up, iq_down = getattr(m, "up_proj_input_quantizer", None), getattr(m, "down_proj_input_quantizer", None)
        wq_up, wq_down = getattr(m, "up_proj_weight_quantizers", None), getattr(m, "down_proj_weight_quantizers", None)
        up, down, act = getattr(m, "up_proj", None), getattr(m, "down_proj", None), getattr(m, "act_fn", None)
        if any(x is None for x in (iq_up, iq_down, wq_up, wq_down, up, down)) or not isinstance(act, torch.nn.Module):
            return False
        if iq_up not in self.off or up.dim() != 3 or down.dim() != 3:
            return False
        if getattr(iq_up, "amax", None) is None or getattr(iq_down, "amax", None) is None:
            self.bf16 += 1  # no expert saw a calibration token: nothing to emulate with
            return True
        for w in (up, down):
            old = w.data
            w.data = torch.stack([fake_quantize(old[e]).to(old.dtype).view_as(old[e]) for e in range(old.shape[0])])
            self.restore.append((w, old))
        self.handles.append(m.register_forward_pre_hook(quantize_input(iq_up.amax.detach().to(torch.float32).max())))
        down_amax = iq_down.amax.detach().to(torch.float32).max()

        def post(_m, _args, out):
            return fake_quantize(out, amax=down_amax).to(out.dtype).view_as(out)

        self.handles.append(act.register_forward_hook(post))
        self.emulated += 1
        return True

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m, old in self.restore:
            (m.weight if isinstance(m, torch.nn.Module) else m).data = old
        for q in self.off:
            q.enable()


def quantized_quality(model, tokens: torch.Tensor) -> Dict[str, Any]:
    """next_token_quality of the calibrated model: modelopt's fake-quant on CUDA (written, not run: no GPU here),
    Foldtron's NVFP4 emulation with modelopt's calibrated amaxes on CPU (_CPUEmulation)."""
    if tokens.is_cuda:
        return {**next_token_quality(model, tokens), "numerics": "modelopt fake-quant (CUDA)"}
    with _CPUEmulation(model) as emu:
        q = next_token_quality(model, tokens)
    return {**q, "numerics": "kernels/nvfp4 emulation of weights + inputs with modelopt's calibrated amax (CPU)",
            "emulated_modules": emu.emulated, "bf16_modules": emu.bf16}


def quality_delta(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    return {"numerics": after.get("numerics"), "emulated_modules": after.get("emulated_modules"),
            "bf16_modules": after.get("bf16_modules"), "tokens": before["tokens"], "bf16_loss": before["loss"], "nvfp4_loss": after["loss"],
            "bf16_ppl": before["ppl"], "nvfp4_ppl": after["ppl"], "loss_delta": after["loss"] - before["loss"],
            "ppl_increase": after["ppl"] / before["ppl"] - 1.0,
            "top1_agreement": (before["preds"] == after["preds"]).float().mean().item()}


def calibration_from_run(config: Any, *, phase: Optional[str] = None, calib_size: int = 16, eval_size: int = 16,
                         seq_length: int = 128, seed: int = 0, shards: Optional[str] = None,
                         curriculum: Optional[str] = None, data_seed: Optional[int] = None):
    """(calibration windows, evaluation windows, their record) from the run's own shards: two disjoint held-out
    splits of `phase` (default: the run's last stage's phase). `config`: RunConfig or YAML path, or None with
    shards / curriculum / phase / data_seed given."""
    from data_pipeline.heldout import held_out_splits

    if isinstance(config, (str, Path)):
        from pretrain.config import load_config

        config = load_config(config)
    data = getattr(config, "data", None)
    shards = shards or (data.shards_dir if data else None)
    curriculum = curriculum or (data.curriculum if data else None)
    data_seed = data_seed if data_seed is not None else (data.seed if data else None)
    if phase is None and getattr(config, "stages", None):
        phase = config.stages[-1].phase or config.stages[-1].name
    missing = [n for n, v in (("shards", shards), ("curriculum", curriculum), ("phase", phase),
                              ("data seed", data_seed)) if v is None]
    if missing:
        raise ExportError(f"NVFP4 calibration on real data needs the run's {', '.join(missing)}: pass --config RUN.yaml "
                          "(its data section and stages) or --calib-shards/--calib-curriculum/--calib-phase/"
                          "--calib-data-seed")
    splits, meta = held_out_splits(shards, curriculum, phase, {"calibration": calib_size, "evaluation": eval_size},
                                   seq_length, seed=seed, data_seed=data_seed)
    dev = torch.device("cpu")
    return (torch.as_tensor(splits["calibration"], device=dev), torch.as_tensor(splits["evaluation"], device=dev),
            meta)


def export_nvfp4(hf_dir: Union[str, Path], output_dir: Union[str, Path], *, calib_tokens: Optional[torch.Tensor] = None,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, overwrite: bool = False, seed: int = 0,
                 calibration_meta: Optional[Dict[str, Any]] = None, eval_tokens: Optional[torch.Tensor] = None,
                 max_ppl_increase: Optional[float] = None,
                 min_top1_agreement: Optional[float] = None) -> Dict[str, Any]:
    """Quantize the BF16 HF export in `hf_dir` to NVFP4 (weights and activations of every Linear, 16-element
    blocks) and write it to `output_dir` (atomically). `exclude`: extra module-name globs kept in BF16.
    `eval_tokens`: held-out windows for the BF16-vs-NVFP4 quality report; `max_ppl_increase` (relative, 0.05 = 5 %)
    fails the export when quantization raises their perplexity more (needs `eval_tokens`); `min_top1_agreement`
    fails it when fewer held-out next-token predictions agree with BF16's. Both bars, because perplexity alone
    misses a calibration that clips: on a near-uniform model (random weights) inputs clipped at a tenth of their
    range cost +1.6 % perplexity but drop top-1 agreement from 0.66 to 0.12 (tests/test_export_nvfp4.py)."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        raise ExportError(f"NVFP4 export needs nvidia-modelopt (pip install 'foldtron[quant]'): {e}") from None
    from safetensors import safe_open
    from transformers import NemotronHForCausalLM

    from pretrain.import_hf import HFCheckpoint

    src, output = Path(hf_dir), Path(output_dir)
    if (max_ppl_increase is not None or min_top1_agreement is not None) and eval_tokens is None:
        raise ExportError("max_ppl_increase needs eval_tokens (held-out windows to measure the perplexity on)")
    for what, t in (("calib_tokens", calib_tokens), ("eval_tokens", eval_tokens)):
        if t is not None and (t.dim() != 2 or t.shape[0] == 0 or t.shape[1] < 2 or t.dtype != torch.long):
            raise ExportError(f"NVFP4 export: {what} must be a non-empty int64 tensor [windows, tokens >= 2], got "
                              f"{t.dtype} {tuple(t.shape)}")
    check_output(output, overwrite)
    hf = HFCheckpoint(src)  # validates files (truncation, index) before the long part
    mtp_names = sorted(n for n in hf.where if n.startswith("mtp."))
    model = NemotronHForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    for what, t in (("calib_tokens", calib_tokens), ("eval_tokens", eval_tokens)):
        if t is not None and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ExportError(f"NVFP4 export: {what} hold token ids {int(t.min())}..{int(t.max())}, outside the "
                              f"vocabulary of {src} ({vocab})")
    if calib_tokens is None:
        calib_tokens = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(seed),
                                     device=torch.device("cpu"))
        calibration: Dict[str, Any] = {"source": "random tokens (format check only; pass calib_tokens for a "
                                                 "production checkpoint)", "shape": list(calib_tokens.shape)}
    else:
        calibration = {"source": "given tokens", **(calibration_meta or {}), "shape": list(calib_tokens.shape)}
    before = next_token_quality(model, eval_tokens) if eval_tokens is not None else None
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for pat in exclude:  # later entries win in modelopt's list of quantizer patterns
        cfg["quant_cfg"].append({"quantizer_name": pat, "enable": False})

    def forward_loop(m):
        with torch.no_grad():
            for row in calib_tokens:
                m(input_ids=row.unsqueeze(0))

    model = mtq.quantize(model, cfg, forward_loop)
    quality = None
    if before is not None:
        quality = quality_delta(before, quantized_quality(model, eval_tokens))
        if max_ppl_increase is not None:
            quality["max_ppl_increase"] = max_ppl_increase
            if not quality["ppl_increase"] <= max_ppl_increase:  # NaN fails too
                hf.close()
                raise ExportError(
                    f"NVFP4 export of {src} misses the quality bar: held-out perplexity {quality['bf16_ppl']:.4g} (BF16) "
                    f"-> {quality['nvfp4_ppl']:.4g} (NVFP4), +{100 * quality['ppl_increase']:.2f} % > "
                    f"{100 * max_ppl_increase:.2f} % allowed (top-1 agreement {quality['top1_agreement']:.3f}, "
                    f"calibration: {calibration.get('phase', calibration['source'])}); nothing written to {output}")
        if min_top1_agreement is not None:
            quality["min_top1_agreement"] = min_top1_agreement
            if not quality["top1_agreement"] >= min_top1_agreement:
                hf.close()
                raise ExportError(
                    f"NVFP4 export of {src} misses the quality bar: held-out top-1 agreement with BF16 "
                    f"{quality['top1_agreement']:.3f} < {min_top1_agreement:.3f} required (perplexity "
                    f"{quality['bf16_ppl']:.4g} -> {quality['nvfp4_ppl']:.4g}, calibration: "
                    f"{calibration.get('phase', calibration['source'])}); nothing written to {output}")
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        export_hf_checkpoint(model, export_dir=str(tmp))
        qpath = tmp / "hf_quant_config.json"
        q = json.loads(qpath.read_text())
        q["quantization"]["exclude_modules"] = sorted({_clean(n) for n in q["quantization"].get("exclude_modules", [])})
        qpath.write_text(json.dumps(q, indent=4) + "\n")
        conf = json.loads((tmp / "config.json").read_text())
        qc = conf.get("quantization_config", {})
        if "ignore" in qc:
            qc["ignore"] = sorted({_clean(n) for n in qc["ignore"]})
        conf["hybrid_override_pattern"] = json.loads((src / "config.json").read_text()).get("hybrid_override_pattern")
        for key in ("num_nextn_predict_layers", "mtp_hybrid_override_pattern", "foldtron_mtp_depths"):
            if key in json.loads((src / "config.json").read_text()):
                conf[key] = json.loads((src / "config.json").read_text())[key]
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        # One index over modelopt's file(s) and the BF16 MTP weights.
        weight_map: Dict[str, str] = {}
        index = tmp / "model.safetensors.index.json"
        if index.is_file():
            weight_map.update(json.loads(index.read_text())["weight_map"])
        else:
            with safe_open(str(tmp / "model.safetensors"), "pt") as f:
                weight_map.update({k: "model.safetensors" for k in f.keys()})
        if mtp_names:
            w = ShardWriter(tmp, 1 << 62, hashes=False)
            for name in mtp_names:
                w.add(name, hf.tensor(name).to(torch.bfloat16).clone())
            w.flush()
            os.replace(tmp / w.files[0][0], tmp / "mtp.safetensors")
            weight_map.update({k: "mtp.safetensors" for k in mtp_names})
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                    indent=2) + "\n")
        write_marker(tmp, {"kind": "nvfp4", "source": str(src), "quant_algo": q["quantization"]["quant_algo"],
                           "calibration": calibration, "quality": quality})
        install_output(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hf.close()
    return {"output": str(output), "quant_algo": q["quantization"]["quant_algo"],
            "group_size": q["quantization"].get("group_size"), "exclude_modules": q["quantization"]["exclude_modules"],
            "tensors": len(weight_map), "mtp_tensors_bf16": len(mtp_names), "calibration": calibration,
            "quality": quality}
