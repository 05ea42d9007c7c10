"""Training the speculative streams (lossless mode) or streams + LoRA (task mode).

Lossless mode freezes the base model.  The hidden state entering the MSA layers and
the main-stream keys/values of every MSA layer are then fixed functions of the
tokens: they are computed once per batch without gradient (and kept in RAM across
epochs while they fit), and only the *stream* rows are run through the MSA layers,
differentiated, and read out through the LM head.  The stream rows go through the
model's own ``_layer`` code (with the recorded main keys/values in place of a cache),
so training and inference compute streams the same way.

Task mode wraps the base model's linear layers with mlx-lm's LoRA
(``linear_to_lora_layers``) and trains LoRA + streams jointly through the full model.

Half-precision models (float16, bfloat16) train float32 master copies of the trainable
parameters (the forward casts them to the model's dtype where they are used, so the
activations stay in that dtype) and take every cross-entropy in float32: Adam's state
then lives in float32 too (its eps is 0 in float16, and bfloat16 drops small updates).
``train`` returns the stream parameters to the model's dtype when it ends.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import CONFIG_KEY, STREAMS_FILE, SpecStreamConfig
from ..files import atomic_write, atomic_write_text, move_into_place
from ..model import HALF_DTYPES, SpecStreamModel, model_dtype, stream_attention
from .data import Batch, iterate_micro_batches
from .objective import SparseTargets, Terms, shifted_ce, stream_names

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class TrainConfig:
    mode: str = "lossless"  # lossless | task
    streams: bool = True  # False: task-mode LoRA alone (the plain fine-tuning baseline)
    iters: int | None = None  # optimizer steps; None: from epochs
    epochs: float = 1.0
    grad_accum: int = 1
    lr: float = 5e-4
    embed_lr: float | None = None  # lr of the stream embeddings P / medusa heads (None: lr)
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    alpha0: float = 1.0
    alphas: list[float] | None = None  # per stream (default 0.1 each)
    exit_phase: str = "joint"  # joint | after | none
    exit_iters: int = 0  # steps of the "after" phase (0: same as the first phase)
    exit_lr: float | None = None  # lr of the "after" phase (None: lr)
    lora_rank: int = 32  # task mode
    lora_scale: float = 2.0  # task mode
    seed: int = 0
    cache_gb: float = 1.0  # RAM for frozen features kept across epochs (lossless)
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    stop_at: int | None = None  # stop the first phase after this step (resume later)
    eval_every: int = 0  # validate every this many steps of the streams phase (0: never)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("lossless", "task"):
            raise ValueError(f"mode must be 'lossless' or 'task', got {self.mode!r}")
        if self.exit_phase not in ("joint", "after", "none"):
            raise ValueError(f"exit_phase must be joint, after or none: {self.exit_phase!r}")
        if not self.streams and self.mode != "task":
            raise ValueError("training without streams only makes sense in task mode")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")


# -- frozen features (lossless mode) ------------------------------------------------
class _KVRecorder:
    """Stands in for the cache in ``SpecStreamModel._layer``: records main keys/values."""

    offset = 0

    def __init__(self) -> None:
        self.kv: dict[int, tuple[mx.array, mx.array]] = {}

    def write(self, index: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.kv[index] = (k, v)
        return k, v


class _KVReplay:
    """Stands in for the cache when only stream rows run: returns the main keys/values."""

    offset = 0

    def __init__(self, kv: dict[int, tuple[mx.array, mx.array]]) -> None:
        self.kv = kv

    def write(self, index: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return self.kv[index]


@dataclass
class Features:
    """What a frozen base computes from a batch's tokens."""

    h: mx.array  # (B, T, D) hidden state entering the MSA layers
    kv: dict[int, tuple[mx.array, mx.array]]  # MSA layer -> main keys, values
    main_logits: mx.array | None = None  # (B, T, V), only when asked
    top: mx.array | None = None  # (B, T, D) last hidden state (medusa heads read it)

    def nbytes(self) -> int:
        n = self.h.nbytes + sum(k.nbytes + v.nbytes for k, v in self.kv.values())
        n += self.top.nbytes if self.top is not None else 0
        return n + (self.main_logits.nbytes if self.main_logits is not None else 0)


