"""The README's result blocks are filled from benchmarks/results by update_readme."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from update_readme import splice  # noqa: E402


def test_splice_replaces_only_the_named_block() -> None:
    readme = "a\n<!-- results:x -->\nold\n<!-- /results:x -->\nb\n<!-- results:y -->\nkeep\n"
    out = splice(readme, "x", "| new |\n")
    assert "| new |\n<!-- /results:x -->" in out and "old" not in out
    assert out.startswith("a\n") and "keep" in out


def test_splice_without_block_is_an_error() -> None:
    with pytest.raises(KeyError):
        splice("no blocks", "x", "t")


def test_readme_has_the_result_blocks() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in ("peers", "sql"):
        assert f"<!-- results:{name} -->" in readme and f"<!-- /results:{name} -->" in readme


def test_heldout_benchmark_runs_on_a_tiny_folder(api_model_dir: Path, tmp_path: Path) -> None:
    """bench_heldout (the trained streams' tokens per pass) on a tiny random folder: the
    table and the JSON are written, and every pass yields between 1 and 1 + depth tokens."""
    import json
    import warnings

    from bench_heldout import main

    out = tmp_path / "heldout.md"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--model", str(api_model_dir), "--trees", "2,1", "config",
                     "--prompts", "2", "--max-tokens", "6", "--output", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["tree"].split()[0] for r in rows] == ["2,1", "config"]
    for r in rows:
        assert r["passes"] > 0 and 1.0 <= r["tokens_per_pass"] <= 3.0
        assert all(0.0 <= a <= 1.0 for a in r["acceptance_per_depth"])
    assert "| 2,1 |" in out.read_text()
