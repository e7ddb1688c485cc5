"""HF export from dist checkpoints saved under 1 rank / TP2 / EP2 / PP2: transformers' NemotronHForCausalLM gives
Foldtron's logits within 1e-4 (fp32) and the same greedy tokens; every layer kind and the MTP block are exported;
export -> import -> export is bit-identical per tensor (every expert hashed); bad input is an error naming the
tensor and file, and never leaves a complete-looking output."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks

transformers = pytest.importorskip("transformers")

# (name, preset, layout, world). "pp2" uses the no-MTP, no-latent preset (a second model for the mismatch tests);
# "pp2-mtp" exports MTP from the last stage, whose embedding copy must not be exported twice.
LAYOUTS = [
    ("1rank", "tiny", dict(), 1),
    ("tp2", "tiny", dict(tp=2, sequence_parallel=True), 2),
    ("ep2", "tiny", dict(ep=2), 2),
    ("pp2", "tiny-nolatent", dict(pp=2), 2),
    ("pp2-mtp", "tiny-8", dict(pp=2), 2),
]
# Test models beyond the presets: "tiny" has 7 layers; this 8-layer variant splits over 2 stages.
VARIANTS = {"tiny-8": ("tiny", dict(hybrid_override_pattern="M*-EM*-E", num_layers=8))}


def model_cfg(name: str):
    from model.presets import get_preset

    base, over = VARIANTS.get(name, (name, {}))
    return get_preset(base, **over)


def perturb(model, seed: int) -> None:
    """Random values everywhere (norms, D, A_log, dt_bias, expert biases) so no parameter sits at an identity
    value that would hide a mapping mistake; seeded per name and rank so TP shards and EP experts all differ."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()) + 7919 * rank)
            if "norm" in name or name.endswith(".D"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()) + 7919 * rank)
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def export_tiny(tmp_path: Path, seed: int, dtype: str = "bf16", hf_name: str = "hf"):
    """One process: the tiny preset, perturbed with `seed`, saved as a Foldtron checkpoint in tmp_path/ckpt and
    exported to tmp_path/<hf_name>; returns (model config, checkpoint dir, HF dir)."""
    from megatron.core import dist_checkpointing

    from model.build import build_model, init_single_process
    from model.presets import get_preset
    from pretrain.export_hf import export_hf

    init_single_process()
    cfg = get_preset("tiny")
    model = build_model(cfg)
    perturb(model, seed)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(ckpt))
    export_hf(ckpt, tmp_path / hf_name, dtype, config=cfg)
    return cfg, ckpt, tmp_path / hf_name


def save_under_layout(preset: str, layout: dict, path: str, seed: int = 3) -> None:
    """One rank: build the model under `layout` and save its sharded_state_dict (the checkpoint code's model part)
    with Megatron-Core dist_checkpointing, plus foldtron.json recording the model config."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from model.build import build_model, transformer_config
    from parallel import groups
    from parallel.layout import ParallelLayout

    cfg = model_cfg(preset)
    lay = ParallelLayout(**layout)
    groups.setup(lay, seed=seed)
    try:
        kw = dict(tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
                  expert_model_parallel_size=lay.ep, sequence_parallel=lay.sequence_parallel,
                  pipeline_dtype=torch.float32)
        model = build_model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                            config=transformer_config(cfg, **kw))
        perturb(model, seed)
        Path(path).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
        if dist.get_rank() == 0:
            (Path(path) / "foldtron.json").write_text(json.dumps(
                {"iteration": 1, "stage": "test", "layout": lay.model_dump(), "model": cfg.model_dump()}))
        dist.barrier()
    finally:
        groups.teardown()


def save_layouts(jobs: list) -> None:
    """Several layouts in one set of ranks (process start-up dominates on a 2-core machine)."""
    for preset, layout, path in jobs:
        save_under_layout(preset, layout, path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{layout name: checkpoint dir}, saved once for the module."""
    from model.build import init_single_process

    root = tmp_path_factory.mktemp("ckpts")
    out = {name: str(root / name) for name, *_ in LAYOUTS}
    run_on_ranks(save_layouts, 2, [(preset, layout, out[name]) for name, preset, layout, world in LAYOUTS
                                   if world == 2])
    init_single_process()  # the 1-rank save runs here: this process is the one export reads in anyway
    for name, preset, layout, world in LAYOUTS:
        if world == 1:
            save_under_layout(preset, layout, out[name])
    return out


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, *_ in LAYOUTS])
def test_export_matches_transformers(saved, tmp_path, name):
    from pretrain.export_hf import export_hf, verify_export

    hf_dir = tmp_path / "hf"
    res = export_hf(saved[name], hf_dir, "fp32")
    assert res["tensors"] > 0 and Path(res["output"]) == hf_dir
    v = verify_export(hf_dir, saved[name], seq_len=20, new_tokens=6)
    assert v["logits_max_rel_diff"] <= 1e-4 and v["logits_max_abs_diff"] <= 1e-4, v
    assert v["greedy_equal"], (v["foldtron_tokens"], v["hf_tokens"])
    preset = dict((n, p) for n, p, *_ in LAYOUTS)[name]
    kinds = {"mamba", "attention", "mlp", "moe"}
    assert set(v["per_layer_kind"]) == kinds
    assert max(v["per_layer_kind"].values()) <= 1e-4
    conf = json.loads((hf_dir / "config.json").read_text())
    for key in ("hybrid_override_pattern", "moe_latent_size", "num_nextn_predict_layers", "n_routed_experts", "mamba_num_heads", "ssm_state_size",
                "n_groups", "conv_kernel", "chunk_size", "num_experts_per_tok", "moe_intermediate_size",
                "moe_shared_expert_intermediate_size", "routed_scaling_factor", "norm_topk_prob", "mlp_hidden_act",
                "layer_norm_epsilon", "tie_word_embeddings"):
        assert key in conf, key
    assert conf["model_type"] == "nemotron_h" and conf["mlp_hidden_act"] == "relu2"
    if preset in ("tiny", "tiny-8"):
        # one shared MTP block (the serving loaders read num_nextn_predict_layers == 1), trained at depth 2
        assert conf["moe_latent_size"] == 32 and conf["num_nextn_predict_layers"] == 1
        assert conf["foldtron_mtp_depths"] == 2
        assert conf["mtp_hybrid_override_pattern"] == "*E"
        assert v["mtp_tensors_exported"] > 0
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert all((hf_dir / f).is_file() for f in set(index["weight_map"].values()))
    assert (hf_dir / "generation_config.json").is_file()


