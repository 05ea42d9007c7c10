"""Put an optimized BLAS into the global symbol scope before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links the netlib *reference* BLAS: fp32 GEMM runs at a
few GFLOP/s, so a 16-token forward costs ~18x a 1-token forward and no speculative
method can win.  MLX resolves its ``cblas_*``/``sgemm_`` symbols at load time; a
library loaded earlier with ``RTLD_GLOBAL`` takes precedence.  OpenBLAS (Debian's
``libopenblas0-pthread``) was measured best for this workload on the project's
machines (PLATFORM.md): ~120 GFLOP/s GEMM, 1.7x cost for 16 tokens vs 1.  The GEMM shim
(``shim.py``) goes in front of it.

Optional: OpenBLAS 0.3.3x from the PyPI wheel ``scipy-openblas32``
(``MLX_SPECSTREAM_BLAS=wheel``), whose symbols carry a ``scipy_`` prefix, so it is only
usable through the shim, which exports them under the standard names.  When other
processes load the cores its threads collapse (speculative passes 10-60x slower were
measured), so it is not the default.

Set ``MLX_SPECSTREAM_BLAS`` to a library path to choose one, ``wheel`` for the wheel,
or ``none`` to keep MLX's own.  macOS uses Accelerate through MLX and needs none of this.
``setup()`` records what happened, and why, in ``STATUS``.
"""

from __future__ import annotations

import ctypes
import enum
import glob
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import shim

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)


class BlasState(str, enum.Enum):
    UNSET = "unset"  # setup() has not run
    LOADED = "loaded"  # path: the library
    DISABLED = "disabled"  # MLX_SPECSTREAM_BLAS=none
    NOT_FOUND = "not-found"  # no optimized BLAS on this machine
    LOAD_FAILED = "load-failed"  # found or named, but it would not load
    NOT_LINUX = "not-linux"  # MLX's own backend (Accelerate on macOS)
    TOO_LATE = "too-late"  # mlx.core was imported before mlx_specstream


@dataclass(frozen=True)
class BlasStatus:
    """Which BLAS MLX uses in this process, and why."""

    state: BlasState = BlasState.UNSET
    reason: str = ""
    path: str | None = None

    @property
    def loaded(self) -> bool:
        return self.state is BlasState.LOADED

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state.value, "reason": self.reason, "path": self.path}


STATUS = BlasStatus()
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


def find_wheel_blas() -> Path | None:
    """libscipy_openblas.so of the scipy-openblas32 wheel, located without importing it."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(list(spec.submodule_search_locations)[0]).glob("lib/libscipy_openblas*.so"))
    return hits[0] if hits else None


def _load_wheel_blas() -> tuple[str | None, str]:
    """The scipy-openblas32 wheel behind the shim: (path, "") or (None, why not)."""
    global _handle
    lib = find_wheel_blas()
    if lib is None:
        return None, "the scipy-openblas32 wheel is not installed"
    try:
        handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
    except OSError as e:
        return None, f"cannot load {lib}: {e}"
    if not shim.install(handle, "scipy_cblas_sgemm", "scipy_cblas_dgemm",
                        "scipy_openblas_set_num_threads", required=True):
        return None, f"the wheel needs the GEMM shim, which failed: {shim.STATUS.reason}"
    _handle = handle
    return str(lib), ""


def _load_system_blas(path: str) -> None:
    """A system OpenBLAS, behind the shim when it is available (else directly).  Raises
    OSError when the library itself does not load."""
    global _handle
    handle = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    shim.install(handle, "cblas_sgemm", "cblas_dgemm", "openblas_set_num_threads")
    # Then globally, for MLX's other BLAS/LAPACK symbols; the shim's GEMMs, loaded
    # first, stay the ones MLX binds to.
    _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _setup() -> BlasStatus:
    if not sys.platform.startswith("linux"):
        return BlasStatus(BlasState.NOT_LINUX, f"{sys.platform}: MLX uses its own BLAS "
                          "(Accelerate on macOS)")
    choice = os.environ.get("MLX_SPECSTREAM_BLAS", "").strip()
    if choice.lower() == "none":
        return BlasStatus(BlasState.DISABLED, "MLX_SPECSTREAM_BLAS=none: MLX's bundled BLAS")
    if "mlx.core" in sys.modules:
        shim.warn(
            "mlx.core was imported before mlx_specstream, so the optimized BLAS could not "
            "be installed; CPU matmuls use the wheel's slow reference BLAS. Import "
            "mlx_specstream first."
        )
        return BlasStatus(BlasState.TOO_LATE, "mlx.core was imported before mlx_specstream")
    note = ""
    if choice == "wheel":
        wheel, why = _load_wheel_blas()
        if wheel is not None:
            return BlasStatus(BlasState.LOADED, "MLX_SPECSTREAM_BLAS=wheel", wheel)
        note = f" (MLX_SPECSTREAM_BLAS=wheel not used: {why})"
        shim.warn(f"mlx_specstream: MLX_SPECSTREAM_BLAS=wheel not used ({why}); trying a "
                  "system OpenBLAS")
    path = find_blas() if choice in ("", "system", "wheel") else choice
    if path is None and not choice:
        # No system OpenBLAS: the wheel, when installed, beats the reference BLAS.
        wheel, why = _load_wheel_blas()
        if wheel is not None:
            return BlasStatus(BlasState.LOADED, "no system OpenBLAS; the scipy-openblas32 "
                              "wheel", wheel)
        note = f" ({why})"
    if path is None:
        shim.warn(
            "No optimized BLAS found: MLX on the CPU will use its reference BLAS and "
            "multi-token forwards run ~18x slower, which defeats speculative decoding. "
            "Install it with `apt-get install libopenblas0-pthread` (Debian/Ubuntu) or "
            "point MLX_SPECSTREAM_BLAS at a libopenblas.so."
        )
        return BlasStatus(BlasState.NOT_FOUND, "no libopenblas in the usual places" + note)
    try:
        _load_system_blas(path)
    except OSError as e:
        shim.warn(f"Could not load BLAS {path}: {e}")
        return BlasStatus(BlasState.LOAD_FAILED, f"cannot load {path}: {e}", path)
    how = f"MLX_SPECSTREAM_BLAS={choice}" if choice not in ("", "system", "wheel") else "found"
    return BlasStatus(BlasState.LOADED, how + note, path)


def setup() -> BlasStatus:
    """Load the BLAS globally (idempotent; call before ``mlx.core`` is imported).  Returns
    ``STATUS``; the shim's outcome is in ``shim.STATUS``."""
    global STATUS
    if STATUS.state is BlasState.UNSET:
        STATUS = _setup()
        if not STATUS.loaded:
            shim.not_applicable(f"no BLAS loaded by mlx_specstream ({STATUS.state.value})")
    return STATUS
