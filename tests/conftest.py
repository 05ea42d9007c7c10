"""Shared test set-up.  mlx_specstream is imported first so that the optimized BLAS is
in place before anything loads mlx.core."""

import warnings
from pathlib import Path

import mlx_specstream  # noqa: F401

import pytest


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF model folder (tests/tiny.py), one per test module: training tests
    write into it."""
    from tiny import make_tiny_hf_folder

    return make_tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "model")


# --- fixtures of the API / server / chat tests ----------------------------------------


@pytest.fixture(scope="session")
def api_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model folder (llama, ChatML template, context 512) for load().

    Made with tests/tiny.py and converted with mlx_specstream.convert.convert when that
    is available; otherwise the HF folder itself (load() accepts it, fresh streams)."""
    from tiny import make_tiny_hf_folder

    root = tmp_path_factory.mktemp("api_model")
    src = make_tiny_hf_folder(root / "hf", "llama")
    try:
        from mlx_specstream.convert import convert
    except ImportError:
        return Path(src)
    dst = root / "converted"
    convert(src, dst, verbose=False)
    return dst


@pytest.fixture(scope="session")
def api_model(api_model_dir: Path):
    """(model, tokenizer) of ``api_model_dir``, loaded once per session."""
    from mlx_specstream import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained streams
        return load(api_model_dir)
