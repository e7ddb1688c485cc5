"""The run-config schema: presets, overrides, and one clear error per bad field before anything starts."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, RunConfig, apply_overrides, build_config, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
# Run configs (examples/configs also holds curation configs and curricula, which have their own schemas).
CONFIGS = [ROOT / "examples/configs" / f for f in ("tiny.yaml", "nano-30b-a3b.yaml", "super-120b-a12b.yaml")] + sorted(
    (ROOT / "examples" / "configs").glob("slurm-*.yaml"))


def test_defaults_validate():
    cfg = RunConfig()
    assert cfg.train.adam_beta2 == 0.95 and cfg.parallel.tp == 1


@pytest.mark.parametrize("path", [p for p in CONFIGS], ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    # The resolved config round-trips through YAML unchanged.
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_super_preset_resolves():
    cfg = load_config(ROOT / "examples/configs/super-120b-a12b.yaml")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_moe_experts, m.moe_router_topk) == (88, 4096, 512, 22)
    assert m.moe_latent_size == 1024 and m.mtp_num_layers == 2 and m.mtp_hybrid_override_pattern == "*E"
    assert cfg.precision.num_layers_at_end_in_bf16 == 14
    assert cfg.stages[-1].parallel.cp == 64


def test_dotted_overrides():
    cfg = load_config(ROOT / "examples/configs/tiny.yaml", ["train.lr=3e-4", "parallel.tp=2", "model.hidden_size=128",
                                                            "data.mock=false", "precision.overrides={a.*: nvfp4}"])
    assert cfg.train.lr == 3e-4 and cfg.parallel.tp == 2 and cfg.model.hidden_size == 128
    assert cfg.data.mock is False and cfg.precision.overrides == {"a.*": "nvfp4"}
    # the preset's other fields stay
    assert cfg.model.moe_latent_size == 32


def test_override_into_list():
    raw = {"stages": [{"name": "a", "train_iters": 3}]}
    assert apply_overrides(raw, ["stages.0.lr=0.1"])["stages"][0]["lr"] == 0.1


BAD = [
    # (overrides on the defaults, text the error must contain)
    (["train.lr=-1"], "train.lr"),
    (["train.lr=abc"], "train.lr"),
    (["train.bogus=1"], "train.bogus: unknown key; allowed keys here: adam_beta1"),
    (["bogus.x=1"], "bogus: unknown key; allowed keys here: backend, checkpoint, cluster, data, logging, model"),
    (["parallel.tp=0"], "parallel.tp"),
    (["parallel.tensor_parallel=2"], "allowed keys here: cp, ep, etp, pp"),
    (["train.lr_decay_style=exp"], "'constant', 'cosine', 'linear' or 'WSD'"),
    (["train.lr_decay_style=WSD"], "lr_wsd_decay_iters"),
    (["train.min_lr=1", "train.lr=0.1"], "train.min_lr (1.0) must be <= train.lr (0.1)"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "must be a multiple of train.micro_batch_size"),
    (["model.preset=gpt5"], "unknown model preset 'gpt5'; known presets: nano-30b-a3b"),
    (["model.hybrid_override_pattern=MX*E"], "'X' at position 1"),
    (["model.hybrid_override_pattern=M*E"], "has 3 layers but num_layers is 4"),
    (["model.num_attention_heads=5"], "num_attention_heads (5) must be a multiple of model.num_query_groups (2)"),
    (["model.mamba_num_heads=3"], "mamba_num_heads (3) must be a multiple"),
    (["model.moe_router_topk=9"], "moe_router_topk (9) must be in 1..num_moe_experts (4)"),
    (["model.mtp_num_layers=2"], "needs model.mtp_hybrid_override_pattern"),
    (["precision.recipe=fp4"], "precision.recipe"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["stages=[{name: a, train_iters: 2}, {name: a, train_iters: 3}]"], "duplicate stage names ['a']"),
    (["stages=[{name: a}]"], "stages.0.train_iters: Field required"),
    (["stages=[{name: a, train_iters: 1, parallel: {tp: 2, pipeline: 2}}]"], "stages.0.parallel.pipeline: unknown key"),
    (["train.lr"], "not of the form dotted.key=value"),
    (["train.lr.x=1"], "train.lr: Input should be a valid number"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_the_field(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_cli_config_show_and_error():
    ok = subprocess.run([sys.executable, "-m", "pretrain.cli", "config", "show", "--config",
                         str(ROOT / "examples/configs/super-120b-a12b.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "hidden_size: 4096" in ok.stdout and "moe_latent_size: 1024" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain.cli", "config", "show", "parallel.tp=x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "parallel.tp" in bad.stderr


def test_every_config_field_documents_itself():
    """`foldtron config show --explain` prints each field's meaning and default from the schema (model/fielddocs)."""
    from pydantic import BaseModel

    from pretrain.config import RunConfig, StageConfig

    missing = []

    def walk(cls, prefix):
        for name, info in cls.model_fields.items():
            ann = info.annotation
            sections = [t for t in getattr(ann, "__args__", ()) + (ann,) if isinstance(t, type) and issubclass(t, BaseModel)]
            if sections and ann in sections:
                assert (ann.__doc__ or "").strip(), f"section {prefix}{name} has no class docstring"
            elif not (info.description or "").strip():
                missing.append(prefix + name)
            for sub in sections:
                if sub is not StageConfig:
                    walk(sub, f"{prefix}{name}.")
    walk(RunConfig, "")
    walk(StageConfig, "stages[].")
    assert not missing, f"fields without a description: {missing}"
