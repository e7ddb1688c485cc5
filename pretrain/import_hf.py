"""Hugging Face NemotronH checkpoint -> Foldtron dist checkpoint (to continue pretraining a released model).

Why this shape:
- The HF directory is checked completely before anything is written: every tensor the config implies must be in
  exactly one file with the config's shape, no unknown tensor may be present, and every file must hold all the
  bytes its header promises (a truncated download is an error naming the tensor and file).
- Tensors are memory-mapped from the safetensors files (copy-on-write, file-backed pages), not read into
  anonymous memory: only the fused QKV of attention layers is materialised, so a large import does not need the
  model's size in RAM.
- One process writes full (unsharded) tensors with Megatron-Core `dist_checkpointing`; loading reshards them to
  any TP/PP/EP layout, so the layout given here is recorded (and validated against the model) rather than baked
  into the files.
- The checkpoint holds only model weights (`"weights_only": true` in foldtron.json), under
  `<output>/<stage>/iter_0000000` with a `latest` pointer; written to a temp dir and renamed at the end.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from model.config import ModelConfig
from pretrain.export_hf import ExportError, hf_shapes, meta_model, single_process_state

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> Dict[str, dict]:
    """A safetensors header, checked against the file size (truncation names the first cut tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ExportError(f"{path}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            raise ExportError(f"{path}: truncated inside its header ({size} bytes, header needs {8 + n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ExportError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][1]):
        end = 8 + n + h["data_offsets"][1]
        if end > size:
            raise ExportError(f"{path} is truncated: tensor {name} needs bytes up to {end}, the file has {size}")
        if h["dtype"] not in _ST_DTYPES:
            raise ExportError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        expect = math.prod(h["shape"]) * _ST_DTYPES[h["dtype"]].itemsize
        if h["data_offsets"][1] - h["data_offsets"][0] != expect:
            raise ExportError(f"{path}: tensor {name} has {h['data_offsets'][1] - h['data_offsets'][0]} bytes for "
                              f"shape {h['shape']} {h['dtype']} ({expect} expected)")
        h["_start"] = 8 + n + h["data_offsets"][0]
    return header


class HFCheckpoint:
    """The tensors of an HF NemotronH directory: names -> (file, header); tensors by zero-copy mmap."""

    def __init__(self, hf_dir: Union[str, Path]):
        self.dir = Path(hf_dir)
        if not (self.dir / "config.json").is_file():
            raise ExportError(f"{self.dir} has no config.json (not a Hugging Face checkpoint directory)")
        self.config = json.loads((self.dir / "config.json").read_text())
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise ExportError(f"{self.dir} has neither model.safetensors.index.json nor model.safetensors")
        self.where: Dict[str, Tuple[Path, dict]] = {}
        for fname in files:
            path = self.dir / fname
            if not path.is_file():
                names = [k for k, v in (weight_map or {}).items() if v == fname]
                raise ExportError(f"{path} is missing (the index puts {len(names)} tensors there, e.g. {names[:3]})")
            for name, h in read_header(path).items():
                if name in self.where:
                    raise ExportError(f"tensor {name} is in both {self.where[name][0]} and {path}")
                if weight_map is not None and weight_map.get(name) != fname:
                    raise ExportError(f"tensor {name} is in {path} but the index says "
                                      f"{weight_map.get(name, 'nothing about it')}")
                self.where[name] = (path, h)
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self.where))
            if lost:
                raise ExportError(f"tensor {lost[0]} is listed in {index} for {weight_map[lost[0]]} but that file "
                                  f"does not contain it ({len(lost)} such tensors)")
        self._maps: Dict[Path, mmap.mmap] = {}

    def check(self, expected: Dict[str, Tuple[int, ...]]) -> None:
        """Every expected tensor present with its shape; nothing else."""
        problems = []
        for name, shape in expected.items():
            if name not in self.where:
                problems.append(f"missing tensor {name} (shape {shape}) in {self.dir}")
            elif tuple(self.where[name][1]["shape"]) != shape:
                problems.append(f"tensor {name} in {self.where[name][0]} has shape {tuple(self.where[name][1]['shape'])}"
                                f", the config needs {shape}")
        for name in sorted(set(self.where) - set(expected)):
            problems.append(f"extra tensor {name} in {self.where[name][0]}: the config has no place for it")
        if problems:
            raise ExportError(f"{self.dir} does not match its config.json:\n  " + "\n  ".join(problems[:20])
                              + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))

    def tensor(self, name: str) -> torch.Tensor:
        path, h = self.where[name]
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dt = _ST_DTYPES[h["dtype"]]
        n = math.prod(h["shape"])
        if n == 0:
            return torch.empty(h["shape"], dtype=dt)
        return torch.frombuffer(self._maps[path], dtype=dt, count=n, offset=h["_start"]).view(h["shape"])

    def close(self) -> None:
        self._maps.clear()  # the tensors keep their mmap alive until they are released


def parse_layout(spec: Union[None, str, dict, Any]):
    """`tp=2,ep=2,sequence_parallel=true` / a dict / a ParallelLayout -> ParallelLayout."""
    from parallel.layout import ParallelLayout

    if spec is None or isinstance(spec, ParallelLayout):
        return spec or ParallelLayout()
    if isinstance(spec, str):
        kv = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ValueError(f"layout item {part!r} is not KEY=VALUE (e.g. tp=2,ep=2)")
            k, v = part.split("=", 1)
            kv[k.strip()] = v.strip().lower() in ("1", "true", "yes") if v.strip().lower() in (
                "true", "false", "yes", "no") else int(v)
        spec = kv
    return ParallelLayout(**spec)


