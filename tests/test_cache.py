"""The cache owner: discarding a pass, stream keys in the spare slots, the public layer."""

from __future__ import annotations

from mlx_specstream.cache import STEP, TreeKVCache
from mlx_specstream.model import build_msa_mask, causal_mask
from tinymodels import tiny_model

import mlx.core as mx
import pytest


class _Concatenating:
    """A cache stand-in that is not a TreeKVCache: ``run_layer`` then concatenates
    the stream keys to what ``write`` returns, as the trainer's stand-ins get."""

    def __init__(self, cache: TreeKVCache) -> None:
        self.cache = cache

    @property
    def offset(self) -> int:
        return self.cache.offset

    def write(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.cache.write(layer, keys, values)


def test_discard_drops_the_pass_and_keeps_the_prefix() -> None:
    cache = TreeKVCache(2)
    kv = mx.arange(2 * 5 * 4, dtype=mx.float32).reshape(1, 2, 5, 4)
    for layer in range(2):
        cache.write(layer, kv, kv + 1)
    cache.commit()
    for layer in range(2):
        cache.write(layer, kv[:, :, :3] * 0, kv[:, :, :3] * 0)
    cache.discard()
    assert cache.offset == 5 and cache.pending == [0, 0]
    with pytest.raises(IndexError):
        cache.commit([0])  # nothing pending any more
    k, v = cache.write(0, kv[:, :, :1], kv[:, :, :1])
    assert k.shape[2] == 6
    assert mx.array_equal(k[:, :, :5], kv) and mx.array_equal(v[:, :, :5], kv + 1)


def test_stream_keys_go_after_the_pending_rows_and_are_never_committed() -> None:
    cache = TreeKVCache(1)
    main = mx.ones((1, 2, 3, 4))
    streams = mx.full((1, 2, 5, 4), 7.0)
    k, v = cache.write(0, main, main * 2, streams, streams * 2)
    assert k.shape[2] == 8 and cache.pending == [3]
    assert mx.array_equal(k[:, :, 3:], streams) and mx.array_equal(v[:, :, :3], main * 2)
    cache.commit([2])
    assert cache.offset == 1
    k, _ = cache.write(0, main[:, :, :1] * 3, main[:, :, :1] * 3)
    assert k.shape[2] == 2 and mx.array_equal(k[:, :, 1:], main[:, :, :1] * 3)


def test_stream_slots_past_the_buffer_grow_it() -> None:
    cache = TreeKVCache(1, max_size=STEP)
    first = mx.zeros((1, 1, STEP - 2, 2))
    cache.write(0, first, first)
    cache.commit()
    main = mx.ones((1, 1, 2, 2))
    streams = mx.full((1, 1, 6, 2), 3.0)
    k, _ = cache.write(0, main, main, streams, streams)  # main rows fit, streams spill
    assert k.shape[2] == STEP + 6
    assert mx.array_equal(k[:, :, : STEP - 2], first)
    assert mx.array_equal(k[:, :, STEP:], streams)
    with pytest.raises(ValueError, match="context overflow"):
        cache.write(0, mx.ones((1, 1, 3, 2)), mx.ones((1, 1, 3, 2)))


@pytest.mark.parametrize("lora", [False, True])
def test_stream_slots_equal_concatenation(lora: bool) -> None:
    """Streams attended from the spare slots give exactly the outputs (main and stream
    rows) of concatenating their keys to the cache, pass after pass."""
    model = tiny_model(lora_rank=4 if lora else 0, random_lora=lora)
    prompt = mx.array([1, 5, 7, 9, 11, 2, 3, 40, 41])
    caches = [model.make_cache(), model.make_cache()]
    for cache in caches:
        model(prompt, cache=cache, with_streams=False)
        cache.commit()
    tree_mask = mx.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=mx.bool_)
    for step, tokens in enumerate(([3, 4, 5], [6, 7, 8], [9, 10, 11])):
        outs = []
        for i, cache in enumerate(caches):
            pos = mx.array([0, 1, 1]) + cache.offset
            h = model.lower(mx.array(tokens), pos, tree_mask, cache)
            if i == 0:  # the model's own pass: stream keys in the spare slots
                x = model.upper_hidden(h, pos, tree_mask, cache)
            else:
                streams = h[:, :, None, :] + model.stream_embeddings(h.dtype)
                x = mx.concatenate([h, streams.reshape(1, 9, -1)], axis=1)
                rows_pos = mx.concatenate([pos, mx.repeat(pos, 3)])[None]
                mask = build_msa_mask(tree_mask, cache.offset, mx.arange(3), 3)
                for layer in range(model.split, model.num_layers):
                    x = model.run_layer(layer, x, positions=rows_pos, mask=mask,
                                        cache=_Concatenating(cache), main_rows=3)
            outs.append(x)
            cache.commit([0, 2] if step % 2 else [0])
        assert mx.array_equal(outs[0], outs[1]), f"step {step}"


def test_upper_with_streams_matches_the_fresh_model_pass() -> None:
    """The model's own MSA pass over a cache (spare slots) equals a cache-less pass over
    the whole sequence for the new rows' streams."""
    model = tiny_model()
    seq = mx.array([1, 5, 7, 9, 11, 2, 3, 40])
    cache = model.make_cache()
    model(seq[:5], cache=cache, with_streams=False)
    cache.commit()
    _, cached_streams, _ = model(seq[5:], cache=cache, mask=causal_mask(3))
    _, full_streams, _ = model(seq)
    assert mx.abs(cached_streams - full_streams[:, 5:]).max().item() <= 1e-4


def test_run_layer_takes_keywords_only() -> None:
    model = tiny_model()
    x = model.base.model.embed_tokens(mx.array([[1, 2, 3]]))
    pos = mx.broadcast_to(mx.arange(3)[None], (1, 3))
    with pytest.raises(TypeError):
        model.run_layer(0, x, pos, "causal")  # type: ignore[misc]
    y = model.run_layer(0, x, positions=pos, mask="causal")
    ref = model.base.model.layers[0](x, mask="causal")
    assert mx.allclose(y, ref, rtol=1e-5, atol=1e-4)
