"""Continuous batching over the speculative loop: many sequences, one forward pass.

Each sequence keeps what ``decode.speculative_loop`` keeps for one: its drafter (the
streams' candidates, a context branch), its acceptor (greedy, or exact sampling with its
own seeded generator), its adaptive pause, its statistics and its stop conditions.  A
step drafts for every active sequence, pads the drafts to a common row count (padding
rows see only themselves and are never committed), runs ONE pass over the batch, reads
every sequence's targets in one host synchronisation, accepts per sequence and commits
the accepted rows of each.

``BatchKVCache`` holds the keys/values of all sequences with a common write pointer:
a pass writes every sequence's rows at the same slots; after acceptance each sequence
keeps its accepted rows (gathered to the front of the pass's slots) and the remaining
slots become holes, masked out of that sequence's attention.  A sequence's RoPE
positions count its valid tokens only, so holes change nothing in its arithmetic.  When
the holes pile up, the cache is compacted (each sequence's valid slots right-aligned).

A new sequence is prefilled alone, in chunks (one per ``BatchDecoder.step``, so that
the running sequences are not stalled for long), with the single-sequence prefill of
``decode.py``; its cache then joins the batch, right-aligned to the write pointer.

Tree size for the batch (``batch_tree_size``): rows added to a pass are nearly free
for one sequence and not for eight.  The cost of a pass is read from the calibrated
cost of a pass of as many tree nodes (``tree_costs``; a batch of B drafts of L nodes
costs what one tree of B * L nodes costs: the same rows through the same matmuls).
Each step the common draft size L (1: plain decoding) maximises the expected tokens of
all sequences per unit of cost, the expected tokens of a draft estimated from the
streams' probabilities of its candidates; each sequence then verifies the L most
probable nodes of its tree.  The probabilities are read from the streams' own
distributions, never from which tokens were drawn, so sampled sequences keep their
exact law.

The streams for the batch (``BatchDecoder.stream_pause``): a pass that carries the
stream rows of B sequences costs ``batch_stream_costs[B-1]`` passes without them
(calibrated), far more than for one sequence.  The batch observes the tokens per
sequence per unit of cost of its passes with streams; while that stays below one (what
a pass without streams gives), it runs the next passes without any stream rows (context
branches still draft) and probes the streams again after a pause, as the single loop's
``Pause`` does, every sequence's own pause left as it was.

Greedy output equals each prompt decoded alone (``decode.speculative_steps``) up to the
rounding of batched matmuls; pruning is not used in a batch (it would need one more
host synchronisation per step, and per sequence).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import STEP, TreeKVCache
from .decode import (
    DecodeStats,
    GreedyAcceptor,
    Pause,
    check_context,
    default_tree,
    fill,
    prefill,
    with_context_branch,
)
from .drafting import ROOT, ContextDrafter, Draft, StreamDrafter, monotone_costs
from .generate import GenerationResponse, _encode, _find_stop, _response, _stop_holdback
from .model import SpecStreamModel
from .sampled import SampledAcceptor, _choose_on_device, sampled_proposals
from .sampling import SamplingParams
from .tree import Tree, product_tree, subtree, tree_from_paths

COMPACT_SLACK = 64  # holes tolerated past the longest sequence before compacting
PREFILL_CHUNK = 512  # as decode.prefill: the same chunks, the same arithmetic
PREFILL_GROUP_ROWS = 4  # a group prefill pass holds up to this many chunks of rows
PREFILL_PADDING = 1.25  # and at most this many rows per prompt token (padding included)


class BatchKVCache:
    """Keys/values of several sequences (rows of the batch axis) with one write pointer.

    ``valid[b, s]``: slot s holds a committed token of sequence b; ``lengths[b]``: its
    number of tokens (its next RoPE position).  The model calls ``write`` and
    ``attention_mask`` (see ``model.attention_mask``); the batch decoder calls
    ``commit``, ``add`` and ``remove``."""

    stream_slots = True  # write() takes the stream rows' keys/values (model.run_layer)

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.ptr = 0
        self.valid = np.zeros((0, 0), dtype=bool)
        self.lengths = np.zeros(0, dtype=np.int64)
        self.pending = 0
        self._cached_mask: tuple[int, mx.array] | None = None

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def offset(self) -> int:
        return self.ptr

    @property
    def holes(self) -> int:
        return int(self.size * self.ptr - self.lengths.sum())

    # -- used by the model -------------------------------------------------------
    def write(self, layer: int, keys: mx.array, values: mx.array,
              stream_keys: mx.array | None = None, stream_values: mx.array | None = None
              ) -> tuple[mx.array, mx.array]:
        """Store the pass's keys/values (B, Hkv, n, D) at the write pointer; return every
        slot up to them (the mask says which each sequence sees).  Stream rows' keys and
        values go to the spare slots after them and are returned after them, never
        committed (as ``TreeKVCache.write``: no copy of the cache per MSA layer)."""
        n = keys.shape[2]
        end = self.ptr + n
        stop = end + (stream_keys.shape[2] if stream_keys is not None else 0)
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or stop > buf_k.shape[2]:
            cap = -(-stop // STEP) * STEP
            buf_k, buf_v = (_resized(b, new, cap, self.ptr) for b, new in
                            ((buf_k, keys), (buf_v, values)))
        buf_k[..., self.ptr : end, :] = keys
        buf_v[..., self.ptr : end, :] = values
        if stop > end:
            buf_k[..., end:stop, :] = stream_keys
            buf_v[..., end:stop, :] = stream_values
        self.keys[layer], self.values[layer] = buf_k, buf_v
        self.pending = n
        return buf_k[..., :stop, :], buf_v[..., :stop, :]

    def attention_mask(self, new_mask: mx.array, stream_rows: mx.array | None,
                       num_streams: int) -> mx.array:
        """(B, 1, rows, slots) boolean mask: ``build_msa_mask`` per sequence, with that
        sequence's valid slots as its cached columns.  new_mask: (B, L, L)."""
        B, L = new_mask.shape[0], new_mask.shape[1]
        if self._cached_mask is None or self._cached_mask[0] != self.ptr:
            self._cached_mask = (self.ptr, mx.array(self.valid[:, : self.ptr]))
        cached = self._cached_mask[1][:, None, :]
        if stream_rows is None:
            main = mx.concatenate([mx.broadcast_to(cached, (B, L, self.ptr)), new_mask], axis=2)
            return main[:, None]
        S = stream_rows.shape[0]
        Ls = S * num_streams
        sid = mx.arange(Ls) // num_streams
        jid = mx.arange(Ls) % num_streams
        stream_stream = (sid[:, None] == sid[None, :]) & (jid[None, :] <= jid[:, None])
        main = mx.concatenate([mx.broadcast_to(cached, (B, L, self.ptr)), new_mask,
                               mx.zeros((B, L, Ls), dtype=mx.bool_)], axis=2)
        streams = mx.concatenate([
            mx.broadcast_to(cached, (B, Ls, self.ptr)),
            mx.repeat(new_mask[:, stream_rows], num_streams, axis=1),
            mx.broadcast_to(stream_stream[None], (B, Ls, Ls)),
        ], axis=2)
        return mx.concatenate([main, streams], axis=1)[:, None]

    # -- used by the batch decoder -----------------------------------------------
    def commit(self, rows: Sequence[Sequence[int]]) -> None:
        """Keep, for each sequence, the given rows of the last pass (in order); the
        write pointer moves past the longest; the other slots become holes."""
        if len(rows) != self.size:
            raise ValueError(f"need rows for {self.size} sequences, got {len(rows)}")
        n = self.pending
        if any(i < 0 or i >= n for r in rows for i in r):
            raise IndexError(f"row out of range of the {n} pending rows")
        kept = max((len(r) for r in rows), default=0)
        if any(list(r) != list(range(len(r))) for r in rows):
            idx = np.zeros((self.size, kept), dtype=np.int32)
            for b, r in enumerate(rows):
                if r:
                    idx[b, : len(r)] = r
                    idx[b, len(r) :] = r[-1]
            take = mx.array(idx)[:, None, :, None]
            for bufs in (self.keys, self.values):
                for layer, buf in enumerate(bufs):
                    part = mx.take_along_axis(buf[..., self.ptr : self.ptr + n, :], take, axis=2)
                    buf[..., self.ptr : self.ptr + kept, :] = part
                    bufs[layer] = buf
        self._ensure_valid(self.ptr + kept)
        for b, r in enumerate(rows):
            self.valid[b, self.ptr : self.ptr + kept] = False
            self.valid[b, self.ptr : self.ptr + len(r)] = True
            self.lengths[b] += len(r)
        self.ptr += kept
        self.pending = 0
        if self.size and self.ptr - int(self.lengths.max()) > COMPACT_SLACK:
            self.compact()

    def compact(self) -> None:
        """Right-align every sequence's valid slots; the pointer becomes the longest."""
        width = int(self.lengths.max()) if self.size else 0
        idx = np.zeros((self.size, width), dtype=np.int32)
        valid = np.zeros((self.size, width), dtype=bool)
        for b in range(self.size):
            slots = np.nonzero(self.valid[b, : self.ptr])[0]
            idx[b, width - slots.shape[0] :] = slots
            valid[b, width - slots.shape[0] :] = True
        take = mx.array(idx)[:, None, :, None]
        cap = max(-(-width // STEP) * STEP, STEP)
        for bufs in (self.keys, self.values):
            for layer, buf in enumerate(bufs):
                part = mx.take_along_axis(buf[..., : self.ptr, :], take, axis=2)
                bufs[layer] = _resized(None, part, cap, 0, part)
        self.valid, self.ptr = valid, width
        self._cached_mask = None

    def add(self, cache: TreeKVCache) -> int:
        """Append the committed keys/values of a single-sequence cache as a new
        sequence, right-aligned to the write pointer; returns its batch row."""
        P = cache.offset
        return self._append(cache.keys, cache.values, np.ones((1, P), dtype=bool),
                            np.array([P]))[0]

    @classmethod
    def empty(cls, num_layers: int, size: int) -> BatchKVCache:
        """A cache of ``size`` sequences holding no tokens yet (a group prefill's)."""
        cache = cls(num_layers)
        cache.valid = np.zeros((size, 0), dtype=bool)
        cache.lengths = np.zeros(size, dtype=np.int64)
        return cache

    def merge(self, other: BatchKVCache) -> list[int]:
        """Append every sequence of ``other`` (its committed slots, right-aligned to the
        write pointer as ``add`` does); returns their batch rows."""
        other.compact()
        return self._append(other.keys, other.values, other.valid[:, : other.ptr],
                            other.lengths)

    def _append(self, keys: list, values: list, valid: np.ndarray, lengths: np.ndarray
                ) -> list[int]:
        """Append sequences whose slots are the first W = valid.shape[1] of ``keys`` /
        ``values`` (per layer, (n, H, >= W, D)), right-aligned to the write pointer (which
        moves right when W is past it)."""
        W = valid.shape[1]
        shift = max(0, W - self.ptr)
        ptr = self.ptr + shift
        cap = max(-(-ptr // STEP) * STEP, STEP)
        for bufs, theirs in ((self.keys, keys), (self.values, values)):
            for layer in range(self.num_layers):
                new = mx.pad(theirs[layer][..., :W, :],
                             [(0, 0), (0, 0), (ptr - W, cap - ptr), (0, 0)])
                old = bufs[layer]
                if old is not None and self.size:
                    old = mx.pad(old[..., : self.ptr, :],
                                 [(0, 0), (0, 0), (shift, cap - ptr), (0, 0)])
                    new = mx.concatenate([old, new], axis=0)
                bufs[layer] = new
        first, n = self.size, valid.shape[0]
        merged = np.zeros((first + n, ptr), dtype=bool)
        merged[:first, shift:] = self.valid[:, : self.ptr]
        merged[first:, ptr - W :] = valid
        self.valid, self.ptr = merged, ptr
        self.lengths = np.concatenate([self.lengths, np.asarray(lengths, dtype=np.int64)])
        self._cached_mask = None
        return list(range(first, first + n))

    def remove(self, rows: Sequence[int]) -> None:
        """Drop the given sequences (batch rows)."""
        keep = [b for b in range(self.size) if b not in set(rows)]
        if not keep:
            self.__init__(self.num_layers)  # type: ignore[misc]
            return
        if len(keep) == self.size:
            return
        idx = mx.array(keep, dtype=mx.int32)
        for bufs in (self.keys, self.values):
            for layer, buf in enumerate(bufs):
                bufs[layer] = buf[idx]
        self.valid, self.lengths = self.valid[keep], self.lengths[keep]
        self._cached_mask = None
        if self.ptr - int(self.lengths.max()) > COMPACT_SLACK:
            self.compact()

    def _ensure_valid(self, end: int) -> None:
        if self.valid.shape[1] < end:
            pad = np.zeros((self.size, end - self.valid.shape[1]), dtype=bool)
            self.valid = np.concatenate([self.valid, pad], axis=1)

    def state_arrays(self) -> list[mx.array]:
        return [b for b in self.keys + self.values if b is not None]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.state_arrays())


def _resized(buf: mx.array | None, like: mx.array, cap: int, keep: int,
             content: mx.array | None = None) -> mx.array:
    """A (B, H, cap, D) buffer in ``like``'s dtype holding ``buf[..., :keep, :]`` (or
    ``content``) at its start."""
    B, H, _, D = like.shape
    out = mx.zeros((B, H, cap, D), like.dtype)
    src = content if content is not None else buf
    if src is not None:
        n = src.shape[2] if content is not None else keep
        if n:
            out[..., :n, :] = src[..., :n, :]
    return out


# ------------------------------------------------------------------ tree size


def node_probabilities(tree: Tree, probs: np.ndarray) -> np.ndarray:
    """Estimated probability that each node is accepted: the product of the streams'
    probabilities of the candidate ranks on its path.  probs: (depths, kmax), row d-1
    the sorted top probabilities of stream d."""
    out = np.ones(tree.size)
    for i in range(1, tree.size):
        d, r = int(tree.depth[i]), int(tree.rank[i])
        p = probs[d - 1, r] if d - 1 < probs.shape[0] and r < probs.shape[1] else 0.0
        out[i] = out[int(tree.parent[i])] * p
    return out


def batch_tree_size(node_probs: Sequence[np.ndarray], pass_cost: Callable[[int], float],
                    others: int = 0, min_rows: int = 1) -> int:
    """The common draft size L (nodes per sequence, 1: plain decoding) maximising the
    batch's expected tokens per unit of pass cost.  node_probs: per sized sequence, its
    nodes' acceptance estimates (root first); ``others`` sequences are not sized (a
    context branch, the pause): one token each is counted for them, and the pass has
    at least ``min_rows`` rows per sequence.  pass_cost(n): the cost of a pass of n tree
    nodes; a batch of B drafts padded to L nodes costs pass_cost(B * L)."""
    B = len(node_probs) + others
    if not node_probs:
        return 1
    best_value, best = 0.0, 1
    sorted_probs = [np.sort(p[1:])[::-1] for p in node_probs]
    for L in range(1, max(p.shape[0] for p in node_probs) + 1):
        expect = others + sum(1.0 + float(p[: L - 1].sum()) for p in sorted_probs)
        value = expect / pass_cost(B * max(L, min_rows))
        if value > best_value * (1 + 1e-9):
            best_value, best = value, L
    return best


def kept_nodes(tree: Tree, probs: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` most probable nodes (a subtree: a parent is never less probable than
    its child; ties keep the earlier node, so siblings stay a prefix of their ranks)."""
    if size >= tree.size:
        return np.arange(tree.size)
    order = sorted(range(1, tree.size), key=lambda i: (-probs[i], i))
    return np.array(sorted([0] + order[: size - 1]))


# ---------------------------------------------------------------- the sequences


@dataclass
class SequenceState:
    """One sequence of the batch: what ``speculative_loop`` keeps for one prompt."""

    uid: int
    prompt: mx.array
    max_tokens: int
    limit: int
    drafter: StreamDrafter | ContextDrafter
    acceptor: GreedyAcceptor
    pause: Pause
    stats: DecodeStats = field(default_factory=DecodeStats)
    context: list[int] = field(default_factory=list)
    produced: int = 0
    finish: str | None = None
    prefill_cache: TreeKVCache | None = None
    prefilled: int = 0
    stream_logits: mx.array | None = None  # the last observed streams (for sizing)
    subtrees: dict = field(default_factory=dict)
    started: float = 0.0
    prompt_time: float = 0.0
    branch_continued: int = 0  # context-branch tokens accepted
    branch_stopped: int = 0  # context branches rejected before their end
    paused: bool = False  # this pass: no stream nodes (the pause, or stale streams)
    wants_streams: bool = False  # this pass: the streams must run for this sequence


@dataclass
class BatchEvent:
    """What one step produced for one sequence: its new tokens and, when it ended,
    why ("stop": an end-of-sequence token, not included; "length": max_tokens or the
    context).  A cancelled sequence produces no more events."""

    uid: int
    tokens: list[int]
    finish: str | None = None
    state: SequenceState | None = None


class PlainSampledAcceptor(GreedyAcceptor):
    """One token per pass, drawn on the device as ``sampled_autoregressive_steps``
    draws it (same generator, same order: the same tokens for the same seed)."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator) -> None:
        self.params, self.rng = params, rng

    def targets(self, main: mx.array, tokens: mx.array, tree: Tree,
                context: list[int]) -> mx.array:
        c = self.params.history_size
        hist = mx.array(context[-c:], dtype=mx.int32) if c else None
        return _choose_on_device(main[0], hist, self.params, self.rng).reshape(1)

    def decide(self, tree: Tree, tokens: mx.array, targets: mx.array,
               draft: Draft | None) -> mx.array:
        return mx.concatenate([mx.zeros((1,), mx.int32), targets[:1].astype(mx.int32)])

    def accept(self, tree: Tree, decided: np.ndarray, draft: Draft | None
               ) -> tuple[list[int], int]:
        return [0], int(decided[1])


def make_drafter(model: SpecStreamModel, params: SamplingParams, speculative: bool = True,
                 tree: Tree | None = None, dynamic: bool | None = None,
                 lookup_branches: int | None = None, rng: np.random.Generator | None = None,
                 lookup_skip_streams: int | None = None, lookup_corpus: bool | None = None
                 ) -> tuple[StreamDrafter | ContextDrafter, GreedyAcceptor]:
    """The drafter and acceptor ``generate.stream_generate`` would use for one request
    (greedy: streams, dynamic chains, context branch; sampled: the streams' exact
    proposals; not speculative: the root alone)."""
    cfg = model.cfg
    if not speculative:
        tree = ROOT
    elif tree is None:
        tree = default_tree(cfg)
    if tree.max_depth > cfg.num_streams:
        raise ValueError(f"tree depth {tree.max_depth} exceeds {cfg.num_streams} streams")
    if not params.plain_greedy:
        rng = rng if rng is not None else params.make_rng()
        sampled = StreamDrafter(tree, sampled_proposals(params, rng))
        if speculative:
            sampled = with_context_branch(model, sampled, lookup_branches,
                                          lookup_skip_streams, lookup_corpus)
        if sampled.max_depth == 0:  # nothing to draft: one token per pass
            return sampled, PlainSampledAcceptor(params, rng)
        return sampled, SampledAcceptor(params, rng)
    dynamic = cfg.dynamic_tree if dynamic is None else dynamic
    chains = None
    if speculative and dynamic:
        chains = [tree_from_paths([[0] * i for i in range(1, d + 1)])
                  for d in range(cfg.num_streams + 1)]
    drafter: StreamDrafter | ContextDrafter = StreamDrafter(
        tree, chains=chains, pass_cost=monotone_costs(cfg.tree_costs))
    if speculative:
        drafter = with_context_branch(model, drafter, lookup_branches, lookup_skip_streams,
                                      lookup_corpus)
    return drafter, GreedyAcceptor()


class BatchDecoder:
    """Continuous batching: ``add`` sequences at any time, ``step`` until none is left.

    Each ``step`` runs at most one prefill chunk of the oldest waiting sequence (a
    sequence joins the batch after its last chunk and yields its first token) and one
    batched pass over the running sequences.  ``size_trees``: size each step's drafts
    for the batch (``batch_tree_size``); False drafts each sequence's whole tree."""

    def __init__(self, model: SpecStreamModel, *, eos_token_ids: Sequence[int] = (),
                 size_trees: bool = True, prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.model = model
        self.eos = set(int(t) for t in eos_token_ids)
        self.size_trees = size_trees
        self.prefill_chunk = prefill_chunk
        self.cache = BatchKVCache(model.num_layers)
        self.running: list[SequenceState] = []  # in cache row order
        self.waiting: list[SequenceState] = []
        self.pass_cost = monotone_costs(model.cfg.tree_costs)
        cfg = model.cfg
        # observes tokens per sequence per unit of cost: a pass without streams gives 1
        self.stream_pause = Pause(1.0 if cfg.batch_stream_costs or cfg.draft_cost_ratio else 0.0)
        self.batch_paused = False  # this pass: no sequence drafts from or runs the streams
        self.passes = 0  # batched passes run
        self.paused_passes = 0  # batched passes without streams for the batch's sake
        self.rows = 0  # tree rows (padding included) over those passes
        self._next_uid = 0

    @property
    def active(self) -> int:
        return len(self.running) + len(self.waiting)

    def stream_cost(self, batch: int) -> float:
        """Cost of a pass of ``batch`` sequences with their stream rows over the same pass
        without them (``batch_stream_costs``; uncalibrated: ``draft_cost_ratio``)."""
        costs = self.model.cfg.batch_stream_costs
        if costs:
            return costs[min(batch, len(costs)) - 1]
        return max(self.model.cfg.draft_cost_ratio, 1.0)

    def add(self, prompt: Sequence[int] | mx.array, max_tokens: int = 256,
            params: SamplingParams | None = None, *, speculative: bool = True,
            tree: Tree | None = None, dynamic_tree: bool | None = None,
            lookup_branches: int | None = None, lookup_skip_streams: int | None = None,
            lookup_corpus: bool | None = None) -> int:
        """Queue a prompt (token ids); returns the sequence's id.  Raises ValueError for
        an empty prompt or one that does not fit in the context."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        params = params or SamplingParams()
        ids = (prompt if isinstance(prompt, mx.array) else mx.array(list(prompt)))
        ids = ids.reshape(-1).astype(mx.int32)
        limit = check_context(self.model, ids.shape[0], max_tokens)
        drafter, acceptor = make_drafter(self.model, params, speculative, tree, dynamic_tree,
                                         lookup_branches,
                                         lookup_skip_streams=lookup_skip_streams,
                                         lookup_corpus=lookup_corpus)
        uses = drafter.uses_streams
        seq = SequenceState(
            uid=self._next_uid, prompt=ids, max_tokens=max_tokens, limit=limit,
            drafter=drafter, acceptor=acceptor,
            pause=Pause(self.model.cfg.draft_cost_ratio if uses else 0.0),
            context=[int(t) for t in np.array(ids)], started=time.perf_counter(),
        )
        seq.stats.accepted_per_depth = [0] * drafter.max_depth
        self._next_uid += 1
        self.waiting.append(seq)
        return seq.uid

    def cancel(self, uid: int) -> bool:
        """Drop a sequence (waiting or running); False when it is not here."""
        for i, s in enumerate(self.waiting):
            if s.uid == uid:
                del self.waiting[i]
                return True
        for b, s in enumerate(self.running):
            if s.uid == uid:
                del self.running[b]
                self.cache.remove([b])
                return True
        return False

    def sequence(self, uid: int) -> SequenceState | None:
        for s in self.running + self.waiting:
            if s.uid == uid:
                return s
        return None

    # -- one step ----------------------------------------------------------------
    def step(self) -> list[BatchEvent]:
        events: list[BatchEvent] = []
        if self.running:
            events += self._decode()
        if self.waiting:
            group = self._prefill_group()
            if len(group) > 1:
                events += self._prefill_together(group)
            else:
                ev = self._prefill_chunk(self.waiting[0])
                if ev is not None:
                    events.append(ev)
        return events

    def _prefill_group(self) -> list[SequenceState]:
        """The waiting sequences, oldest first, that one batched prefill pass takes: whole
        prompts of at most one chunk, up to ``prefill_chunk * PREFILL_GROUP_ROWS`` rows
        with padding (longer prompts are prefilled alone, chunk by chunk)."""
        group: list[SequenceState] = []
        longest = total = 0
        for seq in self.waiting:
            P = seq.prompt.shape[0]
            if seq.prefilled or P > self.prefill_chunk:
                break
            rows = (len(group) + 1) * max(longest, P)
            if rows > self.prefill_chunk * PREFILL_GROUP_ROWS or rows > PREFILL_PADDING * (
                    total + P):
                break
            group.append(seq)
            longest, total = max(longest, P), total + P
        return group

    def _prefill_together(self, group: list[SequenceState]) -> list[BatchEvent]:
        """Prefill whole prompts in one pass (left-padded: every prompt's last token is
        the last row, whose streams draft), then each sequence's first token; the
        sequences join the batch."""
        model = self.model
        k = len(group)
        lens = [s.prompt.shape[0] for s in group]
        P = max(lens)
        tokens = np.zeros((k, P), dtype=np.int32)
        positions = np.zeros((k, P), dtype=np.int32)
        mask = np.zeros((k, P, P), dtype=bool)
        causal = np.tril(np.ones((P, P), dtype=bool))
        for b, (seq, n) in enumerate(zip(group, lens, strict=True)):
            off = P - n
            tokens[b, off:] = np.array(seq.prompt)
            positions[b, off:] = np.arange(n)
            mask[b, off:, off:] = causal[:n, :n]
            mask[b, np.arange(off), np.arange(off)] = True  # padding sees itself only
        streams = any(s.drafter.uses_streams for s in group)
        cache = BatchKVCache.empty(model.num_layers, k)
        new_mask = mx.array(mask)
        pos = mx.array(positions)
        h = model.lower(mx.array(tokens), pos, new_mask, cache)
        x = model.upper_hidden(h, pos, new_mask, cache,
                               stream_rows=mx.array([P - 1]) if streams else None,
                               with_streams=streams)
        main = model.head(x[:, P - 1])
        drafting = model.draft_logits(x[:, P:]) if streams else None
        cache.commit([list(range(P - n, P)) for n in lens])
        mx.eval(cache.state_arrays(), main, *([drafting] if streams else []))
        events = [self._first_token(seq, main[b], drafting[b] if streams else None)
                  for b, seq in enumerate(group)]
        keep = [b for b, seq in enumerate(group) if seq.finish is None]
        if keep:
            if len(keep) < k:
                cache.remove([b for b in range(k) if b not in keep])
            self.cache.merge(cache)
            self.running.extend(group[b] for b in keep)
        return events

    def _first_token(self, seq: SequenceState, main: mx.array,
                     drafting: mx.array | None) -> BatchEvent:
        """After ``seq``'s prefill: its first token (main: the last prompt row's logits),
        its streams observed (drafting: their logits), its event; it leaves the queue."""
        first = seq.acceptor.first(main, seq.context)
        seq.context.append(first)
        if seq.drafter.uses_streams:
            seq.stream_logits = drafting[: seq.drafter.rows]
            seq.drafter.observe(seq.stream_logits, seq.context)
        self.waiting.remove(seq)
        seq.prompt_time = time.perf_counter() - seq.started
        seq.produced = 1
        ev = BatchEvent(seq.uid, [first], state=seq)
        if first in self.eos:
            ev.tokens, ev.finish = [], "stop"
        elif seq.max_tokens <= 1:
            ev.finish = "length"
        seq.finish = ev.finish
        return ev

    def _prefill_chunk(self, seq: SequenceState) -> BatchEvent | None:
        """One chunk of ``seq``'s prompt; after the last, its first token and its join."""
        model, chunk = self.model, self.prefill_chunk
        if seq.prefill_cache is None:
            seq.prefill_cache = model.make_cache()
        P = seq.prompt.shape[0]
        start = (P - 1) // chunk * chunk  # decode.prefill's chunks
        if seq.prefilled < start:
            end = seq.prefilled + chunk
            fill(model, seq.prompt[seq.prefilled : end], seq.prefill_cache, chunk)
            seq.prefilled = end
            return None
        streams = seq.drafter.uses_streams
        logits = prefill(model, seq.prompt[start:], seq.prefill_cache, streams, chunk)
        ev = self._first_token(seq, logits[0], logits[1:] if streams else None)
        if ev.finish is None:
            mx.eval(seq.prefill_cache.state_arrays())
            self.cache.add(seq.prefill_cache)
            self.running.append(seq)
        seq.prefill_cache = None
        return ev

    def _drafts(self) -> list[Draft | None]:
        """Each running sequence's draft (None: its context is full), sized for the batch.
        Sets each sequence's ``paused`` and ``wants_streams`` for this pass."""
        drafts: list[Draft | None] = []
        batched = self.size_trees and len(self.running) > 1
        self.batch_paused = batched and self.stream_pause.active
        probe = self.stream_pause.take() if self.batch_paused else False
        for b, seq in enumerate(self.running):
            pausing = seq.pause.active
            if self.batch_paused:  # its own pause waits; the batch's last plain pass probes
                run = probe and not pausing and seq.drafter.uses_streams
            else:
                run = seq.pause.take() if pausing else seq.drafter.uses_streams
            seq.paused = pausing or self.batch_paused or seq.drafter.stale
            room = seq.limit - int(self.cache.lengths[b])
            draft = seq.drafter.propose(seq.context, room, seq.paused)
            seq.wants_streams = run and not (draft is not None and draft.skip_streams)
            drafts.append(draft)
        sized = [b for b, d in enumerate(drafts) if d is not None and d.tree.size > 1]
        if not (batched and sized):
            return drafts
        with_streams = [b for b in sized if drafts[b].streams > 1
                        and self.running[b].stream_logits is not None]
        columns = self.model.draft_vocab_ids
        conf = {b: _stream_confidence(self.running[b].stream_logits, drafts[b].tree.kmax,
                                      columns) for b in with_streams}
        mx.eval(*conf.values())
        probs = [self._node_probs(self.running[b], drafts[b],
                                  np.array(conf[b]) if b in conf else None) for b in sized]
        others = len(self.running) - len(sized)
        size = batch_tree_size(probs, self.pass_cost, others=others)
        for b, p in zip(sized, probs, strict=True):
            drafts[b] = self._truncate(self.running[b], drafts[b], p, size)
        return drafts

    @staticmethod
    def _node_probs(seq: SequenceState, draft: Draft, conf: np.ndarray | None) -> np.ndarray:
        """Acceptance estimates of a draft's nodes: stream nodes from the streams'
        probabilities (``node_probabilities``; a flat 0.5 per depth before the streams
        were read), context-branch nodes from the sequence's record of how often a
        branch token is followed by an accepted one."""
        tree = draft.tree
        if conf is None:
            conf = np.full((max(tree.max_depth, 1), tree.kmax), 0.5)
        probs = node_probabilities(tree, conf)
        rate = (seq.branch_continued + 1) / (seq.branch_continued + seq.branch_stopped + 2)
        for i in range(draft.streams, tree.size):  # parents come first
            probs[i] = probs[int(tree.parent[i])] * rate
        return probs

    def _truncate(self, seq: SequenceState, draft: Draft, probs: np.ndarray,
                  size: int) -> Draft:
        """The draft restricted to its ``size`` most probable nodes."""
        if size >= draft.tree.size:
            return draft
        keep = kept_nodes(draft.tree, probs, size)
        key = (id(draft.tree), tuple(keep.tolist()))
        if key not in seq.subtrees:
            t = subtree(draft.tree, keep)
            seq.subtrees[key] = (t, mx.array(keep.astype(np.int32)),
                                 mx.array(t.depth.astype(np.int32)),
                                 mx.array(t.mask) if t.size > 1 else None,
                                 mx.array(np.maximum(t.parent, 0).astype(np.int32)))
        t, idx, depth, mask, parent = seq.subtrees[key]
        kept = keep.tolist()
        on_branch = set(draft.branch)
        streamed = None if draft.stream_nodes is None else set(draft.stream_nodes)
        return Draft(t, draft.tokens[idx], depth, mask, parent,
                     streams=sum(i < draft.streams for i in kept),
                     branch=[j for j, i in enumerate(kept) if i in on_branch],
                     q=draft.q, cands=draft.cands,
                     stream_nodes=None if streamed is None else
                     [j for j, i in enumerate(kept) if i in streamed])

    def _decode(self) -> list[BatchEvent]:
        model, cache = self.model, self.cache
        drafts = self._drafts()
        full = [b for b, d in enumerate(drafts) if d is None]
        events = [BatchEvent(self.running[b].uid, [], "length", self.running[b]) for b in full]
        if full:
            self._retire(full)
            drafts = [d for d in drafts if d is not None]
            if not self.running:
                return events
        B = len(self.running)
        L = max(d.tree.size for d in drafts)
        mask = np.zeros((B, L, L), dtype=bool)
        depth = np.zeros((B, L), dtype=np.int64)
        tokens = []
        for b, d in enumerate(drafts):
            n = d.tree.size
            mask[b, :n, :n] = d.tree.mask
            pad = np.arange(n, L)
            mask[b, pad, pad] = True  # padding rows see themselves only
            depth[b, :n] = d.tree.depth
            tokens.append(mx.pad(d.tokens, (0, L - n)) if n < L else d.tokens)
        positions = mx.array((cache.lengths[:, None] + depth).astype(np.int32))
        tok = mx.stack(tokens)
        new_mask = mx.array(mask)
        with_streams = any(seq.wants_streams for seq in self.running)
        h = model.lower(tok, positions, new_mask, cache)
        x = model.upper_hidden(h, positions, new_mask, cache, with_streams=with_streams)
        main = model.head(x[:, :L])
        targets = [seq.acceptor.targets(main[b, : d.tree.size], tok[b, : d.tree.size],
                                        d.tree, seq.context)
                   for b, (seq, d) in enumerate(zip(self.running, drafts, strict=True))]
        decided = [seq.acceptor.decide(d.tree, tok[b, : d.tree.size], targets[b], d)
                   for b, (seq, d) in enumerate(zip(self.running, drafts, strict=True))]
        extra = [a for d in drafts for a in (d.q, d.cands) if a is not None]
        mx.eval(decided, tok, x, *extra)
        tok_np = np.array(tok)
        paths, news = [], []
        for b, (seq, d) in enumerate(zip(self.running, drafts, strict=True)):
            n = d.tree.size
            path, nxt = seq.acceptor.accept(d.tree, np.array(decided[b]), d)
            paths.append(path)
            news.append([int(tok_np[b, i]) for i in path[1:]] + [nxt])
            if n > d.streams:  # a context branch (a chain): did it run to its end?
                taken = sum(i >= d.streams for i in path)
                seq.branch_continued += taken
                seq.branch_stopped += taken < n - d.streams
            # As speculative_loop: a paused pass without a context branch is a plain pass.
            seq.stats.record_tree_pass(0 if seq.paused and not d.branch else n, path,
                                       d.streams if d.tree.size > d.streams else 0)
            if not seq.paused:
                seq.pause.observe(len(path))
        if with_streams and B > 1 and self.size_trees and not self.batch_paused:
            cost = self.stream_cost(B) * self.pass_cost(B * L) / self.pass_cost(B)
            self.stream_pause.observe(sum(len(p) for p in paths) / B / cost)
        self.paused_passes += self.batch_paused
        cache.commit(paths)
        self.passes += 1
        self.rows += B * L
        stream_logits = self._stream_logits(x, L, paths, drafts)
        for b, seq in enumerate(self.running):
            seq.context.extend(news[b])
            if b in stream_logits:
                seq.stream_logits = stream_logits[b]
                seq.drafter.observe(seq.stream_logits, seq.context)
            elif seq.drafter.uses_streams:
                seq.drafter.skip()
            out: list[int] = []
            for t in news[b]:
                if seq.produced >= seq.max_tokens:
                    seq.finish = "length"
                    break
                if t in self.eos:
                    seq.stats.step_tokens += 1  # a pass produced it, as in decode.py's loops
                    seq.finish = "stop"
                    break
                seq.produced += 1
                seq.stats.step_tokens += 1
                out.append(t)
            if seq.finish is None and seq.produced >= seq.max_tokens:
                seq.finish = "length"
            events.append(BatchEvent(seq.uid, out, seq.finish, seq))
        self._retire([b for b, s in enumerate(self.running) if s.finish is not None])
        return events

    def _stream_logits(self, x: mx.array, L: int, paths: list[list[int]],
                       drafts: list[Draft]) -> dict[int, mx.array]:
        """The drafting logits of the streams of each sequence's last accepted node (for
        the sequences whose pass ran them), through one LM-head product for the batch.
        The batch runs the streams of every node; a node outside its draft's
        ``stream_nodes`` is treated as one without them, as decode.py's loop treats it."""
        g = self.model.cfg.num_streams
        bidx: list[int] = []
        ridx: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        for b, seq in enumerate(self.running):
            nodes = drafts[b].stream_nodes
            if seq.wants_streams and (nodes is None or paths[b][-1] in nodes):
                host = L + paths[b][-1] * g  # the streams of the last accepted node
                rows = seq.drafter.rows
                spans[b] = (len(bidx), len(bidx) + rows)
                bidx += [b] * rows
                ridx += range(host, host + rows)
        if not spans:
            return {}
        logits = self.model.draft_logits(x[mx.array(bidx), mx.array(ridx)])
        return {b: logits[i:j] for b, (i, j) in spans.items()}

    def _retire(self, rows: list[int]) -> None:
        if not rows:
            return
        self.cache.remove(rows)
        self.running = [s for b, s in enumerate(self.running) if b not in set(rows)]


def _stream_confidence(stream_logits: mx.array, kmax: int,
                       columns: mx.array | None = None) -> mx.array:
    """(rows, kmax) sorted top probabilities of each stream (float32 for the host).
    columns: the draft vocabulary's ids (every other logit is -inf: no probability)."""
    sl = stream_logits if columns is None else stream_logits[..., columns]
    sl = sl.astype(mx.float32)
    p = mx.exp(sl - mx.logsumexp(sl, axis=-1, keepdims=True))
    if kmax >= p.shape[-1]:
        return -mx.sort(-p, axis=-1)
    return -mx.sort(-mx.topk(p, kmax, axis=-1), axis=-1)  # a partial sort of the vocabulary

# ------------------------------------------------------------------ text and stats


class TextStream:
    """The text side of one sequence, token by token, as ``generate.stream_generate``
    makes it: detokenised segments, stop strings (cut before, held back while they
    may be starting), one ``GenerationResponse`` per token and a final one with the
    finish reason.  The decoder has already dropped end-of-sequence tokens."""

    def __init__(self, tokenizer: TokenizerWrapper, prompt_tokens: int,
                 stop: Sequence[str] | None, stats: DecodeStats, prompt_time: float) -> None:
        self.detok = copy.copy(tokenizer.detokenizer)
        self.detok.reset()
        self.stops = [s for s in (stop or []) if s]
        self.ids = mx.zeros((prompt_tokens,), mx.int32)  # _response reads its length
        self.stats = stats
        self.prompt_tps = prompt_tokens / max(prompt_time, 1e-9)
        self.tic = time.perf_counter()
        self.n = 0
        self.emitted = 0
        self.token = -1
        self.done = False
        self.text = ""

    def push(self, token: int) -> GenerationResponse:
        """The response of one more token; after a stop string it is the final one
        (``done`` is then set and later tokens are to be dropped)."""
        self.n += 1
        self.token = token
        self.detok.add_token(token)
        text = self.detok.text
        end = len(text)
        if self.stops:
            if _find_stop(text, self.stops) >= 0:
                return self.end("stop")
            end -= _stop_holdback(text, self.stops)
        segment = ""
        if end > self.emitted:
            segment, self.emitted = text[self.emitted : end], end
        self.text += segment
        return _response(segment, token, self.ids, self.prompt_tps, self.n, self.tic,
                         self.stats, None)

    def end(self, finish: str | None) -> GenerationResponse:
        """The final response: the text held back, cut at a stop string."""
        self.done = True
        self.detok.finalize()
        text = self.detok.text
        hit = _find_stop(text, self.stops) if self.stops else -1
        if hit >= 0:
            text, finish = text[:hit], "stop"
        segment = text[self.emitted :] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        self.text += segment
        return _response(segment, self.token, self.ids, self.prompt_tps, self.n, self.tic,
                         self.stats, finish or "length")


@dataclass
class SequenceStats:
    """Statistics of one sequence of a batch."""

    prompt_tokens: int
    generation_tokens: int
    generation_tps: float  # tokens/s of this sequence from its first token to its last
    prompt_tps: float
    forward_passes: int  # batched passes it took part in after its prefill
    tokens_per_pass: float
    acceptance: list[float]  # fraction of its passes accepting >= d drafts, per depth d
    lookup_accepted: int
    finish_reason: str


@dataclass
class BatchResponse:
    """The result of ``batch_generate``: as mlx-lm's, with per-sequence statistics."""

    texts: list[str]
    stats: list[SequenceStats]
    token_ids: list[list[int]]
    passes: int  # batched passes
    rows: int  # tree rows through those passes, padding included
    elapsed: float  # seconds, prefills included

    @property
    def tokens_per_s(self) -> float:
        return sum(s.generation_tokens for s in self.stats) / max(self.elapsed, 1e-9)


def batch_generate(
    model: SpecStreamModel,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[str | Sequence[int]],
    max_tokens: int | Sequence[int] = 256,
    *,
    verbose: bool = False,
    speculative: bool = True,
    tree_topk: Sequence[int] | None = None,
    dynamic_tree: bool | None = None,
    lookup_branches: int | None = None,
    size_trees: bool = True,
    stop: Sequence[str] | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | Sequence[int | None] | None = None,
) -> BatchResponse:
    """Generate for every prompt in one batch (``BatchDecoder``); the shape of mlx-lm's
    ``batch_generate``.  prompts: texts or token ids; max_tokens: one for all or one per
    prompt; seed: one per prompt, or an int s giving prompt i the seed s + i (a batched
    sequence draws the same tokens as ``stream_generate`` with its seed when the batch
    does not resize its tree: ``size_trees=False``).  The other options are
    ``stream_generate``'s; size_trees: size each step's drafts for the batch."""
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    count = len(prompts)
    maxes = [max_tokens] * count if isinstance(max_tokens, int) else list(max_tokens)
    seeds = ([None if seed is None else seed + i for i in range(count)]
             if seed is None or isinstance(seed, int) else list(seed))
    if len(maxes) != count or len(seeds) != count:
        raise ValueError("max_tokens and seed lists need one entry per prompt")
    tree = product_tree(tree_topk) if speculative and tree_topk is not None else None
    decoder = BatchDecoder(model, eos_token_ids=tokenizer.eos_token_ids, size_trees=size_trees)
    tic = time.perf_counter()
    uids = []
    for prompt, m, s in zip(prompts, maxes, seeds, strict=True):
        params = SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                repetition_penalty=repetition_penalty,
                                repetition_context_size=repetition_context_size, seed=s)
        uids.append(decoder.add(_encode(tokenizer, prompt), m, params, speculative=speculative,
                                tree=tree, dynamic_tree=dynamic_tree,
                                lookup_branches=lookup_branches))
    states = {u: decoder.sequence(u) for u in uids}
    streams: dict[int, TextStream] = {}
    tokens: dict[int, list[int]] = {u: [] for u in uids}
    finals: dict[int, GenerationResponse] = {}
    while decoder.active:
        for ev in decoder.step():
            seq = states[ev.uid]
            if ev.uid not in streams:
                streams[ev.uid] = TextStream(tokenizer, seq.prompt.shape[0], stop, seq.stats,
                                             seq.prompt_time)
            ts = streams[ev.uid]
            for t in ev.tokens:
                r = ts.push(t)
                tokens[ev.uid].append(t)
                if ts.done:
                    finals[ev.uid] = r
                    decoder.cancel(ev.uid)
                    break
            if ev.finish is not None and not ts.done:
                finals[ev.uid] = ts.end(ev.finish)
            if verbose and ev.uid in finals:
                print(f"[batch_generate] {len(finals)}/{count} done", end="\r", flush=True)
    elapsed = time.perf_counter() - tic
    stats = []
    for u in uids:
        r, st = finals[u], states[u].stats
        stats.append(SequenceStats(
            prompt_tokens=r.prompt_tokens, generation_tokens=len(tokens[u]),
            generation_tps=r.generation_tps, prompt_tps=r.prompt_tps,
            forward_passes=st.forward_passes, tokens_per_pass=st.tokens_per_pass,
            acceptance=st.acceptance_rate(), lookup_accepted=st.lookup_accepted,
            finish_reason=r.finish_reason or "length"))
    if verbose:
        print()
        total = sum(s.generation_tokens for s in stats)
        print(f"[batch_generate] {count} sequences, {total} tokens in {elapsed:.2f} s "
              f"({total / max(elapsed, 1e-9):.1f} tokens/s), {decoder.passes} passes")
    return BatchResponse(texts=[streams[u].text for u in uids], stats=stats,
                         token_ids=[tokens[u] for u in uids], passes=decoder.passes,
                         rows=decoder.rows, elapsed=elapsed)


SAMPLING_OPTIONS = ("temp", "top_p", "top_k", "min_p", "repetition_penalty",
                    "repetition_context_size", "seed")


def add_with_options(decoder: BatchDecoder, prompt: Sequence[int] | mx.array, max_tokens: int,
                     **options) -> int:
    """``decoder.add`` with ``stream_generate``'s keyword options (speculative,
    tree_topk, dynamic_tree, lookup_branches, lookup_skip_streams, lookup_corpus and the
    sampling options).  The early-exit ``prune_threshold`` is not used in a batch; the lookup
    drafter is refused."""
    if options.pop("drafter", "streams") != "streams":
        raise ValueError("a batch drafts with the streams: the lookup drafter is not batched")
    options.pop("prune_threshold", None)
    params = SamplingParams(**{k: options.pop(k) for k in SAMPLING_OPTIONS if k in options
                               and options[k] is not None})
    speculative = bool(options.pop("speculative", True))
    topk = options.pop("tree_topk", None)
    tree = product_tree(topk) if speculative and topk is not None else None
    dynamic = options.pop("dynamic_tree", None)
    lookup = options.pop("lookup_branches", None)
    skip = options.pop("lookup_skip_streams", None)
    corpus = options.pop("lookup_corpus", None)
    if options:
        raise TypeError(f"unknown options {sorted(options)}")
    return decoder.add(prompt, max_tokens, params, speculative=speculative, tree=tree,
                       dynamic_tree=dynamic if params.plain_greedy else None,
                       lookup_branches=lookup, lookup_skip_streams=skip,
                       lookup_corpus=corpus)
