"""Foldtron distributed checkpoint -> Hugging Face NemotronH checkpoint (the layout of the released Nemotron 3
models), streamed one layer at a time.

Why this shape:
- Reading: Megatron-Core's `dist_checkpointing.load` reshards any saved layout (TP/EP/PP, the Mamba in_proj and
  conv1d split into z/x/B/C/dt parts, experts under global indices) into the tensors of a 1-process model. We
  build that model on the meta device (no memory), take its sharded_state_dict, and load it one unit (a decoder
  layer, the MTP block's inner layer, the embedding, ...) at a time into freshly allocated CPU tensors, so peak
  memory is one unit plus the safetensors shard being filled, never the whole model.
- The checkpoint's tensor list (its `.metadata`) is checked against the model config before anything is read:
  a missing, extra or mis-shaped tensor is an error naming the tensor and the checkpoint.
- Names: model/hf_mapping.py (`megatron_to_hf`). Router weight and expert-score bias stay fp32 in a bf16 export
  (transformers keeps them fp32 anyway: `_keep_in_fp32_modules_strict`), so they round-trip losslessly.
- The output is written to `<output>.tmp-<pid>` and renamed at the end: a failed export never leaves a
  directory that looks complete. `overwrite` replaces only a previous export (recognised by `foldtron_export.json`,
  which lists every file the export wrote) and deletes only those files; a run directory, a file, or a directory
  holding anything else is refused before the export starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch

from model.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: HF's default `max_shard_size` ("5GB"); one shard is the writer's buffer, so this bounds its memory too.
DEFAULT_SHARD_BYTES = 5 * 10**9
#: Kept in fp32 whatever the export dtype (HF NemotronH computes the router in fp32).
FP32_NAMES = re.compile(r".*\.mixer\.gate\.(weight|e_score_correction_bias)$")
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
#: What may stand before the model's keys in a checkpoint: nothing (model saved directly), DDP's `module.`,
#: DDP(Float16Module(model)) in bf16 training.
KEY_PREFIXES = ("", "module.", "module.module.")
META = "foldtron.json"


class ExportError(ValueError):
    """A checkpoint or HF directory that cannot be converted; the message names the tensor and file."""


# ----------------------------------------------------------------------------------------------------------
# Finding the checkpoint and its model config

def resolve_checkpoint(path: Union[str, Path]) -> Tuple[Path, dict]:
    """An iteration directory (has `.metadata`), a stage directory (has `latest`) or a run directory (stages with
    `latest`; the most recently written one wins) -> (iteration dir, its foldtron.json or {})."""
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"checkpoint {p} does not exist or is not a directory")

    from pretrain import checkpoint as ckpt

    def meta_of(d: Path) -> dict:
        return ckpt.read_meta(d) if (d / META).is_file() else {}

    if (p / ".metadata").is_file():
        return p, meta_of(p)

    if (p / "latest").is_file():
        info = ckpt.latest(p.parent, p.name)
        return info.path, info.meta
    stages = [d for d in sorted(p.iterdir()) if (d / "latest").is_file()]
    if not stages:
        raise ExportError(f"{p} is not a checkpoint: no `.metadata` (an iteration directory), no `latest` "
                          "(a stage directory) and no stage directories with `latest` (a run directory)")
    infos = [ckpt.latest(p, d.name) for d in stages]
    info = max(infos, key=lambda i: (i.path / META).stat().st_mtime)
    return info.path, info.meta


def resolve_config(config: Any, meta: dict) -> Tuple[ModelConfig, Optional[str]]:
    """(model config, tokenizer.json path or None) from an explicit config (RunConfig, ModelConfig, YAML path)
    or from what the checkpoint recorded in foldtron.json (`model`, `tokenizer`)."""
    if config is None:
        if "model" in meta:
            return ModelConfig(**meta["model"]), meta.get("tokenizer")
        raise ExportError("the checkpoint does not record its model config (foldtron.json has no `model`); "
                          "pass the run config: --config RUN.yaml (or config=... in Python)")
    if isinstance(config, ModelConfig):
        return config, meta.get("tokenizer")
    if isinstance(config, (str, Path)):
        from pretrain.config import load_config

        config = load_config(config)
    from pretrain.config import RunConfig

    if isinstance(config, RunConfig):
        return config.model, config.data.tokenizer or meta.get("tokenizer")
    raise TypeError(f"config must be a RunConfig, ModelConfig or YAML path, got {type(config).__name__}")


def single_process_state() -> None:
    """Megatron-Core parallel state for one process (the export reads whole tensors: TP = EP = PP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from model.build import init_single_process

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("HF export/import runs in one process (dist_checkpointing reshards any layout into it); "
                           f"this one is rank {dist.get_rank()} of {dist.get_world_size()}")
    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise RuntimeError(f"parallel state is initialised with tp/pp/ep {sizes}; export needs 1/1/1")
        return
    init_single_process()


def meta_model(cfg: ModelConfig):
    """The 1-process model on the meta device: its sharded_state_dict describes every tensor, allocating none.

    `torch.device("meta")` alone does not hold where Megatron-Core, TE and MambaMixer pass `device=` explicitly
    (`torch.cuda.current_device()` on a GPU machine): that would materialise the whole model on one GPU.
    model.counting.meta_device also redirects explicit devices to meta."""
    from model.build import build_model
    from model.counting import meta_device

    with meta_device():  # imports Megatron-Core first (model.build.preload)
        return build_model(cfg)


def hf_shapes(cfg: ModelConfig, model=None) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name the config implies, with its shape (mapping the meta model's state dict)."""
    from model.hf_mapping import megatron_to_hf

    model = meta_model(cfg) if model is None else model
    return {k: tuple(v.shape) for k, v in megatron_to_hf(model.state_dict(), cfg).items()}


# ----------------------------------------------------------------------------------------------------------
# Reading a dist checkpoint unit by unit

def unit_of(key: str) -> str:
    """The loading unit of a state-dict key: one decoder layer, one MTP inner layer, the rest of the MTP block,
    or a top-level module (embedding, final norm, output layer)."""
    for pat in (r"(mtp\.layers\.\d+\.mtp_model_layer\.layers\.\d+)\.", r"(mtp\.layers\.\d+)\.",
                r"(decoder\.layers\.\d+)\."):
        if m := re.match(pat, key):
            return m.group(1)
    return key.rsplit(".", 1)[0]


class CheckpointReader:
    """Full (unsharded) Foldtron tensors out of a dist checkpoint saved under any layout, one unit at a time."""

    def __init__(self, ckpt_dir: Union[str, Path], cfg: ModelConfig):
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        single_process_state()
        self.dir, self.cfg = Path(ckpt_dir), cfg
        self.model = meta_model(cfg)
        sd = self.model.sharded_state_dict()
        self.entries = {k: v for k, v in sd.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
        try:
            saved = dist_checkpointing.load_tensors_metadata(str(self.dir))
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ExportError(f"cannot read the tensor metadata of checkpoint {self.dir}: {e}") from e
        # The training loop saves the DDP-wrapped model: its keys carry `module.` (twice with Float16Module).
        self.prefix = max(KEY_PREFIXES, key=lambda p: sum(k.startswith(p + "decoder.") for k in saved))
        n = len(self.prefix)
        self.saved = {k[n:]: v for k, v in saved.items()
                      if k.startswith(self.prefix) and k[n:].startswith(MODEL_PREFIXES)}
        self.dtypes: Dict[str, torch.dtype] = {}
        expected: set = set()
        problems = []
        for name, ent in self.entries.items():
            parts = ent.build() if isinstance(ent, ShardedTensorFactory) else [ent]
            for st in (parts.values() if isinstance(parts, dict) else parts):
                shape = tuple(st.global_shape)
                if st.key in expected:
                    continue  # experts: several local entries share one global tensor
                expected.add(st.key)
                if st.key not in self.saved:
                    problems.append(f"missing tensor {st.key} (the config needs shape {shape} for {name})")
                elif tuple(self.saved[st.key].global_shape) != shape:
                    problems.append(f"tensor {st.key} has shape {tuple(self.saved[st.key].global_shape)} in the "
                                    f"checkpoint but the config needs {shape}")
            first = next(iter(parts.values() if isinstance(parts, dict) else parts))
            if first.key in self.saved:
                self.dtypes[name] = self.saved[first.key].dtype
        for key in sorted(set(self.saved) - set(expected)):
            problems.append(f"extra tensor {key} {tuple(self.saved[key].global_shape)}: the model config has no "
                            "place for it")
        if problems:
            raise ExportError(f"checkpoint {self.dir} does not match the model config "
                              f"(pattern {cfg.hybrid_override_pattern!r}, mtp {cfg.mtp_num_layers}):\n  "
                              + "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))
        self.units: Dict[str, list] = {}
        for name in self.entries:
            self.units.setdefault(unit_of(name), []).append(name)

    def nbytes(self) -> int:
        """Bytes of the model tensors in the checkpoint (its dtype)."""
        return sum(math.prod(v.global_shape) * v.dtype.itemsize for v in self.saved.values())

    def load_unit(self, unit: str) -> Dict[str, torch.Tensor]:
        """Load one unit's tensors (Megatron names, full shapes, the checkpoint's dtype)."""
        import copy

        from megatron.core import dist_checkpointing

        sub = {}
        for name in self.units[unit]:
            ent = copy.copy(self.entries[name])
            ent.data = torch.empty(ent.data.shape, dtype=self.dtypes[name])
            ent.key = self.prefix + ent.key
            sub[name] = ent
        try:
            loaded = dist_checkpointing.load(sub, str(self.dir))
        except Exception as e:  # noqa: BLE001 - re-raised naming the unit and checkpoint
            raise ExportError(f"reading {unit} ({', '.join(self.units[unit][:3])}...) from checkpoint {self.dir} "
                              f"failed: {e}") from e
        # The checkpoint's common state (optimizer param groups, scheduler, loader) comes along: keep ours only.
        return {k: loaded[k] for k in sub}

    def __iter__(self) -> Iterator[Tuple[str, Dict[str, torch.Tensor]]]:
        for unit in self.units:
            yield unit, self.load_unit(unit)


# ----------------------------------------------------------------------------------------------------------
# Writing safetensors shards

def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of dtype, shape and raw bytes: equal hashes mean bit-identical tensors."""
    t = t.contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ShardWriter:
    """Fills one safetensors shard at a time (at most `max_bytes`, unless a single tensor is larger) and writes
    HF's `model.safetensors.index.json` at the end."""

    def __init__(self, out: Path, max_bytes: int, hashes: bool):
        self.out, self.max_bytes, self.hashes = out, max_bytes, hashes
        self.buf: Dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.files: list[Tuple[str, list]] = []
        self.sha: Dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.sha or name in self.buf or any(name in keys for _, keys in self.files):
            raise ExportError(f"tensor {name} produced twice")
        n = t.numel() * t.element_size()
        if self.buf and self.size + n > self.max_bytes:
            self.flush()
        self.buf[name] = t.contiguous()
        self.size += n
        self.total += n
        if self.hashes:
            self.sha[name] = tensor_sha256(t)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        tmp = f"part-{len(self.files):05d}.safetensors"
        save_file(self.buf, str(self.out / tmp), metadata={"format": "pt"})
        self.files.append((tmp, sorted(self.buf)))
        self.buf, self.size = {}, 0

    def finish(self) -> Dict[str, str]:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp, self.out / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


# ----------------------------------------------------------------------------------------------------------
# config.json, generation_config.json, tokenizer

def hf_config(cfg: ModelConfig, dtype: torch.dtype, special: Dict[str, Optional[int]]):
    """NemotronHConfig with every key transformers 5 writes, plus the released checkpoints' pattern keys
    (`hybrid_override_pattern`, `mtp_hybrid_override_pattern`) that vLLM / TRT-LLM and older transformers read."""
    from transformers import NemotronHConfig

    from model.hf_mapping import hf_config_dict

    conf = NemotronHConfig(**hf_config_dict(cfg), **special)
    conf.dtype = dtype
    return conf


def config_json(cfg: ModelConfig, dtype: torch.dtype, special: Dict[str, Optional[int]]) -> dict:
    d = hf_config(cfg, dtype, special).to_dict()
    d.update(hybrid_override_pattern=cfg.hybrid_override_pattern, num_hidden_layers=cfg.num_layers,
             torch_dtype=str(dtype).removeprefix("torch."))
    d.setdefault("moe_latent_size", cfg.moe_latent_size)
    from model.hf_mapping import MTP_WEIGHT_SETS

    d["num_nextn_predict_layers"] = MTP_WEIGHT_SETS if cfg.mtp_num_layers else 0  # weight sets (hf_mapping)
    if cfg.mtp_num_layers:  # transformers rejects an explicit null here
        d["mtp_hybrid_override_pattern"] = cfg.mtp_hybrid_override_pattern
        d["foldtron_mtp_depths"] = cfg.mtp_num_layers
    else:
        d.pop("mtp_hybrid_override_pattern", None)
        d.pop("foldtron_mtp_depths", None)
    return d


def write_tokenizer(src: Union[str, Path], out: Path, vocab_size: int) -> Dict[str, Optional[int]]:
    """tokenizer.json + tokenizer_config.json that `PreTrainedTokenizerFast` (AutoTokenizer) loads; returns the
    special-token ids for config.json / generation_config.json."""
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import DEFAULT_BOS, DEFAULT_EOS, DEFAULT_PAD

    src = Path(src)
    if not src.is_file():
        raise ExportError(f"tokenizer {src} (data.tokenizer of the run config) does not exist")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(src))
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer {src} has ids up to {max(vocab.values())} but the model's vocab_size is "
                          f"{vocab_size}")
    special = {}
    for field, token in (("bos_token", DEFAULT_BOS), ("eos_token", DEFAULT_EOS), ("pad_token", DEFAULT_PAD)):
        if token in vocab:
            setattr(tok, field, token)
            special[f"{field}_id"] = vocab[token]
    if "pad_token_id" not in special and "eos_token_id" in special:
        tok.pad_token = tok.eos_token
        special["pad_token_id"] = special["eos_token_id"]
    tok.save_pretrained(str(out))
    return special


# ----------------------------------------------------------------------------------------------------------
# The output directory: an export replaces only a previous export, and deletes only the files that export wrote.

#: Written last into every export (HF and NVFP4); lists every file of the export (`files`), so that
#: `--overwrite` can tell an export from a run directory and delete exactly what an export wrote.
EXPORT_MARKER = "foldtron_export.json"
#: What an export written before the marker listed its files consisted of (recognised only next to the marker).
_LEGACY_ARTIFACTS = re.compile(r"^(config\.json|generation_config\.json|model\.safetensors\.index\.json|"
                               r"model(-\d{5}-of-\d{5})?\.safetensors|mtp\.safetensors|hf_quant_config\.json|"
                               r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
                               r"chat_template\.jinja|foldtron_export\.json)$")


def _files_under(d: Path) -> list:
    """Every file under `d` (relative paths), and every empty directory as `name/`."""
    return sorted(p.relative_to(d).as_posix() + ("/" if p.is_dir() else "") for p in d.rglob("*")
                  if not p.is_dir() or not any(p.iterdir()))


def foreign_entries(output: Path) -> Optional[list]:
    """The files in `output` that no previous export wrote (relative paths), or None when `output` has no export
    marker (then nothing in it is known to be an export's, unless it is empty)."""
    files = _files_under(output)
    marker = output / EXPORT_MARKER
    if not marker.is_file():
        return None if files else []
    try:
        listed = json.loads(marker.read_text()).get("files")
    except (ValueError, AttributeError) as e:
        raise ExportError(f"{marker} is not a readable export marker ({e}); not overwriting {output}") from None
    if listed is None:
        return [f for f in files if not _LEGACY_ARTIFACTS.match(f)]
    known = set(listed) | {EXPORT_MARKER}
    return [f for f in files if f not in known]


def check_output(output: Union[str, Path], overwrite: bool) -> Path:
    """Fail before any work unless `output` can take an export: it does not exist, or (with `overwrite`) it is an
    empty directory or holds a previous export and nothing else. A file, a run or checkpoint directory, or a directory
    holding any file an export did not write is refused, naming what is in the way."""
    output = Path(output)
    if output.is_symlink():
        raise ExportError(f"output {output} is a symbolic link; name the directory itself")
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} is a file, not a directory; name a directory for the export")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"output {output}: {parent} is a file, not a directory")
            break
    if not output.exists():
        return output
    if not overwrite:
        raise ExportError(f"output {output} exists; pass --overwrite (overwrite=True) to replace a previous export")
    foreign = foreign_entries(output)
    if foreign is None:
        what = ", ".join(sorted(p.name for p in output.iterdir())[:8])
        raise ExportError(f"output {output} exists and is not a Foldtron export (no {EXPORT_MARKER}; it holds "
                          f"{what}); refusing to touch it even with --overwrite: name a new or empty directory")
    if foreign:
        raise ExportError(f"output {output} holds files no export wrote ({', '.join(foreign[:8])}"
                          f"{', ...' if len(foreign) > 8 else ''}); refusing to replace it: move them or name "
                          "another directory")
    return output


def write_marker(tmp: Path, info: Dict[str, Any]) -> None:
    """The export marker, written last: `info` plus the list of every file the export wrote."""
    files = [f for f in _files_under(tmp) if f != EXPORT_MARKER]
    (tmp / EXPORT_MARKER).write_text(json.dumps({**info, "files": files}, indent=1) + "\n")


def install_output(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move the finished export `tmp` to `output`. A previous export there is checked again (it may have changed
    during the export), renamed aside, replaced by one rename, and then only its own files are deleted."""
    if not output.exists() or not any(output.iterdir()):
        os.replace(tmp, output)
        return
    check_output(output, overwrite)
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        os.replace(old, output)
        raise
    remove_export(old)


def remove_export(d: Path) -> None:
    """Delete an export directory file by file, only if every file in it is the export's (else leave it)."""
    foreign = foreign_entries(d)
    if foreign is None or foreign:
        log.warning("left %s in place: it holds files no export wrote (%s)", d, foreign)
        return
    for f in _files_under(d):
        if not f.endswith("/"):
            (d / f).unlink()
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        sub.rmdir()
    d.rmdir()


# ----------------------------------------------------------------------------------------------------------
# The export

def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def export_hf(checkpoint_dir: Union[str, Path], output_dir: Union[str, Path], dtype: str = "bf16", *,
              config: Any = None, tokenizer: Optional[Union[str, Path]] = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
              tensor_hashes: bool = False) -> Dict[str, Any]:
    """Write the HF NemotronH checkpoint of a Foldtron dist checkpoint (any layout) to `output_dir`.

    Returns {output, checkpoint, dtype, tensors, bytes, shards, seconds, gb_per_s, peak_rss_bytes, hashes?}."""
    from model.hf_mapping import megatron_to_hf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    out_dtype = DTYPES[dtype]
    output = check_output(output_dir, overwrite)  # before any work: a wrong --output fails at once
    ckpt, meta = resolve_checkpoint(checkpoint_dir)
    from pretrain.checkpoint import verify_files

    verify_files(ckpt, meta)  # a flipped bit or truncated file is named before anything is read
    cfg, tok_path = resolve_config(config, meta)
    tok_path = tokenizer or tok_path
    reader = CheckpointReader(ckpt, cfg)
    expected = hf_shapes(cfg, reader.model)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        special = write_tokenizer(tok_path, tmp, cfg.vocab_size) if tok_path else {}
        writer = ShardWriter(tmp, max_shard_bytes, tensor_hashes)
        for unit, tensors in reader:
            for name, t in megatron_to_hf(tensors, cfg).items():
                if name not in expected:
                    raise ExportError(f"{unit} produced HF tensor {name}, which the config does not expect")
                if tuple(t.shape) != expected[name]:
                    raise ExportError(f"HF tensor {name} from {unit} has shape {tuple(t.shape)}, expected "
                                      f"{expected[name]}")
                writer.add(name, t.to(torch.float32 if FP32_NAMES.match(name) else out_dtype))
            del tensors
        weight_map = writer.finish()
        missing = sorted(set(expected) - set(weight_map))
        if missing:
            raise ExportError(f"export of {ckpt} wrote no tensor for {missing[:10]}")
        (tmp / "config.json").write_text(json.dumps(config_json(cfg, out_dtype, special), indent=2, sort_keys=True)
                                         + "\n")
        from transformers import GenerationConfig

        GenerationConfig(**{k: v for k, v in special.items()}).save_pretrained(str(tmp))
        write_marker(tmp, {"kind": "hf", "checkpoint": str(ckpt), "iteration": meta.get("iteration"),
                           "stage": meta.get("stage"), "layout": meta.get("layout"), "dtype": dtype,
                           "model": cfg.model_dump(mode="json")})
        install_output(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    secs = time.perf_counter() - t0
    result = {"output": str(output), "checkpoint": str(ckpt), "dtype": dtype, "tensors": len(weight_map),
              "bytes": writer.total, "shards": len(writer.files), "seconds": secs,
              "gb_per_s": writer.total / secs / 1e9, "peak_rss_bytes": _rss_peak_bytes(),
              "tokenizer": str(tok_path) if tok_path else None}
    if tensor_hashes:
        result["hashes"] = writer.sha
    return result


# ----------------------------------------------------------------------------------------------------------
# Verification against transformers

KIND_NAMES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def load_foldtron(checkpoint_dir: Union[str, Path], config: Any = None):
    """(fp32 1-process Foldtron model with the checkpoint's weights, its ModelConfig, checkpoint path)."""
    from model.build import build_model

    ckpt, meta = resolve_checkpoint(checkpoint_dir)
    cfg, _ = resolve_config(config, meta)
    reader = CheckpointReader(ckpt, cfg)
    model = build_model(cfg).eval()
    state = {}
    for _, tensors in reader:
        state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ExportError(f"checkpoint {ckpt}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, cfg, ckpt


#: verify-hf's default tolerance on max relative |Δlogits|, by the export's dtype. A bf16 export is compared with
#: Foldtron's weights rounded to bf16 as the export rounded them (router weights kept fp32), so what is measured is
#: the mapping and the kernels, not the rounding; 1e-3 leaves room for fp32 sums over bf16-valued weights.
VERIFY_TOL = {"fp32": 1e-4, "bf16": 1e-3}


def export_dtype(hf_dir: Union[str, Path]) -> str:
    """"bf16" or "fp32": from the export marker (`dtype`), else config.json's torch_dtype / dtype."""
    hf_dir = Path(hf_dir)
    marker = hf_dir / EXPORT_MARKER
    if marker.is_file():
        d = json.loads(marker.read_text()).get("dtype")
        if d in DTYPES:
            return d
    conf = hf_dir / "config.json"
    if not conf.is_file():
        raise ExportError(f"{hf_dir} is not an HF export: no config.json")
    raw = json.loads(conf.read_text())
    name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    return {"bfloat16": "bf16", "float32": "fp32"}.get(name, "fp32")


@torch.no_grad()
def verify_export(hf_dir: Union[str, Path], checkpoint_dir: Union[str, Path], *, config: Any = None,
                  batch: int = 2, seq_len: int = 24, new_tokens: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Run one random token batch through the exported model (transformers' NemotronHForCausalLM, fp32) and
    through Foldtron (fp32, weights from the checkpoint, rounded to the export's dtype first); report max |Δ| of every
    layer's output grouped by layer kind, of the logits, and whether greedy generation (transformers' `generate`,
    with its Mamba/KV cache) produces Foldtron's tokens (Foldtron: full recompute per step). `tolerance` in the
    result is the default bar for the export's dtype (VERIFY_TOL)."""
    from transformers import NemotronHForCausalLM

    single_process_state()
    dtype = export_dtype(hf_dir)
    model, cfg, ckpt = load_foldtron(checkpoint_dir, config)
    if dtype != "fp32":  # the export rounded every tensor but the router's (FP32_NAMES)
        for name, p in model.named_parameters():
            if ".router." not in name:
                p.copy_(p.to(DTYPES[dtype]).float())
    hf = NemotronHForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed),
                        device=torch.device("cpu"))

    ours_h, theirs_h = {}, {}

    def grab(store, i, seq_first):
        def hook(_m, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            store[i] = h.transpose(0, 1) if seq_first else h
        return hook

    handles = [layer.register_forward_hook(grab(ours_h, i, True)) for i, layer in enumerate(model.decoder.layers)]
    handles += [layer.register_forward_hook(grab(theirs_h, i, False)) for i, layer in enumerate(hf.model.layers)]
    try:
        pos = torch.arange(seq_len, device=torch.device("cpu")).expand(batch, seq_len)
        ours = model(ids, pos, None)
        theirs = hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    per_layer = []
    per_kind: Dict[str, float] = {}
    for i, sym in enumerate(cfg.hybrid_override_pattern):
        d = (ours_h[i] - theirs_h[i]).abs().max().item()
        per_layer.append({"layer": i, "kind": KIND_NAMES[sym], "max_abs_diff": d,
                          "max_abs": theirs_h[i].abs().max().item()})
        per_kind[KIND_NAMES[sym]] = max(per_kind.get(KIND_NAMES[sym], 0.0), d)
    dl = (ours - theirs).abs().max().item()

    gen = ids
    for _ in range(new_tokens):
        logits = model(gen, torch.arange(gen.shape[1], device=torch.device("cpu")).expand(batch, -1), None)
        gen = torch.cat([gen, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    hf.generation_config.eos_token_id = None  # a random model may emit EOS; compare all new_tokens
    hf_gen = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return {
        "hf_dir": str(hf_dir), "checkpoint": str(ckpt), "tokens": [batch, seq_len], "export_dtype": dtype,
        "tolerance": VERIFY_TOL[dtype],
        "logits_max_abs_diff": dl, "logits_max_rel_diff": dl / theirs.abs().max().item(),
        "per_layer_kind": per_kind, "per_layer": per_layer,
        "greedy_equal": torch.equal(gen[:, seq_len:], hf_gen[:, seq_len:]),
        "foldtron_tokens": gen[:, seq_len:].tolist(), "hf_tokens": hf_gen[:, seq_len:].tolist(),
        "mtp_tensors_exported": sum(1 for k in _index_names(Path(hf_dir)) if k.startswith("mtp.")),
    }


def _index_names(hf_dir: Path) -> list:
    return list(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"])
