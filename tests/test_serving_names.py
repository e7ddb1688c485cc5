"""The exported MTP tensor names and config fields against what the serving stacks' NemotronH-with-MTP loaders read.

The table is built from their public source (read through the stored GitHub sources, no line numbers available there;
cited by repository, file, commit and statement):
- vLLM  vllm-project/vllm  vllm/model_executor/models/nemotron_h_mtp.py @ 01ca27739feb
    NemotronHMultiTokenPredictor.__init__: `assert self.num_mtp_layers == 1` (num_nextn_predict_layers), layers
    i in range(num_mtp_layers * len(mtp_hybrid_override_pattern)), `has_start_projections = i % L == 0` (enorm, hnorm,
    eh_proj), `has_end_norm = i % L == L - 1` (final_layernorm), '*' -> NemotronHMTPAttentionDecoderLayer,
    'E' -> NemotronHMTPMoEDecoderLayer, any other char NotImplementedError; mtp_start_layer_idx = num_hidden_layers.
    NemotronHMTP.load_weights: keeps names starting `mtp.` (plus embeddings, lm_head), `mtp.layers.` ->
    `model.layers.`, q/k/v_proj under `.mixer.` stacked into qkv_proj, experts by
    fused_moe_make_expert_params_mapping(ckpt_gate_proj_name="up_proj", ckpt_down_proj_name="down_proj")
    i.e. `experts.{e}.up_proj.` / `experts.{e}.down_proj.`; a name not in its params is skipped silently.
    The MTP layer classes subclass the backbone's NemotronHAttentionDecoderLayer / NemotronHMoEDecoderLayer, so a
    sublayer's names are a backbone layer's names of the same kind.
- SGLang  sgl-project/sglang  python/sglang/srt/models/nemotron_h_mtp.py @ 008b79d2358b
    the same NemotronHMultiTokenPredictor structure and `assert self.num_mtp_layers == 1`; NemotronHForCausalLMMTP
    maps `language_model.mtp.` -> `mtp.` and loads `mtp.layers.*` through NemotronHForCausalLM.load_weights.
- TensorRT-LLM  NVIDIA/TensorRT-LLM  tensorrt_llm/_torch/models/checkpoints/hf/nemotron_h_weight_mapper.py
  @ 05b033ac0631  NemotronHHfWeightMapper.preprocess_weights: `re.match(r'mtp\\.layers\\.(\\d+)\\.(.*)', key)` ->
    `model.layers.{num_hidden_layers}.layers.{sublayer_idx}.{rest}` ("mtp.layers.0 ... sublayer 0, Attention and
    mtp.layers.1 ... sublayer 1, MoE"); per-expert `mixer.experts.{i}.up_proj` / `down_proj`.
"""
from __future__ import annotations

import re

import pytest
import torch

#: What the loaders above read, as data.
SERVING = {
    "num_nextn_predict_layers": 1,  # vLLM + SGLang assert it
    "pattern_chars": set("*E"),  # vLLM + SGLang build only these MTP sublayers
    "config_keys": {"num_nextn_predict_layers", "mtp_hybrid_override_pattern", "num_hidden_layers", "hidden_size",
                    "layer_norm_epsilon", "vocab_size", "n_routed_experts"},
    "name": re.compile(r"^mtp\.layers\.(\d+)\.(.*)$"),  # TRT-LLM's regex; vLLM's `mtp.layers.` prefix
    "start": {"enorm.weight", "hnorm.weight", "eh_proj.weight"},  # on sublayer i % L == 0
    "end": {"final_layernorm.weight"},  # on sublayer i % L == L - 1
    "expert": re.compile(r"^mixer\.experts\.(\d+)\.(up_proj|down_proj)\.weight$"),
    "attention": {"mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"},  # stacked into qkv_proj
}


@pytest.fixture(scope="module")
def exported():
    """(HF tensor names -> shapes, config.json dict) the export writes for the tiny preset (meta model: no data)."""
    from model.build import init_single_process
    from model.presets import get_preset
    from pretrain.export_hf import config_json, hf_shapes

    init_single_process()
    cfg = get_preset("tiny")
    return cfg, hf_shapes(cfg), config_json(cfg, torch.bfloat16, {})


def test_mtp_config_fields_match_serving_loaders(exported):
    cfg, _, conf = exported
    assert SERVING["config_keys"] <= set(conf)
    assert conf["num_nextn_predict_layers"] == SERVING["num_nextn_predict_layers"]
    assert set(conf["mtp_hybrid_override_pattern"]) <= SERVING["pattern_chars"]
    assert conf["num_hidden_layers"] == len(conf["hybrid_override_pattern"]) == cfg.num_layers
    assert conf["foldtron_mtp_depths"] == cfg.mtp_num_layers == 2  # the trained depth is not lost ...
    from model.hf_mapping import model_config_from_hf

    assert model_config_from_hf(conf).mtp_num_layers == 2  # ... and import reads it back


def test_mtp_tensor_names_match_serving_loaders(exported):
    cfg, shapes, conf = exported
    pattern = conf["mtp_hybrid_override_pattern"]
    L = len(pattern)
    mtp = [n for n in shapes if n.startswith("mtp.")]
    assert mtp
    per_layer: dict = {}
    for n in mtp:
        m = SERVING["name"].match(n)
        assert m, n
        per_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
    assert sorted(per_layer) == list(range(SERVING["num_nextn_predict_layers"] * L))
    backbone: dict = {}
    for n in shapes:
        if m := re.match(r"^backbone\.layers\.(\d+)\.(.*)$", n):
            backbone.setdefault(conf["hybrid_override_pattern"][int(m.group(1))], set()).add(m.group(2))
    for i, names in per_layer.items():
        kind = pattern[i % L]
        start = SERVING["start"] if i % L == 0 else set()
        end = SERVING["end"] if i % L == L - 1 else set()
        assert start <= names and end <= names, (i, names)
        assert not (SERVING["start"] - start) & names and not (SERVING["end"] - end) & names, (i, names)
        # the rest is what the backbone's decoder layer of the same kind holds (vLLM subclasses those layers)
        assert names - start - end == backbone[kind], (i, sorted((names - start - end) ^ backbone[kind]))
        if kind == "*":
            assert SERVING["attention"] <= names
        if kind == "E":
            experts = {SERVING["expert"].match(s).groups() for s in names if SERVING["expert"].match(s)}
            assert experts == {(str(e), p) for e in range(conf["n_routed_experts"]) for p in ("up_proj", "down_proj")}
    # TRT-LLM's target names: one MTP layer after the backbone, sublayers 0..L-1
    trt = {SERVING["name"].sub(lambda m: f"model.layers.{conf['num_hidden_layers']}.layers.{m.group(1)}.{m.group(2)}",
                               n) for n in mtp}
    assert {int(n.split(".")[4]) for n in trt} == set(range(L))
