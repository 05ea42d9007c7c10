"""Shared test set-up.  mlx_specstream is imported first so that the optimized BLAS is
in place before anything loads mlx.core."""

import mlx_specstream  # noqa: F401
