"""The OpenAI-compatible server, live on 127.0.0.1 (port 0) with a tiny random model:
the official ``openai`` client for the happy paths, raw ``http.client`` for every
malformed request, a client that disconnects mid-stream, and concurrent clients."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from mlx_specstream import stream_generate
from mlx_specstream.generate_cli import chat_prompt_ids
from mlx_specstream.server import make_server

import pytest

openai = pytest.importorskip("openai")

MODEL_ID = "tiny-test"


def _serve(model, tokenizer, **kw):
    server = make_server(model, tokenizer, MODEL_ID, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def server(api_model):
    model, tokenizer = api_model
    srv, thread = _serve(model, tokenizer)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def port(server) -> int:
    return server.server_address[1]


@pytest.fixture(scope="module")
def client(port):
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
    )


def _reference(api_model, prompt, max_tokens: int, chat: bool, **kw) -> tuple[str, Any]:
    """What the library itself generates for the request (greedy)."""
    model, tokenizer = api_model
    if chat:
        prompt = chat_prompt_ids(tokenizer, prompt)
    text, last = "", None
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kw):
        text += r.text
        last = r
    return text, last


def raw(port: int, method: str, path: str, body: Any = None) -> tuple[int, dict, Any]:
    """One raw request; body may be bytes, str or a JSON-able object."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        parsed = json.loads(data) if data else None
    except json.JSONDecodeError:
        parsed = data
    return resp.status, dict(resp.getheaders()), parsed


def assert_healthy(port: int) -> None:
    status, _, body = raw(port, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


# ----------------------------------------------------------------- happy paths


def test_chat_completion(client, api_model):
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=24)
    ref, last = _reference(api_model, MESSAGES, 24, chat=True)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL_ID
    assert choice.message.role == "assistant"
    assert choice.message.content == ref
    assert choice.finish_reason == last.finish_reason
    u = r.usage
    assert u.prompt_tokens == last.prompt_tokens
    assert u.completion_tokens == last.generation_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    extra = u.model_extra
    assert extra["forward_passes"] == last.forward_passes
    assert extra["tokens_per_pass"] == pytest.approx(last.tokens_per_pass, abs=1e-3)


def test_chat_completion_stream(client):
    whole = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            max_completion_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.model_extra["forward_passes"] >= 1


def test_completion_and_stream(client, api_model):
    r = client.completions.create(model=MODEL_ID, prompt="The capital of", max_tokens=16)
    ref, last = _reference(api_model, "The capital of", 16, chat=False)
    assert r.object == "text_completion"
    assert r.choices[0].text == ref
    assert r.usage.prompt_tokens == last.prompt_tokens
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=MODEL_ID, prompt="The capital of", max_tokens=16, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == r.usage.total_tokens
    # token-id prompts are accepted too
    ids = api_model[1].encode("The capital of")
    r2 = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=16)
    assert r2.choices[0].text == ref


def test_stop_strings(client, api_model):
    ref, _ = _reference(api_model, "Hello", 40, chat=False)
    visible = ref.strip()
    assert len(visible) >= 6, ref
    i = ref.index(visible[3:6])
    for stop in (visible[3:6], [visible[3:6], "\x00never"]):
        r = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=40, stop=stop)
        assert r.choices[0].text == ref[:i]
        assert r.choices[0].finish_reason == "stop"
        s = client.completions.create(
            model=MODEL_ID, prompt="Hello", max_tokens=40, stop=stop, stream=True
        )
        assert "".join(c.choices[0].text for c in s if c.choices) == ref[:i]


def test_models_and_health(client, port):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    status, _, body = raw(port, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL_ID


def test_temperature(client, port):
    """temperature 0 is greedy; > 0 samples, and a seed fixes the sampled tokens."""
    r = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=4, temperature=0, top_p=1.0, seed=1
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0.7}
    status, _, resp = raw(port, "POST", "/v1/chat/completions", body)
    assert status == 200, resp
    # a seed fixes the sampled tokens, streamed or not
    kw = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 16, "temperature": 0.9}
    a = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    s = client.chat.completions.create(seed=5, stream=True, **kw)
    assert a == b == "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert_healthy(port)


