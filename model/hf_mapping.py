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
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from .config import ModelConfig

#: The one name table, per layer kind: Foldtron/Megatron suffix (after `layers.N.`) -> HF NemotronH suffix. Export
#: reads it left to right, import right to left (`_HF_TO_MEGATRON`). What is not a 1:1 rename is in code next to
#: it: the pre-norm of every kind (`norm.weight`), attention's fused QKV (split / fused), experts by index.
#: Megatron-Core 0.19's MambaMixer holds the conv as parameters `conv1d_weight`/`conv1d_bias` (its checkpoint keys
#: stay `conv1d.weight`/`conv1d.bias`, ssm/mamba_mixer.py:1370), HF as a Conv1d module.
LAYER_NAMES: Dict[str, Dict[str, str]] = {
    "M": {"mixer.in_proj.weight": "mixer.in_proj.weight", "mixer.conv1d_weight": "mixer.conv1d.weight",
          "mixer.conv1d_bias": "mixer.conv1d.bias", "mixer.A_log": "mixer.A_log", "mixer.D": "mixer.D",
          "mixer.dt_bias": "mixer.dt_bias", "mixer.norm.weight": "mixer.norm.weight",
          "mixer.out_proj.weight": "mixer.out_proj.weight"},
    "*": {"self_attention.linear_proj.weight": "mixer.o_proj.weight"},
    "-": {"mlp.linear_fc1.weight": "mixer.up_proj.weight", "mlp.linear_fc2.weight": "mixer.down_proj.weight"},
    "E": {"mlp.router.weight": "mixer.gate.weight", "mlp.router.expert_bias": "mixer.gate.e_score_correction_bias",
          "mlp.shared_experts.linear_fc1.weight": "mixer.shared_experts.up_proj.weight",
          "mlp.shared_experts.linear_fc2.weight": "mixer.shared_experts.down_proj.weight",
          "mlp.fc1_latent_proj.weight": "mixer.fc1_latent_proj.weight",
          "mlp.fc2_latent_proj.weight": "mixer.fc2_latent_proj.weight"},
}
_HF_TO_MEGATRON = {sym: {hf: mg for mg, hf in names.items()} for sym, names in LAYER_NAMES.items()}


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
        d.update(num_nextn_predict_layers=MTP_WEIGHT_SETS, mtp_hybrid_override_pattern=cfg.mtp_hybrid_override_pattern,
                 foldtron_mtp_depths=cfg.mtp_num_layers)
    return d


#: `num_nextn_predict_layers` counts MTP weight sets, not depths: Foldtron trains one shared block
#: (mtp_use_repeated_layer) applied `mtp_num_layers` times, and the serving loaders read exactly one
#: (vllm-project/vllm vllm/model_executor/models/nemotron_h_mtp.py and sgl-project/sglang
#: python/sglang/srt/models/nemotron_h_mtp.py, NemotronHMultiTokenPredictor.__init__:
#: `assert self.num_mtp_layers == 1, "Only one MTP layer is supported for NemotronH-MTP"`); the depth a server
#: drafts is its own setting (num_speculative_tokens). The trained depth travels as `foldtron_mtp_depths`.
MTP_WEIGHT_SETS = 1


def _layer_keys(sub: str, t: torch.Tensor, cfg: ModelConfig, sym: str) -> Iterable[Tuple[str, torch.Tensor]]:
    """Map the part of a key after `layers.N.` for a layer of kind `sym`; yields (hf suffix, tensor)."""
    if sub.endswith("layer_norm_weight") or sub == "pre_mlp_layernorm.weight":
        yield "norm.weight", t
        return
    if sub in LAYER_NAMES.get(sym, {}):
        yield LAYER_NAMES[sym][sub], t.float() if sub.endswith("expert_bias") else t
        return
    if sym == "*" and sub == "self_attention.linear_qkv.weight":
        ng, dh = cfg.num_query_groups, cfg.kv_channels
        qpg = cfg.num_attention_heads // ng
        w = t.view(ng, (qpg + 2) * dh, -1)
        q, k, v = torch.split(w, [qpg * dh, dh, dh], dim=1)
        yield "mixer.q_proj.weight", q.reshape(-1, t.shape[-1])
        yield "mixer.k_proj.weight", k.reshape(-1, t.shape[-1])
        yield "mixer.v_proj.weight", v.reshape(-1, t.shape[-1])
        return
    if sym == "E":
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


# ----------------------------------------------------------------------------------------------------------
# The reverse: HF NemotronH -> Foldtron (import of released checkpoints)

