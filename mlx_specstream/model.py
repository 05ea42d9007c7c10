"""The multi-stream attention (MSA) decoder over mlx-lm's Llama-family modules.

The base model is an mlx-lm ``Model`` (llama, mistral, qwen2, qwen3: they differ only
by config: attention bias, q/k norms, rope scaling).  Its weights and modules are
used as they are; this file only changes *how* a pass runs through them:

* every token carries its own rotary position (tree nodes share depths);
* the caller passes the attention mask over the new tokens (causal or a tree);
* in the top ``stream_layers`` layers each token chosen by ``stream_rows`` carries
  ``num_streams`` extra streams ``S[t, j] = M[t] + P[j]``; main and stream queries go
  through one attention call with one mask.  Main rows never see stream keys, so
  main-stream outputs equal the plain model's.  Stream (t, j) sees the main keys
  that t sees, and streams 1..j of t.  Only main keys/values are cached.

A forward is split in ``lower`` (ordinary layers) and ``upper`` (MSA layers) so the
decoder can prune tree nodes between them with the early-exit logits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.activations import swiglu

from .cache import TreeKVCache
from .config import SUPPORTED_MODEL_TYPES, SpecStreamConfig


class KVWriter(Protocol):
    """What ``SpecStreamModel.run_layer`` needs of a cache."""

    offset: int

    def write(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        ...


# A cache whose class sets ``stream_slots = True`` also takes the stream rows' keys/values
# in ``write(layer, keys, values, stream_keys, stream_values)`` and returns them after the
# main ones (``TreeKVCache``, ``batching.BatchKVCache``); others get them concatenated.


ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class LoRA(nn.Module):
    """A low-rank delta ``scale * B A x``; B starts at zero so the delta starts at 0."""

    def __init__(self, in_dims: int, out_dims: int, rank: int, scale: float) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dims)
        self.a = mx.random.uniform(-bound, bound, (rank, in_dims))
        self.b = mx.zeros((out_dims, rank))
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        # In x's dtype whatever the parameters' (fp32 master copies while training).
        return self.scale * ((x @ self.a.astype(x.dtype).T) @ self.b.astype(x.dtype).T)


HALF_DTYPES = (mx.float16, mx.bfloat16)


def model_dtype(base: nn.Module) -> mx.Dtype:
    """The floating-point dtype the base model computes in: that of its token
    embedding (of its scales when quantized, whose dequantized rows have that dtype),
    else that of its final norm."""
    embed = getattr(base.model, "embed_tokens", None)
    for name in ("scales", "weight"):
        w = getattr(embed, name, None)
        if isinstance(w, mx.array) and mx.issubdtype(w.dtype, mx.floating):
            return w.dtype
    return base.model.norm.weight.dtype


def _linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or nn.QuantizedLinear."""
    w = layer.weight
    out_dims = w.shape[0]
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = w.shape[1] * 32 // layer.bits
    else:
        in_dims = w.shape[1]
    return in_dims, out_dims


class StreamParams(nn.Module):
    """Everything the method adds to a model.

    stream_embeddings: P, (num_streams, hidden) (draft_method "streams")
    medusa_weight, medusa_bias: (num_streams, hidden, hidden), (num_streams, hidden): the
        residual heads of draft_method "medusa"; zero, i.e. a copy of the main head, at
        initialisation
    exit_adapter: the rank-r pruning adapter on the main hidden state entering the MSA
        layers, read out through the model's own final norm and LM head
    stream_lora: optional per-MSA-layer LoRA adapters applied to stream rows only

    Created in the base model's dtype (``model_dtype``).  Every use casts a parameter
    to the dtype of the activations it meets, so rows never change dtype (training
    keeps fp32 master copies of half-precision parameters here).
    """

    def __init__(self, base: nn.Module, cfg: SpecStreamConfig) -> None:
        super().__init__()
        hidden = base.args.hidden_size
        if cfg.draft_method == "medusa":
            self.medusa_weight = mx.zeros((cfg.num_streams, hidden, hidden))
            self.medusa_bias = mx.zeros((cfg.num_streams, hidden))
        else:
            self.stream_embeddings = mx.random.normal((cfg.num_streams, hidden)) * 0.02
        self.exit_adapter = LoRA(hidden, hidden, cfg.adapter_rank, 1.0)
        self.stream_lora: list[dict[str, LoRA]] = []
        if cfg.stream_lora_rank > 0:
            layers = base.model.layers[len(base.model.layers) - cfg.stream_layers :]
            for layer in layers:
                d = {}
                for name in ATTN_TARGETS:
                    i, o = _linear_dims(getattr(layer.self_attn, name))
                    d[name] = LoRA(i, o, cfg.stream_lora_rank, cfg.stream_lora_scale)
                for name in MLP_TARGETS:
                    i, o = _linear_dims(getattr(layer.mlp, name))
                    d[name] = LoRA(i, o, cfg.stream_lora_rank, cfg.stream_lora_scale)
                self.stream_lora.append(d)
        self.set_dtype(model_dtype(base))


