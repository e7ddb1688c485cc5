"""The blended, exactly resumable loader: what the training loop iterates.

    loader = BlendedLoader(shards_dir, "curriculum.yaml", phase="phase1", seq_length=4096, micro_batch_size=2,
                           global_batch_size=64, dp_rank=r, dp_size=dp, seed=1234, num_workers=2)
    for mb in loader:            # this rank's micro-batches, global batch after global batch
        mb["tokens"], mb["labels"], mb["loss_mask"], mb["position_ids"]   # [micro_batch_size, seq] tensors
        mb["segment_ids"], mb["cu_seqlens"], mb["max_seqlen"]             # document boundaries (packing.py)
        mb["source_ids"], mb["sample_ids"]                                # which planned window each row is
        loader.source_counts      # {source: samples} of the global batch this micro-batch belongs to
    ckpt["data"] = loader.state_dict()        # small, identical on every DP rank at a step boundary
    loader.load_state_dict(ckpt["data"])      # exact continuation, also with another dp_size

How the order is made. The plan (curriculum.py) fixes, per global batch b of the phase, how many windows
each source gives (floor or ceil of weight x global_batch_size); a source's k-th window is the next
seq_length + 1 tokens of its endless stream (its shards in a seeded order per epoch, each shard's documents in
a seeded order), starting where earlier phases stopped reading it. The batch's windows are permuted by
(seed, phase, b), and DP rank r takes slots [r*G/dp, (r+1)*G/dp), cut into micro-batches. Nothing depends
on dp_size, num_workers or history except through (phase, b, per-source window and token cursors): that is
the whole state, so restoring it, under any DP size, continues the identical global stream. An iteration
ends at the end of the phase (the plan's number of global batches).

Workers: with num_workers > 0 a torch DataLoader runs worker w on global batches b0+w, b0+w+W, ...; each yields
its rank's whole slice of one batch, and the DataLoader's in-order round robin gives them back in batch order.
Shards are opened through `wids`' memory-mapped tar index (random access to documents without reading the
whole shard) and checked against the manifest (size, sha256, document and token counts) on first use; a bad
shard raises `ShardError` naming it, or with `on_bad_shard="skip"` every shard is verified up front and bad
ones are left out of the stream, counted in `skipped_shards`, and logged.
"""
from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.curriculum import BlendSchedule, Curriculum, CurriculumError, load_curriculum, plan
from data_pipeline.manifest import ShardEntry, ShardError, SourceManifest, load_manifests, verify_shard
from data_pipeline.packing import Window, pack

log = logging.getLogger(__name__)
STATE_VERSION = 1