#: The one pre-norm of a layer lives in a different Megatron module per layer kind.
_NORM_OF = {"M": "mixer.in_proj.layer_norm_weight", "*": "self_attention.linear_qkv.layer_norm_weight",
            "-": "mlp.linear_fc1.layer_norm_weight", "E": "pre_mlp_layernorm.weight"}


_LOCAL_EXPERT = re.compile(r"^(.*\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(r"^(.*\.experts)\.(linear_fc[12])\.weight(\d+)$")


def expert_names(state: Dict[str, torch.Tensor], style: str) -> Dict[str, torch.Tensor]:
    """Rename expert weights between Megatron-Core's two expert modules, whose parameter names differ:
    SequentialMLP (local / cpu backends) `experts.local_experts.{e}.linear_fc1.weight` and TEGroupedMLP (te
    backend) `experts.linear_fc1.weight{e}`. `style`: "local" or "grouped". Everything else passes through."""
    if style not in ("local", "grouped"):
        raise ValueError(f"expert name style must be 'local' or 'grouped', got {style!r}")
    out: Dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if style == "grouped" and (m := _LOCAL_EXPERT.match(key)):
            key = f"{m.group(1)}.{m.group(3)}.weight{m.group(2)}"
        elif style == "local" and (m := _GROUPED_EXPERT.match(key)):
            key = f"{m.group(1)}.local_experts.{m.group(3)}.{m.group(2)}.weight"
        out[key] = t
    return out


def expert_style(names) -> str:
    """The expert naming a model uses ("grouped" when any name is TEGroupedMLP's, else "local")."""
    return "grouped" if any(_GROUPED_EXPERT.match(n) for n in names) else "local"


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Megatron's fused QKV layout: per query group, its query heads then its key then its value head."""
    ng, dh = cfg.num_query_groups, cfg.kv_channels
    qpg = cfg.num_attention_heads // ng
    h = q.shape[-1]
    return torch.cat([q.reshape(ng, qpg * dh, h), k.reshape(ng, dh, h), v.reshape(ng, dh, h)], dim=1).reshape(-1, h)


def _layer_from_hf(sub: str, t: torch.Tensor, sym: str) -> str:
    """Megatron suffix (after `layers.N.`) of HF suffix `sub` in a layer of kind `sym` (q/k/v handled apart)."""
    if sub == "norm.weight":
        return _NORM_OF[sym]
    if sub in _HF_TO_MEGATRON.get(sym, {}):
        return _HF_TO_MEGATRON[sym][sub]
    if sym == "E" and (m := re.fullmatch(r"mixer\.experts\.(\d+)\.(up|down)_proj\.weight", sub)):
        return f"mlp.experts.local_experts.{m.group(1)}.linear_fc{1 if m.group(2) == 'up' else 2}.weight"
    raise KeyError(sub)


def hf_to_megatron(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF NemotronH tensors -> Foldtron names (CPU expert naming `experts.local_experts.{e}`, which the
    checkpoint stores under global expert indices whatever the layout). The inverse of `megatron_to_hf`; works
    on any subset (one layer at a time), but an attention layer's q/k/v must come together. Unknown names are an
    error, never dropped. Tensors are passed through (no copy) except the fused QKV."""
    out: Dict[str, torch.Tensor] = {}
    pattern, mtp_pattern = cfg.hybrid_override_pattern, cfg.mtp_hybrid_override_pattern or ""
    L = len(mtp_pattern)
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in hf_sd.items():
        try:
            if key == "backbone.embeddings.weight":
                out["embedding.word_embeddings.weight"] = t
            elif key == "backbone.norm_f.weight":
                out["decoder.final_norm.weight"] = t
            elif key == "lm_head.weight":
                out["output_layer.weight"] = t
            else:
                if m := re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", key):
                    n = int(m.group(1))
                    if n >= len(pattern):
                        raise KeyError(f"layer {n} but the pattern has {len(pattern)} layers")
                    prefix, sym, sub = f"decoder.layers.{n}.", pattern[n], m.group(2)
                elif m := re.fullmatch(r"mtp\.layers\.(\d+)\.(eh_proj|enorm|hnorm|final_layernorm)\.weight", key):
                    o, i = divmod(int(m.group(1)), L) if L else (0, -1)
                    if i != (L - 1 if m.group(2) == "final_layernorm" else 0) or o >= max(cfg.mtp_num_layers, 1):
                        raise KeyError(f"{m.group(2)} does not belong to MTP layer {m.group(1)}")
                    out[f"mtp.layers.{o}.{m.group(2)}.weight"] = t
                    continue
                elif (m := re.fullmatch(r"mtp\.layers\.(\d+)\.(.+)", key)) and L and cfg.mtp_num_layers:
                    o, i = divmod(int(m.group(1)), L)
                    prefix, sym, sub = f"mtp.layers.{o}.mtp_model_layer.layers.{i}.", mtp_pattern[i], m.group(2)
                else:
                    raise KeyError(key)
                if sym == "*" and (q := re.fullmatch(r"mixer\.([qkv])_proj\.weight", sub)):
                    qkv.setdefault(prefix, {})[q.group(1)] = t
                    continue
                out[prefix + _layer_from_hf(sub, t, sym)] = t
        except KeyError as e:
            raise KeyError(f"no Foldtron name for HF tensor {key!r} ({e})") from None
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"attention layer {prefix} has {sorted(parts)} of q/k/v; all three are needed to fuse QKV")
        out[prefix + "self_attention.linear_qkv.weight"] = fuse_qkv(parts["q"], parts["k"], parts["v"], cfg)
    return out


_KIND_OF_BLOCK = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                  "moe": "E"}


def _pattern_from_hf(d: Dict[str, Any], pattern_key: str, list_key: str) -> Optional[str]:
    if d.get(pattern_key):
        return d[pattern_key]
    if d.get(list_key):
        try:
            return "".join(_KIND_OF_BLOCK[b] for b in d[list_key])
        except KeyError as e:
            raise ValueError(f"config.json {list_key} has unknown block type {e}") from None
    return None


def model_config_from_hf(d: Dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a NemotronH config.json dict (released or transformers-5 keys). Settings Foldtron's model
    cannot represent (biases, another activation, tied embeddings, grouped routing) are errors naming the key.
    Training-only fields (aux-loss coefficient, bias update rate, MTP loss weight) keep Foldtron's defaults unless
    given in `overrides`."""
    if d.get("model_type") != "nemotron_h":
        raise ValueError(f"config.json model_type is {d.get('model_type')!r}, expected 'nemotron_h'")
    must = {"mlp_hidden_act": "relu2", "attention_bias": False, "mlp_bias": False, "mamba_proj_bias": False,
            "use_conv_bias": True, "tie_word_embeddings": False, "n_group": 1, "topk_group": 1}
    bad = [f"{k}={d[k]!r} (Foldtron supports {v!r})" for k, v in must.items() if k in d and d[k] != v]
    if d.get("n_routed_experts") and d.get("norm_topk_prob") is False:
        bad.append("norm_topk_prob=False (Foldtron normalises top-k weights)")
    if bad:
        raise ValueError("config.json asks for what Foldtron's model does not implement: " + "; ".join(bad))
    pattern = _pattern_from_hf(d, "hybrid_override_pattern", "layers_block_type")
    if not pattern:
        raise ValueError("config.json has neither hybrid_override_pattern nor layers_block_type")
    f: Dict[str, Any] = dict(
        hybrid_override_pattern=pattern, num_layers=len(pattern), hidden_size=d["hidden_size"],
        vocab_size=d["vocab_size"], num_attention_heads=d["num_attention_heads"],
        num_query_groups=d.get("num_key_value_heads") or d["num_attention_heads"],
        kv_channels=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        ffn_hidden_size=d["intermediate_size"], mamba_num_heads=d["mamba_num_heads"],
        mamba_head_dim=d["mamba_head_dim"], mamba_state_dim=d["ssm_state_size"], mamba_num_groups=d["n_groups"],
        mamba_conv_kernel=d["conv_kernel"], mamba_chunk_size=d["chunk_size"],
        layernorm_epsilon=d["layer_norm_epsilon"], init_method_std=d.get("initializer_range", 0.02),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
    )
    if "E" in pattern or d.get("n_routed_experts"):
        shared = d.get("moe_shared_expert_intermediate_size") if d.get("n_shared_experts", 1) else None
        f.update(num_moe_experts=d["n_routed_experts"], moe_router_topk=d["num_experts_per_tok"],
                 moe_ffn_hidden_size=d["moe_intermediate_size"], moe_shared_expert_intermediate_size=shared or None,
                 moe_latent_size=d.get("moe_latent_size"),
                 moe_router_topk_scaling_factor=d.get("routed_scaling_factor", 1.0))
    if d.get("num_nextn_predict_layers"):
        f.update(mtp_num_layers=d.get("foldtron_mtp_depths") or d["num_nextn_predict_layers"],
                 mtp_hybrid_override_pattern=_pattern_from_hf(d, "mtp_hybrid_override_pattern",
                                                              "mtp_layers_block_type"))
    f.update(overrides)
    return ModelConfig(**f)
