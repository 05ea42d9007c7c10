"""Clear errors and consistent statistics at the user-facing edges: mlx-lm-only keyword
arguments, --dynamic-tree with sampling, tree-shape flags, server request defaults and the
tokens/pass lines."""

from __future__ import annotations

import argparse

from mlx_specstream import generate, stream_generate
from mlx_specstream.generate import GenerationResponse, format_stats
from mlx_specstream.generate_cli import (
    add_decoding_arguments,
    add_sampling_arguments,
    decoding_kwargs,
)
from mlx_specstream.server import parse_request
from mlx_specstream.tree import add_tree_topk_argument, parse_tree_shape

import pytest


def test_mlx_lm_sampler_is_refused_with_a_hint(api_model) -> None:
    model, tokenizer = api_model
    with pytest.raises(TypeError, match="temp, top_p, top_k and min_p"):
        generate(model, tokenizer, "hi", 4, sampler=lambda x: x)
    with pytest.raises(TypeError, match="repetition_penalty"):
        next(stream_generate(model, tokenizer, "hi", 4, logits_processors=[]))
    with pytest.raises(TypeError, match="options are:.*temp"):
        next(stream_generate(model, tokenizer, "hi", 4, temperature=0.5))


def test_dynamic_tree_with_sampling_is_refused(api_model) -> None:
    model, tokenizer = api_model
    with pytest.raises(ValueError, match="dynamic_tree decodes greedily only"):
        next(stream_generate(model, tokenizer, "hi", 4, dynamic_tree=True, temp=0.7))
    with pytest.raises(ValueError, match="greedily only"):
        next(stream_generate(model, tokenizer, "hi", 4, dynamic_tree=True,
                             repetition_penalty=1.2))

    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    add_sampling_arguments(parser)
    with pytest.raises(ValueError, match="--dynamic-tree decodes greedily only"):
        decoding_kwargs(parser.parse_args(["--dynamic-tree", "--temp", "0.7"]))
    assert decoding_kwargs(parser.parse_args(["--dynamic-tree", "--temp", "0"]))["dynamic_tree"]


def test_tree_shape_parser() -> None:
    assert parse_tree_shape("3,2,1") == parse_tree_shape("3 2 1") == [3, 2, 1]
    assert parse_tree_shape(["3", "2,1"]) == [3, 2, 1]
    for bad in ("", "3,x", "3,0"):
        with pytest.raises(ValueError, match="integers >= 1"):
            parse_tree_shape(bad)
    parser = argparse.ArgumentParser()
    add_tree_topk_argument(parser)
    assert parser.parse_args(["--tree-topk", "3", "2", "1"]).tree_topk == [3, 2, 1]
    assert parser.parse_args(["--tree-topk", "3,2"]).tree_topk == [3, 2]
    assert parser.parse_args([]).tree_topk is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--tree-topk", "a"])


def test_server_request_defaults() -> None:
    defaults = {"temperature": 0.5, "top_p": 0.9, "max_tokens": 7}
    req = parse_request({"prompt": "x"}, False, {"m"}, 100, defaults)
    assert req.max_tokens == 7
    assert req.gen_kwargs["temp"] == 0.5 and req.gen_kwargs["top_p"] == 0.9
    req = parse_request({"prompt": "x", "temperature": 0, "max_completion_tokens": 3},
                        False, {"m"}, 100, defaults)
    assert req.max_tokens == 3 and req.gen_kwargs["temp"] == 0


def test_tokens_per_pass_is_decode_stats(api_model) -> None:
    model, tokenizer = api_model
    last = list(stream_generate(model, tokenizer, "hello there", 12))[-1]
    produced = round(last.tokens_per_pass * last.forward_passes)
    assert produced == last.generation_tokens - 1  # the prefill's token is not a pass's
    text = format_stats(last)
    assert f"{last.tokens_per_pass:.2f} tokens-per-pass" in text
    assert f"({produced} tokens from {last.forward_passes} passes after the prefill" in text

    r = GenerationResponse(text="", token=0, prompt_tokens=3, prompt_tps=1.0,
                           generation_tokens=11, generation_tps=1.0, peak_memory=0.0,
                           finish_reason="stop", forward_passes=4, tokens_per_pass=2.5)
    assert "2.50 tokens-per-pass (10 tokens from 4 passes after the prefill)" in format_stats(r)


@pytest.mark.parametrize(
    "name", ["convert", "generate", "chat", "serve", "train", "distill", "calibrate"]
)
def test_subcommand_help_is_for_users(name: str, capsys) -> None:
    from mlx_specstream import cli

    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert " ".join(cli.DESCRIPTIONS[name].split()[:8]) in " ".join(out.split())
    assert "``" not in out and "This module" not in out


def test_one_cache_root_and_atomic_writes(tmp_path, monkeypatch) -> None:
    from mlx_specstream import default_model
    from mlx_specstream.backend import shim
    from mlx_specstream.files import atomic_write, atomic_write_text

    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path / "home"))
    assert shim.cache_home() == default_model.cache_root() == tmp_path / "home"
    monkeypatch.setenv("MLX_SPECSTREAM_HOME", "")
    assert shim.cache_home() == default_model.cache_root()

    target = tmp_path / "a.json"
    atomic_write_text(target, "1")
    atomic_write_text(target, "2")
    assert target.read_text() == "2"

    def boom(p):
        p.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_generate_mlx_lm_flags(api_model, api_model_dir, capsys) -> None:
    from mlx_specstream import cli

    base = ["generate", "--model", str(api_model_dir), "-p", "Hello", "-m", "6"]
    assert cli.main(base + ["--max-kv-size", "512"]) == 1
    assert "--max-kv-size is not supported" in capsys.readouterr().err
    assert cli.main(base + ["--chat-template-config", "[1]"]) == 1
    assert "must be a JSON object" in capsys.readouterr().err

    assert cli.main(base + ["--verbose", "False", "--chat-template-config", "{}"]) == 0
    out = capsys.readouterr().out
    assert "tokens-per-pass" not in out and "==========" not in out

    model, tokenizer = api_model
    ids = list(tokenizer.encode("Hello"))
    first = next(iter(stream_generate(model, tokenizer, ids, 1))).token
    token = tokenizer.convert_ids_to_tokens(first)
    assert cli.main(base + ["--ignore-chat-template", "--extra-eos-token", token]) == 0
    assert "Generation: 1 tokens" in capsys.readouterr().out