def frozen_features(model: SpecStreamModel, tokens: mx.array, with_main: bool = False) -> Features:
    """Hidden state at the MSA boundary and the main keys/values of every MSA layer,
    without gradient.  ``with_main`` also returns the main logits."""
    B, T = tokens.shape
    positions = mx.broadcast_to(mx.arange(T)[None], (B, T))
    h = mx.stop_gradient(model.lower(tokens, positions))
    rec = _KVRecorder()
    x = h
    for i in range(model.split, model.num_layers):
        x = model.run_layer(i, x, positions=positions, mask="causal", cache=rec, main_rows=T)
    main = mx.stop_gradient(model.head(x)) if with_main else None
    if model.cfg.draft_method == "medusa":  # the heads read only the last hidden state
        return Features(h, {}, main, mx.stop_gradient(x))
    kv = {i: (mx.stop_gradient(k), mx.stop_gradient(v)) for i, (k, v) in rec.kv.items()}
    return Features(h, kv, main)


def stream_hidden(
    model: SpecStreamModel, feats: Features, rows: mx.array | None = None
) -> mx.array:
    """Stream hidden states (B, S, gamma, D) after the MSA layers at positions ``rows``
    (all when None), running only stream rows against the recorded main keys/values.
    Medusa heads read the recorded last hidden state instead."""
    if model.cfg.draft_method == "medusa":
        assert feats.top is not None
        top = feats.top if rows is None else feats.top[:, rows]
        return model.medusa_hidden(top)
    h = feats.h
    B, T, D = h.shape
    g = model.cfg.num_streams
    rows = mx.arange(T) if rows is None else rows
    S = rows.shape[0]
    x = (h[:, rows][:, :, None, :] + model.stream_embeddings(h.dtype)).reshape(B, S * g, D)
    positions = mx.broadcast_to(mx.repeat(rows, g)[None], (B, S * g))
    attend = partial(stream_attention, rows=rows, num_streams=g)
    replay = _KVReplay(feats.kv)
    for i in range(model.split, model.num_layers):
        x = model.run_layer(i, x, positions=positions, mask=None, cache=replay, main_rows=0,
                            attend=attend)
    return x.reshape(B, S, g, D)


def stream_forward(model: SpecStreamModel, feats: Features) -> mx.array:
    """Stream logits (B, T, gamma, V) at every position."""
    return model.stream_logits(stream_hidden(model, feats))


def sparse_terms(
    model: SpecStreamModel, feats: Features, st: SparseTargets, train_streams: bool,
    train_exit: bool, alphas: list[float] | None, main_logits: mx.array | None = None,
    tokens: mx.array | None = None, targets: mx.array | None = None,
) -> Terms:
    """The lossless objective with the LM head run only at target positions."""
    g = model.cfg.num_streams
    alphas = list(alphas) if alphas is not None else [0.1] * g
    ce: dict[str, mx.array] = {}
    correct: dict[str, mx.array] = {}
    count: dict[str, mx.array] = {}
    loss = mx.array(0.0)
    if main_logits is not None and tokens is not None and targets is not None:
        ce["main"], correct["main"], count["main"] = shifted_ce(main_logits, tokens, targets, 1)
    if train_streams and st.flat.size:
        D = feats.h.shape[-1]
        sh = stream_hidden(model, feats, st.rows).reshape(-1, D)[st.flat]
        logits, labels, inside = model.draft_targets(sh, st.labels)
        logits = logits.astype(mx.float32)
        c = nn.losses.cross_entropy(logits, labels, reduction="none")
        hit = mx.stop_gradient((mx.argmax(logits, axis=-1) == labels).astype(mx.float32))
        if inside is not None:  # a label outside the draft vocabulary is a miss, no loss
            c, hit = c * inside, hit * inside
        for j, name in enumerate(stream_names(g)):
            w = (st.stream == j).astype(mx.float32)
            ce[name], correct[name], count[name] = (c * w).sum(), (hit * w).sum(), w.sum()
            loss = loss + alphas[j] * ce[name] / mx.maximum(count[name], 1.0)
    if train_exit and st.exit_flat.size:
        D = feats.h.shape[-1]
        logits = model.exit_logits(feats.h.reshape(-1, D)[st.exit_flat]).astype(mx.float32)
        c = nn.losses.cross_entropy(logits, st.exit_labels, reduction="none")
        hit = mx.stop_gradient((mx.argmax(logits, axis=-1) == st.exit_labels).astype(mx.float32))
        ce["exit"], correct["exit"] = c.sum(), hit.sum()
        count["exit"] = mx.array(float(st.exit_labels.size))
        loss = loss + ce["exit"] / mx.maximum(count["exit"], 1.0)
    return Terms(loss, ce, correct, count)