def check_import_target(out: Path, stage: str, overwrite: bool, hf_dir: Path) -> None:
    """Before any work: the import writes `<out>/<stage>/iter_0000000`, `<out>/<stage>/latest` and
    `<out>/tokenizer.json`. `overwrite` replaces only a previous import (its foldtron.json records `source`); a
    stage directory holding trained checkpoints, or a different tokenizer.json it did not write, is refused."""
    from pretrain import checkpoint as ckpt

    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file, not a directory")
    sdir = out / stage
    final = sdir / ckpt.iter_name(0)
    if final.exists() and not overwrite:
        raise ExportError(f"{final} exists; remove it or pass overwrite=True (--overwrite)")
    prev = {}
    if final.exists():
        try:
            prev = json.loads((final / ckpt.META).read_text())
        except (OSError, ValueError):
            prev = {}
        if "source" not in prev or not prev.get("weights_only"):
            raise ExportError(f"{final} is not a previous import (its {ckpt.META} records no `source`); refusing "
                              "to replace it even with --overwrite: choose another --output or --stage")
    if sdir.is_dir():
        others = sorted(p.name for p in sdir.iterdir()
                        if p.name != final.name and not p.name.startswith(("latest", final.name + ".tmp-")))
        if others:
            raise ExportError(f"stage directory {sdir} already holds {', '.join(others[:5])}: importing there would "
                              "point its `latest` back at iteration 0; choose another --output or --stage")
    tok, src_tok = out / "tokenizer.json", hf_dir / "tokenizer.json"
    if tok.exists() and src_tok.is_file() and tok.read_bytes() != src_tok.read_bytes():
        ours = overwrite and prev.get("tokenizer") == str(tok.resolve())
        if not ours:
            raise ExportError(f"{tok} exists and differs from {src_tok}; refusing to replace a tokenizer this import "
                              "did not write: choose another --output")


def import_hf(hf_dir: Union[str, Path], output_dir: Union[str, Path], layout: Any = None, *,
              stage: str = "pretrained", world_size: Optional[int] = None, overwrite: bool = False,
              **model_overrides: Any) -> Dict[str, Any]:
    """Write `<output_dir>/<stage>/iter_0000000` (model weights, dist_checkpointing) from an HF NemotronH dir.

    `layout`: the parallel layout the run will use (checked against the model: TP divides heads, EP the experts,
    PP the pattern...), recorded in foldtron.json; `world_size` defaults to the layout's model-parallel size."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from model.hf_mapping import expert_names, expert_style, hf_to_megatron, model_config_from_hf
    from pretrain import checkpoint as ckpt

    check_import_target(Path(output_dir), stage, overwrite, Path(hf_dir))
    hf = HFCheckpoint(hf_dir)
    try:
        cfg: ModelConfig = model_config_from_hf(hf.config, **model_overrides)
    except (ValueError, KeyError) as e:
        raise ExportError(f"{hf.dir / 'config.json'}: {e}") from None
    lay = parse_layout(layout)
    world = world_size or max(lay.tp * lay.cp * lay.pp, lay.etp * lay.ep * lay.pp)
    problems = [p for p in lay.problems(cfg, world, 2 * lay.cp * 8, 1, world) if "batch" not in p]
    if problems:
        raise ExportError(f"layout {lay.model_dump()} cannot run this model: " + "; ".join(problems))
    single_process_state()
    model = meta_model(cfg)
    hf.check(hf_shapes(cfg, model))

    mg = hf_to_megatron({name: hf.tensor(name) for name in hf.where}, cfg)
    sd = model.sharded_state_dict()
    entries = {k: v for k, v in sd.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    # TEGroupedMLP (te backend) names experts `experts.linear_fc1.weight{e}`, SequentialMLP `local_experts.{e}`.
    mg = expert_names(mg, expert_style(entries))
    missing = sorted(set(entries) - set(mg))
    if missing:
        raise ExportError(f"{hf.dir}: no tensor maps to Foldtron parameter {missing[0]} ({len(missing)} missing)")
    for name, ent in entries.items():
        if tuple(mg[name].shape) != tuple(ent.data.shape):
            raise ExportError(f"{hf.dir}: {name} would get shape {tuple(mg[name].shape)}, needs {tuple(ent.data.shape)}")
        ent.data = mg[name]

    out = Path(output_dir)
    final = out / stage / ckpt.iter_name(0)
    check_import_target(out, stage, overwrite, hf.dir)  # again: the directory may have changed meanwhile
    tmp = out / stage / (ckpt.iter_name(0) + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        dist_checkpointing.save({"model": entries}, str(tmp))
        tok = None
        if (hf.dir / "tokenizer.json").is_file():
            tok = out / "tokenizer.json"
            shutil.copyfile(hf.dir / "tokenizer.json", tok)
        meta = {"stage": stage, "iteration": 0, "weights_only": True, "world_size": 1,
                "layout": lay.model_dump(mode="json"), "model": cfg.model_dump(mode="json"),
                "source": str(hf.dir.resolve()), "tokenizer": str(tok.resolve()) if tok else None,
                "files": ckpt.file_checksums(tmp)}  # verified at load, like a training checkpoint's
        (tmp / ckpt.META).write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr = out / stage / "latest.tmp-ptr"
        ptr.write_text(final.name + "\n")
        os.replace(ptr, out / stage / "latest")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del mg, entries, sd
        hf.close()
    return {"checkpoint": str(final), "stage": stage, "model": cfg.model_dump(mode="json"),
            "layout": lay.model_dump(mode="json"), "tensors": len(hf.where), "tokenizer": meta["tokenizer"]}
