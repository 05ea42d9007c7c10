"""The decoding loops: ONE speculative loop, parametrised by a drafter and an acceptor,
and the autoregressive loop beside it.

A speculative step has named phases, each usable alone: the drafter proposes the draft
(``drafting.py``), ``verify`` runs it through the model (pruning it mid-pass with the
early exit), the acceptor decides the accepted path and the next token on the device
and the host reads back that decision and the node tokens, a few integers, in one
synchronisation (``GreedyAcceptor`` here, exact sampling in ``sampled.py``), ``commit``
keeps the accepted rows in the cache (through ``TreeKVCache.commit`` only), and the
drafter observes the accepted node's streams, whose LM head runs lazily, inside the
next pass (n + g rows through the head instead of n * (1 + g)).  The adaptive pause
(``Pause``) and the statistics (``DecodeStats``) are kept by the loop alone.  One host
synchronisation per step, plus one for pruning (the pruned shape is decided mid-pass,
on the device: the host reads one boolean per node), one for a dynamic chain and one
for a context branch.  The next pass cannot be queued before the read-back: its
positions depend on how many tokens were accepted.

Memory as in mlx-lm's ``generate_step``: MLX's buffer cache is cleared after each
prefill chunk and every ``CLEAR_CACHE_EVERY`` passes, and the loops run under mlx-lm's
``wired_limit`` (a no-op off Metal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import wired_limit

from .config import SpecStreamConfig
from .drafting import ROOT, ContextDrafter, Draft, StreamDrafter, monotone_costs
from .model import SpecStreamModel
from .tree import Tree, product_tree, subtree, tree_from_paths


@dataclass
class DecodeStats:
    """Counters of a generation, updated in place as tokens are yielded."""

    forward_passes: int = 0  # passes after the prefill (each yields >= 1 token)
    step_tokens: int = 0  # tokens produced by those passes
    accepted_per_depth: list[int] = field(default_factory=list)  # steps accepting >= d drafts
    tree_nodes: int = 0  # tree nodes run through the MSA layers, summed over steps
    lookup_passes: int = 0  # passes whose tree carried a context (prompt-lookup) branch
    lookup_accepted: int = 0  # accepted tokens drafted by that branch alone

    @property
    def tokens_per_pass(self) -> float:
        return self.step_tokens / self.forward_passes if self.forward_passes else 0.0

    def acceptance_rate(self) -> list[float]:
        n = max(self.forward_passes, 1)
        return [a / n for a in self.accepted_per_depth]

    def record_tree_pass(self, nodes: int, path: list[int], branch_from: int = 0) -> None:
        """Count one tree pass of ``nodes`` nodes that accepted ``path`` (root first);
        ``branch_from``: the first node of a context branch (0: none)."""
        if branch_from:
            self.lookup_passes += 1
            self.lookup_accepted += sum(i >= branch_from for i in path)
        self.forward_passes += 1
        self.tree_nodes += nodes
        if len(path) - 1 > len(self.accepted_per_depth):  # a context branch goes deeper
            self.accepted_per_depth += [0] * (len(path) - 1 - len(self.accepted_per_depth))
        for d in range(1, len(path)):
            self.accepted_per_depth[d - 1] += 1


PAUSE_TOKENS = 16
PAUSE_MAX_TOKENS = 128
LOOKUP_MAX_NGRAM = 3  # context branch: suffixes of 3 down to 2 tokens are looked up
LOOKUP_MIN_NGRAM = 2  # (a single token matches too often to be worth a branch)


@dataclass
class Pause:
    """The adaptive pause of the speculative loops (greedy and sampled).

    A tree pass costs ``ratio`` plain passes on this machine (``draft_cost_ratio``,
    measured by calibrate).  While the running mean of tokens per tree pass stays below
    it, drafting loses time: the loop then decodes ``span`` tokens with plain passes
    (the streams run only on the last of them, to draft again) and probes the tree anew.
    The mean starts optimistic (``ratio + 1``: a few tree passes before the first pause)
    but restarts neutral after a pause (``ratio``), so that one probe decides: a probe
    that returns fewer tokens than a tree pass costs pauses again at once, for twice as
    long (up to ``max_tokens``); a probe that pays resets the span to ``tokens``.  So
    text the streams cannot predict (sampling at a high temperature, an unfamiliar
    domain) pays for a probe only every ``max_tokens`` tokens.  ``ratio`` 0 never
    pauses."""

    ratio: float
    tokens: int = PAUSE_TOKENS
    max_tokens: int = PAUSE_MAX_TOKENS
    left: int = 0  # plain passes still to run
    ema: float = field(init=False)
    span: int = field(init=False)  # length of the next pause
    probing: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.ema = self.ratio + 1.0  # optimistic start
        self.span = self.tokens

    @property
    def active(self) -> bool:
        return self.left > 0

    def take(self) -> bool:
        """Use up one plain pass; True for the last one, whose streams must run."""
        self.left -= 1
        if self.left > 0:
            return False
        self.ema = self.ratio
        self.probing = True
        return True

    def observe(self, tokens: int) -> None:
        """A tree pass produced ``tokens`` tokens."""
        self.ema = 0.7 * self.ema + 0.3 * tokens
        paying = self.ratio <= 0 or self.ema >= self.ratio
        if self.probing:
            self.probing = False
            self.span = self.tokens if paying else min(2 * self.span, self.max_tokens)
        if not paying:
            self.left = self.span


def default_tree(cfg: SpecStreamConfig) -> Tree:
    """The calibrated tree when the config has one, else the product tree."""
    if cfg.tree_paths is not None:
        return tree_from_paths(cfg.tree_paths)
    return product_tree(cfg.tree_topk)


def check_context(model: SpecStreamModel, prompt_len: int, max_tokens: int) -> int:
    """The context limit, or a ValueError when the prompt does not fit."""
    limit = getattr(model.args, "max_position_embeddings", None) or 1 << 30
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    if prompt_len >= limit:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model's context is {limit} tokens"
        )
    return limit


def fill(model: SpecStreamModel, tokens: mx.array, cache, chunk: int) -> None:
    """Run ``tokens`` through the main stream in chunks, each evaluated and committed."""
    for start in range(0, tokens.shape[0], chunk):
        part = tokens[start : start + chunk]
        positions = mx.arange(cache.offset, cache.offset + part.shape[0])
        h = model.lower(part, positions, cache=cache)
        model.upper_hidden(h, positions, cache=cache, with_streams=False)
        mx.eval(cache.state_arrays())
        cache.commit()
        mx.clear_cache()


def prefill(
    model: SpecStreamModel, prompt: mx.array, cache, with_streams: bool, chunk: int = 512
) -> mx.array:
    """Run the prompt (in chunks) through the model and return the logits of the last
    position only: (1 + num_streams, V) with streams (main row first), else (1, V)."""
    start = (prompt.shape[0] - 1) // chunk * chunk
    fill(model, prompt[:start], cache, chunk)
    rest = prompt[start:]
    L = rest.shape[0]
    positions = mx.arange(cache.offset, cache.offset + L)
    h = model.lower(rest, positions, cache=cache)
    rows = mx.array([L - 1]) if with_streams else None
    x = model.upper_hidden(h, positions, cache=cache, stream_rows=rows,
                           with_streams=with_streams)[0]
    cache.commit()
    # The LM head only where it is read: the last main row and its streams (whose logits
    # are the drafting ones: over the draft vocabulary when the folder has one).
    if not with_streams:
        return model.head(x[L - 1 :])
    return mx.concatenate([model.head(x[L - 1 : L]), model.draft_logits(x[L:])])


PREFILL_STEP = 2048  # mlx-lm's generate_step default prefill_step_size
CLEAR_CACHE_EVERY = 256  # passes between mx.clear_cache() calls, as mlx-lm's generate_step


def greedy_choice(logits: mx.array, _prev: mx.array | None = None) -> mx.array:
    """mlx-lm's greedy sampler on one row of logits: the argmax of the log-probabilities
    ``logits - logsumexp(logits)`` (in half precision that subtraction rounds, so ties
    are broken as mlx-lm breaks them)."""
    return mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1)


def autoregressive_steps(
    model: SpecStreamModel,
    prompt: mx.array,
    max_tokens: int,
    stats: DecodeStats,
    choose: Callable[[mx.array, mx.array | None], mx.array] | None = None,
) -> Iterator[int]:
    """Plain decoding in the same runtime (no streams), mlx-lm's ``generate_step`` op for
    op: ``prompt[:-1]`` is prefilled in chunks of ``PREFILL_STEP`` tokens (each
    evaluated), the last prompt token is the first decoding step, every step reads out
    the main head alone, and the next pass is queued before the current token is read
    back.

    choose(logits (V,), previous token or None) picks the next token on the device;
    ``greedy_choice`` by default.  sampled.py passes its sampler."""
    limit = check_context(model, prompt.shape[0], max_tokens)
    choose = greedy_choice if choose is None else choose
    cache = model.make_cache()
    n = prompt.shape[0]

    def step(token: mx.array, prev: mx.array | None) -> mx.array:
        pos = mx.array([cache.offset])
        logits, _ = model.upper(model.lower(token.reshape(1, 1), pos, None, cache), pos,
                                None, cache, None, False)
        cache.commit()
        return choose(logits[0, -1], prev)

    with wired_limit(model):
        fill(model, prompt[:-1], cache, PREFILL_STEP)
        y = step(prompt[n - 1 :], None)
        mx.async_eval(y)
        produced = 0
        while produced < max_tokens:
            nxt = None
            if produced + 1 < max_tokens and cache.offset + 1 < limit:
                nxt = step(y, y)
                mx.async_eval(nxt)
            tok = int(y.item())
            produced += 1
            if produced > 1:
                stats.forward_passes += 1
                stats.step_tokens += 1
            yield tok
            if nxt is None:
                return
            if produced % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()
            y = nxt


# ---------------------------------------------------------------- the speculative loop


def verify(model: SpecStreamModel, cache, draft: Draft, with_streams: bool,
           prune_threshold: float = 0.0
           ) -> tuple[mx.array, Tree, mx.array, np.ndarray | None, list[int] | None]:
    """Run the draft through the model: the last hidden states (the main rows, then
    ``num_streams`` rows per node with streams), the verified tree, its tokens, the
    draft nodes pruning kept (None: all) and the verified nodes whose streams ran, in
    the order of their rows (None: all; ``Draft.stream_nodes``).  With
    ``prune_threshold`` > 0 the stream nodes whose early-exit probability (of their
    token given their parent) falls below it are dropped after the lower layers, with
    their subtrees; the context branch is kept."""
    tree, tokens, mask = draft.tree, draft.tokens, draft.mask
    positions = draft.depth + cache.offset
    h = model.lower(tokens, positions, mask, cache)
    kept = None
    if prune_threshold > 0.0 and draft.streams > 1:
        ex = model.exit_logits(h[0]).astype(mx.float32)
        lse = mx.logsumexp(ex, axis=-1)
        p = mx.exp(ex[draft.parent, tokens] - lse[draft.parent])
        keep = np.nonzero(np.array(kept_by_pruning(p, mask, draft.branch, prune_threshold)))[0]
        if keep.shape[0] < tree.size:
            kept, keep_mx = keep, mx.array(keep.astype(np.int32))
            h, tokens, positions = h[:, keep_mx], tokens[keep_mx], positions[keep_mx]
            mask, tree = mask[keep_mx][:, keep_mx], subtree(tree, keep)
    rows = draft.stream_nodes if with_streams else None
    if rows is not None and kept is not None:
        now = {int(old): new for new, old in enumerate(kept)}
        rows = [now[i] for i in rows if i in now]
    x = model.upper_hidden(h, positions, mask, cache,
                           None if rows is None else mx.array(rows, dtype=mx.int32),
                           with_streams=with_streams)[0]
    return x, tree, tokens, kept, rows


def commit(model: SpecStreamModel, cache, path: list[int], kept: np.ndarray | None) -> None:
    """Keep the accepted path in the cache: the lower layers hold every drafted node,
    the upper layers the ones pruning kept."""
    if kept is None:
        cache.commit(path)
    else:
        lower_rows = [int(kept[i]) for i in path]
        cache.commit([lower_rows] * model.split + [path] * (model.num_layers - model.split))


def kept_by_pruning(child_prob: mx.array, mask: mx.array, branch: list[int],
                    threshold: float) -> mx.array:
    """``tree.prune`` on the device: (n,) bool, True for the nodes whose own and
    ancestors' early-exit probabilities are >= ``threshold`` (the root and the nodes on
    ``branch`` always pass).  mask: the tree's (n, n) ancestor-or-self mask."""
    forced = np.zeros(child_prob.shape[0], dtype=bool)
    forced[[0, *branch]] = True
    ok = (child_prob >= threshold) | mx.array(forced)
    return mx.all(~mask | ok[None, :], axis=1)


