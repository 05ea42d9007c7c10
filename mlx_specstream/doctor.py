"""Show the CPU backend's state (BLAS, GEMM shim, compiler, cache, weight alignment), the MLX
backend and measured fp32 matmul speed (MLX vs numpy)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from . import backend
from .backend import blas, shim


def matmul_gflops(n: int = 2048, repeat: int = 5) -> dict[str, float]:
    """fp32 n x n matmul throughput of MLX (this process) and numpy, in GFLOP/s."""
    import mlx.core as mx
    import numpy as np

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    t = time.perf_counter()
    for _ in range(repeat):
        mx.eval(a @ b)
    mlx_s = (time.perf_counter() - t) / repeat
    an, bn = np.array(a), np.array(b)
    an @ bn
    t = time.perf_counter()
    for _ in range(repeat):
        an @ bn
    np_s = (time.perf_counter() - t) / repeat
    flops = 2.0 * n**3
    return {"mlx": flops / mlx_s / 1e9, "numpy": flops / np_s / 1e9}


def _stock_gflops(n: int) -> float | None:
    """MLX throughput with its bundled BLAS, measured in a child process."""
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MLX_SPECSTREAM_BLAS="none")
    code = (
        "import json, mlx_specstream.doctor as d; "
        f"print(json.dumps(d.matmul_gflops({n}, repeat=1)))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=600, check=True)
        return float(json.loads(out.stdout.strip().splitlines()[-1])["mlx"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def matvec_gbps(rows: int = 49152, cols: int = 576, repeat: int = 10) -> float:
    """GB/s of weight read by a 1-row fp32 matmul the shape of an LM head: the kind of
    GEMM a decode step is made of."""
    import mlx.core as mx

    w = mx.random.normal((rows, cols))
    x = mx.random.normal((1, cols))
    mx.eval(w, x)
    mx.eval(x @ w.T)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best / 1e9


def report(n: int = 2048, stock: bool = True) -> dict[str, object]:
    import mlx.core as mx

    info: dict[str, object] = {
        **backend.report(),
        "mlx_version": mx.__version__,
        "default_device": str(mx.default_device()),
        "metal_available": bool(getattr(mx, "metal", None) and mx.metal.is_available()),
        "cuda_available": bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
        "matmul_n": n,
    }
    g = matmul_gflops(n)
    info["mlx_gflops"] = round(g["mlx"], 1)
    info["numpy_gflops"] = round(g["numpy"], 1)
    info["ratio_to_numpy"] = round(g["mlx"] / g["numpy"], 3)
    info["decode_matvec_gbps"] = round(matvec_gbps(), 1)
    if stock and blas.STATUS.state not in (blas.BlasState.DISABLED, blas.BlasState.NOT_LINUX):
        s = _stock_gflops(n)
        info["stock_mlx_gflops"] = round(s, 1) if s is not None else None
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=2048, help="matmul size (default 2048)")
    p.add_argument("--no-stock", action="store_true",
                   help="skip timing MLX's bundled BLAS in a child process")
    p.add_argument("--json", action="store_true", help="print JSON")


def _indent(text: str) -> str:
    return text.replace("\n", "\n" + " " * 20)


def backend_lines(info: dict[str, object]) -> list[str]:
    """The backend's states (``backend.report()``), a line each."""
    b, s, a = info["blas"], info["shim"], info["weight_alignment"]
    blas_line = b["state"] + (f" {b['path']}" if b["path"] else "")
    lines = [f"BLAS              : {blas_line} ({b['reason']})"]
    state = s["state"]
    if state == shim.ShimState.ACTIVE.value:
        kernel = f"skinny kernel up to {s['max_m']} rows" if s["max_m"] else "skinny kernel off"
        where = "cached build" if s["cached"] else "built now"
        lines.append(f"GEMM shim         : active {s['path']} ({where}; {kernel})")
    elif state == shim.ShimState.DISABLED.value:
        lines.append(f"GEMM shim         : disabled by {s['reason']}")
    else:
        lines.append(f"GEMM shim         : {state}: {_indent(str(s['reason']))}")
    compiler = s["compiler"] or ("unknown (cached build)" if s["cached"] else "-")
    flags = " ".join([*shim.CFLAGS, *s["flags"]]) if s["flags"] is not None else "-"
    lines.append(f"  compiler        : {compiler}")
    lines.append(f"  flags           : {flags}")
    for f, err in s["failed_flags"]:
        lines.append(f"  failed flag set : {' '.join(f) or '(none)'}: {err}")
    lines.append(f"  cache           : {s['cache_dir']}")
    lines.append(f"weight alignment  : {'on' if a['enabled'] else 'off'} ({a['reason']})")
    return lines


def run(args: argparse.Namespace) -> int:
    info = report(args.size, stock=not args.no_stock)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("\n".join(backend_lines(info)))
    print(f"MLX {info['mlx_version']}, default device {info['default_device']}, "
          f"Metal {info['metal_available']}, CUDA {info['cuda_available']}")
    print(f"fp32 {args.size}x{args.size} matmul: MLX {info['mlx_gflops']} GFLOP/s, "
          f"numpy {info['numpy_gflops']} GFLOP/s ({100 * info['ratio_to_numpy']:.0f}% of numpy)")
    print(f"decode-shaped matmul (1 x 576 x 49152): {info['decode_matvec_gbps']} GB/s of "
          "weights")
    if "stock_mlx_gflops" in info:
        print(f"MLX with its bundled BLAS  : {info['stock_mlx_gflops']} GFLOP/s")
    if not blas.STATUS.loaded and blas.STATUS.state is not blas.BlasState.NOT_LINUX:
        print("warning: no optimized BLAS is active; see the README (apt-get install "
              "libopenblas0-pthread)")
    return 0
