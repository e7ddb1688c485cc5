"""Held-out token windows of a curriculum phase: data the run's curriculum never reads, for calibration (NVFP4 export)
and evaluation (quantization quality, MTP acceptance).

What "held out" means here. The loader reads each source as one endless stream fixed by the data seed and the
manifest (loader.SourceStream); the curriculum plan says where every phase starts and how many tokens it takes from
each source, so the run reads exactly tokens [0, end_s) of source s's stream, end_s being the largest
offset + tokens over all phases. When end_s is below one epoch (the source's token count), tokens [end_s, total_s)
of epoch 0 are never trained on: that tail is the held-out region. Windows of `seq_length` tokens are cut from it at
slot boundaries, drawn without replacement by rng(seed, source), split over the phase's sources in proportion to its
blend weights, and dealt to the named splits (e.g. calibration / evaluation) so no window is in two splits.
A source whose curriculum reads a full epoch or more has no held-out tokens; when no source of the phase has enough,
the error names the sources and how much of them the curriculum reads.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Dict, Union

import numpy as np

from data_pipeline.curriculum import Curriculum, CurriculumError, load_curriculum, plan
from data_pipeline.loader import SourceStream
from data_pipeline.manifest import load_manifests


def _allocate(weights: Dict[str, float], capacity: Dict[str, int], count: int) -> Dict[str, int]:
    """`count` windows over sources in proportion to `weights` (largest remainder), none above its capacity."""
    alloc = {s: 0 for s in weights}
    left = count
    active = {s for s in weights if capacity[s] > 0 and weights[s] > 0}
    while left and active:
        total = sum(weights[s] for s in active)
        share = {s: left * weights[s] / total for s in active}
        give = {s: min(int(math.floor(share[s])), capacity[s] - alloc[s]) for s in active}
        if not any(give.values()):  # hand out the remainder one by one, largest share first
            for s in sorted(active, key=lambda s: (-(share[s] - math.floor(share[s])), s)):
                if left and alloc[s] < capacity[s]:
                    alloc[s] += 1
                    left -= 1
        for s, g in give.items():
            alloc[s] += g
            left -= g
        active = {s for s in active if alloc[s] < capacity[s]}
    return alloc


def held_out_splits(shards_dir: Union[str, Path], curriculum: Union[str, Path, dict, Curriculum], phase: str,
                    sizes: Dict[str, int], seq_length: int, *, seed: int = 0, data_seed: int = 1234
                    ) -> tuple[Dict[str, np.ndarray], dict]:
    """{split name: int64 array [sizes[name], seq_length]} of held-out windows of `phase`, and a record of how they
    were chosen (phase, seed, data seed, per-source windows and the stream region they come from) for metadata.

    `data_seed` must be the run's `data.seed`: it fixes the stream order, hence which tokens the run read."""
    if seq_length < 2:
        raise ValueError(f"held-out windows need seq_length >= 2, got {seq_length}")
    if any(n < 0 for n in sizes.values()) or not sum(sizes.values()):
        raise ValueError(f"held-out split sizes must be >= 0 and not all 0, got {sizes}")
    cur = load_curriculum(curriculum)
    ph = cur.phase(phase)  # unknown phase: CurriculumError naming the known ones
    manifests = load_manifests(shards_dir)
    plans = plan(cur, manifests)
    end: Dict[str, int] = {}
    for pp in plans:
        for s, sp in pp.sources.items():
            end[s] = max(end.get(s, 0), sp.offset + sp.tokens)
    weights = {s: float(w) for s, w in plans[cur.phase_index(phase)].weights.items()}
    streams = {s: SourceStream(Path(shards_dir) / s, manifests[s], data_seed, verify="size") for s in weights}
    capacity = {s: max(0, (streams[s].total - end.get(s, 0)) // seq_length) for s in weights}
    need = sum(sizes.values())
    alloc = _allocate(weights, capacity, need)
    if sum(alloc.values()) < need:
        read = ", ".join(f"{s}: reads {end.get(s, 0):,} of {streams[s].total:,} tokens" for s in weights)
        raise CurriculumError(f"phase {ph.name!r} of curriculum {cur.name!r} has {sum(capacity.values())} held-out "
                              f"windows of {seq_length} tokens (tokens no phase reads), {need} needed ({read}); "
                              "ask for fewer or shorter windows, or hold out data from the curriculum")
    names = list(sizes)
    # splits one after another from what the previous ones left (allocating each against all of `alloc` gave two
    # splits the same windows' share of a source: a split came out short and its record wrong)
    left = dict(alloc)
    per_split: Dict[str, Dict[str, int]] = {}
    for n in names:
        per_split[n] = _allocate(weights, left, sizes[n])
        left = {s: left[s] - per_split[n][s] for s in weights}
    # _allocate per split may under-fill when capacity is tight: top up from what is left, source by source
    for n in names:
        short = sizes[n] - sum(per_split[n].values())
        for s in weights:
            take = min(left[s], short)
            per_split[n][s] += take
            left[s] -= take
            short -= take
    out: Dict[str, list] = {n: [] for n in names}
    sources = {}
    for s in weights:
        k = alloc[s]
        if not k:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(s.encode())])
        slots = np.sort(rng.choice(capacity[s], size=k, replace=False))
        start = end.get(s, 0)
        wins = [streams[s].read(start + int(j) * seq_length, seq_length)[0].astype(np.int64) for j in slots]
        i = 0
        for n in names:
            out[n] += wins[i:i + per_split[n][s]]
            i += per_split[n][s]
        sources[s] = {"windows": {n: per_split[n][s] for n in names}, "region_tokens": [start, streams[s].total]}
    arrays = {n: np.stack(v) if v else np.zeros((0, seq_length), dtype=np.int64) for n, v in out.items()}
    meta = {"shards_dir": str(shards_dir), "curriculum": cur.name, "phase": ph.name, "seq_length": seq_length,
            "seed": seed, "data_seed": data_seed, "sizes": dict(sizes), "sources": sources,
            "held_out": "tokens of epoch 0 that no curriculum phase reads"}
    return arrays, meta
