"""The decoding loop: prefill, then one pass per step that verifies the current draft
tree in the main stream and drafts the next tree from every node's streams.

The loop reaches the model only through ``SpecStreamModel`` (lower / exit / upper /
head) and the cache only through ``TreeKVCache.commit``.  The LM head reads out the
main rows of a pass at once and the streams of the accepted node only, queued with
the next pass.  The decoding policy (tree
shape, pruning, acceptance) is in ``tree.py``.  One host synchronisation per step is
needed for acceptance (two with pruning: the pruned shape is decided mid-pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .config import SpecStreamConfig
from .model import SpecStreamModel
from .tree import (
    Tree,
    accept_greedy,
    follow_chain,
    make_tree,
    product_tree,
    prune,
    subtree,
    tree_from_paths,
    with_chain,
)


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

    def record_tree_pass(self, nodes: int, path: list[int]) -> None:
        """Count one tree pass of ``nodes`` nodes that accepted ``path`` (root first)."""
        self.forward_passes += 1
        self.tree_nodes += nodes
        if len(path) - 1 > len(self.accepted_per_depth):  # a context branch goes deeper
            self.accepted_per_depth += [0] * (len(path) - 1 - len(self.accepted_per_depth))
        for d in range(1, len(path)):
            self.accepted_per_depth[d - 1] += 1


def _topk_indices(logits: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries along the last axis, best first."""
    if k == 1:
        return mx.argmax(logits, axis=-1, keepdims=True)
    part = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logits, part, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return mx.take_along_axis(part, order, axis=-1)


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


def _prefill(
    model: SpecStreamModel, prompt: mx.array, cache, with_streams: bool, chunk: int = 512
) -> mx.array:
    """Run the prompt (in chunks) through the model and return the logits of the last
    position only: (1 + num_streams, V) with streams (main row first), else (1, V)."""
    n = prompt.shape[0]
    start = 0
    while n - start > chunk:
        end = start + chunk
        positions = mx.arange(cache.offset, cache.offset + chunk)
        model.upper_hidden(model.lower(prompt[start:end], positions, None, cache), positions,
                           None, cache, None, False)
        mx.eval(cache.state_arrays())
        cache.commit()
        start = end
    rest = prompt[start:]
    L = rest.shape[0]
    positions = mx.arange(cache.offset, cache.offset + L)
    h = model.lower(rest, positions, None, cache)
    rows = mx.array([L - 1]) if with_streams else None
    x = model.upper_hidden(h, positions, None, cache, rows, with_streams)[0]
    cache.commit()
    # The LM head only where it is read: the last main row and its streams.
    return model.head(x[L - 1 :])


PREFILL_STEP = 2048  # mlx-lm's generate_step default prefill_step_size


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
    done = 0
    while n - done > 1:
        k = min(PREFILL_STEP, n - 1 - done)
        positions = mx.arange(cache.offset, cache.offset + k)
        h = model.lower(prompt[done : done + k], positions, None, cache)
        model.upper_hidden(h, positions, None, cache, None, False)
        mx.eval(cache.state_arrays())
        cache.commit()
        done += k

    def step(token: mx.array, prev: mx.array | None) -> mx.array:
        pos = mx.array([cache.offset])
        logits, _ = model.upper(model.lower(token.reshape(1, 1), pos, None, cache), pos,
                                None, cache, None, False)
        cache.commit()
        return choose(logits[0, -1], prev)

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
        y = nxt


def paused_pass(model: SpecStreamModel, root: mx.array, cache, streams: bool) -> mx.array:
    """One plain pass of the root token while drafting is paused, committed; the logits
    of the root, then (``streams``) of its streams, to draft again: (1 [+ g], V)."""
    pos = mx.array([cache.offset])
    x = model.upper_hidden(model.lower(root, pos, None, cache), pos, None, cache, None,
                           streams)[0]
    cache.commit()
    return model.head(x)


