"""The Python API, in the shape of mlx-lm's: ``load``, ``stream_generate``, ``generate``.

Thread safety: a loaded model holds no per-request state (each generation makes its
own cache), so several threads may share one (model, tokenizer) pair; MLX serialises
the actual computation.  Tokenizer detokenizers are per-request copies.  A thread other
than the main one that generated should call ``mx.clear_streams()`` before it ends
(MLX 0.32 can otherwise abort the process at exit).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .backend import align_weights
from .config import CONFIG_KEY, STREAMS_FILE, SpecStreamConfig
from .corpus import CORPUS_FILE, load_draft_corpus
from .decode import DecodeStats, autoregressive_steps, lookup_steps, speculative_steps
from .model import SpecStreamModel
from .sampled import (
    SampledAcceptor,
    sampled_autoregressive_steps,
    sampled_speculative_steps,
)
from .sampling import SamplingParams
from .tree import product_tree
from .vocab import VOCAB_FILE, load_draft_vocab


@dataclass
class GenerationResponse:
    """One streamed step: as mlx-lm's GenerationResponse, plus speculative statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None
    forward_passes: int = 0  # passes after the prefill
    tokens_per_pass: float = 0.0
    accepted_per_depth: list[int] = field(default_factory=list)
    lookup_accepted: int = 0  # accepted tokens drafted by the context branch alone
    logprobs: mx.array | None = None
    from_draft: bool = False


def load(
    path: str | Path | None = None,
    *,
    streams_path: str | Path | None = None,
    tokenizer_config: dict | None = None,
    lazy: bool = False,
) -> tuple[SpecStreamModel, TokenizerWrapper]:
    """Load a model folder, or a built-in model by name (``models.BUILTIN_MODELS``; the
    default model when ``path`` is None).

    Stream parameters come from ``streams_path`` (a folder with specstream.safetensors
    and optionally a config.json carrying the speculative_streaming section) or else
    from the model folder.  A plain mlx-lm folder loads with fresh, untrained streams."""
    from .models import resolve_model

    path = resolve_model(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a model folder")
    base, config = load_model(path, lazy=lazy)
    src = Path(streams_path) if streams_path is not None else path
    section = config.get(CONFIG_KEY)
    if streams_path is not None and (src / "config.json").exists():
        section = json.loads((src / "config.json").read_text()).get(CONFIG_KEY, section)
    cfg = SpecStreamConfig.from_dict(section)
    model = SpecStreamModel(base, cfg)
    weights_file = src / STREAMS_FILE
    if weights_file.exists():
        try:
            weights = mx.load(str(weights_file))
        except Exception as e:  # corrupt file: say which
            raise ValueError(f"cannot read stream parameters {weights_file}: {e}") from e
        model.load_stream_parameters(weights)
    else:
        warnings.warn(
            f"{weights_file} not found: using freshly initialised (untrained) streams; "
            "output is unchanged but nothing will be accepted",
            stacklevel=2,
        )
    # The draft vocabulary lives with the streams (or, for a streams folder without one,
    # with the model).
    vocab_dir = src if (src / VOCAB_FILE).exists() else path
    model.set_draft_vocab(load_draft_vocab(vocab_dir, cfg.draft_vocab_size))
    corpus_dir = src if (src / CORPUS_FILE).exists() else path
    model.draft_corpus = load_draft_corpus(corpus_dir, model.vocab_rows)
    if model.draft_corpus is not None and cfg.lookup_branches and cfg.lookup_corpus:
        model.draft_corpus.index()  # now, not on the first request
    mx.eval(model.streams.parameters())
    model.eval()
    if not lazy and mx.default_device() == mx.cpu:
        align_weights(model)  # the CPU GEMM shim reads aligned weights faster
    tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


def _encode(tokenizer: TokenizerWrapper, prompt: str | Sequence[int] | mx.array) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).astype(mx.int32)
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        return mx.array(tokenizer.encode(prompt, add_special_tokens=add_special), mx.int32)
    return mx.array(list(prompt), mx.int32)


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could start a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