@pytest.mark.multiproc
@pytest.mark.slow
def test_every_expert_and_shard_survives_layouts(saved, tmp_path):
    """An EP2 checkpoint exports each expert from its own rank's shard: the 4 experts of a layer are distinct,
    and re-exporting the imported 1-rank copy gives bit-identical tensors."""
    from safetensors import safe_open

    from pretrain.export_hf import export_hf

    res = export_hf(saved["ep2"], tmp_path / "hf", "fp32", tensor_hashes=True)
    experts = sorted(k for k in res["hashes"] if ".experts." in k and "up_proj" in k and k.startswith("backbone.layers.3."))
    assert len(experts) == 4 and len({res["hashes"][k] for k in experts}) == 4
    mtp_experts = [k for k in res["hashes"] if k.startswith("mtp.") and ".experts." in k]
    assert len(mtp_experts) == 8 and len({res["hashes"][k] for k in mtp_experts}) == 8
    with safe_open(str(tmp_path / "hf" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert set(f.keys()) == set(res["hashes"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_round_trip_bit_identical(saved, tmp_path, dtype):
    from pretrain.export_hf import export_hf
    from pretrain.import_hf import import_hf

    a = export_hf(saved["tp2"], tmp_path / "a", dtype, tensor_hashes=True, max_shard_bytes=200_000)
    assert a["shards"] > 1
    imp = import_hf(tmp_path / "a", tmp_path / "run", "tp=2,ep=2,sequence_parallel=true")
    b = export_hf(tmp_path / "run", tmp_path / "b", dtype, tensor_hashes=True, max_shard_bytes=200_000)
    assert a["hashes"] == b["hashes"]
    n_exp = sum(1 for k in a["hashes"] if ".experts." in k)
    assert n_exp == 2 * 4 * 3  # up+down x 4 experts x (2 decoder MoE layers + 1 MTP MoE layer)
    for f in sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    meta = json.loads((Path(imp["checkpoint"]) / "foldtron.json").read_text())
    assert meta["weights_only"] and meta["layout"]["tp"] == 2 and meta["model"]["moe_latent_size"] == 32


def test_config_round_trip_and_reverse_mapping():
    from model.hf_mapping import hf_to_megatron, megatron_to_hf, model_config_from_hf
    from model.presets import get_preset
    from pretrain.export_hf import config_json

    for preset in ("tiny", "tiny-nolatent", "super-120b-a12b", "nano-30b-a3b"):
        cfg = get_preset(preset)
        d = json.loads(json.dumps(config_json(cfg, torch.bfloat16, {})))
        assert model_config_from_hf(d) == cfg, preset
        # released configs carry only the pattern strings
        legacy = {k: v for k, v in d.items() if k not in ("layers_block_type", "mtp_layers_block_type")}
        assert model_config_from_hf(legacy) == cfg
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="mlp_hidden_act"):
        model_config_from_hf({**config_json(cfg, torch.float32, {}), "mlp_hidden_act": "silu"})
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(128, 64, generator=g)
    sd = {"decoder.layers.1.self_attention.linear_qkv.weight": qkv,
          "decoder.layers.3.mlp.experts.local_experts.2.linear_fc2.weight": torch.randn(32, 64, generator=g)}
    back = hf_to_megatron(megatron_to_hf(sd, cfg), cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="q/k/v"):
        hf_to_megatron({"backbone.layers.1.mixer.q_proj.weight": qkv[:64]}, cfg)
    with pytest.raises(KeyError, match="no Foldtron name"):
        hf_to_megatron({"backbone.layers.0.mixer.bogus": qkv}, cfg)


# ------------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def good_export(saved, tmp_path_factory):
    from pretrain.export_hf import export_hf

    out = tmp_path_factory.mktemp("good") / "hf"
    export_hf(saved["1rank"], out, "fp32", max_shard_bytes=300_000)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    save_file(fn(sd), str(path), metadata={"format": "pt"})


@pytest.mark.multiproc
@pytest.mark.slow
def test_bad_hf_input_names_tensor_and_file(good_export, tmp_path):
    from pretrain.export_hf import ExportError
    from pretrain.import_hf import import_hf

    index = json.loads((good_export / "model.safetensors.index.json").read_text())["weight_map"]
    victim = "backbone.layers.3.mixer.experts.2.up_proj.weight"
    vfile = index[victim]

    d = _copy(good_export, tmp_path / "missing")  # a dropped expert, index fixed up to match
    _rewrite(d / vfile, lambda sd: {k: v for k, v in sd.items() if k != victim})
    wm = {k: v for k, v in index.items() if k != victim}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(ExportError, match=rf"missing tensor {victim}"):
        import_hf(d, tmp_path / "o1")

    d = _copy(good_export, tmp_path / "extra")
    _rewrite(d / vfile, lambda sd: {**sd, "backbone.layers.3.mixer.experts.9.up_proj.weight": sd[victim].clone()})
    wm = {**index, "backbone.layers.3.mixer.experts.9.up_proj.weight": vfile}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(ExportError, match=rf"extra tensor backbone.layers.3.mixer.experts.9.up_proj.weight in .*{vfile}"):
        import_hf(d, tmp_path / "o2")

    d = _copy(good_export, tmp_path / "shape")
    _rewrite(d / vfile, lambda sd: {**sd, victim: sd[victim][:-1].clone()})
    with pytest.raises(ExportError, match=rf"tensor {victim} in .*{vfile} has shape"):
        import_hf(d, tmp_path / "o3")

    d = _copy(good_export, tmp_path / "trunc")
    data = (d / vfile).read_bytes()
    (d / vfile).write_bytes(data[: len(data) - 100])
    with pytest.raises(ExportError, match=rf"{vfile} is truncated: tensor \S+ needs bytes"):
        import_hf(d, tmp_path / "o4")
    assert not (tmp_path / "o4").exists() or not any((tmp_path / "o4").rglob("latest"))

    d = _copy(good_export, tmp_path / "noindex")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        **index, victim: "model-99999-of-99999.safetensors"}}))
    with pytest.raises(ExportError, match=rf"tensor {victim} is in .* but the index says"):
        import_hf(d, tmp_path / "o5")