def task_sparse_terms(
    model: SpecStreamModel, tokens: mx.array, st: SparseTargets, train_streams: bool,
    train_exit: bool, alpha0: float, alphas: list[float] | None,
) -> Terms:
    """The task-mode objective (gradients through the whole model) with the LM head run
    only at target positions: the main stream at next-token targets, streams only at
    positions that have a stream target (prompt tokens carry none)."""
    B, T = tokens.shape
    g = model.cfg.num_streams
    alphas = list(alphas) if alphas is not None else [0.1] * g
    positions = mx.broadcast_to(mx.arange(T)[None], (B, T))
    h = model.lower(tokens, positions)
    streams = train_streams and st.flat.size > 0
    x = model.upper_hidden(
        h, positions, stream_rows=st.rows if streams else None, with_streams=streams
    )
    D = x.shape[-1]
    ce: dict[str, mx.array] = {}
    correct: dict[str, mx.array] = {}
    count: dict[str, mx.array] = {}

    def ce_hit(logits: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
        logits = logits.astype(mx.float32)
        c = nn.losses.cross_entropy(logits, labels, reduction="none")
        hit = mx.stop_gradient((mx.argmax(logits, axis=-1) == labels).astype(mx.float32))
        return c, hit

    c, hit = ce_hit(model.head(x[:, :T].reshape(-1, D)[st.exit_flat]), st.exit_labels)
    ce["main"], correct["main"] = c.sum(), hit.sum()
    count["main"] = mx.array(float(st.exit_labels.size))
    loss = alpha0 * ce["main"] / mx.maximum(count["main"], 1.0)
    if streams:
        c, hit = ce_hit(model.head(x[:, T:].reshape(-1, D)[st.flat]), st.labels)
        for j, name in enumerate(stream_names(g)):
            w = (st.stream == j).astype(mx.float32)
            ce[name], correct[name], count[name] = (c * w).sum(), (hit * w).sum(), w.sum()
            loss = loss + alphas[j] * ce[name] / mx.maximum(count[name], 1.0)
    if train_exit:
        c, hit = ce_hit(model.exit_logits(h.reshape(-1, D)[st.exit_flat]), st.exit_labels)
        ce["exit"], correct["exit"] = c.sum(), hit.sum()
        count["exit"] = mx.array(float(st.exit_labels.size))
        loss = loss + ce["exit"] / mx.maximum(count["exit"], 1.0)
    return Terms(loss, ce, correct, count)


# -- model preparation --------------------------------------------------------------
def prepare_model(
    model: SpecStreamModel, spec: SpecStreamConfig, reinit: bool = False, seed: int = 0
) -> SpecStreamModel:
    """The model to train: ``model`` itself when its stream config already equals
    ``spec`` (training continues from its streams), else a new SpecStreamModel over the
    same base with fresh streams (and the same draft vocabulary)."""
    same = (
        spec.draft_method == model.cfg.draft_method
        and spec.num_streams == model.cfg.num_streams
        and spec.stream_layers == model.cfg.stream_layers
        and spec.adapter_rank == model.cfg.adapter_rank
        and spec.stream_lora_rank == model.cfg.stream_lora_rank
        and spec.stream_lora_scale == model.cfg.stream_lora_scale
    )
    if same and not reinit:
        model.cfg = spec
        return model
    mx.random.seed(seed)
    new = SpecStreamModel(model.base, spec)
    if model._draft_head is not None and spec.draft_vocab_size:  # the folder's draft vocabulary
        new.set_draft_vocab(model._draft_head.ids)
    if not reinit and _deeper_only(model.cfg, spec):
        _carry_streams(model, new)
    mx.eval(new.streams.parameters())
    return new


def _deeper_only(old: SpecStreamConfig, new: SpecStreamConfig) -> bool:
    """``new`` adds MSA layers below ``old``'s and changes nothing else the streams hold."""
    return (new.stream_layers > old.stream_layers and new.draft_method == old.draft_method
            and new.num_streams == old.num_streams and new.adapter_rank == old.adapter_rank
            and new.stream_lora_rank == old.stream_lora_rank
            and new.stream_lora_scale == old.stream_lora_scale)


def _carry_streams(old: SpecStreamModel, new: SpecStreamModel) -> None:
    """Start ``new`` (more MSA layers) from ``old``'s trained streams: the stream
    embeddings, the pruning adapter and each layer's stream LoRA move to the same layer
    of the model; the added layers keep their fresh LoRA (a zero delta)."""
    src, dst = old.streams, new.streams
    dst.update({k: v for k, v in src.parameters().items() if k != "stream_lora"})
    shift = len(dst.stream_lora) - len(src.stream_lora)
    for i, adapters in enumerate(src.stream_lora):
        for name, lora in adapters.items():
            dst.stream_lora[i + shift][name].update(lora.parameters())


def set_trainable(
    model: SpecStreamModel, tc: TrainConfig, train_streams: bool, train_exit: bool
) -> None:
    model.freeze()
    if tc.mode == "task":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        if not _has_lora(model.base):
            linear_to_lora_layers(
                model.base,
                len(model.layers),
                {"rank": tc.lora_rank, "scale": tc.lora_scale, "dropout": 0.0},
            )
        for _, m in model.base.named_modules():
            if hasattr(m, "lora_a"):
                m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    if train_streams:
        model.streams.unfreeze()
        if not train_exit:
            model.streams.exit_adapter.freeze()
    elif train_exit:
        model.streams.exit_adapter.unfreeze()
    model.train()


def use_master_copies(model: SpecStreamModel) -> None:
    """Cast the trainable parameters of a half-precision model to float32 (no-op for a
    float32 model, or for parameters that already are)."""
    if model_dtype(model.base) not in HALF_DTYPES:
        return
    half = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.trainable_parameters())
            if v.dtype in HALF_DTYPES]
    if half:
        model.update(tree_unflatten(half))


