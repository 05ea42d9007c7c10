"""Medusa heads, the paper's baseline: the same slots of a pass as the streams, trained
by the same objective; decoding with them stays lossless."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.model import SpecStreamModel
from mlx_specstream.training.trainer import (
    TrainConfig,
    frozen_features,
    prepare_model,
    stream_forward,
    train,
)
from mlx_specstream.tree import product_tree
from tinymodels import cyclic_batches, main_logits, tiny_base, tiny_model

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from test_decode import PROMPT, mlx_lm_greedy

MEDUSA = {"draft_method": "medusa", "num_streams": 2, "stream_layers": 2, "tree_topk": [2, 1]}


def test_fresh_heads_copy_the_main_head() -> None:
    model = tiny_model("llama", **MEDUSA)
    toks = mx.array([[3, 9, 27, 17, 51]])
    main, heads, _ = model(toks)
    assert heads.shape == (1, 5, 2, 64)
    for j in range(2):
        assert mx.allclose(heads[:, :, j], main, atol=1e-5).item()
    params = {k: v.size for k, v in model.stream_parameters().items()}
    assert "stream_embeddings" not in params
    assert sum(params.values()) == model.cfg.extra_parameters(32)


def test_medusa_rejects_stream_lora() -> None:
    with pytest.raises(ValueError, match="stream_lora_rank"):
        SpecStreamConfig(draft_method="medusa", stream_lora_rank=4)
    with pytest.raises(ValueError, match="draft_method"):
        SpecStreamConfig(draft_method="eagle")


@pytest.mark.parametrize("topk", [[2, 1], [3], [1, 1]])
def test_medusa_decoding_equals_mlx_lm_greedy(topk) -> None:
    model = tiny_model("qwen3", **MEDUSA)
    model.streams.update(tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(2)) * 0.3,
                                  model.streams.parameters()))
    ref = mlx_lm_greedy(model.base, PROMPT, 40)
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 40, stats, product_tree(topk))) == ref


def test_medusa_accepts_on_a_repetitive_model() -> None:
    base = tiny_base("llama", seed=3, spread=0.02)
    model = SpecStreamModel(base, SpecStreamConfig(**MEDUSA))
    ref = mlx_lm_greedy(base, PROMPT, 41)
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 41, stats)) == ref
    assert stats.tokens_per_pass > 1.5


def test_medusa_training_learns_and_keeps_main_bit_identical() -> None:
    model = prepare_model(tiny_model("llama"), SpecStreamConfig(**MEDUSA))
    assert model.cfg.draft_method == "medusa"
    batches = cyclic_batches()
    probe = mx.array(batches[0].tokens)
    ref = main_logits(model, probe)
    feats = frozen_features(model, probe, with_main=True)
    assert mx.allclose(stream_forward(model, feats), model(probe)[1], atol=1e-4).item()
    tc = TrainConfig(iters=40, lr=1e-2, cache_gb=0.1, seed=0)
    report = train(model, batches, batches, tc, log=lambda s: None, progress=False)
    before, after = report["valid_before"], report["valid_after"]
    for s in ("s1", "s2"):
        assert after[s]["acc"] > before[s]["acc"] + 0.2
    assert mx.array_equal(main_logits(model, probe), ref).item()


def test_plain_lora_task_mode_trains_no_streams(tiny_folder: Path, tmp_path: Path) -> None:
    from mlx_specstream.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "hi", "completion": "Hello there! How are you today?"}] * 4
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ad = tmp_path / "lora"
    assert main(["train", "--model", str(tiny_folder), "--data", str(data), "--mode", "task",
                 "--no-streams", "--adapter-path", str(ad), "--iters", "3", "--lr", "1e-2",
                 "--lora-rank", "4", "--stream-layers", "2", "--no-progress"]) == 0
    cfg = json.loads((ad / "config.json").read_text())["speculative_streaming"]
    assert cfg["tree_paths"] == []  # decodes plainly
    assert "stream_embeddings" in mx.load(str(ad / "specstream.safetensors"))
    ad2 = tmp_path / "medusa"
    assert main(["train", "--model", str(tiny_folder), "--data", str(data), "--mode", "task",
                 "--draft-method", "medusa", "--adapter-path", str(ad2), "--iters", "3",
                 "--lr", "1e-2", "--lora-rank", "4", "--stream-layers", "2",
                 "--no-progress"]) == 0
    w = mx.load(str(ad2 / "specstream.safetensors"))
    assert "medusa_weight" in w and float(mx.abs(w["medusa_weight"]).max()) > 0
    assert not np.isnan(np.array(w["medusa_weight"])).any()
