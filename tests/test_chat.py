"""The chat REPL driven by scripted input, the generate subcommand, and the sampling
pass-through shared by generate / chat / serve."""

from __future__ import annotations

import io

from mlx_specstream import cli, generate_cli, stream_generate
from mlx_specstream.chat import ChatSession
from mlx_specstream.generate_cli import chat_prompt_ids, sampling_kwargs

import pytest


def _reply(api_model, messages, max_tokens):
    model, tokenizer = api_model
    ids = chat_prompt_ids(tokenizer, messages)
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens))


def _session(api_model, script: str, **kw) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    model, tokenizer = api_model
    s = ChatSession(model, tokenizer, stdin=io.StringIO(script), stdout=out, **kw)
    return s, out


def test_multi_turn_and_commands(api_model):
    s, out = _session(
        api_model,
        "Hello\n\nHow are you?\n/stats\n/help\n/bogus\n/quit\nnever read\n",
        max_tokens=12,
        system_prompt="Be brief.",
    )
    assert s.run() == 0
    text = out.getvalue()
    # history: system, user, assistant, user, assistant; replies as the library gives them
    roles = [m["role"] for m in s.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    first = _reply(api_model, s.messages[:2], 12)
    assert s.messages[2]["content"] == first
    assert s.messages[4]["content"] == _reply(api_model, s.messages[:4], 12)
    assert first in text
    assert text.count("tokens/s,") == 2 and text.count("tokens/pass]") == 2
    assert "replies: 2" in text and "tokens per forward pass" in text
    assert "/reset" in text  # help
    assert "unknown command /bogus" in text
    assert s.stats.replies == 2 and s.stats.generation_tokens == 24


def test_reset_and_eof(api_model):
    s, out = _session(api_model, "Hello\n/reset\nHello\n", max_tokens=8)
    assert s.run() == 0  # end of input leaves
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert "[conversation cleared]" in out.getvalue()
    # after /reset the same question gets the same first reply
    replies = [line for line in out.getvalue().splitlines() if "tokens/s" in line]
    assert len(replies) == 2


def test_too_long_turn_is_dropped(api_model):
    s, out = _session(api_model, "go " * 700 + "\nHello\n/exit\n", max_tokens=4)
    assert s.run() == 0
    assert "error:" in out.getvalue() and "context" in out.getvalue()
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert s.messages[0]["content"] == "Hello"


def test_generate_subcommand(api_model, api_model_dir, capsys):
    rc = cli.main(
        ["generate", "--model", str(api_model_dir), "--prompt", "Hello", "--max-tokens", "10"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    expected = _reply(api_model, [{"role": "user", "content": "Hello"}], 10)
    assert expected in out
    for key in ("Prompt:", "tokens-per-sec", "tokens-per-pass", "Acceptance per depth", "Peak"):
        assert key in out
    rc = cli.main(
        [
            "generate",
            "--model",
            str(api_model_dir),
            "-p",
            "Hello",
            "-m",
            "10",
            "--ignore-chat-template",
            "--no-speculative",
        ]
    )
    assert rc == 0
    model, tokenizer = api_model
    raw = "".join(r.text for r in stream_generate(model, tokenizer, "Hello", 10))
    assert raw in capsys.readouterr().out


def test_chat_subcommand(api_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/quit\n"))
    rc = cli.main(
        ["chat", "--model", str(api_model_dir), "--max-tokens", "5", "--tree-topk", "2,1"]
    )
    assert rc == 0
    assert "tokens/pass]" in capsys.readouterr().out


def test_sampling_pass_through():
    """Options left as None are not passed on; the others are, once SamplingParams (the
    one validator) accepts them."""
    assert sampling_kwargs() == {}
    assert sampling_kwargs(temp=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=3) == {
        "temp": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "seed": 3,
    }
    for bad, name in (({"temp": -1.0}, "temp"), ({"top_p": 0.0}, "top_p"),
                      ({"top_k": 1.5}, "top_k"), ({"seed": -2}, "seed"),
                      ({"repetition_context_size": 0}, "repetition_context_size")):
        with pytest.raises(ValueError, match=name):
            sampling_kwargs(**bad)


def test_generate_rejects_bad_sampling_options(api_model_dir, capsys):
    rc = cli.main(["generate", "--model", str(api_model_dir), "--temp", "-0.5"])
    assert rc != 0
    assert "temp" in capsys.readouterr().err


def test_generate_cli_decoding_flags(api_model_dir, capsys):
    base = ["generate", "--model", str(api_model_dir), "--prompt", "hello", "--max-tokens", "12"]
    assert cli.main(base + ["--no-speculative"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(base + ["--dynamic-tree"]) == 0
    dynamic = capsys.readouterr().out
    assert cli.main(base + ["--tree-topk", "2,1"]) == 0
    tree = capsys.readouterr().out
    first = plain.strip().splitlines()[0]
    assert dynamic.strip().splitlines()[0] == first == tree.strip().splitlines()[0]
    assert generate_cli.decoding_kwargs(
        generate_cli.argparse.Namespace(no_speculative=False, dynamic_tree=True)
    ) == {"speculative": True, "dynamic_tree": True}