def streams_to_model_dtype(model: SpecStreamModel) -> None:
    """Return the stream parameters (float32 master copies while training) to the
    model's dtype, the dtype they are used, saved and loaded in."""
    model.streams.set_dtype(model_dtype(model.base))


def _has_lora(base: nn.Module) -> bool:
    return any(hasattr(m, "lora_a") for _, m in base.named_modules())


# -- evaluation ---------------------------------------------------------------------
def _terms_for(
    model: SpecStreamModel, tc: TrainConfig, batch: Batch, feats: Features | None,
    train_streams: bool, train_exit: bool, with_main: bool,
) -> Terms:
    tokens = mx.array(batch.tokens)
    targets = mx.array(batch.targets)
    if tc.mode == "lossless":
        assert feats is not None
        st = batch.sparse(model.cfg.num_streams)
        main = feats.main_logits if with_main else None
        return sparse_terms(model, feats, st, train_streams, train_exit, tc.alphas,
                            main, tokens, targets)
    st = batch.sparse(model.cfg.num_streams)
    return task_sparse_terms(model, tokens, st, train_streams, train_exit, tc.alpha0, tc.alphas)


SIMULATED_TREES: tuple[tuple[int, ...], ...] = ((3, 2, 1), (1, 1, 1))


def stream_ranks(model: SpecStreamModel, feats: Features, st: SparseTargets,
                 chunk: int = 1024) -> mx.array:
    """Rank of each sparse target among its stream's logits (0: the top-1 token)."""
    D = feats.h.shape[-1]
    sh = stream_hidden(model, feats, st.rows).reshape(-1, D)[st.flat]
    out = []
    for i in range(0, sh.shape[0], chunk):
        logits, labels, inside = model.draft_targets(sh[i : i + chunk], st.labels[i : i + chunk])
        lab = mx.take_along_axis(logits, labels[:, None], axis=-1)
        rank = (logits > lab).sum(axis=-1)
        if inside is not None:  # cannot be drafted: never among the candidates
            rank = mx.where(inside, rank, mx.array(np.iinfo(np.int32).max, dtype=rank.dtype))
        out.append(rank)
        mx.eval(out[-1])
    return mx.concatenate(out) if out else mx.zeros((0,), dtype=mx.int32)


