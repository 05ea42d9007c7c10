"""The text-to-SQL task of the paper-table reproduction: real tables, executable queries,
disjoint splits, and the two accuracy measures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sql_data = pytest.importorskip("sql_data")


@pytest.fixture(scope="module")
def con():
    try:
        return sql_data.build_database()
    except FileNotFoundError:
        pytest.skip("vega_datasets not installed")


def test_tables_load_real_rows(con) -> None:
    assert con.execute("SELECT COUNT(*) FROM cars").fetchone()[0] == 406
    assert con.execute("SELECT COUNT(*) FROM iris WHERE species = 'setosa'").fetchone()[0] == 50


def test_examples_execute_and_are_distinct(con) -> None:
    exs = sql_data.make_examples(200, seed=3, con=con)
    assert len(exs) == 200
    assert len({e.question for e in exs}) == 200
    for e in exs:
        assert sql_data.execute(con, e.sql), e.sql
        msgs = e.messages()
        assert e.question in msgs[0]["content"] and "CREATE TABLE" in msgs[0]["content"]
        assert msgs[1]["content"] == e.sql


def test_split_is_disjoint(tmp_path: Path) -> None:
    try:
        counts = sql_data.write_split(tmp_path, 60, 20, seed=1, n_valid=10)
    except FileNotFoundError:
        pytest.skip("vega_datasets not installed")
    assert counts == {"test": 20, "valid": 10, "train": 60}
    qs = {}
    for name in counts:
        rows = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        qs[name] = {r["question"] for r in rows}
    assert not qs["train"] & qs["test"] and not qs["train"] & qs["valid"]
    assert (tmp_path / "tables.sqlite").exists()


def test_accuracy_measures(con) -> None:
    gold = "SELECT COUNT(*) FROM cars WHERE horsepower > 150;"
    assert sql_data.normalize_sql("select count(*)  from cars where horsepower > 150") == \
        sql_data.normalize_sql(gold)
    assert sql_data.same_result(con, "SELECT COUNT(*) FROM cars WHERE 150 < horsepower", gold)
    assert not sql_data.same_result(con, "SELECT COUNT(*) FROM cars", gold)
    assert not sql_data.same_result(con, "SELEC nonsense", gold)
    ordered = "SELECT name FROM cars ORDER BY horsepower DESC LIMIT 3;"
    assert sql_data.same_result(con, ordered, ordered)
