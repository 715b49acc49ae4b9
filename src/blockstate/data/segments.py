"""Training segments, batches and evaluation batches.

Batch format (the Hugging Face convention): ``{"input_ids": LongTensor (B, L), "labels": LongTensor (B, L)}``
with ``labels == input_ids`` except at masked positions (``-100``); the model shifts internally and predicts
``labels[:, t + 1]`` from ``input_ids[:, :t + 1]``.  Padding is input id 0 with label -100.

Segments.  Each document is stored as ``EOS t1 ... tn`` (see ``tokenized.py``) and cut into segments of
``L = seq_len`` tokens with stride ``L - overlap``.  With the default ``overlap=1`` consecutive segments of a
document share one token: the last input of segment k is the first input of segment k+1, so the target that
a segment's last position cannot predict is predicted by the next one, and every real token is a target
exactly once (segment 0 predicts t1 from the EOS).  ``overlap=0`` gives disjoint segments, losing the first
target of every continuation segment.  A segment is emitted only if it has at least one target.

* ``packing=False`` (default): a segment never mixes two documents; the last (or only, for a short document)
  segment of a document is padded to L.  Short documents therefore cost padding, not cross-document context.
* ``packing=True``: the split is one stream ``EOS d0 EOS d1 ...`` cut the same way; labels equal to EOS are
  masked, so the end of a document is never a target and the next document's first token is predicted from
  the separator.  No padding except at the very end.
* ``contiguous=True`` (stateful models): each batch row is a *lane* walking through documents in order, one
  segment per step, and the batch gets ``reset`` (BoolTensor (B,)): True when the row starts a new document,
  i.e. the model must drop the state carried for that row.  With ``overlap=1`` a continuation row starts with
  the previous segment's last token, so a model that carries state must carry the state *after position
  L - 2* (before the last input) to see each token once; with ``overlap=0`` it carries the state after the
  full segment and the first target of each continuation segment is not scored.
* ``contiguous=True, lane_span=K`` (K >= 1): each lane walks a bounded *run* of at most K consecutive segments
  of one document, starting at a random segment (segment-aligned offset) of a random document, then jumps to a
  new random start with ``reset`` True for that row.  A run ends after K segments or at the document's end.
  Run starts are the segments of the split in a seeded per-epoch permutation (one start per segment per epoch),
  so documents are drawn in proportion to their length, exactly as shuffled segments draw them: over N steps
  with B lanes a model that carries state sees about as many documents as shuffled training drawing B*N/K
  segments, instead of the B*N/(segments per document) that whole-document lanes walk through.

Order and sharding.  The samples (segments; documents for lanes; run starts, i.e. segments, for lane spans)
form an infinite stream: epoch e is a
permutation drawn from ``(seed, e)``.  Global batch g is positions ``[g*G, (g+1)*G)`` of that stream with
``G = batch_size * world_size``; rank r takes rows ``[r*b, (r+1)*b)``.  So N ranks with batch b see exactly
the batches of one process with batch N*b, and ``state_dict()`` (plain ints) resumes mid-epoch exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .common import DataError
from .tokenized import TokenizedSplit

IGNORE_INDEX = -100
PAD_ID = 0
STATE_VERSION = 1


def num_segments(length: int | np.ndarray, seq_len: int, overlap: int = 1) -> Any:
    """Segments needed for sequences of ``length`` tokens (leading EOS included): those with >= 1 target."""
    length = np.asarray(length, dtype=np.int64)
    return np.where(length >= 2, (length - 2) // (seq_len - overlap) + 1, 0)


def segment_table(data: TokenizedSplit, seq_len: int, overlap: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` into ``data.tokens`` of every segment, document after document (no packing)."""
    m = np.diff(data.offsets)
    n = num_segments(m, seq_len, overlap)
    doc = np.repeat(np.arange(len(m)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    starts = data.offsets[doc] + k * (seq_len - overlap)
    return starts, np.minimum(seq_len, data.offsets[doc + 1] - starts)


def gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int, eos_id: int
           ) -> dict[str, torch.Tensor]:
    """Materialise segments (length 0 = an empty, fully masked row) as an HF-style batch."""
    x = np.full((len(starts), seq_len), PAD_ID, dtype=np.int64)
    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        x[i, :n] = tokens[s:s + n]
    valid = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]
    labels = np.where(valid & (x != eos_id), x, IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(labels)}


