"""The draft vocabulary (FR-Spec): the streams draft from a frequency-ranked subset of the
vocabulary; verification keeps the whole head, so greedy output does not change."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from mlx_specstream import drafting, vocab
from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.model import SpecStreamModel
from tinymodels import tiny_base

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_decode import PROMPT, mlx_lm_greedy


@pytest.fixture
def drafted(monkeypatch) -> list[list[int]]:
    """The stream-drafted tokens of every draft (the root and context branches left out)."""
    seen: list[list[int]] = []
    propose = drafting.StreamDrafter.propose

    def recording(self, context, room, paused):
        draft = propose(self, context, room, paused)
        if draft is not None and draft.streams > 1:
            seen.append(np.array(draft.tokens[1 : draft.streams]).tolist())
        return draft

    monkeypatch.setattr(drafting.StreamDrafter, "propose", recording)
    return seen


def _repeating_model() -> SpecStreamModel:
    """Weak weights: the model repeats itself, so untrained streams (~ main) are accepted."""
    base = tiny_base("llama", seed=3, spread=0.02)
    return SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2))


def test_greedy_output_unchanged_and_drafts_stay_in_the_subset(drafted) -> None:
    model = _repeating_model()
    ref = mlx_lm_greedy(model.base, PROMPT, 41)
    full = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 41, full)) == ref
    assert full.tokens_per_pass > 1.5 and drafted

    # a subset holding what the model says (ranked by count): drafts as good as before
    counts = np.bincount(np.array(ref), minlength=64)
    subset = vocab.rank_tokens(counts)[:16]
    model.set_draft_vocab(mx.array(subset))
    drafted.clear()
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 41, stats)) == ref
    assert stats.tokens_per_pass > 1.5
    assert drafted and set(sum(drafted, [])) <= set(subset.tolist())

    # a subset without them: nothing is accepted, and the output is still the same
    others = np.setdiff1d(np.arange(64), np.array(ref))[:16]
    model.set_draft_vocab(mx.array(others))
    drafted.clear()
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 41, stats)) == ref
    assert stats.tokens_per_pass == 1.0
    assert drafted and set(sum(drafted, [])) <= set(others.tolist())

    model.set_draft_vocab(None)
    assert list(speculative_steps(model, PROMPT, 41, DecodeStats())) == ref


@pytest.mark.parametrize("quantized", [False, True])
def test_draft_head_computes_the_subset_rows_of_the_head(quantized: bool) -> None:
    base = tiny_base("llama", seed=1)
    if quantized:
        nn.quantize(base, group_size=32, bits=8)
    model = SpecStreamModel(base, SpecStreamConfig())
    h = mx.random.normal((2, 3, 32))
    want = model.stream_logits(h)
    ids = mx.array([5, 0, 63, 17])
    model.set_draft_vocab(ids)
    got = model.draft_logits(h)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got[..., ids]), np.array(want[..., ids]), atol=1e-5)
    rest = np.setdiff1d(np.arange(64), np.array(ids))
    assert np.isneginf(np.array(got[..., mx.array(rest)])).all()
    assert mx.array_equal(model.stream_logits(h), want)  # training's head is untouched
    with pytest.raises(ValueError, match="ids in"):
        model.set_draft_vocab(mx.array([64]))


def test_count_and_rank() -> None:
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [int(c) for c in text]

    counts = vocab.count_tokens(Tok(), ["1123", "31"], 6, eos_ids=[5])
    assert counts.tolist() == [0, 3, 1, 2, 0, 2]
    assert vocab.rank_tokens(counts).tolist() == [1, 3, 5, 2, 0, 4]  # ties: lower id first


def test_vocab_command_and_load(api_model_dir: Path, tmp_path: Path, capsys, drafted) -> None:
    from mlx_specstream import generate, load
    from mlx_specstream.cli import main

    folder = tmp_path / "m"
    shutil.copytree(api_model_dir, folder)
    data = tmp_path / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": t}]}
        for t in ("The quick brown fox.", "the theory of the thing", "def add(a, b):")
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["vocab", "--model", str(folder), "--data", str(data), "--size", "40"]) == 0
    assert "most frequent" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert config[CONFIG_KEY]["draft_vocab_size"] == 40
    ranking = mx.load(str(folder / vocab.VOCAB_FILE))["token_ids"]
    assert ranking.size == config["vocab_size"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load(folder)
        plain, _ = load(api_model_dir)
    assert model._draft_head is not None and model._draft_head.ids.size == 40
    assert plain._draft_head is None
    kw = dict(max_tokens=12, tree_topk=[2, 1])
    assert generate(model, tok, "hello", **kw) == generate(plain, tok, "hello", **kw)
    # sampled drafting: proposal distributions are zero outside the subset
    drafted.clear()
    text = generate(model, tok, "hello", **kw, temp=0.8, seed=3)
    subset = set(np.array(model._draft_head.ids).tolist())
    assert isinstance(text, str) and drafted and set(sum(drafted, [])) <= subset

    # training fresh streams (--reinit) on this folder drafts from the same vocabulary
    from mlx_specstream.training.trainer import prepare_model

    spec = SpecStreamConfig.from_dict({**model.cfg.to_dict(), "stream_lora_rank": 4})
    fresh = prepare_model(model, spec, reinit=True)
    assert fresh is not model and fresh._draft_head is not None
    assert mx.array_equal(fresh._draft_head.ids, model._draft_head.ids)

    vocab.set_draft_vocab_size(folder, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load(folder)[0]._draft_head is None
    vocab.set_draft_vocab_size(folder, 40)
    (folder / vocab.VOCAB_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="mlx-specstream vocab"):
        load(folder)
    with pytest.raises(ValueError, match="no texts"):
        vocab.build_draft_vocab(folder, [], 10)
