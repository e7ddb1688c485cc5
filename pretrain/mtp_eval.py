"""Self-speculative greedy decoding with the model's own MTP block as the drafter (`foldtron eval-mtp`).

One step, for a sequence x[0..n-1] whose main-model hidden states h and next token t (argmax at n-1) are known:
  draft   depth 1 predicts d1 from (h, tokens x[1..n-1] + t); depth k from depth k-1's MTP hidden states and the
          tokens shifted once more (+ d1..d_{k-1}): the training-time MTP recurrence, run over the whole sequence
          because the MTP block holds an attention layer (no KV cache: full recompute, CPU-sized models);
  verify  one main-model forward over x + t + d1..dD gives the main model's argmax after each of them;
  accept  the longest prefix of drafts equal to those argmaxes; the main model's token after the last accepted
          one becomes the next t (the correction, or the bonus token when every draft was accepted).
Tokens emitted per step = 1 + accepted drafts, and the output is plain greedy decoding's, token for token.

Two drafters, one loop:
- `FoldtronDrafter`: Megatron-Core's HybridModel (weights from a Foldtron checkpoint). The main forward is the model's
  own forward (the decoder's output, after its final norm, is what the MTP block reads); the draft is
  `LanguageModule.compute_mtp_single_step` (megatron/core/models/common/language_module/language_module.py), the
  API Megatron-Core's own speculative decoding calls, i.e. `MultiTokenPredictionLayer.forward_single_position`.
- `HFDrafter`: transformers' NemotronHForCausalLM for the main model (transformers drops `mtp.*` on load:
  `_keys_to_ignore_on_load_unexpected`), and the exported `mtp.layers.*` tensors in transformers' own NemotronH
  blocks and RMSNorms, composed as the serving stacks compose them (vLLM nemotron_h_mtp.py
  NemotronHMTPAttentionDecoderLayer.forward: eh_proj(cat(enorm(embed), hnorm(hidden))), the pattern's layers,
  final_layernorm, the shared lm_head): so the exported tensors, under their exported names, are what drafts.
"""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

DEVICE = torch.device("cpu")


from pretrain.export_hf import ExportError  # noqa: E402  (the CLI prints ExportError as one line, exit 2)


class MTPEvalError(ExportError):
    """Input eval-mtp cannot use (no MTP block, missing MTP tensors, bad options); names what is wrong."""


