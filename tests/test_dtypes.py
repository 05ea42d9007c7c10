"""Half precision (float16, bfloat16) and quantized (4-bit) bases: decoding, the main
stream's exactness, the dtype of the stream parameters, training, and the
autoregressive mode against mlx-lm's ``generate_step``.

Half-precision matmuls are slow on a CPU: the models here stay tiny."""

from __future__ import annotations

from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import decode
from mlx_specstream.config import STREAMS_FILE, SpecStreamConfig
from mlx_specstream.decode import DecodeStats, autoregressive_steps, speculative_steps
from mlx_specstream.model import SpecStreamModel, init_stream_params, model_dtype
from mlx_specstream.sampled import sampled_speculative_steps
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.training.trainer import TrainConfig, prepare_model, save_streams, train
from mlx_specstream.tree import product_tree
from tinymodels import cyclic_batches, tiny_base

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

PROMPT = mx.array([1, 5, 7, 9, 11, 2, 3])
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def base_of(kind: str, seed: int = 0) -> nn.Module:
    """A tiny llama base: float32, bfloat16, float16, or q4 (bfloat16, 4-bit weights)."""
    base = tiny_base("llama", seed=seed)
    base.set_dtype(mx.bfloat16 if kind == "q4" else DTYPES[kind])
    if kind == "q4":
        nn.quantize(base, group_size=32, bits=4)
    mx.eval(base.parameters())
    return base


def model_of(kind: str, lora_rank: int = 4, **cfg) -> SpecStreamModel:
    spec = SpecStreamConfig(**{"num_streams": 3, "stream_layers": 2, "tree_topk": [3, 2, 1],
                               "stream_lora_rank": lora_rank, **cfg})
    model = SpecStreamModel(base_of(kind), spec)
    mx.eval(model.parameters())
    return model


def expected_dtype(kind: str) -> mx.Dtype:
    return mx.bfloat16 if kind == "q4" else DTYPES[kind]


def all_finite(tree) -> bool:
    return all(
        mx.all(mx.isfinite(v)).item()
        for _, v in tree_flatten(tree)
        if mx.issubdtype(v.dtype, mx.floating)
    )


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "q4"])
def test_stream_parameters_have_the_model_dtype(kind: str) -> None:
    model = model_of(kind)
    dtype = expected_dtype(kind)
    assert model_dtype(model.base) == dtype
    assert {v.dtype for v in model.stream_parameters().values()} == {dtype}
    assert {v.dtype for v in init_stream_params(model.base, model.cfg).values()} == {dtype}
    # float32 weights (a file written elsewhere) load in the model's dtype
    model.load_stream_parameters(
        {k: v.astype(mx.float32) for k, v in model.stream_parameters().items()}
    )
    assert {v.dtype for v in model.stream_parameters().values()} == {dtype}
    # so do fresh streams for training (train --reinit)
    spec = SpecStreamConfig(num_streams=2, stream_layers=2, tree_topk=[2, 1], stream_lora_rank=2)
    fresh = prepare_model(model, spec, reinit=True)
    assert {v.dtype for v in fresh.stream_parameters().values()} == {dtype}


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("masters", [False, True])
def test_half_main_logits_with_fresh_streams_equal_the_base_exactly(kind, masters) -> None:
    """Stream rows never change the main rows' dtype or values, also when the stream
    parameters are float32 (the master copies training keeps)."""
    model = model_of(kind)
    if masters:
        model.streams.set_dtype(mx.float32)
    base = model.base
    tokens = PROMPT[None]
    main, sl, ex = model(tokens, with_exit=True)
    ref = base(tokens)
    assert main.dtype == sl.dtype == ex.dtype == DTYPES[kind]
    assert mx.array_equal(main, ref).item()
    cache, ref_cache = model.make_cache(), make_prompt_cache(base)
    main, _, _ = model(tokens, cache=cache, stream_rows=mx.array([PROMPT.shape[0] - 1]))
    cache.commit()
    assert mx.array_equal(main, base(tokens, cache=ref_cache)).item()
    for i, t in enumerate([4, 8, 15]):
        main, _, _ = model(mx.array([[t]]), cache=cache, with_streams=i % 2 == 0)
        cache.commit()
        assert mx.array_equal(main, base(mx.array([[t]]), cache=ref_cache)).item(), i


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "q4"])
def test_speculative_decoding_runs_in_half_and_quantized(kind: str) -> None:
    """Pruning, dynamic chains and sampling read half-precision arrays on the host."""
    model = model_of(kind)
    n = 12
    pruned = list(speculative_steps(model, PROMPT, n, DecodeStats(), product_tree([3, 2, 1]),
                                    prune_threshold=0.02))
    chain = list(speculative_steps(model, PROMPT, n, DecodeStats(), None, 0.0, dynamic=True))
    params = SamplingParams(temp=0.8, top_p=0.9, seed=1)
    sampled = list(sampled_speculative_steps(model, PROMPT, n, DecodeStats(), params))
    for out in (pruned, chain, sampled):
        assert len(out) == n
        assert all(0 <= t < model.args.vocab_size for t in out)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16", "q4"])
