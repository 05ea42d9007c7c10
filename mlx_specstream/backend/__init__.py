"""The CPU backend on Linux, set up by ``import mlx_specstream`` before ``mlx.core`` loads.

- ``blas``: finds OpenBLAS and loads it into the global symbol scope (``blas.STATUS``).
- ``shim``: builds (``shim.c``, cached per machine and flag set) and installs the GEMM
  shim in front of it (``shim.STATUS``).
- ``align``: moves fp32 weights to 64-byte boundaries for the shim's kernel.

None of these imports ``mlx.core`` at module level.
"""

from __future__ import annotations

from . import align, blas, shim
from .align import align_weights
from .blas import setup


def report() -> dict[str, object]:
    """Every state of the backend, for ``mlx-specstream doctor`` and tests."""
    on, why = align.enabled()
    return {
        "blas": blas.STATUS.as_dict(),
        "shim": shim.STATUS.as_dict(),
        "weight_alignment": {"enabled": on, "reason": why},
    }


__all__ = ["align", "align_weights", "blas", "report", "setup", "shim"]
