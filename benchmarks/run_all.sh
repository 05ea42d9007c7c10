#!/usr/bin/env bash
# Every benchmark of the README's results, in one run on this machine, then the tables are
# copied into README.md.  Needs the baselines of scripts/train_baselines.sh in
# runs/baselines (Medusa heads, the distilled draft, the three SQL fine-tunes); the
# methods whose folders are missing are skipped.  About 30 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" benchmarks/bench_forward.py --sizes 1,2,4,8,16,64 | tee benchmarks/results/forward.txt
"$PY" benchmarks/profile_step.py --ops | tee benchmarks/results/profile_default.txt
"$PY" benchmarks/bench_decode.py --peers --tree-topk 3,2,1 --tag peers
"$PY" benchmarks/bench_sql.py --examples 100 --recalibrate
"$PY" benchmarks/update_readme.py
