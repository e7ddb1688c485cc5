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
Calibration: token batches you pass (`calib_tokens`), else random tokens (then `calibration` in the result says
so: fine for a format check, not for a production checkpoint).
"""
from __future__ import annotations

import copy
import json
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


def export_nvfp4(hf_dir: Union[str, Path], output_dir: Union[str, Path], *, calib_tokens: Optional[torch.Tensor] = None,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, overwrite: bool = False, seed: int = 0) -> Dict[str, Any]:
    """Quantize the BF16 HF export in `hf_dir` to NVFP4 (weights and activations of every Linear, 16-element
    blocks) and write it to `output_dir` (atomically). `exclude`: extra module-name globs kept in BF16."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        raise ExportError(f"NVFP4 export needs nvidia-modelopt (pip install 'foldtron[quant]'): {e}") from None
    from safetensors import safe_open
    from transformers import NemotronHForCausalLM

    from pretrain.import_hf import HFCheckpoint

    src, output = Path(hf_dir), Path(output_dir)
    check_output(output, overwrite)
    hf = HFCheckpoint(src)  # validates files (truncation, index) before the long part
    mtp_names = sorted(n for n in hf.where if n.startswith("mtp."))
    model = NemotronHForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    if calib_tokens is None:
        calib_tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
        calibration = "random tokens (format check only; pass calib_tokens for a production checkpoint)"
    else:
        calibration = f"{tuple(calib_tokens.shape)} given tokens"
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for pat in exclude:  # later entries win in modelopt's list of quantizer patterns
        cfg["quant_cfg"].append({"quantizer_name": pat, "enable": False})

    def forward_loop(m):
        with torch.no_grad():
            for row in calib_tokens:
                m(input_ids=row.unsqueeze(0))

    model = mtq.quantize(model, cfg, forward_loop)
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
        for key in ("num_nextn_predict_layers", "mtp_hybrid_override_pattern"):
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
        write_marker(tmp, {"kind": "nvfp4", "source": str(src), "quant_algo": q["quantization"]["quant_algo"]})
        install_output(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hf.close()
    return {"output": str(output), "quant_algo": q["quantization"]["quant_algo"],
            "group_size": q["quantization"].get("group_size"), "exclude_modules": q["quantization"]["exclude_modules"],
            "tensors": len(weight_map), "mtp_tensors_bf16": len(mtp_names), "calibration": calibration}
