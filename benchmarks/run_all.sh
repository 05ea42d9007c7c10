#!/usr/bin/env bash
# Every benchmark of the README's results, in one run on this machine, then the tables are
# copied into README.md.  The peers and SQL rows need the baselines of
# scripts/train_baselines.sh in runs/baselines (Medusa heads, the distilled draft, the
# three SQL fine-tunes); the methods whose folders are missing are skipped.  About an hour
# on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# The broad suite (benchmarks/suite): tokens per pass with the adaptive pause off, greedy
# and sampled, then speed against mlx-lm and our autoregressive mode.
"$PY" benchmarks/bench_heldout.py --trees 3,2,1 --option lookup_branches=0 \
    --row "3,2,1 + context" tree_topk=3,2,1 lookup_branches=4 lookup_corpus=False \
    --row "3,2,1 + context + corpus" tree_topk=3,2,1 lookup_branches=4 \
    --per-category 3 --output benchmarks/results/heldout_broad.md
"$PY" benchmarks/bench_heldout.py --trees 3,2,1 --option lookup_branches=4 \
    --option lookup_skip_streams=0 --per-category 3 \
    --output benchmarks/results/heldout_broad_noskip.md
"$PY" benchmarks/bench_heldout.py --trees 3,2,1 --option temp=0.7 --option seed=0 \
    --option lookup_branches=0 \
    --row "3,2,1 + context + corpus" tree_topk=3,2,1 lookup_branches=4 \
    --row "3,2,1 + context + corpus, streams every pass" tree_topk=3,2,1 lookup_branches=4 \
    lookup_skip_streams=0 \
    --per-category 3 --output benchmarks/results/heldout_broad_sampled.md
"$PY" benchmarks/bench_decode.py --per-category 2 --tree-topk 3,2,1 \
    --row "SS calibrated, no corpus" lookup_corpus=False \
    --row "SS calibrated, no context drafts" lookup_branches=0 --tag broad
"$PY" benchmarks/bench_sampling.py --per-category 2 --temps 0.7 --ours-ar \
    --row "SS temp 0.7, no context drafts" lookup_branches=0
# Peers on the held-out chitchat prompts, the forward pass, the SQL task.
"$PY" benchmarks/bench_decode.py --suite chitchat --prompts 10 --peers --dynamic \
    --tree-topk 3,2,1 --tag peers
"$PY" benchmarks/bench_forward.py --sizes 1,2,4,8,16,64 | tee benchmarks/results/forward.txt
"$PY" benchmarks/profile_step.py --ops | tee benchmarks/results/profile_default.txt
"$PY" benchmarks/bench_sql.py --examples 100 --recalibrate
"$PY" benchmarks/update_readme.py
