"""Precision policy: per layer and module kind, Megatron's first/last-layer knobs, overrides, Super's published policy."""
import collections

import pytest

from model.precision import (
    PrecisionConfig,
    linear_format,
    linear_precisions,
    role_of,
    super_policy,
    te_recipe_kwargs,
)
from model.presets import get_preset


def fmt(cfg, role, layer=5, n=20, name="", mtp=False):
    return linear_format(cfg, num_layers=n, layer_index=layer, role=role, name=name, is_mtp=mtp)


def test_defaults_are_high_precision():
    cfg = PrecisionConfig()
    assert {fmt(cfg, r) for r in ("linear_qkv", "in_proj", "out_proj", "linear_fc1", "fc1_latent_proj")} == {"bf16"}
    assert fmt(PrecisionConfig(recipe="fp32"), "out_proj") == "fp32"


def test_nvfp4_recipe_carve_outs():
    cfg = PrecisionConfig(recipe="nvfp4")
    assert fmt(cfg, "in_proj") == "nvfp4"
    assert fmt(cfg, "linear_fc1") == fmt(cfg, "linear_fc2") == "nvfp4"
    assert fmt(cfg, "linear_qkv") == fmt(cfg, "linear_proj") == "bf16"
    assert fmt(cfg, "fc1_latent_proj") == fmt(cfg, "fc2_latent_proj") == "bf16"
    assert fmt(cfg, "out_proj") == "mxfp8"
    assert fmt(cfg, "linear_fc1", layer=None, mtp=True) == "bf16"
    assert fmt(cfg, "output_layer", layer=None) == "bf16"
    assert fmt(cfg, "embedding") == "bf16" and fmt(cfg, "router") == "fp32"
    with pytest.raises(ValueError, match="unknown module role"):
        fmt(cfg, "linear_xyz")


def test_first_last_layers_megatron_semantics():
    cfg = PrecisionConfig(recipe="nvfp4", first_last_layers_bf16=True, num_layers_at_start_in_bf16=2,
                          num_layers_at_end_in_bf16=3)
    got = [fmt(cfg, "in_proj", layer=i, n=10) for i in range(10)]
    assert got == ["bf16"] * 2 + ["nvfp4"] * 5 + ["bf16"] * 3
    with pytest.raises(ValueError, match="only 4 layers"):
        fmt(cfg, "in_proj", layer=0, n=4)
    with pytest.raises(ValueError, match="first_last_layers_bf16"):
        PrecisionConfig(num_layers_at_end_in_bf16=3)


def test_overrides_last_matching_glob_wins():
    cfg = PrecisionConfig(recipe="nvfp4", overrides={"decoder.layers.3.*": "bf16", "*.out_proj": "nvfp4"})
    assert fmt(cfg, "in_proj", layer=3, name="decoder.layers.3.mixer.in_proj") == "bf16"
    assert fmt(cfg, "out_proj", layer=3, name="decoder.layers.3.mixer.out_proj") == "nvfp4"
    assert fmt(cfg, "out_proj", layer=4, name="decoder.layers.4.mixer.out_proj") == "nvfp4"
    # overrides reach into an otherwise BF16 run (studying one module in NVFP4)
    one = PrecisionConfig(overrides={"decoder.layers.1.mlp.linear_fc1": "nvfp4"})
    assert fmt(one, "linear_fc1", layer=1, name="decoder.layers.1.mlp.linear_fc1") == "nvfp4"
    assert fmt(one, "linear_fc1", layer=2, name="decoder.layers.2.mlp.linear_fc1") == "bf16"


