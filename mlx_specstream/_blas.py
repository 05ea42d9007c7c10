"""Put an optimized BLAS into the global symbol scope before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links the netlib *reference* BLAS: fp32 GEMM runs at a
few GFLOP/s, so a 16-token forward costs ~18x a 1-token forward and no speculative
method can win.  MLX resolves its ``cblas_*``/``sgemm_`` symbols at load time; a
library loaded earlier with ``RTLD_GLOBAL`` takes precedence.  OpenBLAS (Debian's
``libopenblas0-pthread``) was measured best for this workload on the project's
machines (PLATFORM.md): ~120 GFLOP/s GEMM, 1.7x cost for 16 tokens vs 1.

Set ``MLX_SPECSTREAM_BLAS`` to a library path to choose one, or to ``none`` to keep
MLX's own.  macOS uses Accelerate through MLX and needs none of this.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

#: What was loaded: a path, "none" (disabled), "unavailable", "not-linux" or
#: "too-late" (mlx.core was imported first).
ACTIVE: str = "unset"
_handle: ctypes.CDLL | None = None


def find_blas() -> str | None:
    """Return the path of an optimized BLAS on this machine, or None."""
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in ("/usr/lib/*/openblas*/libopenblas*.so*", "/usr/lib/*/libopenblas*.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def setup() -> str:
    """Load the BLAS globally (idempotent). Returns the value of ``ACTIVE``."""
    global ACTIVE, _handle
    if ACTIVE != "unset":
        return ACTIVE
    if not sys.platform.startswith("linux"):
        ACTIVE = "not-linux"
        return ACTIVE
    choice = os.environ.get("MLX_SPECSTREAM_BLAS", "").strip()
    if choice.lower() == "none":
        ACTIVE = "none"
        return ACTIVE
    if "mlx.core" in sys.modules:
        ACTIVE = "too-late"
        warnings.warn(
            "mlx.core was imported before mlx_specstream, so the optimized BLAS could not "
            "be installed; CPU matmuls use the wheel's slow reference BLAS. Import "
            "mlx_specstream first.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ACTIVE
    path = choice or find_blas()
    if path is None:
        ACTIVE = "unavailable"
        warnings.warn(
            "No optimized BLAS found: MLX on the CPU will use its reference BLAS and "
            "multi-token forwards run ~18x slower, which defeats speculative decoding. "
            "Install it with `apt-get install libopenblas0-pthread` (Debian/Ubuntu) or "
            "point MLX_SPECSTREAM_BLAS at a libopenblas.so.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ACTIVE
    try:
        _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        ACTIVE = "unavailable"
        warnings.warn(f"Could not load BLAS {path}: {e}", RuntimeWarning, stacklevel=3)
        return ACTIVE
    ACTIVE = path
    return ACTIVE
