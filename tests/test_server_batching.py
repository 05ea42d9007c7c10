"""The server's continuous batch: concurrent requests share passes and answer what each
would answer alone; n > 1; bad input and disconnects inside a running batch."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from mlx_specstream.generate import GenerationResponse
from mlx_specstream.server import Job, _usage, parse_request, request_log

import pytest
from test_server import COMP, _open, _reference, _serve, assert_healthy, raw

PROMPTS = ["Hello", "The capital of", "def add(a, b):", "SELECT name", "Once upon a time"]


@pytest.fixture(scope="module")
def batch_server(api_model):
    model, tokenizer = api_model
    srv, thread = _serve(model, tokenizer)
    yield srv, srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _concurrently(port: int, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = [(0, None)] * len(bodies)

    def one(i: int) -> None:
        status, _, resp = raw(port, "POST", COMP, bodies[i])
        out[i] = (status, resp)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _stream_text(resp: bytes) -> str:
    text = ""
    for event in resp.decode().split("\n\n"):
        if event.startswith("data: {"):
            obj = json.loads(event[len("data: ") :])
            text += "".join(c.get("text", "") for c in obj.get("choices", []))
    return text


def test_concurrent_requests_share_passes_and_equal_alone(batch_server, api_model) -> None:
    srv, port = batch_server
    bodies = [{"prompt": p, "max_tokens": 10 + 4 * i, "stream": i % 2 == 1}
              for i, p in enumerate(PROMPTS)]
    bodies.append({"prompt": PROMPTS[0], "max_tokens": 30, "stop": ["e"]})
    results = _concurrently(port, bodies)
    assert srv.engine.max_batch_size > 1  # they ran together
    for body, (status, resp) in zip(bodies, results, strict=True):
        assert status == 200
        ref, last = _reference(api_model, body["prompt"], body["max_tokens"], chat=False,
                               stop=body.get("stop"))
        if body.get("stream"):
            assert _stream_text(resp) == ref
        else:
            assert resp["choices"][0]["text"] == ref
            assert resp["choices"][0]["finish_reason"] == last.finish_reason
            usage = resp["usage"]
            assert usage["completion_tokens"] == last.generation_tokens
            assert usage["tokens_per_second"] > 0 and isinstance(usage["acceptance"], list)
            assert usage["forward_passes"] == last.forward_passes


def test_n_choices_are_sequences_of_the_batch(batch_server, api_model) -> None:
    _, port = batch_server
    status, _, resp = raw(port, "POST", COMP, {"prompt": "Hello", "max_tokens": 12, "n": 3})
    ref, _ = _reference(api_model, "Hello", 12, chat=False)
    assert status == 200 and [c["index"] for c in resp["choices"]] == [0, 1, 2]
    assert all(c["text"] == ref for c in resp["choices"])  # greedy: n equal answers
    assert resp["usage"]["completion_tokens"] == 36
    body = {"prompt": "Hello", "max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 4}
    first = raw(port, "POST", COMP, body)[2]
    again = raw(port, "POST", COMP, body)[2]
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]  # seeded
    assert len(set(texts)) > 1  # n draws, not one draw n times
    status, _, resp = raw(port, "POST", COMP, {**body, "stream": True})
    chunks = [json.loads(e[len("data: ") :]) for e in resp.decode().split("\n\n")
              if e.startswith("data: {")]
    by_index = {i: "".join(c["choices"][0]["text"] for c in chunks
                           if c["choices"] and c["choices"][0]["index"] == i) for i in range(3)}
    assert [by_index[i] for i in range(3)] == texts


def test_bad_input_and_disconnects_do_not_disturb_the_batch(batch_server, api_model) -> None:
    """Requests failing in the worker (token ids out of the vocabulary, a prompt over
    the context) and a client leaving mid-stream, all while others decode."""
    srv, port = batch_server
    cancelled = srv.engine.cancelled
    leaving = _open(port, {"prompt": "Leaving", "max_tokens": 300, "stream": True})
    data = b""
    while b"data: " not in data:
        data += leaving.recv(4096)
    bodies = [{"prompt": p, "max_tokens": 16} for p in PROMPTS[:3]]
    bodies.insert(1, {"prompt": [1, 2, 10**6], "max_tokens": 5})
    bodies.insert(3, {"prompt": list(range(2, 60)) * 10, "max_tokens": 5})
    closer = threading.Timer(0.05, leaving.close)
    closer.start()
    results = _concurrently(port, bodies)
    closer.join()
    assert results[1][0] == 400 and results[1][1]["error"]["param"] == "prompt"
    assert results[3][0] == 400
    assert results[3][1]["error"]["code"] == "context_length_exceeded"
    for i in (0, 2, 4):
        ref, _ = _reference(api_model, bodies[i]["prompt"], 16, chat=False)
        assert results[i] == (200, results[i][1]) and results[i][1]["choices"][0]["text"] == ref
    deadline = time.time() + 10
    while srv.engine.cancelled <= cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert srv.engine.cancelled == cancelled + 1
    assert_healthy(port)


def test_usage_and_log_of_several_choices() -> None:
    def resp(tokens: int, passes: int, accepted: list[int], tps: float) -> GenerationResponse:
        return GenerationResponse(
            text="", token=0, prompt_tokens=5, prompt_tps=1.0, generation_tokens=tokens,
            generation_tps=tps, peak_memory=0.0, finish_reason="length",
            forward_passes=passes, tokens_per_pass=(tokens - 1) / passes,
            accepted_per_depth=accepted)

    u = _usage([resp(11, 5, [4, 1], 10.0), resp(7, 6, [0], 5.0)])
    assert u["prompt_tokens"] == 5 and u["completion_tokens"] == 18
    assert u["forward_passes"] == 11 and u["tokens_per_pass"] == pytest.approx(16 / 11, 1e-3)
    assert u["accepted_per_depth"] == [4, 1] and u["acceptance"] == [0.3636, 0.0909]
    assert u["tokens_per_second"] == 15.0
    req = parse_request({"prompt": "x", "n": 2}, False, {"m"}, 512)
    line = request_log(Job(req), [resp(11, 5, [4, 1], 10.0)], 3)
    assert "tokens/s" in line and "tokens/pass" in line and "batch of 3" in line
