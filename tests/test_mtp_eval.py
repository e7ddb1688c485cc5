"""Self-speculative decoding with the MTP block (pretrain/mtp_eval.py) and held-out windows (data_pipeline/heldout.py).

- Megatron-Core's MTP (compute_mtp_single_step) and the exported mtp.* tensors in transformers' NemotronH blocks give
  the same draft logits: the exported tensors are the ones that draft.
- The speculative output equals plain greedy decoding token for token, with the real drafters and with a drafter whose
  drafts are the true continuation with planted errors (so accepted, partly accepted and rejected drafts all occur,
  and the counts are checked against where the errors were planted).
- Held-out windows come from tokens no curriculum phase reads, deterministically per seed, disjoint splits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    from model.build import init_single_process
    from pretrain import mtp_eval
    from pretrain.export_hf import export_hf
    from tests.test_export_hf import save_under_layout

    root = tmp_path_factory.mktemp("mtp")
    init_single_process()
    save_under_layout("tiny", {}, str(root / "ckpt"))
    export_hf(root / "ckpt", root / "hf", "fp32")
    fd, _ = mtp_eval.foldtron_drafter(root / "ckpt")
    return fd, mtp_eval.HFDrafter(root / "hf")


def test_exported_mtp_tensors_draft_like_megatron(drafters):
    fd, hd = drafters
    assert fd.depths == hd.depths == 2  # foldtron_mtp_depths read back from config.json
    ids = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(0), device=CPU)
    lf, h_f = fd.main(ids)
    lh, h_h = hd.main(ids)
    assert (lf - lh).abs().max() < 1e-4
    toks = torch.cat([ids[1:], lf[-1].argmax().view(1)])
    for depth in (1, 2):
        h_f, df = fd.draft_logits(h_f, toks, depth)
        h_h, dh = hd.draft_logits(h_h, toks, depth)
        assert (df - dh).abs().max() < 1e-4 * df.abs().max(), depth
        assert torch.equal(df.argmax(-1), dh.argmax(-1))
        toks = torch.cat([toks[1:], df[-1].argmax().view(1)])


def test_speculative_equals_greedy_real_drafters(drafters):
    from pretrain.mtp_eval import evaluate

    prompts = [torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(1), device=CPU)]
    for d in drafters:
        r = evaluate(d, prompts, 6)
        assert r["greedy_equal"] is True
        assert len(r["acceptance_per_position"]) == 2 and all(0 <= a <= 1 for a in r["acceptance_per_position"])
        assert r["mean_tokens_per_verify"] == pytest.approx(1 + r["mean_accepted_drafts"])
    assert [len(o) for o in r["outputs"]] == [6]


class PlantedDrafter:
    """A real model as verifier (transformers' NemotronH, the faster one on CPU); drafts = the true greedy continuation, wrong at planted sequence positions."""

    def __init__(self, inner, truth: torch.Tensor, wrong: set):
        self.inner, self.truth, self.wrong, self.depths = inner, truth, wrong, 3
        self.main, self.prefix = inner.main, inner.prefix


def test_accept_logic_with_planted_errors(drafters, monkeypatch):
    from pretrain import mtp_eval

    fd = drafters[1]
    prompt = torch.randint(0, 512, (8,), generator=torch.Generator().manual_seed(3), device=CPU)
    greedy = mtp_eval.plain_greedy(fd, prompt, 16)  # 4 beyond the 12 generated: every draft has a true token
    truth = torch.cat([prompt, greedy])
    wrong = {10, 11, 15}  # sequence positions whose draft is wrong
    pd = PlantedDrafter(fd, truth, wrong)

    def planted(drafter, seq, hidden, t, D):
        n = seq.numel() + 1  # position of the first draft
        out = []
        for j in range(D):
            p = n + j
            tok = truth[p] if p < truth.numel() else torch.tensor(0, device=CPU)
            out.append((tok + 1) % 512 if p in wrong else tok)
        return torch.stack(out)

    monkeypatch.setattr(mtp_eval, "draft", planted)
    out, c = mtp_eval.speculative_greedy(pd, prompt, 12, 3)
    assert torch.equal(out, greedy[:12])
    # each step emits t plus the drafts before the first planted error: walk the positions
    pos, lengths = prompt.numel(), []
    while pos < prompt.numel() + 12:
        a = 0
        while a < 3 and pos + 1 + a not in wrong:
            a += 1
        lengths.append(1 + a)
        pos += 1 + a
    assert c["lengths"] == lengths
    assert c["accepted_at"] == [sum(1 for n in lengths if n > j + 1) for j in range(3)]


def test_held_out_windows(tmp_path):
    from data_pipeline.curriculum import CurriculumError
    from data_pipeline.heldout import held_out_splits
    from data_pipeline.loader import BlendedLoader
    from tests.pipeline_data import build

    data = build(tmp_path)
    cur = {"name": "t", "phases": [{"name": "p1", "tokens": 8 * 4 * 64, "seq_length": 64, "global_batch_size": 4,
                                    "blend": {"code": 0.5, "email": 0.3, "json": 0.2}}]}
    a, meta = held_out_splits(data["shards"], cur, "p1", {"calibration": 6, "evaluation": 5}, 64, seed=7)
    b, _ = held_out_splits(data["shards"], cur, "p1", {"calibration": 6, "evaluation": 5}, 64, seed=7)
    c, _ = held_out_splits(data["shards"], cur, "p1", {"calibration": 6, "evaluation": 5}, 64, seed=8)
    assert a["calibration"].shape == (6, 64) and a["evaluation"].shape == (5, 64)
    assert np.array_equal(a["calibration"], b["calibration"]) and not np.array_equal(a["calibration"],
                                                                                      c["calibration"])
    assert meta["phase"] == "p1" and meta["seed"] == 7 and meta["sizes"] == {"calibration": 6, "evaluation": 5}
    rows = {tuple(r) for s in a.values() for r in s}
    assert len(rows) == 11  # no window in two splits
    # none of them is a window the run trains on
    trained = {tuple(r[:64]) for mb in BlendedLoader(data["shards"], cur, "p1", seed=1234) for r in mb["tokens"].tolist()}
    assert not rows & trained
    with pytest.raises(CurriculumError, match="held-out windows"):
        held_out_splits(data["shards"], cur, "p1", {"evaluation": 10**6}, 64)