class _Shard:
    """One verified shard: a memory map plus (offset, length) of each document's token member, in tar order."""

    def __init__(self, path: Path, entry: ShardEntry, dtype: np.dtype, check_sha256: bool):
        from wids.wids_mmtar import MMIndexedTar

        verify_shard(path, entry, check_sha256)
        try:
            self.tar = MMIndexedTar(str(path), verbose=False)
        except Exception as e:  # a damaged header: struct/ValueError from the index scan
            raise ShardError(f"shard {path} is not a readable tar ({type(e).__name__}: {e})") from e
        members = [(off, size) for name, off, size in self.tar.by_index if ".tokens.u" in name]
        size = len(self.tar.mmapped_file)
        if len(members) != entry.documents or any(off + 512 + n > size for off, n in members):
            raise ShardError(f"shard {path} holds {len(members)} readable documents but the manifest says "
                             f"{entry.documents} (truncated or corrupt)")
        self.offsets = np.asarray([off + 512 for off, _ in members], dtype=np.int64)
        self.lengths = np.asarray([n // dtype.itemsize for _, n in members], dtype=np.int64)
        if int(self.lengths.sum()) != entry.tokens:
            raise ShardError(f"shard {path} holds {int(self.lengths.sum())} tokens but the manifest says "
                             f"{entry.tokens}")
        self.dtype = dtype

    def doc(self, i: int, start: int, stop: int) -> np.ndarray:
        off = int(self.offsets[i]) + start * self.dtype.itemsize
        return np.frombuffer(self.tar.mmapped_file, dtype=self.dtype, count=stop - start, offset=off)


class SourceStream:
    """One source as an endless token stream; `read(offset, n)` gives tokens [offset, offset+n) and the
    positions where documents begin. Epoch e orders shards by rng(seed, source, e) and each shard's
    documents by rng(seed, source, e, shard), so the stream is fixed by the seed and the manifest alone."""

    def __init__(self, root: Path, manifest: SourceManifest, seed: int, verify: str = "sha256",
                 on_bad_shard: str = "error", cache_shards: int = 8):
        self.root, self.manifest, self.seed = root, manifest, seed
        self.dtype = np.dtype(manifest.dtype)
        self.check_sha256 = verify == "sha256"
        self.key = zlib.crc32(manifest.source.encode())
        self.entries = list(manifest.shards)
        self.skipped: list[str] = []
        if on_bad_shard == "skip":
            good = []
            for e in self.entries:
                try:
                    _Shard(root / e.path, e, self.dtype, self.check_sha256)
                    good.append(e)
                except ShardError as err:
                    log.warning("skipping bad shard (%s)", err)
                    self.skipped.append(str(err))
            self.entries = good
        self.shard_tokens = np.asarray([e.tokens for e in self.entries], dtype=np.int64)
        self.total = int(self.shard_tokens.sum())
        if self.total == 0:
            raise ShardError(f"source {manifest.source} has no tokens in its (usable) shards under {root}")
        self._shards: OrderedDict[int, _Shard] = OrderedDict()
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._docs: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.cache_shards = cache_shards

    def _shard(self, j: int) -> _Shard:
        sh = self._shards.get(j)
        if sh is None:
            sh = _Shard(self.root / self.entries[j].path, self.entries[j], self.dtype, self.check_sha256)
            self._shards[j] = sh
            while len(self._shards) > self.cache_shards:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(j)
        return sh

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            perm = np.random.default_rng([self.seed, self.key, e]).permutation(len(self.entries))
            self._epochs[e] = (perm, np.concatenate([[0], np.cumsum(self.shard_tokens[perm])]))
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _doc_order(self, e: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        key = (e, j)
        if key not in self._docs:
            sh = self._shard(j)
            perm = np.random.default_rng([self.seed, self.key, e, j]).permutation(len(sh.lengths))
            self._docs[key] = (perm, np.concatenate([[0], np.cumsum(sh.lengths[perm])]))
            while len(self._docs) > self.cache_shards:
                self._docs.popitem(last=False)
        return self._docs[key]

    def read(self, offset: int, n: int) -> tuple[np.ndarray, list[int]]:
        out = np.empty(n, dtype=self.dtype)
        starts: list[int] = []
        pos = 0
        while pos < n:
            e, o = divmod(offset + pos, self.total)
            perm, cum = self._epoch(e)
            k = int(np.searchsorted(cum, o, side="right")) - 1
            j = int(perm[k])
            dperm, dcum = self._doc_order(e, j)
            sh = self._shard(j)
            within_shard = o - int(cum[k])
            d = int(np.searchsorted(dcum, within_shard, side="right")) - 1
            within = within_shard - int(dcum[d])
            while pos < n and d < len(dperm):
                doc = int(dperm[d])
                length = int(sh.lengths[doc])
                if within == 0 and length:
                    starts.append(pos)
                take = min(length - within, n - pos)
                if take > 0:
                    out[pos:pos + take] = sh.doc(doc, within, within + take)
                    pos += take
                within = 0
                d += 1
        return out, starts


@dataclass
class _Spec:
    """Everything a worker needs to rebuild any global batch of the phase (picklable)."""

    shards_dir: str
    sources: list[str]
    manifests: dict
    weights: dict
    offsets: list[int]  # token position where this phase starts in each source's stream
    seq_lengths: list[int]
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    seed: int
    phase_index: int
    num_batches: int
    eos_id: Optional[int]
    eod_mask_loss: bool
    reset_position_ids: bool
    verify: str
    on_bad_shard: str


class _Planner:
    """Walks the schedule: for global batch b, which (source, window, token offset) fill it, in which order."""

    def __init__(self, spec: _Spec, batches: int, drawn: list[int], tokens: list[int]):
        self.spec = spec
        self.schedule = BlendSchedule(spec.weights, spec.global_batch_size)
        self.b, self.drawn, self.tokens = batches, list(drawn), list(tokens)

    def next(self) -> tuple[int, list[int], list[tuple[int, int, int]]]:
        s, b = self.spec, self.b
        seq = s.seq_lengths[b % len(s.seq_lengths)]
        counts = self.schedule.counts(b, self.drawn)
        slots = []
        for i, c in enumerate(counts):
            for k in range(c):
                slots.append((i, self.drawn[i] + k, s.offsets[i] + self.tokens[i] + k * seq))
            self.drawn[i] += c
            self.tokens[i] += c * seq
        order = np.random.default_rng([s.seed, s.phase_index, b]).permutation(len(slots))
        self.b += 1
        return b, counts, [slots[i] for i in order]


class _BatchBuilder:
    def __init__(self, spec: _Spec):
        self.spec = spec
        self.streams: dict[int, SourceStream] = {}

    def stream(self, i: int) -> SourceStream:
        if i not in self.streams:
            s = self.spec
            name = s.sources[i]
            self.streams[i] = SourceStream(Path(s.shards_dir) / name, SourceManifest(**s.manifests[name]), s.seed,
                                           s.verify, s.on_bad_shard)
        return self.streams[i]

    def build(self, b: int, slots: list[tuple[int, int, int]]) -> list[dict]:
        s = self.spec
        seq = s.seq_lengths[b % len(s.seq_lengths)]
        per_rank = s.global_batch_size // s.dp_size
        mine = slots[s.dp_rank * per_rank:(s.dp_rank + 1) * per_rank]
        out = []
        for m in range(0, per_rank, s.micro_batch_size):
            windows = []
            for src, sample, off in mine[m:m + s.micro_batch_size]:
                toks, starts = self.stream(src).read(off, seq + 1)
                windows.append(Window(toks, starts, src, sample))
            out.append(pack(windows, s.eos_id, s.eod_mask_loss, s.reset_position_ids))
        return out


def _iter_batches(spec: _Spec, batches: int, drawn: list[int], tokens: list[int], worker: int = 0,
                  num_workers: int = 1) -> Iterator[tuple[int, list[int], list[dict]]]:
    planner, builder = _Planner(spec, batches, drawn, tokens), _BatchBuilder(spec)
    while planner.b < spec.num_batches:
        b, counts, slots = planner.next()
        if (b - batches) % num_workers == worker:
            yield b, counts, builder.build(b, slots)


class _WorkerBatches(IterableDataset):
    """The per-worker view for torch's DataLoader (module level, so it pickles for any start method)."""

    def __init__(self, spec: _Spec, batches: int, drawn: list[int], tokens: list[int]):
        self.args = (spec, batches, drawn, tokens)

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        return _iter_batches(*self.args, w, n)


def _identity(x):
    return x


class BlendedLoader:
    def __init__(self, shards_dir: Union[str, Path], curriculum: Union[str, Path, dict, Curriculum], phase: str,
                 seq_length: Optional[int] = None, micro_batch_size: int = 1,
                 global_batch_size: Optional[int] = None, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234,
                 num_workers: int = 0, prefetch_factor: int = 2, eod_mask_loss: bool = False,
                 reset_position_ids: bool = False, verify: Literal["sha256", "size"] = "sha256",
                 on_bad_shard: Literal["error", "skip"] = "error"):
        cur = load_curriculum(curriculum)
        ph = cur.phase(phase)
        if seq_length is not None and seq_length not in ph.seq_lengths:
            raise CurriculumError(f"seq_length {seq_length} disagrees with phase {phase!r} of the curriculum "
                                  f"(seq_length {ph.seq_length})")
        if global_batch_size is not None and ph.global_batch_size not in (None, global_batch_size):
            raise CurriculumError(f"phase {phase!r}: curriculum global_batch_size {ph.global_batch_size} != "
                                  f"{global_batch_size} given by the run")
        manifests = load_manifests(shards_dir)
        plans = plan(cur, manifests, global_batch_size)
        pp = plans[cur.phase_index(phase)]
        g = pp.global_batch_size
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank {dp_rank} outside dp_size {dp_size}")
        if g % (dp_size * micro_batch_size):
            raise ValueError(f"global_batch_size {g} is not a multiple of dp_size {dp_size} x micro_batch_size "
                             f"{micro_batch_size}")
        sources = list(pp.sources)
        toks = {m.tokenizer.get("sha256") for s, m in manifests.items() if s in sources}
        if len(toks) > 1:
            raise ShardError(f"sources of phase {phase!r} were tokenized with different tokenizers; re-shard them")
        first = manifests[sources[0]].tokenizer
        self.spec = _Spec(str(shards_dir), sources, {s: manifests[s].model_dump() for s in sources},
                          dict(pp.weights), [pp.sources[s].offset for s in sources], pp.seq_lengths, g,
                          micro_batch_size, dp_rank, dp_size, seed, pp.index, pp.batches, first.get("eos_id"),
                          eod_mask_loss, reset_position_ids, verify, on_bad_shard)
        self.phase, self.plan = phase, pp
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.micro_batches_per_batch = g // (dp_size * micro_batch_size)
        self._batches, self._micro = 0, 0
        self._drawn, self._tokens = [0] * len(sources), [0] * len(sources)
        self.source_counts: dict[str, int] = {}
        self.batch_index: Optional[int] = None
        self.skipped_shards: list[str] = []
        if on_bad_shard == "skip":  # verify up front so every rank and worker agrees on the stream
            builder = _BatchBuilder(self.spec)
            for i in range(len(sources)):
                self.skipped_shards += builder.stream(i).skipped

    @property
    def num_batches(self) -> int:
        """Global batches in the phase (the plan's), of which `batches_done` are consumed."""
        return self.spec.num_batches

    @property
    def batches_done(self) -> int:
        return self._batches

    def __len__(self) -> int:
        return (self.spec.num_batches - self._batches) * self.micro_batches_per_batch - self._micro

    def __iter__(self) -> Iterator[dict]:
        spec, skip = self.spec, self._micro
        start, drawn, tokens = self._batches, list(self._drawn), list(self._tokens)
        if self.num_workers > 0:
            dl = DataLoader(_WorkerBatches(spec, start, drawn, tokens), batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor, collate_fn=_identity)
            batches = iter(dl)
        else:
            batches = _iter_batches(spec, start, drawn, tokens)
        for b, counts, micro in batches:
            self.batch_index = b
            self.source_counts = {s: c for s, c in zip(spec.sources, counts) if c}
            for m in range(skip, len(micro)):
                self._micro = m + 1
                if self._micro == len(micro):
                    self._batches = b + 1
                    self._micro = 0
                    seq = spec.seq_lengths[b % len(spec.seq_lengths)]
                    self._drawn = [d + c for d, c in zip(self._drawn, counts)]
                    self._tokens = [t + c * seq for t, c in zip(self._tokens, counts)]
                yield micro[m]
            skip = 0

    def state_dict(self) -> dict:
        s = self.spec
        return {"version": STATE_VERSION, "phase": self.phase, "seed": s.seed,
                "global_batch_size": s.global_batch_size, "batches": self._batches,
                "samples_consumed": self._batches * s.global_batch_size,
                "source_samples": dict(zip(s.sources, self._drawn)),
                "source_tokens": dict(zip(s.sources, self._tokens)),
                # only meaningful mid-batch (gradient accumulation interrupted); then dp_size must match
                "micro_batch": self._micro, "dp_size": s.dp_size, "micro_batch_size": s.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        s = self.spec
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("phase", self.phase), ("seed", s.seed), ("global_batch_size", s.global_batch_size)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {mine!r}: a "
                                 f"checkpoint resumes the same phase, seed and global batch size")
        if set(state["source_samples"]) != set(s.sources):
            raise ValueError(f"loader state sources {sorted(state['source_samples'])} differ from phase "
                             f"{self.phase!r} sources {s.sources}")
        drawn = [int(state["source_samples"][x]) for x in s.sources]
        if sum(drawn) != state["batches"] * s.global_batch_size:
            raise ValueError("loader state is inconsistent: per-source samples do not add up to batches x "
                             "global_batch_size")
        if state["batches"] > s.num_batches:
            raise ValueError(f"loader state is {state['batches']} batches into phase {self.phase!r}, which "
                             f"has only {s.num_batches}")
        if state.get("micro_batch", 0) and (state["dp_size"], state["micro_batch_size"]) != (
                s.dp_size, s.micro_batch_size):
            raise ValueError("loader state was saved in the middle of a global batch; it can only resume with "
                             "the same dp_size and micro_batch_size (save at a step boundary to change them)")
        self._batches, self._micro = int(state["batches"]), int(state.get("micro_batch", 0))
        self._drawn = drawn
        self._tokens = [int(state["source_tokens"][x]) for x in s.sources]