def init_stream_params(
    base: nn.Module, cfg: SpecStreamConfig, seed: int = 0
) -> dict[str, mx.array]:
    """Freshly initialised stream parameters for ``base``, as a flat name -> array dict.

    Deterministic in ``seed`` and independent of MLX's global random state."""
    flat = dict(tree_flatten(StreamParams(base, cfg).parameters()))
    key = mx.random.key(seed)
    out = {}
    for name in sorted(flat):
        key, sub = mx.random.split(key)
        shape = flat[name].shape
        if name == "stream_embeddings":
            out[name] = mx.random.normal(shape, key=sub) * 0.02
        elif name.endswith(".a"):
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = mx.random.uniform(-bound, bound, shape, key=sub)
        else:  # LoRA up-projections start at zero: the adapters start as the identity
            out[name] = mx.zeros(shape)
    dtype = model_dtype(base)
    return {k: v.astype(dtype) for k, v in out.items()}


def _check_supported(base: nn.Module) -> None:
    model_type = getattr(base, "model_type", None) or getattr(base.args, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"architecture '{model_type}' is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer = base.model.layers[0]
    for name in ATTN_TARGETS:
        if not hasattr(layer.self_attn, name):
            raise ValueError(f"architecture '{model_type}': attention has no {name}")
    if getattr(base.args, "sliding_window", None) and "sliding_attention" in (
        getattr(base.args, "layer_types", None) or []
    ):
        raise ValueError("sliding-window attention layers are not supported")


def _with_lora(linear: nn.Module, x: mx.array, lora: LoRA | None, n_main: int,
               stream_x: mx.array | None = None) -> mx.array:
    """``linear(x)`` with the LoRA delta added to the stream rows (rows >= n_main) only.

    ``stream_x``: x with its main rows zeroed (``_stream_rows_only``), shared by the
    projections that read the same x; the delta is then computed over all rows at once
    (rank-r, cheap) and is exactly zero on main rows, which stay bit-identical."""
    y = linear(x)
    if lora is None or x.shape[1] == n_main:
        return y
    if stream_x is None:
        stream_x = _stream_rows_only(x, n_main)
    a, b = lora.a.astype(x.dtype), lora.b.astype(x.dtype)
    if _compiled():
        return _lora_add_c(y, stream_x, a, b, lora.scale)
    return y + lora.scale * ((stream_x @ a.T) @ b.T)


def _stream_rows_only(x: mx.array, n_main: int) -> mx.array:
    keep = (mx.arange(x.shape[1]) >= n_main)[None, :, None]
    return mx.where(keep, x, mx.zeros((), x.dtype))


# On the CPU, mx.fast.rms_norm and mx.fast.rope run as a handful of primitives each; a
# decode step is a chain of ~400 tiny ops, so their dispatch dominates the non-matmul
# time.  Compiled, each becomes one fused kernel (~5x faster here).  Their inputs have
# a few fixed shapes per decode (positions are an array input), so the traces are reused.
# On a GPU they are single kernels either way and every new shape (tree size, prompt
# tail) would only add a trace: compiled on the CPU only.  MLX_SPECSTREAM_COMPILE=1 or 0
# forces it on or off.
_COMPILE_SETTING = os.environ.get("MLX_SPECSTREAM_COMPILE", "").strip()


def _compiled() -> bool:
    if _COMPILE_SETTING:
        return _COMPILE_SETTING != "0"
    return mx.default_device() == mx.cpu


@partial(mx.compile, shapeless=False)
def _rms_norm_c(x: mx.array, w: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, w, eps)


@partial(mx.compile, shapeless=False)
def _rope_c(x: mx.array, offset: mx.array, dims: int, traditional: bool, base: float,
            scale: float) -> mx.array:
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


@partial(mx.compile, shapeless=False)
def _lora_add_c(y: mx.array, xs: mx.array, a: mx.array, b: mx.array, scale: float) -> mx.array:
    return y + scale * ((xs @ a.T) @ b.T)


@partial(mx.compile, shapeless=False)
def _rotate_c(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


# Every layer rotates by the same positions in one pass, so their cosines and sines are
# computed once per positions array (the last few are kept, with the array itself so that
# its identity is not reused).  They are read off mx.fast.rope itself, applied to (1, 0)
# pairs: rope(x)[:half] = x1 cos - x2 sin and rope(x)[half:] = x1 sin + x2 cos give the
# exact cos and sin it computes, and ``_rotate_c`` then performs its arithmetic, so the
# rotation is bit-identical to mx.fast.rope's and mlx-lm's (tests/test_model.py).
_ROPE_TABLES: list[tuple[mx.array, tuple, mx.array, mx.array]] = []
_ROPE_TABLES_KEPT = 4


def _rope_tables(rope: nn.RoPE, positions: mx.array) -> tuple[mx.array, mx.array]:
    """(cos, sin), each (positions.size, 1, 1, dims // 2) in float32."""
    key = (rope.dims, rope.base, rope.scale)
    for pos, k, cos, sin in _ROPE_TABLES:
        if pos is positions and k == key:
            return cos, sin
    n, half = positions.size, rope.dims // 2
    unit = mx.concatenate([mx.ones((n, 1, 1, half)), mx.zeros((n, 1, 1, half))], axis=-1)
    t = _rope_c(unit, positions.reshape(-1), rope.dims, False, rope.base, rope.scale)
    cos, sin = t[..., :half], t[..., half:]
    _ROPE_TABLES.insert(0, (positions, key, cos, sin))
    del _ROPE_TABLES[_ROPE_TABLES_KEPT:]
    return cos, sin


def _norm(norm: nn.Module, x: mx.array) -> mx.array:
    if _compiled() and type(norm) is nn.RMSNorm:
        return _rms_norm_c(x, norm.weight, norm.eps)
    return norm(x)


def _rope(rope: nn.Module, x: mx.array, positions: mx.array) -> mx.array:
    """Rotary embedding with one position per token.  x: (B, L, H, D), positions: (B, L).

    Tokens go onto the batch axis, where mx.fast.rope takes one offset per row."""
    B, L, H, D = x.shape
    x = x.reshape(B * L, H, 1, D)
    if (_compiled() and type(rope) is nn.RoPE and not rope.traditional and rope.dims == D
            and x.dtype == mx.float32):
        y = _rotate_c(x, *_rope_tables(rope, positions))
    elif _compiled() and type(rope) is nn.RoPE:
        y = _rope_c(x, positions.reshape(-1), rope.dims, rope.traditional, rope.base,
                    rope.scale)
    else:
        y = rope(x, offset=positions.reshape(-1))
    return y.reshape(B, L, H, D)


def build_msa_mask(
    new_mask: mx.array, cached: int, stream_rows: mx.array | None, num_streams: int
) -> mx.array:
    """The one boolean mask of a fused MSA layer.

    new_mask: (Lm, Lm) which new main tokens each new main token sees (causal / tree).
    Rows: Lm main queries, then S * num_streams stream queries ordered (s, j).
    Columns: ``cached`` committed positions, Lm new main keys, the stream keys."""
    Lm = new_mask.shape[0]
    parts_main = [new_mask]
    if stream_rows is None:
        if cached:
            parts_main.insert(0, mx.ones((Lm, cached), dtype=mx.bool_))
        return mx.concatenate(parts_main, axis=1) if cached else new_mask
    S = stream_rows.shape[0]
    Ls = S * num_streams
    sid = mx.arange(Ls) // num_streams
    jid = mx.arange(Ls) % num_streams
    stream_main = mx.repeat(new_mask[stream_rows], num_streams, axis=0)
    stream_stream = (sid[:, None] == sid[None, :]) & (jid[None, :] <= jid[:, None])
    main = [new_mask, mx.zeros((Lm, Ls), dtype=mx.bool_)]
    streams = [stream_main, stream_stream]
    if cached:
        main.insert(0, mx.ones((Lm, cached), dtype=mx.bool_))
        streams.insert(0, mx.ones((Ls, cached), dtype=mx.bool_))
    return mx.concatenate([mx.concatenate(main, axis=1), mx.concatenate(streams, axis=1)], axis=0)


def stream_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, rows: mx.array, num_streams: int
) -> mx.array:
    """Attention of stream rows only, as the MSA mask has it (``build_msa_mask``), without
    building it: the stream query of (position s, stream j) sees the main keys at
    positions <= rows[s] and the stream keys of position s up to stream j.

    q: (B, H, S * g, d) stream queries ordered (s, j); k, v: (B, Hkv, T + S * g, d), the T
    main keys then the stream keys in the same order.  Memory grows with S * g * T instead
    of S * g * (T + S * g): what lets the trainer run long sequences."""
    B, H, L, d = q.shape
    g = num_streams
    S = L // g
    Hkv = k.shape[1]
    T = k.shape[2] - L
    rep = H // Hkv
    q5 = (q * scale).reshape(B, Hkv, rep, L, d)
    km, vm = k[:, :, None, :T], v[:, :, None, :T]
    ks = k[:, :, None, T:].reshape(B, Hkv, 1, S, g, d)
    vs = v[:, :, None, T:].reshape(B, Hkv, 1, S, g, d)
    neg = mx.array(-mx.inf, dtype=q.dtype)
    seen = mx.arange(T)[None, :] <= mx.repeat(rows, g)[:, None]  # (L, T)
    sm = mx.where(seen, q5 @ km.swapaxes(-1, -2), neg)  # (B, Hkv, rep, L, T)
    lower = mx.arange(g)[None, :] <= mx.arange(g)[:, None]  # (g, g): stream j sees j' <= j
    ss = mx.where(lower, q5.reshape(B, Hkv, rep, S, g, d) @ ks.swapaxes(-1, -2), neg)
    top = mx.stop_gradient(mx.maximum(sm.max(axis=-1), ss.max(axis=-1).reshape(B, Hkv, rep, L)))
    pm = mx.exp(sm - top[..., None])
    ps = mx.exp(ss - top.reshape(B, Hkv, rep, S, g)[..., None])
    den = pm.sum(axis=-1) + ps.sum(axis=-1).reshape(B, Hkv, rep, L)
    o = pm @ vm + (ps @ vs).reshape(B, Hkv, rep, L, d)
    return (o / den[..., None]).reshape(B, H, L, d)


def attention_mask(new_mask: mx.array, cache, stream_rows: mx.array | None,
                   num_streams: int) -> mx.array:
    """The mask of a layer over ``new_mask`` (see ``build_msa_mask``).  A cache that holds
    several sequences (``batching.BatchKVCache``) builds it itself: which of its slots
    each sequence sees is known to it alone."""
    own = getattr(cache, "attention_mask", None)
    if own is not None:
        return own(new_mask, stream_rows, num_streams)
    return build_msa_mask(new_mask, cache.offset if cache is not None else 0, stream_rows,
                          num_streams)


def causal_mask(n: int) -> mx.array:
    idx = mx.arange(n)
    return idx[:, None] >= idx[None, :]


class SpecStreamModel(nn.Module):
    """(tokens, positions, mask, cache) -> main logits, stream hidden states, early-exit logits."""

    def __init__(self, base: nn.Module, cfg: SpecStreamConfig) -> None:
        super().__init__()
        _check_supported(base)
        cfg.validate(len(base.model.layers))
        self.base = base
        self.cfg = cfg
        self.streams = StreamParams(base, cfg)
        self.num_layers = len(base.model.layers)
        self.split = self.num_layers - cfg.stream_layers
        self._draft_head = None  # the LM head's draft-vocabulary rows (set_draft_vocab)
        self.draft_corpus = None  # corpus.DraftCorpus of the model's past answers, if any

    # -- pieces ----------------------------------------------------------------
    @property
    def args(self):
        return self.base.args

    @property
    def vocab_rows(self) -> int:
        """Rows of the token embedding: every id the model reads is below this."""
        return int(self.base.model.embed_tokens.weight.shape[0])

    @property
    def layers(self) -> list[nn.Module]:
        return self.base.model.layers

    def make_cache(self, max_size: int | None = None) -> TreeKVCache:
        return TreeKVCache(self.num_layers, max_size=max_size)

    def head(self, h: mx.array) -> mx.array:
        """Final norm and LM head (shared by the main stream, the streams and early exit)."""
        h = _norm(self.base.model.norm, h)
        if self.base.args.tie_word_embeddings:
            return self.base.model.embed_tokens.as_linear(h)
        return self.base.lm_head(h)

    def stream_embeddings(self, dtype: mx.Dtype) -> mx.array:
        """P, (num_streams, hidden), in ``dtype`` (that of the rows it is added to)."""
        return self.streams.stream_embeddings.astype(dtype)

    def exit_logits(self, h: mx.array) -> mx.array:
        """Early-exit logits of the pruning adapter from hidden states entering the MSA layers."""
        return self.head(h + self.streams.exit_adapter(h))

    def stream_logits(self, stream_hidden: mx.array) -> mx.array:
        return self.head(stream_hidden)

    def set_draft_vocab(self, token_ids: mx.array | None) -> None:
        """Let the streams draft from ``token_ids`` only (see :meth:`draft_logits`); None:
        from the whole vocabulary."""
        from .vocab import DraftHead

        self._draft_head = None if token_ids is None else DraftHead(self.base, token_ids)

    def draft_targets(
        self, stream_hidden: mx.array, labels: mx.array
    ) -> tuple[mx.array, mx.array, mx.array | None]:
        """Stream logits and labels in the vocabulary the streams draft from, for training
        and ranking: with a draft vocabulary only its rows are computed, labels become
        indices into it and ``inside`` is False where a label cannot be drafted; otherwise
        the whole head, the labels as given and ``inside`` None."""
        if self._draft_head is None:
            return self.head(stream_hidden), labels, None
        dh = self._draft_head
        pos = dh.positions(labels)
        logits = dh.subset_logits(_norm(self.base.model.norm, stream_hidden))
        return logits, mx.maximum(pos, 0), pos >= 0

    @property
    def draft_vocab_ids(self) -> mx.array | None:
        """The draft vocabulary's token ids (the only finite columns of ``draft_logits``),
        or None without one."""
        return None if self._draft_head is None else self._draft_head.ids

    def draft_logits(self, stream_hidden: mx.array) -> mx.array:
        """Stream logits for drafting.  With a draft vocabulary only its rows of the LM head
        are computed and every other token gets -inf: drafts hold its ids only, and proposal
        distributions stay distributions over the whole vocabulary."""
        if self._draft_head is None:
            return self.head(stream_hidden)
        return self._draft_head(_norm(self.base.model.norm, stream_hidden))

    def medusa_hidden(self, top: mx.array) -> mx.array:
        """Medusa heads on last hidden states (B, S, D): (B, S, g, D), head k giving
        ``top + silu(W_k top + b_k)`` (read out by ``head`` like a stream row)."""
        B, S, D = top.shape
        g = self.cfg.num_streams
        w = self.streams.medusa_weight.astype(top.dtype).reshape(g * D, D)
        y = (top @ w.T).reshape(B, S, g, D) + self.streams.medusa_bias.astype(top.dtype)
        return top[:, :, None, :] + nn.silu(y)

    def run_layer(
        self,
        index: int,
        x: mx.array,
        *,
        positions: mx.array,
        mask: mx.array | str | None,
        cache: KVWriter | None = None,
        main_rows: int | None = None,
        attend: Callable[[mx.array, mx.array, mx.array, float], mx.array] | None = None,
    ) -> mx.array:
        """Run decoder layer ``index`` on hidden states ``x`` (B, L, hidden).

        positions: (B, L) rotary position of each row.  mask: None (one query row),
        "causal", or a boolean (L, keys) mask over the keys the cache returns.
        cache: where the main rows' keys/values go and what is attended to: a
        ``TreeKVCache``, or any object with ``write(layer, keys, values) -> (keys,
        values)`` (the trainer records and replays keys that way); None attends to the
        rows of ``x`` alone.  main_rows: rows ``[0, main_rows)`` are main-stream rows
        (cached, no stream LoRA); the rest are stream rows (LoRA on, keys attended in
        this pass only); default all rows.  attend: ``attend(q, k, v, scale)`` in place
        of masked attention (the trainer's ``stream_attention``; ``mask`` is then unused)."""
        n_main = x.shape[1] if main_rows is None else main_rows
        layer = self.layers[index]
        attn = layer.self_attn
        lora = None
        if self.streams.stream_lora and index >= self.split:
            lora = self.streams.stream_lora[index - self.split]
        B, L, _ = x.shape

        h = _norm(layer.input_layernorm, x)
        hs = _stream_rows_only(h, n_main) if lora is not None and L > n_main else None
        q = _with_lora(attn.q_proj, h, lora and lora["q_proj"], n_main, hs)
        k = _with_lora(attn.k_proj, h, lora and lora["k_proj"], n_main, hs)
        v = _with_lora(attn.v_proj, h, lora and lora["v_proj"], n_main, hs)
        q = q.reshape(B, L, attn.n_heads, -1)
        k = k.reshape(B, L, attn.n_kv_heads, -1)
        v = v.reshape(B, L, attn.n_kv_heads, -1)
        if hasattr(attn, "q_norm"):
            q = _norm(attn.q_norm, q)
            k = _norm(attn.k_norm, k)
        q = _rope(attn.rope, q, positions).transpose(0, 2, 1, 3)
        k = _rope(attn.rope, k, positions).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if L > n_main and getattr(cache, "stream_slots", False):
            # stream keys/values into the buffer's spare slots: no copy of the cache
            k, v = cache.write(index, k[:, :, :n_main], v[:, :, :n_main],
                               k[:, :, n_main:], v[:, :, n_main:])
        elif cache is not None:
            km, vm = cache.write(index, k[:, :, :n_main], v[:, :, :n_main])
            if L > n_main:
                km = mx.concatenate([km, k[:, :, n_main:]], axis=2)
                vm = mx.concatenate([vm, v[:, :, n_main:]], axis=2)
            k, v = km, vm
        if attend is not None:
            o = attend(q, k, v, attn.scale)
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=attn.scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, L, -1)
        x = x + _with_lora(attn.o_proj, o, lora and lora["o_proj"], n_main)

        h = _norm(layer.post_attention_layernorm, x)
        mlp = layer.mlp
        if lora is None or L == n_main:
            return x + mlp(h)
        hs = _stream_rows_only(h, n_main)
        g = _with_lora(mlp.gate_proj, h, lora["gate_proj"], n_main, hs)
        u = _with_lora(mlp.up_proj, h, lora["up_proj"], n_main, hs)
        return x + _with_lora(mlp.down_proj, swiglu(g, u), lora["down_proj"], n_main)

    # -- the forward ---------------------------------------------------------------
    @staticmethod
    def _positions(positions: mx.array, B: int) -> mx.array:
        positions = positions.astype(mx.int32)
        if positions.ndim == 1:
            positions = mx.broadcast_to(positions[None], (B, positions.shape[0]))
        return positions

    def _mask(self, new_mask: mx.array | None, cache: TreeKVCache | None, L: int):
        """Mask for main-only layers. None means causal over the new tokens."""
        if new_mask is None:
            return None if L == 1 else "causal"
        return attention_mask(new_mask, cache, None, 0)

    def lower(
        self,
        tokens: mx.array,
        positions: mx.array,
        mask: mx.array | None = None,
        cache: TreeKVCache | None = None,
    ) -> mx.array:
        """Embed and run the ordinary layers 0 .. split-1.  tokens: (B, L)."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, L = tokens.shape
        positions = self._positions(positions, B)
        x = self.base.model.embed_tokens(tokens)
        m = self._mask(mask, cache, L)
        for i in range(self.split):
            x = self.run_layer(i, x, positions=positions, mask=m, cache=cache)
        return x

    def upper_hidden(
        self,
        h: mx.array,
        positions: mx.array,
        mask: mx.array | None = None,
        cache: TreeKVCache | None = None,
        stream_rows: mx.array | None = None,
        with_streams: bool = True,
    ) -> mx.array:
        """Run the MSA layers; returns the last hidden states before the final norm,
        (B, L + S * num_streams, hidden): the L main rows, then the streams of the tokens
        in ``stream_rows`` (all tokens when None) ordered (token, stream)."""
        B, L, D = h.shape
        positions = self._positions(positions, B)
        if with_streams and self.cfg.draft_method == "medusa":
            x, m = h, self._mask(mask, cache, L)
            for i in range(self.split, self.num_layers):
                x = self.run_layer(i, x, positions=positions, mask=m, cache=cache)
            rows = x if stream_rows is None else x[:, stream_rows.astype(mx.int32)]
            heads = self.medusa_hidden(rows)
            return mx.concatenate([x, heads.reshape(B, -1, D)], axis=1)
        if with_streams:
            g = self.cfg.num_streams
            rows = mx.arange(L) if stream_rows is None else stream_rows.astype(mx.int32)
            S = rows.shape[0]
            streams = h[:, rows][:, :, None, :] + self.stream_embeddings(h.dtype)
            x = mx.concatenate([h, streams.reshape(B, S * g, D)], axis=1)
            pos = mx.concatenate([positions, mx.repeat(positions[:, rows], g, axis=1)], axis=1)
            new_mask = causal_mask(L) if mask is None else mask
            m = attention_mask(new_mask, cache, rows, g)
        else:
            x, pos, m = h, positions, self._mask(mask, cache, L)
        for i in range(self.split, self.num_layers):
            x = self.run_layer(i, x, positions=pos, mask=m, cache=cache, main_rows=L)
        return x

    def upper(
        self,
        h: mx.array,
        positions: mx.array,
        mask: mx.array | None = None,
        cache: TreeKVCache | None = None,
        stream_rows: mx.array | None = None,
        with_streams: bool = True,
    ) -> tuple[mx.array, mx.array | None]:
        """Run the MSA layers.  Returns main logits (B, L, V) and the stream hidden states
        before the final norm (B, S, num_streams, hidden), or None without streams."""
        B, L, D = h.shape
        x = self.upper_hidden(h, positions, mask, cache, stream_rows, with_streams)
        main_logits = self.head(x[:, :L])
        if not with_streams:
            return main_logits, None
        return main_logits, x[:, L:].reshape(B, -1, self.cfg.num_streams, D)

    def __call__(
        self,
        tokens: mx.array,
        positions: mx.array | None = None,
        mask: mx.array | None = None,
        cache: TreeKVCache | None = None,
        stream_rows: mx.array | None = None,
        with_streams: bool = True,
        with_exit: bool = False,
    ) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """One pass.  Returns (main logits (B, L, V), stream logits (B, S, g, V) or None,
        early-exit logits (B, L, V) or None)."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        L = tokens.shape[1]
        if positions is None:
            start = cache.offset if cache is not None else 0
            positions = mx.arange(start, start + L)
        h = self.lower(tokens, positions, mask, cache)
        exit_logits = self.exit_logits(h) if with_exit else None
        main, sh = self.upper(h, positions, mask, cache, stream_rows, with_streams)
        stream_logits = self.stream_logits(sh) if sh is not None else None
        return main, stream_logits, exit_logits

    # -- parameters ----------------------------------------------------------------
    def stream_parameters(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.streams.parameters()))

    def load_stream_parameters(self, weights: dict[str, mx.array], strict: bool = True) -> None:
        own = self.stream_parameters()
        if strict:
            missing = sorted(set(own) - set(weights))
            extra = sorted(set(weights) - set(own))
            if missing or extra:
                raise ValueError(
                    f"stream parameters do not match the config: missing {missing[:5]}, "
                    f"unexpected {extra[:5]}"
                )
        for name, w in weights.items():
            if name in own and tuple(own[name].shape) != tuple(w.shape):
                raise ValueError(
                    f"stream parameter '{name}' has shape {tuple(w.shape)}, "
                    f"expected {tuple(own[name].shape)}"
                )
        dtype = model_dtype(self.base)
        self.streams.update(
            tree_unflatten([(k, v.astype(dtype)) for k, v in weights.items() if k in own])
        )