def speculative_steps(
    model: SpecStreamModel,
    prompt: mx.array,
    max_tokens: int,
    stats: DecodeStats,
    tree: Tree | None = None,
    prune_threshold: float | None = None,
    dynamic: bool | None = None,
    lookup_branches: int | None = None,
) -> Iterator[int]:
    """Greedy Speculative Streaming.  Yields tokens, identical to greedy decoding.

    dynamic: instead of one tree for every step, a chain whose length is chosen per step
    from the accepted node's stream confidences (top-1 probabilities p_j): the length d
    maximising (1 + p_1 + p_1 p_2 + ...) / cost(d + 1 nodes), with the measured relative
    pass costs of ``cfg.tree_costs`` (EAGLE-2's idea restricted to chains).  Costs one
    extra host sync per step.  Default: ``cfg.dynamic_tree``.

    lookup_branches: the longest context branch (0: none; default:
    ``cfg.lookup_branches``).  When the context (prompt + output, root included) ends
    with an n-gram (3 down to 2 tokens) seen earlier, the tokens that followed it (at
    most this many) join the draft tree as a chain from the root, verified in the same
    pass: the chain follows the stream tree's nodes as long as they carry its tokens
    and continues as new nodes (any depth) below the last of them, so no two siblings
    repeat a token.  Reading the stream candidates for that costs one extra host sync
    on the steps that have a match.  Pruning always keeps the branch.  While the
    adaptive pause is on, a pass with a match verifies the branch alone (main stream
    only, streams on the pause's last pass) instead of the root alone; the pause's
    length is counted in passes.  A one-node tree with a branch is prompt lookup
    (``lookup.lookup_steps``)."""
    cfg = model.cfg
    dynamic = cfg.dynamic_tree if dynamic is None else dynamic
    lookup = cfg.lookup_branches if lookup_branches is None else int(lookup_branches)
    if lookup < 0:
        raise ValueError(f"lookup_branches must be >= 0, got {lookup}")
    g = cfg.num_streams
    if dynamic:
        chains = [tree_from_paths([[0] * i for i in range(1, d + 1)]) for d in range(g + 1)]
        tree = chains[-1]
    tree = tree if tree is not None else default_tree(cfg)
    if tree.max_depth > cfg.num_streams:
        raise ValueError(f"tree depth {tree.max_depth} exceeds {cfg.num_streams} streams")
    if tree.size == 1:
        # A one-node tree drafts nothing: calibration chooses it when the streams would
        # not pay for themselves (e.g. untrained); plain decoding is then the fastest,
        # or prompt lookup when a context branch is wanted.
        if lookup:
            from .lookup import lookup_steps

            yield from lookup_steps(model, prompt, max_tokens, stats, LOOKUP_MAX_NGRAM,
                                    lookup, LOOKUP_MIN_NGRAM)
        else:
            yield from autoregressive_steps(model, prompt, max_tokens, stats)
        return
    threshold = cfg.prune_threshold if prune_threshold is None else prune_threshold
    limit = check_context(model, prompt.shape[0], max_tokens)
    stats.accepted_per_depth = [0] * tree.max_depth
    cache = model.make_cache()

    # Constant per tree: index arrays and mask on the device.
    def constants(t: Tree) -> tuple[Tree, mx.array, mx.array, mx.array, mx.array]:
        return (t, mx.array(t.gather_index.astype(np.int32)), mx.array(t.depth.astype(np.int32)),
                mx.array(t.mask), mx.array(np.maximum(t.parent, 0).astype(np.int32)))

    base = constants(tree)
    kmax = tree.kmax
    per_length = [constants(t) for t in chains] if dynamic else []
    root_only = constants(make_tree([-1], [0], [0]))
    # Trees with a context branch, per (stream tree, attach node, branch length).
    branched: dict[tuple[int, int, int], tuple[Tree, mx.array, mx.array, mx.array]] = {}

    def with_branch(b: tuple, attach: int, length: int) -> tuple:
        key = (id(b[0]), attach, length)
        if key not in branched:
            t = with_chain(b[0], attach, length)
            branched[key] = (t, mx.array(t.depth.astype(np.int32)), mx.array(t.mask),
                             mx.array(np.maximum(t.parent, 0).astype(np.int32)))
        return branched[key]

    costs = list(cfg.tree_costs or [])
    for i in range(len(costs) - 2, -1, -1):  # measured costs are noisy: make them monotone
        costs[i] = min(costs[i], costs[i + 1])

    def pass_cost(n: int) -> float:
        if not costs:  # uncalibrated: a rough CPU-like default
            return 1.2 + 0.2 * (n - 1)
        return costs[n - 1] if n <= len(costs) else costs[-1] * n / len(costs)

    def chain_length(conf: np.ndarray) -> int:
        best, best_d, reach, expect = 0.0, 0, 1.0, 1.0
        for d in range(g + 1):
            if d:
                reach *= float(conf[d - 1])
                expect += reach
            value = expect / pass_cost(d + 1)
            if value > best:
                best, best_d = value, d
        return best_d

    conf = None

    def draft(stream_logits: mx.array) -> mx.array:
        """(g, V) stream logits of the host node -> flattened top-kmax candidates (and,
        for dynamic chains, the streams' top-1 probabilities)."""
        nonlocal conf
        if dynamic:  # float32 on the device: the host reads it (numpy has no bfloat16)
            sl = stream_logits.astype(mx.float32)
            conf = mx.exp(mx.max(sl, axis=-1) - mx.logsumexp(sl, axis=-1))
        return _topk_indices(stream_logits, kmax).reshape(-1)

    from .lookup import find_draft  # (lookup.py imports this module)

    logits = _prefill(model, prompt, cache, with_streams=True)
    root = mx.argmax(logits[0]).reshape(1)
    cands = draft(logits[1:])
    produced = 0
    first = int(root.item())
    produced += 1
    context = [int(t) for t in np.array(prompt).reshape(-1)] + [first] if lookup else []
    yield first

    pause = Pause(cfg.draft_cost_ratio)
    while produced < max_tokens:
        chain = find_draft(context, LOOKUP_MAX_NGRAM, lookup, LOOKUP_MIN_NGRAM) if lookup else []
        with_streams = True
        if pause.active:
            with_streams = pause.take()
            if not chain:
                if cache.offset + 1 > limit:
                    return
                logits = paused_pass(model, root, cache, with_streams)
                root = mx.argmax(logits[:1], axis=-1)
                if with_streams:
                    cands = draft(logits[1:])
                stats.forward_passes += 1
                stats.step_tokens += 1
                produced += 1
                tok = int(root.item())
                if lookup:
                    context.append(tok)
                yield tok
                continue
            b = root_only  # the pause holds the streams back; the branch alone is verified
        elif dynamic:
            b = per_length[chain_length(np.array(conf))]
        else:
            b = base
        if cache.offset + b[0].size > limit:
            return  # context full
        stream_tree, gather = b[0], b[1]
        t, depth, full_mask, parent = b[0], b[2], b[3], b[4]
        on_branch: list[int] = []
        new = 0
        if chain:
            if stream_tree.size > 1:
                node_tok = np.concatenate([[context[-1]], np.array(cands[gather])])
                on_branch = follow_chain(stream_tree, node_tok, chain)
            else:
                on_branch = [0]
            new = min(len(chain) - len(on_branch) + 1, limit - cache.offset - stream_tree.size)
            if new > 0:
                t, depth, full_mask, parent = with_branch(b, on_branch[-1], new)
                on_branch += list(range(stream_tree.size, stream_tree.size + new))
                stats.lookup_passes += 1
            else:
                new = 0
        off = cache.offset
        parts = [root]
        if stream_tree.size > 1:
            parts.append(cands[gather])
        if new:
            parts.append(mx.array(chain[len(chain) - new :], dtype=root.dtype))
        tokens = mx.concatenate(parts) if len(parts) > 1 else root
        positions = depth + off
        mask = full_mask if t.size > 1 else None
        h = model.lower(tokens, positions, mask, cache)
        if threshold > 0.0 and stream_tree.size > 1:
            ex = model.exit_logits(h[0]).astype(mx.float32)  # read on the host
            lse = mx.logsumexp(ex, axis=-1)
            p = np.array(mx.exp(ex[parent, tokens] - lse[parent]))
            p[on_branch] = 1.0  # the context branch is kept whatever the early exit says
            keep = prune(t, p, threshold)
        else:
            keep = None
        if keep is not None and keep.shape[0] < t.size:
            keep_mx = mx.array(keep.astype(np.int32))
            h = h[:, keep_mx]
            u_tokens = tokens[keep_mx]
            u_pos = positions[keep_mx]
            u_mask = full_mask[keep_mx][:, keep_mx]
            kept, tree_sub = keep, subtree(t, keep)
        else:
            u_tokens, u_pos, u_mask = tokens, positions, mask
            kept, tree_sub = None, t
        n = tree_sub.size
        # The LM head runs on the main rows (verification) now, and on the streams of
        # the accepted node only once acceptance has picked it: lazily, so that it runs
        # inside the next pass (n + g rows through the head instead of n * (1 + g)).
        x = model.upper_hidden(h, u_pos, u_mask, cache, None, with_streams)[0]
        pred = mx.argmax(model.head(x[:n]), axis=-1)
        mx.eval(pred, u_tokens, x)
        pred_np, tok_np = np.array(pred), np.array(u_tokens)
        path = accept_greedy(tree_sub, tok_np, pred_np)
        last = path[-1]
        stats.record_tree_pass(n, path)
        if new:
            full_path = path if kept is None else [int(kept[i]) for i in path]
            stats.lookup_accepted += sum(i >= stream_tree.size for i in full_path)
        if b is not root_only:
            pause.observe(len(path))
        # Commit: lower layers hold every node, upper layers the kept ones.
        if kept is None:
            cache.commit(path)
        else:
            lower_rows = [int(keep[i]) for i in path]
            cache.commit([lower_rows] * model.split + [path] * (model.num_layers - model.split))
        root = pred[last].reshape(1)
        if with_streams:
            cands = draft(model.head(x[n + last * g : n + (last + 1) * g]))  # in the next pass
        new_tokens = [int(tok_np[i]) for i in path[1:]] + [int(pred_np[last])]
        for tok in new_tokens:
            if produced >= max_tokens:
                return
            produced += 1
            stats.step_tokens += 1
            if lookup:
                context.append(tok)
            yield tok