class FoldtronDrafter:
    """Main model and MTP drafter from a 1-process Megatron-Core HybridModel (fp32, eval)."""

    def __init__(self, model, cfg):
        if not cfg.mtp_num_layers:
            raise MTPEvalError("the model has no MTP block (mtp_num_layers = 0): nothing to draft with")
        self.model, self.cfg, self.depths = model, cfg, cfg.mtp_num_layers
        self._h: Optional[torch.Tensor] = None
        self.model.decoder.register_forward_hook(self._grab)

    def _grab(self, _m, _inp, out):
        self._h = out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def main(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids [n] -> (logits [n, V], decoder hidden states [n, 1, H])."""
        pos = torch.arange(ids.numel(), device=DEVICE).unsqueeze(0)
        logits = self.model(ids.unsqueeze(0), pos, None)
        return logits[0], self._h

    @staticmethod
    def prefix(hidden: torch.Tensor, n: int) -> torch.Tensor:
        return hidden[:n]  # [s, b, h]

    @torch.no_grad()
    def draft_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, depth: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One MTP depth over every position: hidden [n, 1, H], next_ids [n] -> (MTP hidden [n, 1, H], logits [n, V])."""
        n = next_ids.numel()
        pos = torch.arange(depth + 1, depth + 1 + n, device=DEVICE).unsqueeze(0)
        # mtp_use_repeated_layer: one layer serves every depth (depth=None picks it, as Megatron's controller does)
        h, logits = self.model.compute_mtp_single_step(hidden_states=hidden, next_token_ids=next_ids.unsqueeze(0),
                                                       position_ids=pos, depth=None)
        return h, logits[:, 0]


class HFDrafter:
    """Main model = transformers' NemotronHForCausalLM from an HF export; MTP = the export's `mtp.*` tensors in
    transformers' NemotronHBlock / NemotronHRMSNorm modules (fp32)."""

    def __init__(self, hf_dir: Union[str, Path], depths: Optional[int] = None):
        from safetensors import safe_open
        from torch import nn
        from transformers import NemotronHForCausalLM
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock, NemotronHRMSNorm

        hf_dir = Path(hf_dir)
        conf_path = hf_dir / "config.json"
        if not conf_path.is_file():
            raise MTPEvalError(f"{hf_dir} is not an HF export: no config.json")
        raw = json.loads(conf_path.read_text())
        if not raw.get("num_nextn_predict_layers"):
            raise MTPEvalError(f"{conf_path}: num_nextn_predict_layers is {raw.get('num_nextn_predict_layers')!r}; "
                               "the export has no MTP block to draft with")
        self.hf = NemotronHForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        conf = self.hf.config
        pattern = raw.get("mtp_hybrid_override_pattern")
        mtp_types = list(conf.mtp_layers_block_type)
        L = len(mtp_types)
        # Foldtron's training depth (the shared block applied D times); serving stacks read num_nextn_predict_layers
        # as the number of MTP weight sets, which is 1 for a shared block.
        self.depths = depths or int(raw.get("foldtron_mtp_depths") or raw["num_nextn_predict_layers"])
        mconf = copy.deepcopy(conf)
        mconf.layers_block_type = mtp_types
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            where = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
                where = {k: "model.safetensors" for k in f.keys()}
        names = sorted(k for k in where if k.startswith("mtp."))
        if not names:
            raise MTPEvalError(f"{hf_dir}: config.json asks for MTP ({pattern or mtp_types}) but the checkpoint has no "
                               "mtp.* tensors")
        H, eps = conf.hidden_size, conf.layer_norm_epsilon
        self.blocks = nn.ModuleList([NemotronHBlock(mconf, layer_idx=i) for i in range(L)])
        self.enorm, self.hnorm = NemotronHRMSNorm(H, eps=eps), NemotronHRMSNorm(H, eps=eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.final_layernorm = NemotronHRMSNorm(H, eps=eps)
        target = {}
        for i in range(L):
            for k, v in self.blocks[i].state_dict().items():
                target[f"mtp.layers.{i}.{k}"] = v
        for part in ("enorm", "hnorm", "eh_proj"):
            target[f"mtp.layers.0.{part}.weight"] = getattr(self, part).weight
        target[f"mtp.layers.{L - 1}.final_layernorm.weight"] = self.final_layernorm.weight
        # transformers 5 holds experts as one 3-D tensor per projection; its checkpoint conversion for nemotron_h
        # (transformers/conversion_mapping.py: WeightConverter "mixer.experts.*.up_proj.weight" ->
        # "mixer.experts.up_proj", MergeModulelist(dim=0)) stacks the per-expert tensors: the same here.
        expert = re.compile(r"^(mtp\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
        sources: Dict[str, List[Tuple[int, str]]] = {}
        for name in names:
            m = expert.match(name)
            key = f"{m.group(1)}.{m.group(3)}" if m else name
            sources.setdefault(key, []).append((int(m.group(2)) if m else 0, name))
        missing = sorted(set(target) - set(sources))
        extra = sorted(set(sources) - set(target))
        if missing or extra:
            raise MTPEvalError(f"{hf_dir}: mtp.* tensors do not match the MTP pattern {mtp_types}: missing "
                               f"{missing[:6]}, unexpected {extra[:6]}")
        files: Dict[str, Any] = {}

        def get(name: str) -> torch.Tensor:
            f = where[name]
            if f not in files:
                files[f] = safe_open(str(hf_dir / f), "pt")
            return files[f].get_tensor(name)

        with torch.no_grad():
            for key, parts in sources.items():
                parts.sort()
                if len(parts) > 1 or parts[0][1] != key:
                    if [e for e, _ in parts] != list(range(len(parts))):
                        raise MTPEvalError(f"{hf_dir}: {key} has experts {[e for e, _ in parts]}, not 0..{len(parts) - 1}")
                    t = torch.stack([get(n) for _, n in parts])
                else:
                    t = get(key)
                if tuple(t.shape) != tuple(target[key].shape):
                    raise MTPEvalError(f"{hf_dir}: {key} has shape {tuple(t.shape)}, the MTP block needs "
                                       f"{tuple(target[key].shape)}")
                target[key].copy_(t.to(target[key].dtype))
        for m in (self.blocks, self.enorm, self.hnorm, self.eh_proj, self.final_layernorm):
            m.to(DEVICE).eval()
        self.mconf = mconf

    @torch.no_grad()
    def main(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.hf.model(input_ids=ids.unsqueeze(0))
        h = out.last_hidden_state  # after norm_f: what Megatron's MTP block reads (the decoder's final norm output)
        return self.hf.lm_head(h)[0], h

    @staticmethod
    def prefix(hidden: torch.Tensor, n: int) -> torch.Tensor:
        return hidden[:, :n]  # [b, s, h]

    @torch.no_grad()
    def draft_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, depth: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_causal_mask

        emb = self.hf.model.embeddings(next_ids.unsqueeze(0))
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        pos = torch.arange(next_ids.numel(), device=DEVICE).unsqueeze(0)
        mask = create_causal_mask(config=self.mconf, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=pos)
        for blk in self.blocks:
            x = blk(x, attention_mask=mask if blk.block_type == "full_attention" else None, position_ids=pos)
        x = self.final_layernorm(x)
        return x, self.hf.lm_head(x)[0]


Drafter = Union[FoldtronDrafter, HFDrafter]


def draft(drafter: Drafter, seq: torch.Tensor, hidden: torch.Tensor, t: torch.Tensor, D: int) -> torch.Tensor:
    """D draft tokens after seq + t (the recurrence of the module docstring)."""
    toks = torch.cat([seq, t.view(1)])
    drafts: List[torch.Tensor] = []
    h = hidden
    for k in range(1, D + 1):
        # depth k at position i reads token i + k: x[k..n-1] + t + d1..d_{k-1}
        h, logits = drafter.draft_logits(h, toks[k:], k)
        d = logits[-1].argmax(-1)
        drafts.append(d)
        toks = torch.cat([toks, d.view(1)])
    return torch.stack(drafts)


def speculative_greedy(drafter: Drafter, prompt: torch.Tensor, new_tokens: int, D: int) -> Tuple[torch.Tensor, dict]:
    """Greedy continuation of `prompt` [n0] by draft-and-verify; returns (new tokens [new_tokens], counts)."""
    seq = prompt
    logits, h = drafter.main(seq)
    t = logits[-1].argmax(-1)
    accepted_at = [0] * D
    steps, lengths = 0, []
    while seq.numel() - prompt.numel() < new_tokens:
        d = draft(drafter, seq, h, t, D)
        ext = torch.cat([seq, t.view(1), d])
        vlogits, vh = drafter.main(ext)
        n = seq.numel()
        p = vlogits[n:n + D + 1].argmax(-1)  # main's token after t, after d1, ..., after dD
        a = 0
        while a < D and bool(d[a] == p[a]):
            accepted_at[a] += 1
            a += 1
        steps += 1
        lengths.append(1 + a)
        seq = torch.cat([seq, t.view(1), d[:a]])
        h = drafter.prefix(vh, seq.numel())
        t = p[a]
    return seq[prompt.numel():prompt.numel() + new_tokens], {"steps": steps, "accepted_at": accepted_at,
                                                            "lengths": lengths}


def plain_greedy(drafter: Drafter, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    seq = prompt
    for _ in range(new_tokens):
        logits, _ = drafter.main(seq)
        seq = torch.cat([seq, logits[-1].argmax(-1).view(1)])
    return seq[prompt.numel():]


def evaluate(drafter: Drafter, prompts: Sequence[torch.Tensor], new_tokens: int, D: Optional[int] = None,
             check_greedy: bool = True) -> Dict[str, Any]:
    """Acceptance per draft position (fraction of verify steps whose j-th draft was accepted, vLLM's
    `acceptance rate per position`), its conditional form (given drafts 1..j-1 were), mean accepted drafts per step
    and mean tokens per main-model verify forward (accepted + 1); `greedy_equal` compares with plain greedy."""
    D = D or drafter.depths
    if D < 1:
        raise MTPEvalError(f"draft length must be >= 1, got {D}")
    if new_tokens < 1:
        raise MTPEvalError(f"new_tokens must be >= 1, got {new_tokens}")
    t0 = time.perf_counter()
    acc = [0] * D
    steps, lengths, equal, outs = 0, [], True, []
    for prompt in prompts:
        out, c = speculative_greedy(drafter, prompt, new_tokens, D)
        outs.append(out.tolist())
        steps += c["steps"]
        lengths += c["lengths"]
        acc = [a + b for a, b in zip(acc, c["accepted_at"])]
        if check_greedy:
            equal &= torch.equal(out, plain_greedy(drafter, prompt, new_tokens))
    per_pos = [a / steps for a in acc]
    cond = [acc[j] / (acc[j - 1] if j else steps) if (acc[j - 1] if j else steps) else 0.0 for j in range(D)]
    mean_len = sum(lengths) / len(lengths)
    return {"draft_tokens": D, "prompts": len(prompts), "new_tokens": new_tokens, "verify_steps": steps,
            "acceptance_per_position": per_pos, "conditional_acceptance_per_position": cond,
            "mean_accepted_drafts": mean_len - 1, "mean_tokens_per_verify": mean_len,
            "greedy_equal": equal if check_greedy else None, "seconds": time.perf_counter() - t0, "outputs": outs}


def prompts_from(windows, prompt_len: int) -> List[torch.Tensor]:
    """Prompts = the first `prompt_len` tokens of each held-out window."""
    import numpy as np

    arr = np.asarray(windows)
    if arr.ndim != 2 or arr.shape[1] < prompt_len:
        raise MTPEvalError(f"held-out windows of shape {arr.shape} are shorter than the prompt length {prompt_len}")
    return [torch.as_tensor(arr[i, :prompt_len], dtype=torch.long, device=DEVICE) for i in range(arr.shape[0])]


def foldtron_drafter(checkpoint: Union[str, Path], config: Any = None) -> Tuple[FoldtronDrafter, Any]:
    from pretrain.export_hf import load_foldtron, single_process_state

    single_process_state()
    model, cfg, ckpt = load_foldtron(checkpoint, config)
    return FoldtronDrafter(model, cfg), ckpt

