"""The one owner of the key/value cache.

Keys and values of the *main* stream only are stored, per layer, in buffers
pre-allocated in steps of ``STEP`` positions.  A forward pass writes the keys and
values of its new tokens right after the committed prefix ("pending" rows) and
attends to ``buffer[:offset + pending]``.  Afterwards the decode loop commits the
rows it accepted: they are gathered to ``[offset, offset + accepted)`` and the rest
is simply overwritten by the next pass (lazy roll-back, no copy).

The stream rows of the MSA layers keep their keys/values in the spare slots after
the pending rows for the length of one pass (``write``); they are never committed.

Layers may hold different pending rows (parallel pruning drops tree nodes from the
upper layers), so ``commit`` takes the accepted rows per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

STEP = 256


class TreeKVCache:
    stream_slots = True  # write() takes the stream rows' keys/values (model.run_layer)

    def __init__(self, num_layers: int, max_size: int | None = None) -> None:
        self.num_layers = num_layers
        self.max_size = max_size
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.pending: list[int] = [0] * num_layers
        self.offset = 0

    # -- used by the model -------------------------------------------------------
    def write(
        self,
        layer: int,
        keys: mx.array,
        values: mx.array,
        stream_keys: mx.array | None = None,
        stream_values: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Store new main-stream keys/values (B, Hkv, n, D) as pending rows of ``layer``
        and return the keys/values visible to this pass (committed prefix + new).

        ``stream_keys``/``stream_values`` (B, Hkv, s, D): the stream rows' keys/values,
        written into the spare slots right after the pending rows and returned after
        them, so that one slice of the buffer holds everything an MSA layer attends to
        (no copy of the cache per pass).  They are never committed: the next pass
        overwrites them."""
        n = keys.shape[2]
        end = self.offset + n
        if self.max_size is not None and end > self.max_size:
            raise ValueError(
                f"context overflow: {end} positions needed, the cache holds {self.max_size}"
            )
        stop = end + (stream_keys.shape[2] if stream_keys is not None else 0)
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or stop > buf_k.shape[2]:
            buf_k, buf_v = self._grow(buf_k, buf_v, keys, values, stop)
        buf_k[..., self.offset : end, :] = keys
        buf_v[..., self.offset : end, :] = values
        if stop > end:
            buf_k[..., end:stop, :] = stream_keys
            buf_v[..., end:stop, :] = stream_values
        self.keys[layer], self.values[layer] = buf_k, buf_v
        self.pending[layer] = n
        return buf_k[..., :stop, :], buf_v[..., :stop, :]

    def _grow(
        self,
        buf_k: mx.array | None,
        buf_v: mx.array | None,
        keys: mx.array,
        values: mx.array,
        end: int,
    ) -> tuple[mx.array, mx.array]:
        cap = ((end + STEP - 1) // STEP) * STEP
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        new_k = mx.zeros((B, H, cap, Dk), keys.dtype)
        new_v = mx.zeros((B, H, cap, Dv), values.dtype)
        if buf_k is not None and self.offset > 0:
            new_k[..., : self.offset, :] = buf_k[..., : self.offset, :]
            new_v[..., : self.offset, :] = buf_v[..., : self.offset, :]
        return new_k, new_v

    # -- used by the decode loop -------------------------------------------------
    def commit(self, rows: Sequence[int] | Sequence[Sequence[int]] | None = None) -> int:
        """Keep the given pending rows (in order) and drop the others.

        ``rows`` is one list for every layer, a list of lists (one per layer), or
        None to keep every pending row (prefill, autoregressive steps).  Returns the
        number of positions committed."""
        if rows is None:
            n = self.pending[0]
            if any(p != n for p in self.pending):
                raise RuntimeError("layers hold different pending rows; pass rows per layer")
            self.offset += n
            self.pending = [0] * self.num_layers
            return n
        per_layer: Sequence[Sequence[int]]
        if len(rows) > 0 and isinstance(rows[0], (list, tuple)):
            per_layer = rows  # type: ignore[assignment]
        else:
            per_layer = [rows] * self.num_layers  # type: ignore[list-item]
        if len(per_layer) != self.num_layers:
            raise ValueError(f"need rows for {self.num_layers} layers, got {len(per_layer)}")
        n = len(per_layer[0])
        off = self.offset
        for layer, r in enumerate(per_layer):
            if len(r) != n:
                raise ValueError("every layer must commit the same number of rows")
            if any(i < 0 or i >= self.pending[layer] for i in r):
                raise IndexError(f"row out of range of the {self.pending[layer]} pending rows")
            if list(r) == list(range(n)):
                continue  # already in place
            idx = mx.array(r, dtype=mx.int32) + off
            for bufs in (self.keys, self.values):
                buf = bufs[layer]
                buf[..., off : off + n, :] = mx.take(buf, idx, axis=2)
                bufs[layer] = buf
        self.offset += n
        self.pending = [0] * self.num_layers
        return n

    def discard(self) -> None:
        """Drop every pending row: the last pass leaves nothing in the cache."""
        self.pending = [0] * self.num_layers

    def reset(self) -> None:
        self.offset = 0
        self.pending = [0] * self.num_layers

    def trim(self, n: int) -> int:
        """Drop the last ``n`` committed positions (e.g. to reuse a chat prefix)."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.keys + self.values if b is not None)

    def state_arrays(self) -> list[mx.array]:
        return [b for b in self.keys + self.values if b is not None]