def simulated_passes(hit_depth: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """(tokens, passes) of greedy tree decoding along one teacher-forced answer.

    ``hit_depth[q]`` is how many draft depths the tree drafted at position q gets right
    (tokens q+2 .. q+1+d all among its candidates).  Decoding starts with the root at
    ``first`` (the prefill produced it, drafted at first - 1) and stops at ``last``."""
    q, tokens, passes = first - 1, 0, 0
    while (left := last - 1 - (q + 1)) > 0:  # tokens after the root
        d = min(int(hit_depth[q]), left - 1)
        tokens += d + 1
        passes += 1
        q += d + 1
    return tokens, passes


def _simulate_batch(model: SpecStreamModel, batch: Batch, feats: Features,
                    st: SparseTargets, trees: tuple[tuple[int, ...], ...]) -> dict[str, list]:
    """Tokens and passes per simulated tree on one batch.  Exact for greedy answers
    (the data is then what decoding produces); ``temp`` records are not in valid sets
    used for this, and padding positions are never targets."""
    g = model.cfg.num_streams
    B, T = batch.tokens.shape
    rows = np.array(st.rows)
    S = len(rows)
    ranks = np.array(stream_ranks(model, feats, st))
    flat = np.array(st.flat)
    rank = np.full((B * S * g,), np.iinfo(np.int32).max, dtype=np.int64)
    rank[flat] = ranks
    rank = rank.reshape(B, S, g)
    full = np.full((B, T, g), np.iinfo(np.int32).max, dtype=np.int64)
    full[:, rows] = rank
    out: dict[str, list] = {}
    for tree in trees:
        k = np.array([tree[j] if j < len(tree) else 0 for j in range(g)])
        hits = full < k  # (B, T, g)
        depth = np.cumprod(hits, axis=-1).sum(axis=-1)
        tok = ps = 0
        for b in range(B):
            tgt = np.nonzero(batch.targets[b])[0]
            if len(tgt) < 2:
                continue
            t, p = simulated_passes(depth[b], int(tgt[0]), int(tgt[-1]) + 1)
            tok, ps = tok + t, ps + p
        out[str(list(tree))] = [tok, ps]
    return out


def evaluate(
    model: SpecStreamModel, batches: list[Batch], tc: TrainConfig, desc: str = "valid"
) -> dict[str, dict[str, float]]:
    """Top-1 accuracy and mean CE of main, each stream and the early exit; in lossless
    mode also the tokens per pass that greedy decoding would reach on these answers
    with the trees of ``SIMULATED_TREES`` (adaptive pause off), as ``tpp``."""
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    sim: dict[str, list[int]] = {}
    simulate = tc.mode == "lossless" and model.cfg.num_streams > 0
    for batch in batches:
        feats = None
        if tc.mode == "lossless":
            feats = frozen_features(model, mx.array(batch.tokens), with_main=True)
        terms = _terms_for(model, tc, batch, feats, train_streams=True, train_exit=True,
                           with_main=True)
        mx.eval(terms.ce, terms.correct, terms.count)
        for name in terms.ce:
            s = sums.setdefault(name, [0.0, 0.0, 0.0])
            s[0] += terms.ce[name].astype(mx.float32).item()
            s[1] += terms.correct[name].astype(mx.float32).item()
            s[2] += terms.count[name].astype(mx.float32).item()
        if simulate and feats is not None:
            st = batch.sparse(model.cfg.num_streams)
            if st.flat.size:
                for key, (t, p) in _simulate_batch(model, batch, feats, st,
                                                   SIMULATED_TREES).items():
                    acc = sim.setdefault(key, [0, 0])
                    acc[0] += t
                    acc[1] += p
    if was_training:
        model.train()
    out: dict[str, dict[str, float]] = {
        name: {"acc": c / max(n, 1), "ce": ce / max(n, 1), "n": n}
        for name, (ce, c, n) in sums.items()
    }
    if sim:
        out["tpp"] = {k: t / max(p, 1) for k, (t, p) in sim.items()}
    return out


def format_metrics(m: dict[str, dict[str, float]]) -> str:
    order = ["main"] + sorted(k for k in m if k.startswith("s")) + ["exit"]
    text = "  ".join(
        f"{k}: acc {m[k]['acc']:.3f} ce {m[k]['ce']:.3f}" for k in order if k in m
    )
    if "tpp" in m:
        text += "  tokens/pass " + " ".join(f"{k} {v:.3f}" for k, v in m["tpp"].items())
    return text


# -- optimisation -------------------------------------------------------------------
def _schedule(lr: float, steps: int, warmup_frac: float) -> Callable[[mx.array], mx.array]:
    warm = max(1, int(round(steps * warmup_frac))) if steps > 1 else 0
    decay = optim.linear_schedule(lr, 0.0, max(steps - warm, 1))
    if warm == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(1e-8, lr, warm), decay], [warm])


