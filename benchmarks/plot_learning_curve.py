"""Learning curve of a streams training run: validation tokens per pass (what greedy
decoding would reach on the held-out answers, adaptive pause off) against the number
of training answers seen, from the report that ``train --eval-every N --report R``
writes.

    python benchmarks/plot_learning_curve.py REPORT.json [MORE.json ...] [--output curve.png]

Several reports are runs that continue one another (each started from the streams the
previous one saved): their curves are chained, answers seen adding up.  Prints a table and
writes a plot (matplotlib) beside the first report by default."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def curve_rows(report: dict) -> list[dict]:
    """(answers seen, tokens per pass per tree, stream top-1) rows, the state before
    training first."""
    rows = []
    before = report.get("valid_before")
    if before and "tpp" in before:
        rows.append({"examples": 0, **before})
    rows.extend(report.get("curve", []))
    return rows


def chained_rows(reports: list[dict]) -> list[dict]:
    """The rows of runs that continue one another, answers seen counted from the first
    run's start (a later run's state before training is the previous run's last row)."""
    rows: list[dict] = []
    offset = 0
    for i, report in enumerate(reports):
        part = curve_rows(report)
        if i > 0 and part and part[0]["examples"] == 0:
            part = part[1:]
        rows.extend({**r, "examples": r["examples"] + offset} for r in part)
        if rows:
            offset = rows[-1]["examples"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", nargs="+", help="train reports, in the order the runs were made")
    p.add_argument("--output", default=None, help="PNG path (default: REPORT with .png)")
    p.add_argument("--title", default="streams: validation tokens per pass")
    args = p.parse_args(argv)
    rows = chained_rows([json.loads(Path(r).read_text()) for r in args.report])
    if not rows:
        print(f"{args.report}: no curve (train with --eval-every N)", file=sys.stderr)
        return 1
    trees = list(rows[0]["tpp"])
    streams = sorted(k for k in rows[0] if k.startswith("s") and k[1:].isdigit())
    print("| answers seen | " + " | ".join(f"tokens/pass {t}" for t in trees)
          + " | " + " | ".join(f"top-1 {s}" for s in streams) + " |")
    print("|---" * (1 + len(trees) + len(streams)) + "|")
    for r in rows:
        print(f"| {r['examples']} | " + " | ".join(f"{r['tpp'][t]:.3f}" for t in trees)
              + " | " + " | ".join(f"{r[s]['acc']:.3f}" for s in streams) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["examples"] for r in rows]
    for t in trees:
        ax.plot(xs, [r["tpp"][t] for r in rows], marker="o", label=f"tree {t}")
    ax.set_xlabel("training answers seen")
    ax.set_ylabel("tokens per pass (validation, pause off)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(args.output) if args.output else Path(args.report[0]).with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
