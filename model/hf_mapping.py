"""Foldtron (Megatron-Core names) -> Hugging Face NemotronH (released checkpoint layout) names and config.

The name table follows Megatron-Bridge `models/nemotronh/nemotron_h_bridge.py` (shared/reference/nemotron3.md).
Works on a full (TP=1, EP=1) state dict: gathering TP/EP shards first is the export's business. Both expert
layouts map: `experts.local_experts.{e}.linear_fc{1,2}.weight` (SequentialMLP, CPU) and
`experts.linear_fc{1,2}.weight{e}` (TEGroupedMLP, GPU).

Numerics the HF side must be told (pitfalls found by the parity test):
- HF clamps dt from below at `time_step_min` (modeling_nemotron_h.py: time_step_limit = (time_step_min, inf));
  Megatron-Core's kernels use dt_limit (0, inf). `hf_config_dict` writes time_step_min=0.0 so the exported
  model computes what was trained (time_step_min is only an init hint on the Megatron side).
- Router: sigmoid, top-k on score + e_score_correction_bias, weights renormalised (norm_topk_prob) then scaled
  (routed_scaling_factor); one expert group (n_group = topk_group = 1).
- Mamba gated norm groups: d_inner / n_groups channels (both sides); eps = layer_norm_epsilon.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Tuple

import torch

from .config import ModelConfig

_MAMBA_KEYS = {f"mixer.{k}" for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias",
                                      "norm.weight", "out_proj.weight")}


def hf_config_dict(cfg: ModelConfig) -> Dict[str, Any]:
    """NemotronHConfig kwargs (model_type nemotron_h) for this model."""
    d: Dict[str, Any] = dict(
        architectures=["NemotronHForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        hybrid_override_pattern=cfg.hybrid_override_pattern,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        attention_bias=False,
        intermediate_size=cfg.ffn_hidden_size,
        mlp_hidden_act="relu2",
        mlp_bias=False,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        ssm_state_size=cfg.mamba_state_dim,
        n_groups=cfg.mamba_num_groups,
        conv_kernel=cfg.mamba_conv_kernel,
        chunk_size=cfg.mamba_chunk_size,
        use_conv_bias=True,
        mamba_proj_bias=False,
        mamba_hidden_act="silu",
        time_step_min=0.0,
        time_step_limit=(0.0, float("inf")),
        layer_norm_epsilon=cfg.layernorm_epsilon,
        tie_word_embeddings=False,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_method_std,
    )
    if "E" in cfg.all_symbols:
        d.update(n_routed_experts=cfg.num_moe_experts, num_experts_per_tok=cfg.moe_router_topk,
                 moe_intermediate_size=cfg.moe_ffn_hidden_size,
                 moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size or 0,
                 n_shared_experts=1 if cfg.moe_shared_expert_intermediate_size else 0,
                 moe_latent_size=cfg.moe_latent_size, routed_scaling_factor=cfg.moe_router_topk_scaling_factor,
                 norm_topk_prob=True, n_group=1, topk_group=1)
    if cfg.mtp_num_layers:
        d.update(num_nextn_predict_layers=cfg.mtp_num_layers, mtp_hybrid_override_pattern=cfg.mtp_hybrid_override_pattern)
    return d


def _layer_keys(sub: str, t: torch.Tensor, cfg: ModelConfig, sym: str) -> Iterable[Tuple[str, torch.Tensor]]:
    """Map the part of a key after `layers.N.` for a layer of kind `sym`; yields (hf suffix, tensor)."""
    if sub.endswith("layer_norm_weight") or sub == "pre_mlp_layernorm.weight":
        yield "norm.weight", t
        return
    if sym == "M":
        if sub not in _MAMBA_KEYS:
            raise KeyError(sub)
        yield sub, t
        return
    if sym == "*":
        if sub == "self_attention.linear_qkv.weight":
            ng, dh = cfg.num_query_groups, cfg.kv_channels
            qpg = cfg.num_attention_heads // ng
            w = t.view(ng, (qpg + 2) * dh, -1)
            q, k, v = torch.split(w, [qpg * dh, dh, dh], dim=1)
            yield "mixer.q_proj.weight", q.reshape(-1, t.shape[-1])
            yield "mixer.k_proj.weight", k.reshape(-1, t.shape[-1])
            yield "mixer.v_proj.weight", v.reshape(-1, t.shape[-1])
            return
        if sub == "self_attention.linear_proj.weight":
            yield "mixer.o_proj.weight", t
            return
        raise KeyError(sub)
    if sym == "-":
        names = {"mlp.linear_fc1.weight": "mixer.up_proj.weight", "mlp.linear_fc2.weight": "mixer.down_proj.weight"}
        yield names[sub], t
        return
    if sym == "E":
        fixed = {"mlp.router.weight": "mixer.gate.weight", "mlp.router.expert_bias": "mixer.gate.e_score_correction_bias",
                 "mlp.shared_experts.linear_fc1.weight": "mixer.shared_experts.up_proj.weight",
                 "mlp.shared_experts.linear_fc2.weight": "mixer.shared_experts.down_proj.weight",
                 "mlp.fc1_latent_proj.weight": "mixer.fc1_latent_proj.weight",
                 "mlp.fc2_latent_proj.weight": "mixer.fc2_latent_proj.weight"}
        if sub in fixed:
            yield fixed[sub], t.float() if sub.endswith("expert_bias") else t
            return
        m = (re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", sub)
             or re.fullmatch(r"mlp\.experts\.linear_fc([12])\.weight(\d+)", sub))
        if m:
            e, fc = (m.group(1), m.group(2)) if "local_experts" in sub else (m.group(2), m.group(1))
            yield f"mixer.experts.{e}.{'up_proj' if fc == '1' else 'down_proj'}.weight", t
            return
        raise KeyError(sub)
    raise KeyError(sub)


def megatron_to_hf(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """A full Foldtron state dict -> HF NemotronH keys (released layout: one key per expert, `backbone.*`).
    Unknown keys are an error (nothing is silently dropped); `_extra_state` entries are skipped."""
    out: Dict[str, torch.Tensor] = {}
    pattern, mtp_pattern = cfg.hybrid_override_pattern, cfg.mtp_hybrid_override_pattern or ""
    L = len(mtp_pattern)
    for key, t in state_dict.items():
        if key.endswith("_extra_state"):
            continue
        try:
            if key == "embedding.word_embeddings.weight":
                out["backbone.embeddings.weight"] = t
            elif key == "decoder.final_norm.weight":
                out["backbone.norm_f.weight"] = t
            elif key == "output_layer.weight":
                out["lm_head.weight"] = t
            elif m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key):
                n = int(m.group(1))
                for suffix, v in _layer_keys(m.group(2), t, cfg, pattern[n]):
                    out[f"backbone.layers.{n}.{suffix}"] = v
            elif m := re.fullmatch(r"mtp\.layers\.(\d+)\.mtp_model_layer\.layers\.(\d+)\.(.+)", key):
                o, i = int(m.group(1)), int(m.group(2))
                for suffix, v in _layer_keys(m.group(3), t, cfg, mtp_pattern[i]):
                    out[f"mtp.layers.{o * L + i}.{suffix}"] = v
            elif m := re.fullmatch(r"mtp\.layers\.(\d+)\.(eh_proj|enorm|hnorm|final_layernorm)\.weight", key):
                o, part = int(m.group(1)), m.group(2)
                i = L - 1 if part == "final_layernorm" else 0
                out[f"mtp.layers.{o * L + i}.{part}.weight"] = t
            else:
                raise KeyError(key)
        except KeyError as e:
            raise KeyError(f"no HF name for Foldtron parameter {key!r} ({e})") from None
    return out