def make_optimizer(tc: TrainConfig, steps: int, lr: float | None = None) -> optim.Optimizer:
    lr = tc.lr if lr is None else lr
    elr = tc.embed_lr if tc.embed_lr is not None else lr
    main = optim.AdamW(learning_rate=_schedule(lr, steps, tc.warmup), weight_decay=tc.weight_decay)
    emb = optim.AdamW(learning_rate=_schedule(elr, steps, tc.warmup), weight_decay=0.0)
    return optim.MultiOptimizer(
        [emb, main], [lambda path, _: "stream_embeddings" in path or "medusa_" in path]
    )


# -- checkpoints --------------------------------------------------------------------
def _atomic_save_safetensors(
    path: Path, arrays: dict[str, mx.array], metadata: dict | None = None
) -> None:
    atomic_write(path, lambda p: mx.save_safetensors(str(p), arrays, metadata=metadata or {}))


def save_checkpoint(
    ckpt_dir: Path, model: SpecStreamModel, optimizer: optim.Optimizer, step: int,
    phase: str, meta: dict[str, Any],
) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    opt = dict(tree_flatten(optimizer.state))
    _atomic_save_safetensors(ckpt_dir / "weights.safetensors", weights)
    _atomic_save_safetensors(ckpt_dir / "optimizer.safetensors", opt)
    state = {"step": step, "phase": phase, **meta}
    atomic_write_text(ckpt_dir / "state.json", json.dumps(state, indent=2))


