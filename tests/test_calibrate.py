"""Tree sizing: acceptance statistics, the choice of tree, tree_from_paths."""

from __future__ import annotations

from mlx_specstream.calibrate import (
    acceptance_stats,
    apply_result,
    batch_cost_curve,
    choose_tree,
    measure_batch_cost,
    measure_cost,
)
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.model import SpecStreamModel
from mlx_specstream.tree import best_paths, tree_from_paths, tree_paths
from tinymodels import tiny_base

import mlx.core as mx


def test_tree_from_paths_round_trip() -> None:
    paths = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
    tree = tree_from_paths(paths)
    assert tree.size == 6
    assert sorted(tree_paths(tree)) == sorted(paths)
    assert tree.kmax == 2


def test_best_paths_is_a_tree_of_the_most_probable_paths() -> None:
    probs = {(0,): 0.7, (1,): 0.1, (0, 0): 0.5, (0, 1): 0.05, (0, 0, 0): 0.3, (2,): 0.02}
    assert best_paths(probs, 4) == [(0,), (0, 0), (0, 0, 0)]
    assert best_paths(probs, 5) == [(0,), (0, 0), (0, 0, 0), (1,)]
    assert best_paths({}, 8) == []


def test_choose_tree_trades_tokens_against_cost() -> None:
    accept = {"path_prob": {"0": 0.8, "0,0": 0.6, "0,0,0": 0.4, "1": 0.1}}
    cheap = {"autoregressive": 1.0, "tree": {"1": 1.0, "2": 1.0, "3": 1.0, "4": 1.0, "5": 1.0}}
    assert choose_tree(cheap, accept)["best"]["nodes"] == 5
    steep = {"autoregressive": 1.0, "tree": {"1": 1.0, "2": 1.9, "4": 3.5}}
    assert choose_tree(steep, accept)["best"]["nodes"] == 1


def test_choose_tree_reads_a_noisy_curve_as_non_decreasing() -> None:
    """A size measured slower than a larger one takes the larger one's time: 3 nodes
    measured at 2.0 but 4 at 1.2 means 3 nodes cost at most 1.2."""
    accept = {"path_prob": {"0": 0.8, "0,0": 0.6, "0,0,0": 0.4}}
    noisy = {"autoregressive": 1.0, "tree": {"1": 1.0, "2": 1.1, "3": 2.0, "4": 1.2}}
    choice = choose_tree(noisy, accept)
    assert [r["seconds"] for r in choice["table"]] == [1.0, 1.1, 1.2, 1.2]
    assert choice["best"]["nodes"] == 4


def test_acceptance_stats_and_cost_on_a_model_that_repeats_itself() -> None:
    """Weak weights make greedy output repeat one token and untrained streams (~ the
    main state) predict it too: rank 0 at every depth."""
    base = tiny_base("llama", seed=3, spread=0.02)
    model = SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2))
    stats = acceptance_stats(model, [[1, 5, 7, 9]], max_tokens=20, progress=False)
    probs = stats["path_prob"]
    assert probs["0"] > 0.8 and probs["0,0,0"] > 0.5
    cost = measure_cost(model, sizes=(1, 2, 4), context=16, repeat=1, progress=False)
    assert set(cost["tree"]) == {"1", "2", "4"} and cost["autoregressive"] > 0
    choice = choose_tree(cost, stats)
    tree = tree_from_paths(choice["tree_paths"])
    out = list(speculative_steps(model, mx.array([1, 5, 7, 9]), 20, DecodeStats(), tree))
    ref = list(speculative_steps(model, mx.array([1, 5, 7, 9]), 20, DecodeStats(),
                                 tree_from_paths([])))
    assert out == ref


def test_acceptance_counts_only_what_the_draft_vocabulary_can_draft() -> None:
    """With a draft vocabulary, calibration measures what decoding drafts: a token outside
    it is never accepted, whatever the whole head would say."""
    import numpy as np

    base = tiny_base("llama", seed=3, spread=0.02)
    model = SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2))
    prompt = [1, 5, 7, 9]
    full = acceptance_stats(model, [prompt], max_tokens=20, progress=False)["path_prob"]
    out = list(speculative_steps(model, mx.array(prompt), 20, DecodeStats(),
                                 tree_from_paths([])))
    others = np.setdiff1d(np.arange(64), np.array(out + prompt)).astype(np.int32)
    model.set_draft_vocab(mx.array(others))  # none of the tokens the model says
    none = acceptance_stats(model, [prompt], max_tokens=20, progress=False)["path_prob"]
    assert full["0"] > 0.8 and none == {}


def test_bad_tree_costs_and_missing_streams_folder_are_clear_errors(tmp_path) -> None:
    from mlx_specstream.calibrate import calibrate_folder
    from mlx_specstream.config import SpecStreamConfig

    import pytest

    with pytest.raises(ValueError, match="tree_costs"):
        SpecStreamConfig(tree_costs=[1.0, 0.0])
    with pytest.raises(FileNotFoundError, match="streams folder"):
        calibrate_folder(tmp_path, streams_path=tmp_path / "nope")


def test_more_default_prompts_than_held_out_turns_is_a_clear_error(api_model_dir) -> None:
    from mlx_specstream.calibrate import calibrate_folder

    import pytest

    with pytest.raises(ValueError, match="num_prompts must be 1..100"):
        calibrate_folder(api_model_dir, num_prompts=500, write=False, progress=False)


def test_calibrate_cli_takes_domain_prompts(api_model_dir, tmp_path, capsys) -> None:
    import json

    from mlx_specstream.cli import main

    f = tmp_path / "valid.jsonl"
    conv = [{"role": "user", "content": "Summarize: the cat sat on the mat."},
            {"role": "assistant", "content": "A cat sat."}]
    f.write_text(json.dumps({"messages": conv}) + "\n")
    assert main(["calibrate", "--model", str(api_model_dir), "--prompts", str(f),
                 "--max-tokens", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "batched pass with streams / without" in out
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["calibrate", "--model", str(api_model_dir), "--prompts",
                 str(tmp_path / "empty.txt"), "--dry-run"]) == 1


def test_batch_cost_is_measured_per_batch_size_and_stored_as_a_curve() -> None:
    base = tiny_base("llama", seed=3, spread=0.02)
    model = SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2))
    bc = measure_batch_cost(model, batches=(1, 3), context=16, repeat=1, progress=False)
    assert set(bc["plain"]) == set(bc["streams"]) == {"1", "3"}
    assert all(v > 0 for d in bc.values() for v in d.values())
    curve = batch_cost_curve({"plain": {"1": 1.0, "2": 2.0, "4": 2.0},
                              "streams": {"1": 1.5, "2": 4.0, "4": 6.0}})
    assert curve == [1.5, 2.0, 2.5, 3.0]
    section: dict = {}
    apply_result(section, {"cost": {"autoregressive": 1.0, "tree": {"1": 1.2}},
                           "choice": {"tree_paths": [[0]], "best": {"seconds": 1.2}},
                           "batch_cost": {"plain": {"1": 1.0, "2": 1.0},
                                          "streams": {"1": 1.1, "2": 1.8}}})
    assert section["batch_stream_costs"] == [1.1, 1.8]
    cfg = SpecStreamConfig(**section)
    assert cfg.batch_stream_costs == [1.1, 1.8]
    import pytest

    with pytest.raises(ValueError, match="batch_stream_costs"):
        SpecStreamConfig(batch_stream_costs=[1.0, -2.0])