@pytest.mark.multiproc
@pytest.mark.slow
def test_bad_checkpoint_is_an_error_and_leaves_no_output(saved, tmp_path):
    from model.presets import get_preset
    from pretrain.export_hf import ExportError, export_hf

    with pytest.raises(ExportError, match=r"missing tensor mtp\.layers\.0\..*checkpoint|checkpoint .* does not match"):
        export_hf(saved["pp2"], tmp_path / "x", config=get_preset("tiny"))  # config wants MTP + latent
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    with pytest.raises(ExportError, match=r"extra tensor decoder\.layers\.6\.") as e:
        export_hf(saved["1rank"], tmp_path / "y", config=get_preset("tiny", hybrid_override_pattern="M*-EM*",
                                                                       num_layers=6))
    assert saved["1rank"] in str(e.value)
    with pytest.raises(ExportError, match=r"has shape .* in the checkpoint but the config needs"):
        export_hf(saved["1rank"], tmp_path / "z", config=get_preset("tiny", moe_ffn_hidden_size=48))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ExportError, match="exists"):
        (tmp_path / "w").mkdir()
        export_hf(saved["1rank"], tmp_path / "w")


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.reliability
def test_overwrite_replaces_only_a_previous_export(saved, tmp_path):
    """Issue 20: `--overwrite --output RUN` deleted every checkpoint in RUN. Now a directory that is not an export
    is refused (nothing touched); a previous export is replaced and its stale shards go; foreign files block."""
    from pretrain.export_hf import ExportError, export_hf

    root = Path(saved["1rank"]).parent  # every layout's checkpoint: a run directory in all but name
    before = {p: p.stat().st_size for p in root.rglob("*")}
    with pytest.raises(ExportError, match="not a Foldtron export"):
        export_hf(saved["1rank"], root, "fp32", overwrite=True)
    assert {p: p.stat().st_size for p in root.rglob("*")} == before
    out = tmp_path / "hf"
    export_hf(saved["1rank"], out, "fp32", max_shard_bytes=200_000)
    assert len(list(out.glob("*.safetensors"))) > 1
    export_hf(saved["1rank"], out, "fp32", overwrite=True)
    assert [p.name for p in out.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"notes\.txt"):
        export_hf(saved["1rank"], out, "fp32", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.reliability
def test_import_records_checksums_and_overwrites_only_an_import(saved, tmp_path):
    """Issue 20: an imported checkpoint carries per-file sha256 like a trained one (a flipped bit is named by the
    next export); --overwrite replaces a previous import."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.export_hf import export_hf
    from pretrain.import_hf import import_hf

    export_hf(saved["1rank"], tmp_path / "a", "fp32")
    imp = import_hf(tmp_path / "a", tmp_path / "run")
    it = Path(imp["checkpoint"])
    assert set(json.loads((it / "foldtron.json").read_text())["files"]) >= {".metadata"}
    f = max(it.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{f} does not match its sha256"):
        export_hf(tmp_path / "run", tmp_path / "b", "fp32")
    import_hf(tmp_path / "a", tmp_path / "run", overwrite=True)
    export_hf(tmp_path / "run", tmp_path / "b", "fp32")


@pytest.mark.multiproc
@pytest.mark.slow
def test_cli_run_dir_tokenizer_and_verify(saved, tmp_path, capsys):
    """`foldtron export-hf` on a run directory (stage/latest -> iter dir), tokenizer from the run config's
    data.tokenizer: AutoTokenizer loads the export and encodes like `tokenizers`; --verify passes."""
    import shutil

    import yaml
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import TrainConfig, train_bpe
    from pretrain.cli import main

    tok = train_bpe(["the quick brown fox jumps over the lazy dog %d" % i for i in range(200)],
                    TrainConfig(vocab_size=400, min_frequency=1))
    tok.save(tmp_path / "tokenizer.json")
    run = tmp_path / "run"
    shutil.copytree(saved["1rank"], run / "phase1" / "iter_0000001")
    (run / "phase1" / "latest").write_text("iter_0000001\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        {"model": {"preset": "tiny"}, "data": {"tokenizer": str(tmp_path / "tokenizer.json")}}))
    out = tmp_path / "hf"
    rc = main(["export-hf", "--checkpoint", str(run), "--output", str(out), "--dtype", "fp32",
               "--config", str(tmp_path / "run.yaml"), "--verify", "--max-shard-size", "100KB"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert '"greedy_equal": true' in printed and "iter_0000001" in printed
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    text = "the lazy fox"
    assert hf_tok(text)["input_ids"] == tok.hf.encode(text).ids
    conf = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert conf["eos_token_id"] == gen["eos_token_id"] == hf_tok.eos_token_id == tok.eos_id
    assert sum(1 for _ in out.glob("model-*-of-*.safetensors")) > 1
    rc = main(["verify-hf", str(out), "--checkpoint", str(run / "phase1")])
    assert rc == 0


@pytest.mark.slow
@pytest.mark.multiproc
def test_export_from_training_loop_checkpoint(tmp_path):
    """A checkpoint written by `foldtron train` (DDP-wrapped model: keys under `module.`, optimizer state and
    loader/scheduler common state beside the weights) exports and verifies."""
    import subprocess
    import sys

    import yaml

    from pretrain.export_hf import export_hf, verify_export

    run = {"model": {"preset": "tiny-nolatent"}, "data": {"mock": True},
           "train": {"train_iters": 2, "seq_length": 32, "global_batch_size": 2, "micro_batch_size": 1},
           "checkpoint": {"save": str(tmp_path / "run"), "save_interval": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    p = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "-c", str(tmp_path / "run.yaml")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    export_hf(tmp_path / "run", tmp_path / "hf", "fp32", config=tmp_path / "run.yaml")
    v = verify_export(tmp_path / "hf", tmp_path / "run", config=tmp_path / "run.yaml")
    assert v["logits_max_rel_diff"] <= 1e-4 and v["greedy_equal"], v
    assert v["checkpoint"].endswith("iter_0000002")
    # foldtron train records the model config in foldtron.json: the checkpoint exports on its own.
    from pretrain.cli import main

    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf2"),
                 "--dtype", "fp32"]) == 0
    assert (tmp_path / "hf2" / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()