def path_to(tree: Tree, node: int) -> list[int]:
    """The node ids from the root to ``node``."""
    path = [node]
    while path[-1] > 0:
        path.append(int(tree.parent[path[-1]]))
    return path[::-1]


class TreeTables:
    """Device copies of a few trees' ancestor masks and sibling orders, made once per
    tree (pruned trees are new objects each step: the table is bounded)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.made: dict[int, tuple] = {}

    def get(self, tree: Tree) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """(parent (n,), depth (n,), ancestor-or-self mask (n, n), earlier-sibling
        mask (n, n): j is a sibling of i listed before it)."""
        if id(tree) not in self.made:
            if len(self.made) >= self.limit:
                self.made.clear()
            parent = np.maximum(tree.parent, 0)
            idx = np.arange(tree.size)
            same_parent = tree.parent[:, None] == tree.parent[None, :]
            earlier = same_parent & (idx[None, :] < idx[:, None]) & (idx[:, None] > 0)
            self.made[id(tree)] = (tree, mx.array(parent.astype(np.int32)),
                                   mx.array(tree.depth.astype(np.int32)), mx.array(tree.mask),
                                   mx.array(earlier))
        return self.made[id(tree)][1:]


def accepted_node_greedy(tokens: mx.array, predicted: mx.array, tables: tuple) -> mx.array:
    """``tree.accept_greedy`` on the device: the last node of the accepted path (a
    scalar).  A child matches when its token is its parent's prediction and no earlier
    sibling matches; a node is reachable when it and its ancestors match; the accepted
    path ends at the deepest reachable node (one per depth: siblings exclude each
    other)."""
    parent, depth, mask, earlier = tables
    match = (tokens == predicted[parent]) | (mx.arange(tokens.shape[0]) == 0)
    first = match & ~mx.any(earlier & match[None, :], axis=1)
    reach = mx.all(~mask | first[None, :], axis=1)
    return mx.argmax(mx.where(reach, depth + 1, 0))


class GreedyAcceptor:
    """The longest path whose every token is the main stream's argmax (the device
    form of ``tree.accept_greedy``); the next token is the argmax after it.
    ``targets`` and ``decide`` (on the device, per node; ``decide`` gives a few int32:
    the last accepted node, the next token) and ``accept`` (on the host, after the
    step's one synchronisation) are the interface of every acceptor."""

    def __init__(self) -> None:
        self.tables = TreeTables()

    def first(self, logits: mx.array, context: list[int]) -> int:
        """The token after the prompt (``logits``: its last row), its last token taken
        as a root alone."""
        root = mx.array(context[-1:], dtype=mx.int32)
        return self.accept_now(ROOT, root, self.targets(logits[None], root, ROOT, context),
                               None)[1]

    def targets(self, main: mx.array, tokens: mx.array, tree: Tree,
                context: list[int]) -> mx.array:
        return mx.argmax(main, axis=-1)

    def decide(self, tree: Tree, tokens: mx.array, targets: mx.array,
               draft: Draft | None) -> mx.array:
        best = accepted_node_greedy(tokens, targets, self.tables.get(tree))
        return mx.stack([best, targets[best]]).astype(mx.int32)

    def accept(self, tree: Tree, decided: np.ndarray, draft: Draft | None
               ) -> tuple[list[int], int]:
        return path_to(tree, int(decided[0])), int(decided[1])

    def accept_now(self, tree: Tree, tokens: mx.array, targets: mx.array,
                   draft: Draft | None) -> tuple[list[int], int]:
        """``decide`` and ``accept`` with their own synchronisation (the first token,
        tests)."""
        return self.accept(tree, np.array(self.decide(tree, tokens, targets, draft)), draft)


def speculative_loop(model: SpecStreamModel, prompt: mx.array, max_tokens: int,
                     stats: DecodeStats, drafter: StreamDrafter | ContextDrafter,
                     acceptor: GreedyAcceptor, prune_threshold: float = 0.0) -> Iterator[int]:
    """Prefill, then one pass per step: draft, verify, accept, commit.  While the pause
    is on, the drafter drafts without the streams (the root alone, or a context branch)
    and the streams run on the pause's last pass only; a drafter that never runs the
    streams never pauses.  A draft marked ``skip_streams`` runs its pass without them
    too; the next pass then drafts as a paused one, as it does when the accepted path
    ends on a node outside the draft's ``stream_nodes``."""
    limit = check_context(model, prompt.shape[0], max_tokens)
    with wired_limit(model):
        cache = model.make_cache()
        stats.accepted_per_depth = [0] * drafter.max_depth
        g = model.cfg.num_streams
        context = [int(t) for t in np.array(prompt).reshape(-1)]  # prompt + output, root last
        logits = prefill(model, prompt, cache, drafter.uses_streams)
        context.append(acceptor.first(logits[0], context))
        if drafter.uses_streams:
            drafter.observe(logits[1 : 1 + drafter.rows], context)
        produced = 1
        yield context[-1]
        pause = Pause(model.cfg.draft_cost_ratio if drafter.uses_streams else 0.0)
        while produced < max_tokens:
            pausing = pause.active
            run_streams = pause.take() if pausing else drafter.uses_streams
            paused = pausing or drafter.stale  # no stream nodes: the pause, or none were run
            draft = drafter.propose(context, limit - cache.offset, paused)
            if draft is None:
                return  # context full
            with_streams = run_streams and not draft.skip_streams
            x, tree, tokens, kept, rows = verify(model, cache, draft, with_streams,
                                                 prune_threshold)
            n = tree.size
            targets = acceptor.targets(model.head(x[:n]), tokens, tree, context)
            decided = acceptor.decide(tree, tokens, targets, draft)
            read = mx.concatenate([decided, tokens.astype(mx.int32)])
            mx.eval(read, x, *(a for a in (draft.q, draft.cands) if a is not None))
            read_np = np.array(read)
            k = decided.shape[0]
            path, nxt = acceptor.accept(tree, read_np[:k], draft)
            tok_np = read_np[k:]
            commit(model, cache, path, kept)
            # A paused pass without a context branch is a plain pass, not a tree pass.
            stats.record_tree_pass(0 if paused and not draft.branch else n,
                                   path if kept is None else [int(kept[i]) for i in path],
                                   draft.streams if draft.tree.size > draft.streams else 0)
            if not paused:
                pause.observe(len(path))
            new_tokens = [int(tok_np[i]) for i in path[1:]] + [nxt]
            context.extend(new_tokens)
            last = path[-1]
            if rows is not None:  # the streams ran on some nodes only
                last = rows.index(last) if last in rows else -1
            if with_streams and last >= 0:
                host = n + last * g  # the streams of the last accepted node
                drafter.observe(model.draft_logits(x[host : host + drafter.rows]), context)
            elif drafter.uses_streams:
                drafter.skip()
            for tok in new_tokens:
                if produced >= max_tokens:
                    return
                produced += 1
                stats.step_tokens += 1
                yield tok
            if stats.forward_passes % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()


def corpus_of(model: SpecStreamModel, lookup_corpus: bool | None = None):
    """The corpus a context branch drafts from: the model's, unless ``lookup_corpus`` (or,
    when None, ``cfg.lookup_corpus``) is off."""
    use = model.cfg.lookup_corpus if lookup_corpus is None else bool(lookup_corpus)
    return getattr(model, "draft_corpus", None) if use else None


def with_context_branch(model: SpecStreamModel, drafter: StreamDrafter,
                        lookup_branches: int | None = None,
                        lookup_skip_streams: int | None = None,
                        lookup_corpus: bool | None = None) -> StreamDrafter | ContextDrafter:
    """``drafter`` under a context branch (``drafting.ContextDrafter``) of at most
    ``lookup_branches`` tokens (default ``cfg.lookup_branches``; 0: ``drafter`` alone),
    with the skip rule and the corpus of the folder's config unless given."""
    cfg = model.cfg
    lookup = cfg.lookup_branches if lookup_branches is None else int(lookup_branches)
    if lookup < 0:
        raise ValueError(f"lookup_branches must be >= 0, got {lookup}")
    skip = cfg.lookup_skip_streams if lookup_skip_streams is None else int(lookup_skip_streams)
    if skip < 0:
        raise ValueError(f"lookup_skip_streams must be >= 0, got {skip}")
    if not lookup:
        return drafter
    return ContextDrafter(drafter, lookup, LOOKUP_MAX_NGRAM, LOOKUP_MIN_NGRAM, skip_at=skip,
                          corpus=corpus_of(model, lookup_corpus))


def speculative_steps(
    model: SpecStreamModel,
    prompt: mx.array,
    max_tokens: int,
    stats: DecodeStats,
    tree: Tree | None = None,
    prune_threshold: float | None = None,
    dynamic: bool | None = None,
    lookup_branches: int | None = None,
    lookup_skip_streams: int | None = None,
    lookup_corpus: bool | None = None,
) -> Iterator[int]:
    """Greedy Speculative Streaming.  Yields tokens, identical to greedy decoding.

    dynamic: a chain sized per step (``drafting.chain_length``) instead of one tree;
    default ``cfg.dynamic_tree``.  lookup_branches: the longest context branch
    (``drafting.ContextDrafter``; 0: none; default ``cfg.lookup_branches``).  A
    one-node tree with a branch is prompt lookup.  lookup_skip_streams: a pass whose
    branch has at least this many tokens runs without the streams (0: never; default
    ``cfg.lookup_skip_streams``).  lookup_corpus: where the context has no match, the
    branch drafts from the folder's corpus (``corpus.DraftCorpus``; default
    ``cfg.lookup_corpus``)."""
    cfg = model.cfg
    dynamic = cfg.dynamic_tree if dynamic is None else dynamic
    lookup = cfg.lookup_branches if lookup_branches is None else int(lookup_branches)
    chains = None
    if dynamic:
        chains = [tree_from_paths([[0] * i for i in range(1, d + 1)])
                  for d in range(cfg.num_streams + 1)]
    tree = chains[-1] if chains else tree if tree is not None else default_tree(cfg)
    if tree.max_depth > cfg.num_streams:
        raise ValueError(f"tree depth {tree.max_depth} exceeds {cfg.num_streams} streams")
    if tree.size == 1 and not lookup:
        # A one-node tree drafts nothing: calibration chooses it when the streams would
        # not pay for themselves (e.g. untrained); plain decoding is then the fastest.
        yield from autoregressive_steps(model, prompt, max_tokens, stats)
        return
    drafter = with_context_branch(
        model, StreamDrafter(tree, chains=chains, pass_cost=monotone_costs(cfg.tree_costs)),
        lookup_branches, lookup_skip_streams, lookup_corpus)
    threshold = cfg.prune_threshold if prune_threshold is None else prune_threshold
    yield from speculative_loop(model, prompt, max_tokens, stats, drafter, GreedyAcceptor(),
                                threshold)


def lookup_steps(model: SpecStreamModel, prompt: mx.array, max_tokens: int,
                 stats: DecodeStats, max_ngram: int = 3, num_draft: int = 4,
                 min_ngram: int = 1, acceptor: GreedyAcceptor | None = None
                 ) -> Iterator[int]:
    """Prompt lookup: the context drafter alone, verified by the main stream (no
    speculative streams).  Greedy output is identical to plain decoding; with
    ``sampled.SampledAcceptor`` the law is that of plain sampling."""
    drafter = ContextDrafter(StreamDrafter(ROOT), num_draft, max_ngram, min_ngram)
    return speculative_loop(model, prompt, max_tokens, stats, drafter,
                            acceptor or GreedyAcceptor())
