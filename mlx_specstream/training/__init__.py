"""Training of the speculative streams: data, the n-gram loss, the loop, distillation
and LoRA fusing.  Subcommands: ``train``, ``distill``, ``fuse``."""

from .data import heldout_prompts, load_split, make_batches
from .trainer import TrainConfig, evaluate, save_streams, train

__all__ = [
    "TrainConfig",
    "evaluate",
    "heldout_prompts",
    "load_split",
    "make_batches",
    "save_streams",
    "train",
]
