"""Put an optimized BLAS into the global symbol scope before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links the netlib *reference* BLAS: fp32 GEMM runs at a
few GFLOP/s, so a 16-token forward costs ~18x a 1-token forward and no speculative
method can win.  MLX resolves its ``cblas_*``/``sgemm_`` symbols at load time; a
library loaded earlier with ``RTLD_GLOBAL`` takes precedence.  OpenBLAS (Debian's
``libopenblas0-pthread``) was measured best for this workload on the project's
machines (PLATFORM.md): ~120 GFLOP/s GEMM, 1.7x cost for 16 tokens vs 1.

Optional: OpenBLAS 0.3.3x from the PyPI wheel ``scipy-openblas32``
(``MLX_SPECSTREAM_BLAS=wheel``).  Its symbols carry a ``scipy_`` prefix, so a 10-line
shim exporting ``cblas_sgemm``/``cblas_dgemm`` is compiled once with the system C
compiler into the cache folder.  Measured here on a quiet machine, 2-8 token passes ran
15-25% faster with it than with Debian's 0.3.21; but when other processes load the
cores its threads collapse (speculative passes 10-60x slower), so it is not the default.

Set ``MLX_SPECSTREAM_BLAS`` to a library path to choose one, ``wheel`` for the wheel,
or ``none`` to keep MLX's own.  macOS uses Accelerate through MLX and needs none of this.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

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


_SHIM_C = """
typedef int I;
extern void scipy_cblas_sgemm(I, I, I, I, I, I, float, const float *, I, const float *, I,
                              float, float *, I);
extern void scipy_cblas_dgemm(I, I, I, I, I, I, double, const double *, I, const double *, I,
                              double, double *, I);
void cblas_sgemm(I o, I ta, I tb, I m, I n, I k, float al, const float *a, I lda,
                 const float *b, I ldb, float be, float *c, I ldc) {
  scipy_cblas_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
void cblas_dgemm(I o, I ta, I tb, I m, I n, I k, double al, const double *a, I lda,
                 const double *b, I ldb, double be, double *c, I ldc) {
  scipy_cblas_dgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
"""


def cache_home() -> Path:
    return Path(os.environ.get("MLX_SPECSTREAM_HOME", Path.home() / ".cache" / "mlx-specstream"))


def find_wheel_blas() -> Path | None:
    """libscipy_openblas.so of the scipy-openblas32 wheel, located without importing it."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(list(spec.submodule_search_locations)[0]).glob("lib/libscipy_openblas*.so"))
    return hits[0] if hits else None


def build_shim() -> Path | None:
    """Compile (once) the cblas shim; None when no C compiler is available."""
    digest = hashlib.sha1(_SHIM_C.encode()).hexdigest()[:12]
    out = cache_home() / "blas" / f"libmlxss_cblas_{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "shim.c"
        src.write_text(_SHIM_C)
        lib = Path(tmp) / out.name
        try:
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)],
                           check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        os.replace(lib, out)
    return out


def _load_wheel_blas() -> str | None:
    lib = find_wheel_blas()
    if lib is None:
        return None
    shim = build_shim()
    if shim is None:
        return None
    global _handle
    try:
        handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _handle = handle
    return str(lib)


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
    if choice == "wheel":
        wheel = _load_wheel_blas()
        if wheel is not None:
            ACTIVE = wheel
            return ACTIVE
    path = find_blas() if choice in ("", "system", "wheel") else choice
    if path is None and not choice:
        path = _load_wheel_blas()  # no system OpenBLAS: the wheel beats the reference BLAS
        if path is not None:
            ACTIVE = path
            return ACTIVE
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