def test_super_policy_reproduces_published_split():
    model = get_preset("super-120b-a12b")
    rows = linear_precisions(model, super_policy())
    by_layer = collections.defaultdict(set)
    for r in rows:
        if r.layer_index is not None and r.role != "router":
            by_layer[r.layer_index].add(r.fmt)
    pattern = model.hybrid_override_pattern
    assert all(by_layer[i] == {"bf16"} for i in range(74, 88))  # last 14 of 88 (15%) entirely BF16
    # before them, every non-attention layer has low-precision linears (attention layers are BF16 by kind)
    assert all(by_layer[i] != {"bf16"} for i in range(74) if pattern[i] != "*")
    assert all(by_layer[i] == {"bf16"} for i in range(88) if pattern[i] == "*")
    for r in rows:
        if r.layer_index is not None and r.layer_index < 74:
            want = {"linear_qkv": "bf16", "linear_proj": "bf16", "fc1_latent_proj": "bf16", "fc2_latent_proj": "bf16",
                    "out_proj": "mxfp8", "router": "fp32"}.get(r.role, "nvfp4")
            assert r.fmt == want, r
        if r.name.startswith("mtp.") and r.role != "router":
            assert r.fmt == "bf16", r
    assert {r.fmt for r in rows if r.role in ("embedding", "output_layer")} == {"bf16"}
    assert sum(r.name.startswith("mtp.") for r in rows) > 0


def test_role_of_and_te_kwargs():
    assert role_of("decoder.layers.3.mlp.experts.local_experts.0.linear_fc1") == "linear_fc1"
    assert role_of("embedding.word_embeddings") == "embedding"
    with pytest.raises(ValueError, match="no precision role"):
        role_of("decoder.layers.0.mixer.conv1d")
    cfg = PrecisionConfig(recipe="nvfp4", disable_rht=True)
    assert te_recipe_kwargs(cfg, "nvfp4") == dict(disable_rht=True, disable_stochastic_rounding=False,
                                                  disable_2d_quantization=False)
    with pytest.raises(ValueError, match="no Transformer Engine"):
        te_recipe_kwargs(cfg, "bf16")


def test_super_precision_plan_needs_no_gpu_and_matches_the_published_recipe():
    """`foldtron precision-plan` for the Super config: per module, the format and the TE recipe arguments the te
    backend uses (the emulation computes the same formats): last 14 of 88 layers BF16, attention / latent / MTP
    BF16, Mamba out_proj MXFP8, NVFP4 with RHT, SR and 2-D weights elsewhere."""
    import subprocess
    import sys
    from pathlib import Path

    from model.adapt.te_precision import te_plan
    from pretrain.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples/configs/super-120b-a12b.yaml")
    plan = {r.name: r for r in te_plan(cfg.model, cfg.precision)}
    assert plan["decoder.layers.0.mixer.in_proj"].te_recipe == "NVFP4BlockScaling"
    assert plan["decoder.layers.0.mixer.in_proj"].te_kwargs == dict(disable_rht=False, disable_stochastic_rounding=False,
                                                                     disable_2d_quantization=False)
    assert plan["decoder.layers.0.mixer.out_proj"].te_recipe == "MXFP8BlockScaling"
    assert all(r.fmt == "bf16" for n, r in plan.items() if (n.startswith(("mtp.", "output_layer")) or "latent" in n
               or "self_attention" in n) and not n.endswith("router"))  # routers stay FP32
    last = [r for n, r in plan.items() if n.startswith("decoder.layers.") and int(n.split(".")[2]) >= 74
            and not n.endswith("router")]
    assert last and all(r.fmt == "bf16" for r in last)
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "precision-plan", "--config",
                          "examples/configs/super-120b-a12b.yaml"], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NVFP4BlockScaling(disable_rht=False" in out.stdout and "MXFP8BlockScaling()" in out.stdout


def test_te_nvfp4_on_hopper_is_a_clear_error():
    from model.adapt.te_precision import check_device_supports
    from model.precision import super_policy

    with pytest.raises(ValueError, match="compute capability >= 10.0"):
        check_device_supports(super_policy(), {"nvfp4", "mxfp8", "bf16"}, capability=(9, 0))
    check_device_supports(super_policy(), {"nvfp4"}, capability=(10, 0))  # Blackwell: fine
    check_device_supports(super_policy(), {"fp8", "bf16"}, capability=(9, 0))  # Hopper FP8: fine
