"""The speculative-streaming section of a model folder's config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CONFIG_KEY = "speculative_streaming"
STREAMS_FILE = "specstream.safetensors"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DRAFT_METHODS = ("streams", "medusa")


@dataclass
class SpecStreamConfig:
    """Settings of the speculative streams and of the draft tree.

    num_streams: gamma, the number of speculative streams (stream j predicts t+1+j).
    stream_layers: Ns, the number of top decoder layers that run multi-stream attention.
    tree_topk: candidates kept per tree depth (len <= num_streams); the product tree has
        1 + k1 + k1*k2 + ... nodes.
    prune_threshold: drop a tree node (and its subtree) from the MSA layers when the
        early-exit probability of its token under its parent is below this; 0 disables.
    adapter_rank: rank of the pruning (early-exit) adapter.
    stream_lora_rank: rank of the stream-only LoRA adapters in the MSA layers (0: none).
    stream_lora_scale: LoRA scale (alpha / rank).
    tree_paths: a calibrated tree as rank paths (see tree.tree_from_paths); when set it
        replaces the product tree of ``tree_topk`` (`mlx-specstream calibrate` writes it).
    draft_cost_ratio: cost of a tree pass over a plain pass on this machine (calibrate
        writes it); while the running tokens per pass stays below it, decoding pauses
        drafting for a few tokens.  0 never pauses.
    draft_method: "streams" (Speculative Streaming: multi-stream attention in the top
        ``stream_layers`` layers) or "medusa" (the baseline the paper compares with:
        ``num_streams`` residual heads on the last hidden state, read out through the
        model's final norm and LM head; no stream rows in any layer).  Both fill the
        same slots of a pass, so the tree, pruning and acceptance code is shared.
    lookup_branches: the longest context (prompt-lookup) branch added to the greedy
        draft tree when the context repeats an earlier n-gram; 0 disables.
    lookup_skip_streams: a pass whose context branch has at least this many tokens runs
        without the stream rows (the text is being copied: the context is likely to draft
        the next pass too, which then drafts from it alone); 0: the streams always run.
    lookup_corpus: when the context holds no earlier match, the context branch drafts
        from the folder's corpus of the model's past answers (``draft_corpus.safetensors``,
        written by ``mlx-specstream corpus``) if it has one.
    draft_vocab_size: the streams draft from the first K token ids of the folder's
        frequency ranking (``draft_vocab.safetensors``, written by ``mlx-specstream
        vocab``): their LM head computes K rows instead of the whole vocabulary (FR-Spec).
        Verification keeps the whole head, so the output is unchanged.  0: the whole head.
    batch_stream_costs: entry B-1 is the cost of a batched pass of B sequences carrying
        their stream rows (one node each) over the same pass without them, on this
        machine (calibrate writes it for B = 1..8; larger batches use the last entry).  A
        batch stops running the streams while the tokens they add do not pay for them.
        None: every batch size costs ``draft_cost_ratio``.
    """

    num_streams: int = 3
    stream_layers: int = 4
    tree_topk: list[int] = field(default_factory=lambda: [3, 2, 1])
    prune_threshold: float = 0.0
    adapter_rank: int = 8
    stream_lora_rank: int = 0
    stream_lora_scale: float = 2.0
    tree_paths: list[list[int]] | None = None
    draft_cost_ratio: float = 0.0
    draft_method: str = "streams"
    tree_costs: list[float] | None = None
    dynamic_tree: bool = False
    lookup_branches: int = 0
    lookup_skip_streams: int = 0
    lookup_corpus: bool = True
    draft_vocab_size: int = 0
    batch_stream_costs: list[float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_layers: int | None = None) -> None:
        if self.num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {self.num_streams}")
        if self.stream_layers < 1:
            raise ValueError(f"stream_layers must be >= 1, got {self.stream_layers}")
        if num_layers is not None and self.stream_layers > num_layers:
            raise ValueError(
                f"stream_layers={self.stream_layers} exceeds the model's {num_layers} layers"
            )
        if not self.tree_topk or any(int(k) < 1 for k in self.tree_topk):
            raise ValueError(f"tree_topk must be a non-empty list of ints >= 1: {self.tree_topk}")
        if len(self.tree_topk) > self.num_streams:
            raise ValueError(
                f"tree_topk has {len(self.tree_topk)} depths but there are only "
                f"{self.num_streams} streams"
            )
        if self.draft_cost_ratio < 0:
            raise ValueError(f"draft_cost_ratio must be >= 0, got {self.draft_cost_ratio}")
        if not 0.0 <= self.prune_threshold < 1.0:
            raise ValueError(f"prune_threshold must be in [0, 1), got {self.prune_threshold}")
        if self.draft_method not in DRAFT_METHODS:
            raise ValueError(
                f"draft_method must be one of {', '.join(DRAFT_METHODS)}, got "
                f"{self.draft_method!r}"
            )
        if self.draft_method == "medusa" and self.stream_lora_rank:
            raise ValueError("medusa heads have no stream rows in the layers: stream_lora_rank "
                             "must be 0")
        if self.tree_costs is not None:
            self.tree_costs = [float(c) for c in self.tree_costs]
            if any(c <= 0 for c in self.tree_costs):
                raise ValueError(f"tree_costs must be positive, got {self.tree_costs}")
        if self.batch_stream_costs is not None:
            self.batch_stream_costs = [float(c) for c in self.batch_stream_costs]
            if not self.batch_stream_costs or any(c <= 0 for c in self.batch_stream_costs):
                raise ValueError("batch_stream_costs must be a non-empty list of positive "
                                 f"costs, got {self.batch_stream_costs}")
        if isinstance(self.lookup_branches, bool) or int(self.lookup_branches) < 0:
            raise ValueError(f"lookup_branches must be an int >= 0, got {self.lookup_branches}")
        self.lookup_branches = int(self.lookup_branches)
        if isinstance(self.lookup_skip_streams, bool) or int(self.lookup_skip_streams) < 0:
            raise ValueError(
                f"lookup_skip_streams must be an int >= 0, got {self.lookup_skip_streams}")
        self.lookup_skip_streams = int(self.lookup_skip_streams)
        if not isinstance(self.lookup_corpus, bool):
            raise ValueError(f"lookup_corpus must be true or false, got {self.lookup_corpus!r}")
        if isinstance(self.draft_vocab_size, bool) or int(self.draft_vocab_size) < 0:
            raise ValueError(f"draft_vocab_size must be an int >= 0, got {self.draft_vocab_size}")
        self.draft_vocab_size = int(self.draft_vocab_size)
        if self.adapter_rank < 1:
            raise ValueError(f"adapter_rank must be >= 1, got {self.adapter_rank}")
        self.tree_topk = [int(k) for k in self.tree_topk]
        if self.tree_paths is not None:
            self.tree_paths = [[int(r) for r in p] for p in self.tree_paths]
            if any(len(p) > self.num_streams or min(p, default=0) < 0 for p in self.tree_paths):
                raise ValueError("tree_paths must be rank paths no deeper than num_streams")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SpecStreamConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys in '{CONFIG_KEY}' config: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def extra_parameters(self, hidden_size: int) -> int:
        """Parameters added by the method, not counting the optional stream LoRA."""
        adapter = 2 * self.adapter_rank * hidden_size
        if self.draft_method == "medusa":
            return self.num_streams * (hidden_size + 1) * hidden_size + adapter
        return self.num_streams * hidden_size + adapter