class _Order:
    """Position -> sample index in the infinite stream of per-epoch permutations of ``range(n)``."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}  # the last few epochs' permutations (lanes straddle epochs)

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._perms[epoch]

    def take(self, pos: int, count: int) -> np.ndarray:
        out = []
        while count > 0:
            epoch, i = divmod(pos, self.n)
            chunk = self.perm(epoch)[i:i + count]
            out.append(chunk)
            pos, count = pos + len(chunk), count - len(chunk)
        return np.concatenate(out) if out else np.zeros(0, np.int64)


class _Lanes:
    """Lanes walking through runs of consecutive segments: each pulls the next run of the order when its own ends.

    ``span=0``: sample q of the order is a document, and the run is the whole document.  ``span=K``: sample q is
    a segment (``seg_doc`` / ``seg_k``: its document and index there), and the run is up to K segments from it,
    cut at the end of its document.
    """

    def __init__(self, nseg: np.ndarray, order: _Order, lanes: int, finite: bool, span: int = 0):
        self.nseg, self.order, self.finite, self.span = nseg, order, finite, span
        if span:  # every segment of every document, as (document, index within it): the possible run starts
            self.seg_doc = np.repeat(np.arange(len(nseg), dtype=np.int32), nseg)
            self.seg_k = (np.arange(int(nseg.sum())) - np.repeat(np.cumsum(nseg) - nseg, nseg)).astype(np.int32)
        self.next_q = 0
        self.lane_q = [-1] * lanes  # position in the order of the lane's run; -1 = none yet / idle
        self.lane_k = [0] * lanes  # index of the lane's next segment within its document

    def run(self, q: int) -> tuple[int, int, int]:
        """(document, first segment, end segment) of the run at position ``q`` of the order."""
        s = int(self.order.take(q, 1)[0])
        if not self.span:
            return s, 0, int(self.nseg[s])
        d, k = int(self.seg_doc[s]), int(self.seg_k[s])
        return d, k, min(int(self.nseg[d]), k + self.span)

    def step(self) -> list[tuple[int, int, bool]] | None:
        """Advance every lane one segment: ``[(document or -1 if idle, segment index, starts a run)]``; None if
        every lane is idle."""
        rows = []
        for j, q in enumerate(self.lane_q):
            if q < 0 or self.lane_k[j] >= self.run(q)[2]:
                if self.finite and self.next_q >= self.order.n:
                    self.lane_q[j] = -1
                    rows.append((-1, 0, True))
                    continue
                self.lane_q[j], self.lane_k[j] = self.next_q, self.run(self.next_q)[1]
                self.next_q += 1
            doc, first, _ = self.run(self.lane_q[j])
            rows.append((doc, self.lane_k[j], self.lane_k[j] == first))
            self.lane_k[j] += 1
        return None if all(d < 0 for d, _, _ in rows) else rows


class SegmentLoader:
    """Infinite, deterministic, shardable and resumable iterator of training batches (see module doc).

    ``batch_size`` is per rank.  Iterating yields dicts of CPU tensors; ``state_dict()`` after k batches and
    ``load_state_dict()`` on a fresh loader continue with batch k+1 exactly.  ``lane_span`` (with
    ``contiguous``): runs of at most that many segments from random starts instead of whole documents.
    """

    def __init__(self, data: TokenizedSplit, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, packing: bool = False, contiguous: bool = False, shuffle: bool = True,
                 overlap: int = 1, lane_span: int = 0, _finite: bool = False):
        if seq_len < 2 or batch_size < 1:
            raise DataError(f"seq_len ({seq_len}) must be >= 2 and batch_size ({batch_size}) >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if overlap not in (0, 1):
            raise DataError(f"overlap must be 0 or 1, not {overlap}")
        if isinstance(lane_span, bool) or not isinstance(lane_span, int) or lane_span < 0:
            raise DataError(f"lane_span must be an integer >= 0 (0 = whole-document lanes), not {lane_span!r}")
        if lane_span and not contiguous:
            raise DataError("lane_span applies to contiguous lanes (models that carry state): pass contiguous=True "
                            "or lane_span=0")
        if packing and contiguous:
            raise DataError("packing=True and contiguous=True cannot be combined: a row's reset flag cannot "
                            "mark a document boundary inside a segment; use one of them")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.packing, self.contiguous, self.shuffle, self.overlap = packing, contiguous, shuffle, overlap
        self.lane_span = lane_span
        self.global_batch = batch_size * world_size
        self.mode = "spans" if lane_span else "contiguous" if contiguous else "packed" if packing else "segments"
        if contiguous:
            nseg = num_segments(np.diff(data.offsets), seq_len, overlap)
            self._active = np.flatnonzero(nseg > 0)
            self._nseg = nseg[self._active]
            self.num_samples = int(self._nseg.sum()) if lane_span else len(self._active)
        elif packing:
            self.num_samples = int(num_segments(len(data.tokens), seq_len, overlap))
        else:
            self._starts, self._lengths = segment_table(data, seq_len, overlap)
            self.num_samples = len(self._starts)
        if self.num_samples == 0:
            raise DataError(f"{data.name or 'the split'} has no tokens to train on: check the corpus split")
        self._order = _Order(self.num_samples, seed, shuffle)
        self._position = 0  # samples of the global stream consumed (segment modes)
        self._steps = 0
        if contiguous:
            self._lanes = _Lanes(self._nseg, self._order, self.global_batch, _finite, lane_span)

    def __iter__(self) -> SegmentLoader:
        return self

    @property
    def epoch(self) -> int:
        """Epoch of the next sample (for lanes: of the next document to start)."""
        pos = self._lanes.next_q if self.contiguous else self._position
        return pos // self.num_samples

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per pass over the samples (an estimate for lanes: documents differ in length; with
        ``lane_span`` a pass starts one run at every segment, so it walks most segments several times)."""
        total = int(self._nseg.sum()) if self.contiguous else self.num_samples
        if self.lane_span:
            lanes = self._lanes
            total = int(np.minimum(self.lane_span, self._nseg[lanes.seg_doc] - lanes.seg_k).sum())
        return max(1, math.ceil(total / self.global_batch))

    @property
    def padding_fraction(self) -> float:
        """Share of batch positions that are padding over one pass (the cost of not packing short docs)."""
        if self.contiguous:  # a document's segments hold its tokens plus the shared (overlap) ones
            m, n = np.diff(self.data.offsets)[self._active], self._nseg
            used, total = int(m.sum() + ((n - 1) * self.overlap).sum()), int(n.sum())
        else:
            used, total = int(self._segments(np.arange(self.num_samples))[1].sum()), self.num_samples
        return 1.0 - used / (total * self.seq_len)

    def _segments(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.packing:
            starts = idx * (self.seq_len - self.overlap)
            return starts, np.minimum(self.seq_len, len(self.data.tokens) - starts)
        return self._starts[idx], self._lengths[idx]

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.contiguous:
            idx = self._order.take(self._position + self.rank * self.batch_size, self.batch_size)
            self._position += self.global_batch
            self._steps += 1
            return gather(self.data.tokens, *self._segments(idx), self.seq_len, self.data.eos_id)
        rows = self._lanes.step()
        if rows is None:
            raise StopIteration
        self._steps += 1
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        offs, stride = self.data.offsets, self.seq_len - self.overlap
        starts = np.array([offs[self._active[d]] + k * stride if d >= 0 else 0 for d, k, _ in mine],
                          dtype=np.int64)
        ends = np.array([offs[self._active[d] + 1] if d >= 0 else 0 for d, _, _ in mine], dtype=np.int64)
        batch = gather(self.data.tokens, starts, np.clip(np.minimum(self.seq_len, ends - starts), 0, None),
                       self.seq_len, self.data.eos_id)
        batch["reset"] = torch.tensor([first for _, _, first in mine], dtype=torch.bool)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable ints describing the position (and the settings it is only valid for)."""
        state = {"version": STATE_VERSION, "mode": self.mode, "seed": self.seed, "seq_len": self.seq_len,
                 "overlap": self.overlap, "shuffle": int(self.shuffle), "num_samples": self.num_samples,
                 "steps": self._steps}
        if self.contiguous:
            state.update(lanes=self.global_batch, next_q=self._lanes.next_q, lane_q=list(self._lanes.lane_q),
                         lane_k=list(self._lanes.lane_k))
        if self.lane_span:  # only then: states saved before lane_span existed keep their exact form
            state["lane_span"] = self.lane_span
        else:
            state["position"] = self._position
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; DataError if it was saved by a loader over other data or settings."""
        mine = self.state_dict()
        keys = ["version", "mode", "seed", "seq_len", "overlap", "shuffle", "num_samples"]
        keys += ["lanes"] if self.contiguous else []
        keys += ["lane_span"] if self.lane_span else []
        bad = [f"{k}={state.get(k)!r} (this loader: {mine[k]!r})" for k in keys if state.get(k) != mine[k]]
        if bad:
            raise DataError(f"cannot resume: the saved loader state differs in {', '.join(bad)}; resume with "
                            "the same corpus, tokenizer, seq_len, seed and (for lanes) global batch size and "
                            "lane span")
        self._steps = int(state["steps"])
        if self.contiguous:
            self._lanes.next_q = int(state["next_q"])
            self._lanes.lane_q = [int(q) for q in state["lane_q"]]
            self._lanes.lane_k = [int(k) for k in state["lane_k"]]
        else:
            self._position = int(state["position"])


def eval_batches(data: TokenizedSplit, seq_len: int, batch_size: int, *, contiguous: bool = False,
                 rank: int = 0, world_size: int = 1, overlap: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over every document of ``data`` in order, every token a target exactly once (``overlap=1``).

    Documents shorter than ``seq_len`` are one padded segment, longer ones are cut with stride
    ``seq_len - 1``.  Every rank gets the same number of batches of ``batch_size`` rows (the tail is filled
    with fully masked rows), so sharded evaluation can all-reduce per step.  ``contiguous=True`` walks
    documents in lanes with ``reset`` flags, for stateful models.  Bits per byte: see :func:`bits_per_byte`.
    """
    if contiguous:
        yield from SegmentLoader(data, seq_len, batch_size, rank=rank, world_size=world_size, contiguous=True,
                                 shuffle=False, overlap=overlap, _finite=True)
        return
    loader = SegmentLoader(data, seq_len, batch_size, rank=rank, world_size=world_size, shuffle=False,
                           overlap=overlap)
    n, g = loader.num_samples, loader.global_batch
    for first in range(0, n, g):
        idx = np.arange(first + rank * batch_size, first + (rank + 1) * batch_size)
        starts, lengths = loader._segments(np.minimum(idx, n - 1))
        yield gather(data.tokens, starts, np.where(idx < n, lengths, 0), seq_len, data.eos_id)


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """Bits per byte = summed token NLL (nats) / (ln 2 * raw bytes): comparable across tokenizers."""
    return float(total_nll_nats) / (math.log(2) * int(total_bytes))
