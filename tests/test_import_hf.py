"""An imported HF checkpoint continues under another layout: the weights-only dist checkpoint written by
`import_hf` (one process, full tensors) loads on 2 gloo ranks as TP2 x EP2 (+SP) and gives transformers' logits."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_on_ranks

pytest.importorskip("transformers")


def _logits_under_layout(ckpt: str, layout: dict, ids: list):
    """Plain lists/numpy in and out: tensors sent through the result queue live in shared memory that the
    exiting rank takes with it."""
    from megatron.core import dist_checkpointing

    from model.build import build_model, transformer_config
    from parallel import groups
    from parallel.layout import ParallelLayout
    from pretrain.export_hf import resolve_checkpoint, resolve_config

    path, meta = resolve_checkpoint(ckpt)
    cfg, _ = resolve_config(None, meta)
    lay = ParallelLayout(**layout)
    groups.setup(lay, seed=0)
    try:
        model = build_model(cfg, config=transformer_config(
            cfg, tensor_model_parallel_size=lay.tp, expert_model_parallel_size=lay.ep,
            sequence_parallel=lay.sequence_parallel)).eval()
        sd = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
        model.load_state_dict(dist_checkpointing.load(sd, str(path)), strict=False)
        with torch.no_grad():
            ids = torch.tensor(ids)
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            return model(ids, pos, None, runtime_gather_output=True).numpy()
    finally:
        groups.teardown()


@pytest.mark.multiproc
@pytest.mark.slow
def test_imported_checkpoint_runs_under_tp2_ep2(tmp_path):
    from transformers import NemotronHForCausalLM

    from pretrain.import_hf import import_hf
    from tests.test_export_hf import export_tiny

    cfg, _, _ = export_tiny(tmp_path, 9, "fp32")
    res = import_hf(tmp_path / "hf", tmp_path / "run", "tp=2,ep=2,sequence_parallel=true")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = NemotronHForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()(
            input_ids=ids).logits
    outs = run_on_ranks(_logits_under_layout, 2, str(tmp_path / "run"),
                        dict(tp=2, ep=2, sequence_parallel=True), ids.tolist())
    for ours in map(torch.from_numpy, outs):
        assert ours.shape == theirs.shape
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-4
    assert res["layout"]["tp"] == 2


def test_bad_layout_is_refused(tmp_path):
    from pretrain.export_hf import ExportError
    from pretrain.import_hf import parse_layout

    assert parse_layout("tp=2,ep=2,sequence_parallel=true").sequence_parallel is True
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_layout("tp2")
    with pytest.raises(ExportError, match="config.json"):
        from pretrain.import_hf import import_hf

        import_hf(tmp_path, tmp_path / "out")


def test_expert_names_map_between_sequential_and_te_grouped_both_ways():
    """A checkpoint or export moves between the te backend (TEGroupedMLP: `experts.linear_fc1.weight{e}`) and the
    local/cpu ones (SequentialMLP: `experts.local_experts.{e}.linear_fc1.weight`): the rename is exact both ways
    and export reads either naming to the same HF tensors."""
    import torch

    from model.hf_mapping import expert_names, expert_style, megatron_to_hf
    from model.presets import get_preset

    cfg = get_preset("tiny", mtp_num_layers=0, mtp_hybrid_override_pattern=None)
    t = {f"decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc{k}.weight": torch.full((2, 2), 10.0 * e + k)
         for e in range(cfg.num_moe_experts) for k in (1, 2)}
    t["decoder.layers.3.mlp.router.weight"] = torch.zeros(4, 2)
    grouped = expert_names(t, "grouped")
    assert "decoder.layers.3.mlp.experts.linear_fc2.weight3" in grouped and expert_style(grouped) == "grouped"
    assert expert_style(t) == "local"
    back = expert_names(grouped, "local")
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    a, b = megatron_to_hf(t, cfg), megatron_to_hf(grouped, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
