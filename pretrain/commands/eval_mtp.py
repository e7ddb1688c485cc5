"""`foldtron eval-mtp`: self-speculative greedy decoding with the model's own MTP block as the drafter, on held-out
data of a curriculum phase (tokens no phase of the run reads: data_pipeline/heldout.py).

Per prompt: draft D tokens with the shared MTP block (D = the MTP depths trained, or --draft-tokens), verify them with
one main-model forward, accept the longest agreeing prefix plus the main model's own next token. Reports the
acceptance rate per draft position, the mean accepted drafts per step and tokens per verify forward, and whether the
output equals plain greedy decoding token for token (exit code 1 when it does not).

--checkpoint runs Megatron-Core's model (weights from the Foldtron checkpoint; the draft is Megatron-Core's
compute_mtp_single_step); --hf runs transformers' NemotronHForCausalLM with the export's mtp.* tensors in
transformers' NemotronH blocks. Where it runs: CPU, fp32, no KV cache (every step recomputes the whole sequence);
measured on the quickstart model (7 layers, hidden 64): ~0.1-0.3 s per verify step.
"""
from __future__ import annotations

import argparse
import json

from pretrain.commands.config import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-mtp", help="measure MTP heads as speculative drafters (acceptance per position)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="Foldtron checkpoint (run, stage or iteration directory)")
    src.add_argument("--hf", metavar="HFDIR", help="HF NemotronH export (from export-hf) with its mtp.* tensors")
    p.add_argument("--phase", help="curriculum phase the held-out prompts come from (default: the run's last stage)")
    p.add_argument("--shards", metavar="DIR", help="shards directory (default: the run config's data.shards_dir)")
    p.add_argument("--curriculum", metavar="YAML", help="curriculum (default: the run config's data.curriculum)")
    p.add_argument("--data-seed", type=int, help="the run's data.seed (fixes which tokens the run read)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--draft-tokens", type=int, help="drafts per step (default: the MTP depths of the model)")
    p.add_argument("--seed", type=int, default=0, help="which held-out windows (default 0)")
    p.add_argument("--no-greedy-check", action="store_true", help="skip the plain greedy run (half the time)")
    p.add_argument("--output", metavar="JSON", help="also write the report here")
    add_config_args(p)
    p.set_defaults(func=_run)


def held_out_prompts(config, *, shards, curriculum, phase, data_seed, prompts, prompt_len, seed):
    """(prompts, meta) from explicit data arguments, else from the run config's data section and last stage."""
    from data_pipeline.heldout import held_out_splits
    from pretrain.mtp_eval import MTPEvalError, prompts_from

    data = getattr(config, "data", None)
    shards = shards or (data.shards_dir if data else None)
    curriculum = curriculum or (data.curriculum if data else None)
    data_seed = data_seed if data_seed is not None else (data.seed if data else None)
    if phase is None and config is not None and getattr(config, "stages", None):
        last = config.stages[-1]
        phase = last.phase or last.name
    missing = [n for n, v in (("--shards", shards), ("--curriculum", curriculum), ("--phase", phase),
                              ("--data-seed", data_seed)) if v is None]
    if missing:
        raise MTPEvalError(f"held-out data needs {', '.join(missing)} (or --config RUN.yaml, whose data section and "
                           "stages give them)")
    splits, meta = held_out_splits(shards, curriculum, phase, {"evaluation": prompts}, prompt_len, seed=seed,
                                   data_seed=data_seed)
    return prompts_from(splits["evaluation"], prompt_len), meta


def _run(args: argparse.Namespace) -> int:
    from pretrain import mtp_eval

    config = None
    if args.config or args.overrides:
        from pretrain.config import load_config

        config = load_config(args.config, args.overrides)
    prompts, meta = held_out_prompts(config, shards=args.shards, curriculum=args.curriculum, phase=args.phase,
                                     data_seed=args.data_seed, prompts=args.prompts, prompt_len=args.prompt_len,
                                     seed=args.seed)
    if args.checkpoint:
        drafter, where = mtp_eval.foldtron_drafter(args.checkpoint, config)
        source = {"foldtron_checkpoint": str(where)}
    else:
        drafter = mtp_eval.HFDrafter(args.hf)
        source = {"hf_export": args.hf}
    report = mtp_eval.evaluate(drafter, prompts, args.new_tokens, args.draft_tokens,
                               check_greedy=not args.no_greedy_check)
    report.pop("outputs")
    report = {**source, **report, "held_out": meta}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0 if report["greedy_equal"] in (True, None) else 1
