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