def load_checkpoint(
    ckpt_dir: Path, model: SpecStreamModel, optimizer: optim.Optimizer
) -> dict[str, Any]:
    state = json.loads((ckpt_dir / "state.json").read_text())
    weights = mx.load(str(ckpt_dir / "weights.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    opt = mx.load(str(ckpt_dir / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


# -- the loop -----------------------------------------------------------------------
class _FeatureCache:
    def __init__(self, budget_bytes: float) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.items: dict[int, Features] = {}

    def get(self, key: int, make: Callable[[], Features]) -> Features:
        f = self.items.get(key)
        if f is not None:
            return f
        f = make()
        mx.eval(f.h, f.kv)
        size = f.nbytes()
        if self.used + size <= self.budget:
            self.items[key] = f
            self.used += size
        return f


def _num_steps(tc: TrainConfig, num_batches: int) -> int:
    if tc.iters is not None:
        return max(int(tc.iters), 0)
    return max(1, math.ceil(tc.epochs * num_batches / tc.grad_accum))


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        return None


def run_phase(
    model: SpecStreamModel,
    train_batches: list[Batch],
    tc: TrainConfig,
    phase: str,
    steps: int,
    train_streams: bool,
    train_exit: bool,
    cache: _FeatureCache | None,
    lr: float | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_eval: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """One optimisation phase ("streams": streams [+ exit adapter], or "exit": the
    pruning adapter alone).  Returns a summary with the last smoothed losses.
    ``on_eval(step, examples seen)`` is called every ``tc.eval_every`` steps."""
    set_trainable(model, tc, train_streams, train_exit)
    if phase == "exit":  # only the exit adapter learns
        model.freeze()
        model.streams.exit_adapter.unfreeze()
    use_master_copies(model)
    optimizer = make_optimizer(tc, steps, lr)
    ckpt_dir = Path(tc.checkpoint_dir) / phase if tc.checkpoint_dir else None
    start = 0
    if tc.resume and ckpt_dir is not None and (ckpt_dir / "state.json").exists():
        state = load_checkpoint(ckpt_dir, model, optimizer)
        start = int(state["step"])
        log(f"resumed phase '{phase}' from {ckpt_dir} at step {start}")
    if start >= steps:
        return {"steps": steps, "resumed_at": start, "seconds": 0.0, "tokens": 0}

    ctx: dict[str, Any] = {}

    def loss_fn(m: SpecStreamModel):
        batch, feats = ctx["batch"], ctx["feats"]
        terms = _terms_for(m, tc, batch, feats, train_streams=train_streams,
                           train_exit=train_exit, with_main=tc.mode == "task")
        names = list(terms.ce)
        ce = mx.stack([terms.ce[k] for k in names])
        cnt = mx.stack([terms.count[k] for k in names])
        return terms.loss, ce, cnt

    names: list[str] = []
    if tc.mode == "task":
        names.append("main")
    if train_streams:
        names += stream_names(model.cfg.num_streams)
    if train_exit:
        names.append("exit")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    order = iterate_micro_batches(len(train_batches), tc.seed, start * tc.grad_accum)
    smooth: dict[str, float] = {}
    bar = _progress(steps, start, f"train[{phase}]") if progress else None
    tic = time.perf_counter()
    ntok = 0
    seen = 0
    end = steps if phase != "streams" or tc.stop_at is None else min(steps, tc.stop_at)
    for step in range(start, end):
        acc = None
        ce_sum = np.zeros(len(names))
        cnt_sum = np.zeros(len(names))
        for _ in range(tc.grad_accum):
            bi = next(order)
            batch = train_batches[bi]
            feats = None
            if tc.mode == "lossless":
                toks = mx.array(batch.tokens)
                if cache is not None:
                    feats = cache.get(bi, lambda t=toks: frozen_features(model, t))
                else:
                    feats = frozen_features(model, toks)
            ctx["batch"], ctx["feats"] = batch, feats
            (_, ce, cnt), grads = loss_and_grad(model)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            mx.eval(acc, ce, cnt)
            ce_sum += np.array(ce.astype(mx.float32))
            cnt_sum += np.array(cnt.astype(mx.float32))
            ntok += int(batch.targets.sum())
            seen += batch.tokens.shape[0]
        if tc.grad_accum > 1:
            acc = tree_map(lambda g: g / tc.grad_accum, acc)
        if tc.grad_clip and tc.grad_clip > 0:
            acc, _ = optim.clip_grad_norm(acc, tc.grad_clip)
        optimizer.update(model, acc)
        mx.eval(model.trainable_parameters(), optimizer.state)
        for k, s, n in zip(names, ce_sum, cnt_sum, strict=True):
            v = s / max(n, 1)
            smooth[k] = v if k not in smooth else 0.9 * smooth[k] + 0.1 * v
        if bar is not None:
            bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in smooth.items()))
            bar.update(1)
        done = step + 1
        if ckpt_dir is not None and tc.checkpoint_every and (
            done % tc.checkpoint_every == 0 or done == end
        ):
            save_checkpoint(ckpt_dir, model, optimizer, done, phase, {"steps": steps})
        if on_eval is not None and tc.eval_every and (done % tc.eval_every == 0 or done == end):
            on_eval(done, seen)
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - tic
    model.eval()
    return {"steps": steps, "resumed_at": start, "seconds": secs, "tokens": ntok, "loss": smooth}


def train(
    model: SpecStreamModel,
    train_batches: list[Batch],
    valid_batches: list[Batch],
    tc: TrainConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train in place; returns a report with validation metrics before and after."""
    report: dict[str, Any] = {"config": asdict(tc)}
    t0 = time.perf_counter()
    if valid_batches:
        before = evaluate(model, valid_batches, tc)
        log(f"valid before: {format_metrics(before)}")
        report["valid_before"] = before
    cache = _FeatureCache(tc.cache_gb * 2**30) if tc.mode == "lossless" else None
    steps = _num_steps(tc, len(train_batches))
    joint = tc.exit_phase == "joint" and tc.streams
    curve: list[dict[str, Any]] = []

    def on_eval(step: int, seen: int) -> None:
        m = evaluate(model, valid_batches, tc)
        log(f"valid at step {step} ({seen} examples this run): {format_metrics(m)}")
        curve.append({"step": step, "examples": seen, **m})

    report["streams_phase"] = run_phase(
        model, train_batches, tc, "streams", steps, train_streams=tc.streams, train_exit=joint,
        cache=cache, log=log, progress=progress, on_eval=on_eval if valid_batches else None,
    )
    if curve:
        report["curve"] = curve
    stopped = tc.stop_at is not None and tc.stop_at < steps
    report["stopped_early"] = stopped
    if tc.exit_phase == "after" and tc.streams and not stopped:
        exit_steps = tc.exit_iters or steps
        report["exit_phase"] = run_phase(
            model, train_batches, tc, "exit", exit_steps, train_streams=False, train_exit=True,
            cache=cache, lr=tc.exit_lr, log=log, progress=progress,
        )
    streams_to_model_dtype(model)
    model.freeze()
    model.eval()
    if valid_batches:
        after = evaluate(model, valid_batches, tc)
        log(f"valid after:  {format_metrics(after)}")
        report["valid_after"] = after
    report["seconds"] = time.perf_counter() - t0
    return report


# -- saving -------------------------------------------------------------------------
def save_streams(model: SpecStreamModel, folder: str | Path) -> None:
    """Write ``specstream.safetensors`` and the config section into ``folder`` (a model
    folder, whose config.json is updated, or a separate streams folder), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = model_dtype(model.base)
    weights = {k: v.astype(dtype) for k, v in model.stream_parameters().items()}
    _atomic_save_safetensors(folder / STREAMS_FILE, weights, {"format": "mlx"})
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    config[CONFIG_KEY] = model.cfg.to_dict()
    atomic_write_text(cfg_path, json.dumps(config, indent=4, sort_keys=False) + "\n")


def save_task_adapters(model: SpecStreamModel, folder: str | Path, tc: TrainConfig,
                       model_path: str | Path | None = None) -> None:
    """mlx-lm style LoRA adapters (adapters.safetensors + adapter_config.json) plus the
    streams, so that ``fuse`` (or mlx-lm's load_adapters) can apply them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora = {k: v for k, v in tree_flatten(model.base.parameters()) if ".lora_" in k}
    _atomic_save_safetensors(folder / ADAPTER_FILE, lora)
    adapter_cfg = {
        "fine_tune_type": "lora",
        "num_layers": len(model.layers),
        "lora_parameters": {"rank": tc.lora_rank, "scale": tc.lora_scale, "dropout": 0.0},
        "model": str(model_path) if model_path is not None else None,
    }
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(adapter_cfg, indent=4) + "\n")
    save_streams(model, folder)


def replace_dir(tmp: Path, dest: Path, force: bool) -> None:
    """Move the finished ``tmp`` folder to ``dest`` (replacing it only with force); ``tmp``
    is removed when it cannot be moved."""
    try:
        move_into_place(tmp, dest, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
