"""A text-to-SQL task from the real tables of ``vega_datasets``, for the task-mode
reproduction of the paper's Table 1.

The tables are loaded into one sqlite3 database; questions come from templates filled
with values drawn from the tables themselves, each paired with the SQL that answers it.
Every query is executed when it is made: one that fails, or returns nothing, is
dropped.  Train and test questions are disjoint strings.

    python benchmarks/sql_data.py --output runs/sql [--train 3000 --test 200]

writes train.jsonl / valid.jsonl / test.jsonl (chat ``messages``) and tables.sqlite.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import re
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

# table -> (file, {column: type}, noun for rows, name column or None)
# Columns not listed are not loaded (some files have dozens of numeric columns).
TABLES: dict[str, tuple[str, dict[str, str], str, str | None]] = {
    "cars": ("cars.json", {"Name": "TEXT", "Miles_per_Gallon": "REAL", "Cylinders": "INTEGER",
                           "Displacement": "REAL", "Horsepower": "INTEGER",
                           "Weight_in_lbs": "INTEGER", "Acceleration": "REAL", "Year": "TEXT",
                           "Origin": "TEXT"}, "cars", "Name"),
    "iris": ("iris.json", {"sepalLength": "REAL", "sepalWidth": "REAL", "petalLength": "REAL",
                           "petalWidth": "REAL", "species": "TEXT"}, "flowers", None),
    "barley": ("barley.json", {"yield": "REAL", "variety": "TEXT", "year": "INTEGER",
                               "site": "TEXT"}, "barley plots", "variety"),
    "airports": ("airports.csv", {"iata": "TEXT", "name": "TEXT", "city": "TEXT",
                                  "state": "TEXT", "country": "TEXT", "latitude": "REAL",
                                  "longitude": "REAL"}, "airports", "name"),
    "seattle_weather": ("seattle-weather.csv", {"date": "TEXT", "precipitation": "REAL",
                                                "temp_max": "REAL", "temp_min": "REAL",
                                                "wind": "REAL", "weather": "TEXT"},
                        "days", "date"),
    "stocks": ("stocks.csv", {"symbol": "TEXT", "date": "TEXT", "price": "REAL"},
               "monthly prices", "date"),
    "burtin": ("burtin.json", {"Bacteria": "TEXT", "Penicillin": "REAL",
                               "Streptomycin": "REAL", "Neomycin": "REAL",
                               "Gram_Staining": "TEXT", "Genus": "TEXT"}, "bacteria",
               "Bacteria"),
    "driving": ("driving.json", {"side": "TEXT", "year": "INTEGER", "miles": "INTEGER",
                                 "gas": "REAL"}, "years", "year"),
    "la_riots": ("la-riots.csv", {"first_name": "TEXT", "last_name": "TEXT", "age": "INTEGER",
                                  "gender": "TEXT", "race": "TEXT", "death_date": "TEXT",
                                  "neighborhood": "TEXT", "type": "TEXT"}, "victims",
                 "last_name"),
    "iowa_electricity": ("iowa-electricity.csv", {"year": "TEXT", "source": "TEXT",
                                                  "net_generation": "INTEGER"},
                         "yearly records", "year"),
    "ohlc": ("ohlc.json", {"date": "TEXT", "open": "REAL", "high": "REAL", "low": "REAL",
                           "close": "REAL", "signal": "TEXT"}, "trading days", "date"),
    "crimea": ("crimea.json", {"date": "TEXT", "wounds": "INTEGER", "other": "INTEGER",
                               "disease": "INTEGER"}, "months", "date"),
}

INSTRUCTION = "Write an SQLite query that answers the question."


def data_dir() -> Path:
    spec = importlib.util.find_spec("vega_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "vega_datasets is not installed (scripts/setup.sh installs it offline)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "_data"


def _column(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name).lower()


def _read(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _value(raw, typ: str):
    if raw is None or raw == "":
        return None
    try:
        if typ == "INTEGER":
            return int(float(raw))
        if typ == "REAL":
            return float(raw)
    except ValueError:
        return None
    return str(raw)


def build_database(path: str | Path | None = None) -> sqlite3.Connection:
    """All tables in one sqlite3 database (in memory when ``path`` is None)."""
    con = sqlite3.connect(":memory:" if path is None else str(path))
    src = data_dir()
    for table, (fname, cols, _, _) in TABLES.items():
        names = [_column(c) for c in cols]
        decl = ", ".join(f"{n} {t}" for n, t in zip(names, cols.values(), strict=True))
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"CREATE TABLE {table} ({decl})")
        rows = [tuple(_value(r.get(c), t) for c, t in cols.items()) for r in _read(src / fname)]
        con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(cols))})", rows)
    con.commit()
    return con


def schema(table: str) -> str:
    _, cols, _, _ = TABLES[table]
    decl = ", ".join(f"{_column(c)} {t}" for c, t in cols.items())
    return f"CREATE TABLE {table} ({decl});"


@dataclass
class Example:
    table: str
    question: str
    sql: str

    def messages(self) -> list[dict[str, str]]:
        user = f"{INSTRUCTION}\n\n{schema(self.table)}\n\nQuestion: {self.question}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.sql}]


def _words(col: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", col).replace("_", " ").lower()


def _sql_text(value: object) -> str:
    """A value inside a single-quoted SQL string literal."""
    return str(value).replace("'", "''")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


class _Maker:
    def __init__(self, con: sqlite3.Connection, table: str, rng: random.Random) -> None:
        self.con, self.t, self.rng = con, table, rng
        _, cols, self.noun, name = TABLES[table]
        self.name = _column(name) if name else None
        self.nums = [_column(c) for c, t in cols.items() if t in ("REAL", "INTEGER")]
        self.cats = []
        for c, t in cols.items():
            c = _column(c)
            if t == "TEXT" and c != self.name:
                n = con.execute(f"SELECT COUNT(DISTINCT {c}) FROM {table}").fetchone()[0]
                if 2 <= n <= 60:
                    self.cats.append(c)

    def _val(self, col: str):
        rows = self.con.execute(
            f"SELECT {col} FROM {self.t} WHERE {col} IS NOT NULL").fetchall()
        return self.rng.choice(rows)[0]

    def make(self) -> Example | None:
        r, t, noun = self.rng, self.t, self.noun
        kinds = ["max", "min", "count_gt"]
        if self.cats:
            kinds += ["count_eq", "avg_eq", "group_count", "group_avg", "distinct", "and",
                      "sum_eq", "group_max", "most"]
        if self.name:
            kinds += ["top_name", "low_names", "list_gt"]
        kind = r.choice(kinds)
        num = r.choice(self.nums) if self.nums else None
        cat = r.choice(self.cats) if self.cats else None
        if num is None:
            return None
        n_h = _words(num)
        c_h = _words(cat) if cat else ""
        if kind in ("max", "min"):
            word, extreme, fn = (("highest", "maximum", "MAX") if kind == "max"
                                else ("lowest", "minimum", "MIN"))
            q = r.choice([f"What is the {word} {n_h} in the {t} table?",
                          f"What is the {extreme} {n_h} among all {noun}?"])
            sql = f"SELECT {fn}({num}) FROM {t};"
        elif kind == "count_gt":
            v = _num(self._val(num))
            op, word = r.choice([(">", "greater than"), ("<", "less than")])
            q = r.choice([f"How many {noun} have a {n_h} {word} {v}?",
                          f"Count the {noun} whose {n_h} is {word} {v}."])
            sql = f"SELECT COUNT(*) FROM {t} WHERE {num} {op} {v};"
        elif kind == "count_eq":
            v = _sql_text(self._val(cat))
            q = r.choice([f"How many {noun} have {c_h} '{v}'?",
                          f"Count the {noun} where the {c_h} is '{v}'."])
            sql = f"SELECT COUNT(*) FROM {t} WHERE {cat} = '{v}';"
        elif kind in ("avg_eq", "sum_eq"):
            v = _sql_text(self._val(cat))
            word, fn = ("average", "AVG") if kind == "avg_eq" else ("total", "SUM")
            q = f"What is the {word} {n_h} of {noun} with {c_h} '{v}'?"
            sql = f"SELECT {fn}({num}) FROM {t} WHERE {cat} = '{v}';"
        elif kind == "group_count":
            q = r.choice([f"How many {noun} are there for each {c_h}?",
                          f"Count the {noun} per {c_h}."])
            sql = f"SELECT {cat}, COUNT(*) FROM {t} GROUP BY {cat};"
        elif kind == "group_avg":
            q = f"What is the average {n_h} for each {c_h}?"
            sql = f"SELECT {cat}, AVG({num}) FROM {t} GROUP BY {cat};"
        elif kind == "group_max":
            q = f"For each {c_h}, what is the highest {n_h}?"
            sql = f"SELECT {cat}, MAX({num}) FROM {t} GROUP BY {cat};"
        elif kind == "distinct":
            q = f"How many different {c_h} values are there among the {noun}?"
            sql = f"SELECT COUNT(DISTINCT {cat}) FROM {t};"
        elif kind == "most":
            q = f"Which {c_h} has the most {noun}?"
            sql = f"SELECT {cat} FROM {t} GROUP BY {cat} ORDER BY COUNT(*) DESC LIMIT 1;"
        elif kind == "and":
            v = _sql_text(self._val(cat))
            w = _num(self._val(num))
            q = f"How many {noun} with {c_h} '{v}' have a {n_h} above {w}?"
            sql = f"SELECT COUNT(*) FROM {t} WHERE {cat} = '{v}' AND {num} > {w};"
        elif kind == "top_name":
            best, order = r.choice([("highest", "DESC"), ("lowest", "ASC")])
            q = f"Which {_words(self.name)} has the {best} {n_h}?"
            sql = f"SELECT {self.name} FROM {t} ORDER BY {num} {order} LIMIT 1;"
        elif kind == "low_names":
            k = r.randint(2, 5)
            best, order = r.choice([("highest", "DESC"), ("lowest", "ASC")])
            q = f"List the {_words(self.name)} of the {k} {noun} with the {best} {n_h}."
            sql = f"SELECT {self.name} FROM {t} ORDER BY {num} {order} LIMIT {k};"
        else:  # list_gt
            v = _num(self._val(num))
            q = f"List the {_words(self.name)} of {noun} with a {n_h} above {v}."
            sql = f"SELECT {self.name} FROM {t} WHERE {num} > {v};"
        return Example(t, q, sql)


def make_examples(n: int, seed: int = 0, con: sqlite3.Connection | None = None) -> list[Example]:
    """``n`` distinct examples whose SQL executes and returns rows."""
    con = con or build_database()
    rng = random.Random(seed)
    makers = [_Maker(con, t, rng) for t in TABLES]
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        ex = rng.choice(makers).make()
        if ex is None or ex.question in seen:
            continue
        try:
            rows = con.execute(ex.sql).fetchall()
        except sqlite3.Error:
            continue
        if not rows or rows == [(None,)]:
            continue
        seen.add(ex.question)
        out.append(ex)
    return out


def normalize_sql(sql: str) -> str:
    """For exact match: one space between tokens, no trailing semicolon, keywords upper."""
    s = " ".join(sql.strip().split()).rstrip(";").strip()
    return re.sub(r"\b(select|from|where|group by|order by|limit|and|desc|asc|count|avg|sum|"
                  r"max|min|distinct)\b", lambda m: m.group(0).upper(), s, flags=re.I)


def execute(con: sqlite3.Connection, sql: str) -> list[tuple] | None:
    """Rows of ``sql`` (floats rounded), or None when it does not run."""
    try:
        rows = con.execute(sql).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    return [tuple(round(v, 4) if isinstance(v, float) else v for v in row) for row in rows]


def same_result(con: sqlite3.Connection, pred: str, gold: str) -> bool:
    """Execution match: equal rows (in order when the gold query orders them)."""
    a, b = execute(con, pred), execute(con, gold)
    if a is None or b is None:
        return False
    if "ORDER BY" in gold.upper():
        return a == b
    return sorted(map(repr, a)) == sorted(map(repr, b))


def write_split(output: str | Path, n_train: int, n_test: int, seed: int = 0,
                n_valid: int = 100) -> dict[str, int]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    con = build_database(out / "tables.sqlite.tmp")
    con.close()
    Path(out / "tables.sqlite.tmp").replace(out / "tables.sqlite")
    con = sqlite3.connect(str(out / "tables.sqlite"))
    exs = make_examples(n_train + n_valid + n_test, seed, con)
    random.Random(seed + 1).shuffle(exs)
    parts = {"test": exs[:n_test], "valid": exs[n_test:n_test + n_valid],
             "train": exs[n_test + n_valid:]}
    for name, items in parts.items():
        tmp = out / f".{name}.jsonl.tmp"
        with tmp.open("w") as f:
            for ex in items:
                rec = {"messages": ex.messages(), "table": ex.table, "question": ex.question}
                f.write(json.dumps(rec) + "\n")
        tmp.replace(out / f"{name}.jsonl")
    return {k: len(v) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--valid", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = write_split(args.output, args.train, args.test, args.seed, args.valid)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
