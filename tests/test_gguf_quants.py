"""GGUF files of every common tensor type, written on the fly with the ``gguf`` package."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_specstream  # noqa: F401  (installs the BLAS before mlx.core)
import tiny

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

#: Types gguf.quants.quantize can make from the source weights, and the largest error of a
#: dequantized weight allowed relative to the largest weight of its row: one step of the
#: type's grid (blocks are pieces of a row, so a block's step is at most the row's).
QUANTIZABLE = {
    "F32": 0.0,
    "F16": 2**-10,
    "BF16": 2**-8,
    "Q8_0": 1 / 127,
    "Q5_0": 1 / 16,
    "Q5_1": 2 / 31,
    "Q4_0": 1 / 8,
    "Q4_1": 2 / 15,
}
K_QUANTS = tuple(tiny.K_QUANT_SCALE_OFFSETS)


def _converted_weights(folder: Path) -> dict[str, mx.array]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, mx.array] = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(mx.load(str(folder / f)))
    return out


@pytest.mark.parametrize("qtype", list(QUANTIZABLE))
def test_quantized_gguf_matches_source(tmp_path: Path, qtype: str) -> None:
    from mlx_specstream.convert import convert

    path, config, source, stored = tiny.make_tiny_gguf_with_types(tmp_path / "m.gguf", qtype)
    out = convert(path, tmp_path / "out", verbose=False)
    weights = _converted_weights(out)
    assert set(weights) == set(source)
    for name, w in source.items():
        got = np.array(weights[name])
        assert got.dtype == np.float32 and got.shape == w.shape, name
        # the gguf package's own dequantization of the stored bytes, exactly
        np.testing.assert_array_equal(got, stored[name], err_msg=name)
        # and the source within the type's quantization error (blocks are row pieces)
        rel = QUANTIZABLE[qtype] if w.ndim == 2 else 0.0
        bound = rel * np.abs(w).max(axis=-1, keepdims=True) + 1e-7
        assert (np.abs(got - w) <= bound).all(), f"{name}: {np.abs(got - w).max()}"
    written = json.loads((out / "config.json").read_text())
    assert written["hidden_size"] == config["hidden_size"] == 256
    assert "quantization" not in written


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_gguf_dequantized_tensor_by_tensor(tmp_path: Path, qtype: str) -> None:
    """gguf.quants.quantize cannot make k-quants: random valid blocks are stored, and the
    converted weights must be their dequantization, in HF layout (llama: Q/K un-permuted)."""
    from mlx_specstream.convert import convert

    model_type = "llama" if qtype == "Q4_K" else "qwen2"
    path, _, source, stored = tiny.make_tiny_gguf_with_types(
        tmp_path / "k.gguf", qtype, model_type=model_type
    )
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type.name for t in reader.tensors} == {qtype, "F32"}
    out = convert(path, tmp_path / "out", verbose=False)
    weights = _converted_weights(out)
    for name, expected in stored.items():
        np.testing.assert_array_equal(np.array(weights[name]), expected, err_msg=name)
        assert np.isfinite(expected).all()
        if expected.ndim == 2:
            assert not np.array_equal(expected, source[name])  # stored blocks are not the source


def test_k_quant_model_runs_with_mlx_lm(tmp_path: Path) -> None:
    from mlx_specstream.convert import convert

    import mlx_lm

    path, _, _, _ = tiny.make_tiny_gguf_with_types(tmp_path / "k.gguf", "Q6_K")
    out = convert(path, tmp_path / "out", verbose=False, quantize_bits=8)
    model, tokenizer = mlx_lm.load(str(out))
    logits = model(mx.array([tokenizer.encode("def add(a, b):")]))
    assert np.isfinite(np.array(logits)).all()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


def test_keep_gguf_quant_refuses_k_quants(tmp_path: Path) -> None:
    from mlx_specstream.convert import convert

    path, _, _, _ = tiny.make_tiny_gguf_with_types(tmp_path / "k.gguf", "Q4_K")
    with pytest.raises(ValueError, match="Q4_K.*cannot keep"):
        convert(path, tmp_path / "out", keep_gguf_quant=True, verbose=False)
    assert not (tmp_path / "out").exists()


def test_lazy_reader_reads_one_tensor_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """The gguf-package path hands the writer tensors on demand: before the writer asks,
    nothing is dequantized, and each lookup dequantizes exactly one tensor."""
    from mlx_specstream.convert import gguf as reader

    path, _, source, _ = tiny.make_tiny_gguf_with_types(tmp_path / "k.gguf", "Q5_0")
    calls: list[tuple[int, ...]] = []
    real = gguf.quants.dequantize

    def counting(data, qtype):
        calls.append(data.shape)
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    src = reader.read_gguf(path)
    assert calls == []
    assert src.shapes() == {k: v.shape for k, v in source.items()}
    src.weights["model.layers.0.mlp.up_proj.weight"]
    assert len(calls) == 1
