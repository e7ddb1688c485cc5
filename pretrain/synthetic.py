"""Synthetic training data (`data.mock: true`): a deterministic token stream with learnable structure, for smoke
tests and benchmarks on a machine without shards — the role of Megatron's mock datasets.

Each sample is a pure function of (seed, global sample index): a random start token, then
t[k+1] = (a * t[k] + b) mod V with (a, b) drawn per sample from a small set, and every 8th token replaced by
noise. A model can learn it (the loss falls well below log V), and the order does not depend on how many DP
ranks read it. The loader interface matches data_pipeline.loader.BlendedLoader: it iterates this DP rank's
micro-batches (tokens/labels/loss_mask/position_ids) global batch after global batch, and its state_dict /
load_state_dict carry the number of consumed global batches, so a resume under another DP size continues the
identical global stream.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

STATE_VERSION = 1
_RULES = ((1, 1), (3, 7), (5, 11), (7, 3))  # (a, b) pairs of the recurrence


def sample(seed: int, index: int, seq_length: int, vocab_size: int) -> np.ndarray:
    """seq_length + 1 tokens of global sample `index` (inputs are [:-1], labels [1:])."""
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    a, b = _RULES[int(rng.integers(len(_RULES)))]
    out = np.empty(seq_length + 1, dtype=np.int64)
    out[0] = rng.integers(vocab_size)
    for k in range(seq_length):
        out[k + 1] = (a * out[k] + b) % vocab_size
    noise = np.arange(seq_length + 1) % 8 == 7
    out[noise] = rng.integers(vocab_size, size=int(noise.sum()))
    return out


class SyntheticLoader:
    def __init__(self, *, seq_length: int | list[int], vocab_size: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, num_batches: int | None = None,
                 phase: str = "synthetic"):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside dp_size {dp_size}")
        if global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of dp_size {dp_size} x "
                             f"micro_batch_size {micro_batch_size}")
        # A list alternates per global batch, as a curriculum phase's does (long-context stage 2).
        self.seq_lengths = list(seq_length) if isinstance(seq_length, (list, tuple)) else [seq_length]
        self.seq_length, self.vocab_size, self.seed, self.phase = self.seq_lengths[0], vocab_size, seed, phase
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batches_per_batch = global_batch_size // (dp_size * micro_batch_size)
        self._num_batches = num_batches
        self._batches = 0
        self.source_counts: dict[str, int] = {}

    @property
    def num_batches(self) -> int | None:
        return self._num_batches

    @property
    def batches_done(self) -> int:
        return self._batches

    def _micro(self, b: int, m: int) -> dict:
        first = b * self.global_batch_size + self.dp_rank * (self.global_batch_size // self.dp_size)
        first += m * self.micro_batch_size
        seq = self.seq_lengths[b % len(self.seq_lengths)]
        rows = np.stack([sample(self.seed, first + i, seq, self.vocab_size) for i in range(self.micro_batch_size)])
        rows_t = torch.from_numpy(rows)
        return {
            "tokens": rows_t[:, :-1].contiguous(),
            "labels": rows_t[:, 1:].contiguous(),
            # Host-side batch, like the shard loader's: the forward step moves it to the backend's device.
            "loss_mask": torch.ones(self.micro_batch_size, seq, dtype=torch.float32, device="cpu"),
            "position_ids": torch.arange(seq, device="cpu").unsqueeze(0)
            .expand(self.micro_batch_size, -1).contiguous(),
        }

    def __iter__(self) -> Iterator[dict]:
        while self._num_batches is None or self._batches < self._num_batches:
            b = self._batches
            self.source_counts = {"synthetic": self.global_batch_size}
            for m in range(self.micro_batches_per_batch):
                if m == self.micro_batches_per_batch - 1:
                    self._batches = b + 1  # the state counts a batch as consumed once its last micro-batch is out
                yield self._micro(b, m)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "synthetic", "phase": self.phase, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "batches": self._batches,
                "samples_consumed": self._batches * self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic" or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state {state.get('kind')!r} v{state.get('version')} is not a synthetic-data "
                             f"state v{STATE_VERSION} (data.mock changed between save and resume?)")
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r} but this run has {mine!r}")
        self._batches = int(state["batches"])