# ------------------------------------------------------------ malformed requests

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (method, path, body, status, param)
    ("POST", CHAT, b"{not json", 400, None),
    ("POST", CHAT, b"\xff\xfe\x00", 400, None),
    ("POST", CHAT, "[1, 2]", 400, None),
    ("POST", CHAT, {}, 400, "messages"),
    ("POST", CHAT, {"messages": "hi"}, 400, "messages"),
    ("POST", CHAT, {"messages": []}, 400, "messages"),
    ("POST", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("POST", CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
    ("POST", CHAT, {"messages": USER, "model": 7}, 400, "model"),
    ("POST", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", CHAT, {"messages": USER, "max_tokens": -3}, 400, "max_tokens"),
    ("POST", CHAT, {"messages": USER, "max_tokens": 10**9}, 400, "max_tokens"),
    ("POST", CHAT, {"messages": USER, "max_tokens": "10"}, 400, "max_tokens"),
    ("POST", CHAT, {"messages": USER, "max_tokens": 2.5}, 400, "max_tokens"),
    ("POST", CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("POST", CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("POST", CHAT, {"messages": USER, "temperature": -1}, 400, "temperature"),
    ("POST", CHAT, {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("POST", CHAT, {"messages": USER, "seed": "x"}, 400, "seed"),
    ("POST", CHAT, {"messages": USER, "seed": -1}, 400, "seed"),
    ("POST", CHAT, {"messages": USER, "top_k": -1}, 400, "top_k"),
    ("POST", CHAT, {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("POST", CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
    ("POST", CHAT, {"messages": USER, "stop": 5}, 400, "stop"),
    ("POST", CHAT, {"messages": USER, "stop": ["a", 1]}, 400, "stop"),
    ("POST", CHAT, {"messages": USER, "n": 9}, 400, "n"),
    ("POST", CHAT, {"messages": USER, "n": 0}, 400, "n"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "go " * 700}]}, 400, "messages"),
    (
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "go " * 700}], "stream": True},
        400,
        "messages",
    ),
    ("POST", COMP, {}, 400, "prompt"),
    ("POST", COMP, {"prompt": 42}, 400, "prompt"),
    ("POST", COMP, {"prompt": ""}, 400, "prompt"),
    ("POST", COMP, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", COMP, {"prompt": [1, 99999]}, 400, "prompt"),
    ("POST", COMP, {"prompt": "x " * 700, "stream": True}, 400, "prompt"),
    ("POST", COMP, {"prompt": "hi", "max_tokens": 513}, 400, "max_tokens"),
    ("GET", "/nope", None, 404, None),
    ("POST", "/v1/nope", {"prompt": "hi"}, 404, None),
    ("GET", CHAT, None, 405, None),
    ("POST", "/health", {}, 405, None),
    ("DELETE", "/v1/models", None, 405, None),
    ("GET", "/v1/models/other", None, 404, "model"),
    ("POST", CHAT, "[" * 100000 + "]" * 100000, 400, None),
]


@pytest.mark.parametrize("method,path,body,status,param", BAD_REQUESTS)
def test_bad_request(port, method, path, body, status, param):
    got, headers, resp = raw(port, method, path, body)
    assert got == status, resp
    assert headers.get("Content-Type") == "application/json"
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param
    if status == 405:
        assert "Allow" in headers
    assert_healthy(port)


def test_no_content_length(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 411")
    assert_healthy(port)


def test_generation_errors(api_model):
    """stream_generate's ValueError (before the first token) is a 400 even when
    streaming; a failure mid-stream ends the stream with an error event; other
    failures are a 500; the server keeps serving."""
    model, tokenizer = api_model

    def failing(model, tokenizer, prompt, max_tokens, **kw) -> Iterator[Any]:
        if max_tokens == 7:
            raise ValueError("the prompt has 900 tokens but the model's context is 512 tokens")
        gen = stream_generate(model, tokenizer, prompt, max_tokens, **kw)
        yield next(gen)
        raise RuntimeError("boom")

    srv, thread = _serve(model, tokenizer, stream_fn=failing)
    port = srv.server_address[1]
    try:
        for stream in (False, True):
            body = {"prompt": "Hello", "max_tokens": 7, "stream": stream}
            status, headers, resp = raw(port, "POST", COMP, body)
            assert status == 400 and headers["Content-Type"] == "application/json"
            assert resp["error"]["code"] == "context_length_exceeded"
        status, _, resp = raw(port, "POST", COMP, {"prompt": "Hello", "max_tokens": 5})
        assert status == 500 and resp["error"]["type"] == "server_error"
        assert "boom" in resp["error"]["message"]
        status, _, resp = raw(
            port, "POST", COMP, {"prompt": "Hello", "max_tokens": 5, "stream": True}
        )
        assert status == 200
        events = [e for e in resp.decode().split("\n\n") if e]
        assert json.loads(events[-1][len("data: ") :])["error"]["type"] == "server_error"
        assert_healthy(port)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


# ------------------------------------------------------------------ disconnects


@pytest.fixture
def slow_server(api_model):
    """A server whose generation sleeps 10 ms per token; yields (server, port, calls),
    calls holding one list of generated-token counts per generation started."""
    model, tokenizer = api_model
    calls: list[list[int]] = []

    def slow(*args, **kw) -> Iterator[Any]:
        produced: list[int] = []
        calls.append(produced)
        for r in stream_generate(*args, **kw):
            produced.append(r.generation_tokens)
            time.sleep(0.01)
            yield r

    srv, thread = _serve(model, tokenizer, stream_fn=slow)
    yield srv, srv.server_address[1], calls
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _open(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a completion request on a raw socket (not reading the answer)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    return sock


def _wait_idle(srv, cancelled: int) -> None:
    deadline = time.time() + 10
    while (srv.engine.cancelled < cancelled or srv.engine.busy) and time.time() < deadline:
        time.sleep(0.02)
    assert srv.engine.cancelled == cancelled
    assert not srv.engine.busy and srv.engine.queued == 0


def test_disconnect_mid_stream_stops_generation(slow_server):
    """A client that goes away mid-stream stops its generation; the server carries on."""
    srv, port, calls = slow_server
    sock = _open(port, {"prompt": "Hello", "max_tokens": 400, "stream": True})
    data = b""
    while b"data: " not in data:
        data += sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 200")
    sock.close()
    _wait_idle(srv, 1)
    assert len(calls) == 1 and len(calls[0]) < 400  # stopped well before max_tokens
    # the server still answers, and generates
    assert_healthy(port)
    status, _, resp = raw(port, "POST", COMP, {"prompt": "Hello", "max_tokens": 3})
    assert status == 200 and resp["usage"]["completion_tokens"] == 3


def test_disconnect_while_running_or_queued(slow_server):
    """A non-streamed request whose client leaves stops too, and a queued one whose
    client leaves never starts."""
    srv, port, calls = slow_server
    running = _open(port, {"prompt": "Hello", "max_tokens": 400})
    deadline = time.time() + 10
    while not srv.engine.busy and time.time() < deadline:
        time.sleep(0.01)
    queued = _open(port, {"prompt": "Queued", "max_tokens": 400})
    while srv.engine.queued < 1 and time.time() < deadline:
        time.sleep(0.01)
    queued.close()
    time.sleep(0.2)
    running.close()
    _wait_idle(srv, 2)
    assert len(calls) == 1 and len(calls[0]) < 400  # the queued job never ran
    assert_healthy(port)


def test_process_exits_cleanly_after_serving(api_model_dir):
    """Generation on the worker thread must not make the process abort at exit (MLX
    needs the worker's streams freed: "terminate called without an active exception")."""
    script = f"""
import http.client, json, threading, warnings
import mlx_specstream
from mlx_specstream import load
from mlx_specstream.server import make_server
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model, tokenizer = load({str(api_model_dir)!r})
srv = make_server(model, tokenizer, "m", "127.0.0.1", 0)
threading.Thread(target=srv.serve_forever, daemon=True).start()
c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
c.request("POST", "/v1/completions", json.dumps({{"prompt": "Hello", "max_tokens": 8}}))
assert c.getresponse().status == 200
srv.shutdown()
srv.server_close()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ------------------------------------------------------------------ concurrency


def test_concurrent_clients_match_single_client(client, port):
    prompts = ["Hello", "The capital of", "def add(a, b):", "SELECT name"]
    single = {
        p: client.completions.create(model=MODEL_ID, prompt=p, max_tokens=12).choices[0].text
        for p in prompts
    }
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        c = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
        )
        try:
            for j in range(2):
                p = prompts[(i + j) % len(prompts)]
                if j % 2:
                    s = c.completions.create(model=MODEL_ID, prompt=p, max_tokens=12, stream=True)
                    text = "".join(ch.choices[0].text for ch in s if ch.choices)
                else:
                    text = (
                        c.completions.create(model=MODEL_ID, prompt=p, max_tokens=12)
                        .choices[0]
                        .text
                    )
                with lock:
                    results.append((p, text))
        except BaseException as e:  # noqa: BLE001 (reported below)
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 8
    for p, text in results:
        assert text == single[p]
    assert_healthy(port)