_MLX_LM_ONLY = {
    "sampler": "pass temp, top_p, top_k and min_p instead of a sampler",
    "logits_processors": "pass repetition_penalty (and repetition_context_size) instead of "
    "logits processors",
    "draft_model": "the speculative streams draft inside the model; no draft model is used",
    "num_draft_tokens": "the draft tree comes from tree_topk (or the calibrated tree)",
    "prompt_cache": "each call keeps its own cache; pass the whole prompt",
    "max_kv_size": "the cache grows with the context; a rotating cache is not supported",
}


def check_unsupported(kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments of ``mlx_lm.stream_generate`` that this API does not take."""
    if not kwargs:
        return
    hints = [f"{k}: {_MLX_LM_ONLY[k]}" for k in kwargs if k in _MLX_LM_ONLY]
    other = sorted(k for k in kwargs if k not in _MLX_LM_ONLY)
    msg = "stream_generate() does not take " + ", ".join(repr(k) for k in kwargs)
    if hints:
        msg += " (mlx-lm's API; sampling here is temp/top_p/top_k/min_p/repetition_penalty). "
        msg += "; ".join(hints)
    if other:
        msg += (
            "; options are: speculative, drafter, tree_topk, prune_threshold, dynamic_tree, "
            "lookup_branches, lookup_skip_streams, lookup_corpus, stop, temp, top_p, top_k, "
            "min_p, repetition_penalty, repetition_context_size, seed"
        )
    raise TypeError(msg)


def _refuse_unknown_kwargs(fn):
    """Wrap ``fn`` so that unknown keyword arguments raise :func:`check_unsupported`'s
    TypeError (with hints for mlx-lm's) instead of Python's bare one; the signature stays."""
    names = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        check_unsupported({k: v for k, v in kwargs.items() if k not in names})
        return fn(*args, **kwargs)

    return wrapper


@_refuse_unknown_kwargs
def stream_generate(
    model: SpecStreamModel,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = 256,
    *,
    speculative: bool = True,
    drafter: str = "streams",
    tree_topk: Sequence[int] | None = None,
    prune_threshold: float | None = None,
    dynamic_tree: bool | None = None,
    lookup_branches: int | None = None,
    lookup_skip_streams: int | None = None,
    lookup_corpus: bool | None = None,
    stop: Sequence[str] | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
) -> Iterator[GenerationResponse]:
    """Generate, yielding one ``GenerationResponse`` per token.

    speculative: False runs plain autoregressive decoding in the same runtime.
    drafter: "streams" (Speculative Streaming) or "lookup" (prompt-lookup n-gram drafts
        alone).
    tree_topk: candidates per depth of the product tree (default: the folder's config).
    prune_threshold: early-exit pruning threshold, 0 disables (default: config);
        not used when sampling (pruned trees are no longer draws from the streams).
    dynamic_tree: a chain sized per step from the streams' confidences and the
        calibrated pass costs, instead of one tree (greedy only; default: config).
    lookup_branches: longest context branch: when the context repeats an earlier
        n-gram, the tokens that followed it join the draft tree and are verified in
        the same pass; 0 disables (default: config).  When sampling, its tokens are
        tested as proposals of all their mass on one token, so the law is unchanged.
    lookup_skip_streams: a pass whose context branch has at least this many tokens runs
        without the streams (copying text, the context drafts the next pass too); 0: the
        streams always run (default: config).
    lookup_corpus: where the context has no match, the context branch drafts from the
        folder's corpus of the model's past answers (``mlx-specstream corpus``), if it has
        one (default: config).
    stop: stop strings; generation ends before the first one, which is not emitted.
    temp, top_p, top_k, min_p, repetition_penalty, repetition_context_size: mlx-lm's
        sampling options (see ``sampling.SamplingParams``).  temp 0 without a
        repetition penalty decodes greedily; otherwise tokens are sampled with the
        exact distribution of autoregressive sampling.
    seed: seed of the generation's random generator (same seed, same tokens);
        None draws fresh entropy."""
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    params = SamplingParams(
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        seed=seed,
    )
    if dynamic_tree and not params.plain_greedy:
        raise ValueError(
            "dynamic_tree decodes greedily only (temp 0, no repetition penalty); drop "
            "dynamic_tree or set temp=0"
        )
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    ids = _encode(tokenizer, prompt)
    stats = DecodeStats()
    tree = product_tree(tree_topk) if speculative and tree_topk is not None else None
    if drafter not in ("streams", "lookup"):
        raise ValueError(f"drafter must be 'streams' or 'lookup', got {drafter!r}")
    for name, value in (("lookup_branches", lookup_branches),
                        ("lookup_skip_streams", lookup_skip_streams)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if drafter == "lookup" and speculative:
        acceptor = None if params.plain_greedy else SampledAcceptor(params, params.make_rng())
        steps = lookup_steps(model, ids, max_tokens, stats, acceptor=acceptor)
    elif params.plain_greedy:
        if speculative:
            steps = speculative_steps(model, ids, max_tokens, stats, tree, prune_threshold,
                                      dynamic_tree, lookup_branches, lookup_skip_streams,
                                      lookup_corpus)
        else:
            steps = autoregressive_steps(model, ids, max_tokens, stats)
    elif speculative:
        steps = sampled_speculative_steps(model, ids, max_tokens, stats, params, tree,
                                          lookup_branches, lookup_skip_streams, lookup_corpus)
    else:
        steps = sampled_autoregressive_steps(model, ids, max_tokens, stats, params)
    detok = copy.copy(tokenizer.detokenizer)
    detok.reset()
    stops = [s for s in (stop or []) if s]
    eos = set(tokenizer.eos_token_ids)
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()

    tic = time.perf_counter()
    prompt_tps = 0.0
    emitted = 0
    n, token = 0, -1
    finish: str | None = None
    for n, token in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = ids.shape[0] / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
        if token in eos:
            finish = "stop"
            break
        detok.add_token(token)
        if n >= max_tokens:
            finish = "length"
            break
        text = detok.text
        end = len(text)
        if stops:
            if _find_stop(text, stops) >= 0:
                break  # the final response below cuts the text at the stop string
            end -= _stop_holdback(text, stops)
        if end > emitted:
            segment, emitted = text[emitted:end], end
        else:
            segment = ""
        yield _response(segment, token, ids, prompt_tps, n, tic, stats, None)
    detok.finalize()
    text = detok.text
    hit = _find_stop(text, stops) if stops else -1
    if hit >= 0:
        text, finish = text[:hit], "stop"
    yield _response(text[emitted:], token, ids, prompt_tps, n, tic, stats, finish or "length")


def _find_stop(text: str, stops: Sequence[str]) -> int:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _response(segment, token, ids, prompt_tps, n, tic, stats, finish) -> GenerationResponse:
    elapsed = max(time.perf_counter() - tic, 1e-9)
    return GenerationResponse(
        text=segment,
        token=token,
        prompt_tokens=int(ids.shape[0]),
        prompt_tps=prompt_tps,
        generation_tokens=n,
        generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
        peak_memory=mx.get_peak_memory() / 1e9 if hasattr(mx, "get_peak_memory") else 0.0,
        finish_reason=finish,
        forward_passes=stats.forward_passes,
        tokens_per_pass=stats.tokens_per_pass,
        accepted_per_depth=list(stats.accepted_per_depth),
        lookup_accepted=stats.lookup_accepted,
    )


def generate(
    model: SpecStreamModel,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate and return the whole text (printing it as it streams when verbose).

    Keyword arguments (decoding and sampling options, ``stop``) go to ``stream_generate``."""
    text = ""
    last = None
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if verbose:
            print(r.text, end="", flush=True)
        text += r.text
        last = r
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return text


def format_stats(r: GenerationResponse) -> str:
    """The statistics lines of ``generate --verbose``.  tokens-per-pass is
    ``DecodeStats.tokens_per_pass``: the tokens produced by the forward passes after the
    prefill over those passes (the prefill's first token is not counted)."""
    return (
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens-per-sec\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.2f} tokens-per-sec, "
        f"{r.tokens_per_pass:.2f} tokens-per-pass "
        f"({round(r.tokens_per_pass * r.forward_passes)} tokens from {r.forward_passes} "
        "passes after the prefill"
        + (f", {r.lookup_accepted} tokens from the context" if r.lookup_accepted else "")
        + ")\n"
        f"Peak memory: {r.peak_memory:.3f} GB"
    )
