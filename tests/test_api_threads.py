"""The thread-safety contract of the Python API (see mlx_specstream/generate.py): threads
sharing one (model, tokenizer) pair get what sequential runs get."""

from __future__ import annotations

import threading

from mlx_specstream import generate, stream_generate

import mlx.core as mx
import pytest

PROMPTS = ["Hello", "The capital of France", "def add(a, b):", "SELECT name FROM"]


@pytest.mark.parametrize("speculative", [True, False])
def test_two_threads_share_one_model(api_model, speculative):
    model, tokenizer = api_model
    sequential = {p: generate(model, tokenizer, p, 24, speculative=speculative) for p in PROMPTS}
    results: dict[tuple[int, str], str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait(10)
            # the two threads take the prompts in opposite orders
            order = PROMPTS if i == 0 else PROMPTS[::-1]
            for p in order:
                text = ""
                for r in stream_generate(model, tokenizer, p, 24, speculative=speculative):
                    text += r.text
                results[(i, p)] = text
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
        finally:
            # MLX wants each thread's streams freed before it ends (else the process
            # may abort at exit: "terminate called without an active exception").
            if hasattr(mx, "clear_streams"):
                mx.clear_streams()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 2 * len(PROMPTS)
    for (_, p), text in results.items():
        assert text == sequential[p], p


def test_interleaved_generators_in_one_thread(api_model):
    """Two live generators stepped alternately do not disturb each other."""
    model, tokenizer = api_model
    a_ref = generate(model, tokenizer, PROMPTS[0], 16)
    b_ref = generate(model, tokenizer, PROMPTS[1], 16)
    ga = stream_generate(model, tokenizer, PROMPTS[0], 16)
    gb = stream_generate(model, tokenizer, PROMPTS[1], 16)
    a = b = ""
    done_a = done_b = False
    while not (done_a and done_b):
        if not done_a:
            r = next(ga, None)
            done_a = r is None
            a += r.text if r else ""
        if not done_b:
            r = next(gb, None)
            done_b = r is None
            b += r.text if r else ""
    assert (a, b) == (a_ref, b_ref)