def test_autoregressive_mode_equals_mlx_lm_generate_step(kind: str) -> None:
    model = model_of(kind, lora_rank=0)
    ref = [int(t) for t, _ in generate_step(PROMPT, model.base, max_tokens=24)]
    assert list(autoregressive_steps(model, PROMPT, 24, DecodeStats())) == ref


def test_autoregressive_prefill_mirrors_mlx_lm(monkeypatch) -> None:
    """prompt[:-1] in chunks of PREFILL_STEP, then the last prompt token alone as the
    first step, then one token per pass; never any stream rows."""
    model = model_of("float32", lora_rank=0)
    monkeypatch.setattr(decode, "PREFILL_STEP", 3)
    lengths, streams = [], []
    lower, upper_hidden = model.lower, model.upper_hidden

    def spy_lower(tokens, *a, **k):
        lengths.append(int(tokens.reshape(-1).shape[0]))
        return lower(tokens, *a, **k)

    def spy_upper(h, positions, mask=None, cache=None, rows=None, with_streams=True):
        streams.append(with_streams)
        return upper_hidden(h, positions, mask, cache, rows, with_streams)

    monkeypatch.setattr(model, "lower", spy_lower)
    monkeypatch.setattr(model, "upper_hidden", spy_upper)
    prompt = mx.arange(1, 9)  # 8 tokens: 3 + 3 + 1 prefilled, the 8th is the first step
    ref = [int(t) for t, _ in generate_step(prompt, model.base, max_tokens=5,
                                            prefill_step_size=3)]
    assert list(autoregressive_steps(model, prompt, 5, DecodeStats())) == ref
    assert lengths == [3, 3, 1, 1, 1, 1, 1, 1]
    assert not any(streams)


VOCAB = 64


@pytest.mark.parametrize("kind", ["float16", "q4"])
@pytest.mark.parametrize("mode", ["lossless", "task"])
def test_half_and_quantized_training_step_keeps_parameters_finite(kind, mode, tmp_path) -> None:
    """float16's Adam eps underflows to 0 and the adapters' B start at 0: without float32
    master copies the first step divides 0 by 0."""
    model = model_of(kind, lora_rank=2)
    tc = TrainConfig(mode=mode, iters=1, lr=1e-2, lora_rank=2, cache_gb=0.01, warmup=0.0)
    batches = cyclic_batches(4, 16, rules=((3, 1), (5, 7)), per_batch=2)
    train(model, batches, [], tc, log=lambda s: None, progress=False)
    assert all_finite(model.parameters())
    dtype = expected_dtype(kind)
    assert {v.dtype for v in model.stream_parameters().values()} == {dtype}
    # the step changed the adapters (their B left zero)
    assert mx.any(model.streams.stream_lora[0]["q_proj"].b != 0).item()
    save_streams(model, tmp_path)
    saved = mx.load(str(tmp_path / STREAMS_FILE))
    assert {v.dtype for v in saved.values()} == {dtype}


@pytest.mark.parametrize("mode,streams", [("task", False), ("lossless", True)])
def test_bfloat16_training_reads_its_terms_on_the_host(mode: str, streams: bool) -> None:
    """The plain fine-tuning baseline (task mode without streams) and the pruning
    adapter's own phase read their cross-entropy terms on the host."""
    model = model_of("bfloat16", lora_rank=0)
    tc = TrainConfig(mode=mode, streams=streams, iters=1, lr=1e-2, lora_rank=2,
                     exit_phase="after", exit_iters=1, cache_gb=0.01)
    batches = cyclic_batches(4, 16, rules=((3, 1), (5, 7)), per_batch=2)
    report = train(model, batches, batches, tc, log=lambda s: None, progress=False)
    assert ("exit_phase" in report) == streams
    assert np.isfinite(report["valid_after"]["main"]["ce"])
    assert all_finite(model.parameters())


@pytest.mark.parametrize("kind", ["bfloat16", "q4"])
def test_converted_folder_without_streams_file_decodes(kind: str, tmp_path: Path) -> None:
    """A converted bfloat16 (or 4-bit) folder whose streams are fresh, through ``load``
    and ``stream_generate`` with pruning, dynamic chains and sampling."""
    import warnings

    import tiny
    from mlx_specstream import load, stream_generate
    from mlx_specstream.convert import convert

    src = tiny.make_tiny_hf_folder(tmp_path / "src", hidden_size=32, intermediate_size=64)
    q = {"quantize_bits": 4, "group_size": 32} if kind == "q4" else {}
    out = convert(src, tmp_path / kind, dtype="bfloat16", verbose=False, **q)
    (out / STREAMS_FILE).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load(out)
    assert {v.dtype for v in model.stream_parameters().values()} == {mx.bfloat16}
    for kw in ({"prune_threshold": 0.02}, {"dynamic_tree": True}, {"temp": 0.7, "seed": 0}):
        toks = [r.token for r in stream_generate(model, tok, "Hello there", 8, **kw)]
        assert toks, kw
