"""mlx-specstream: Speculative Streaming inference on MLX.

Importing this package first installs an optimized BLAS on Linux (see ``backend``),
which must happen before ``mlx.core`` is loaded.
"""

from . import backend

backend.setup()

from .batching import BatchDecoder, BatchResponse, batch_generate  # noqa: E402
from .generate import GenerationResponse, generate, load, stream_generate  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "batch_generate", "GenerationResponse",
           "BatchDecoder", "BatchResponse"]
__version__ = "0.1.0"
