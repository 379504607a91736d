"""PackedKV: one layer's cached tokens, packed in preallocated slots plus a dense window of the newest ones.

A key or value goes down once: ``write`` encodes it straight into its slot (``kernels.encode_into``), and
``dense_states`` decodes slots straight into the tensor an attention call reads (``kernels.dequantize_into``).
Both cache layouts use this type; they differ in policy only: the dynamic layer grows the slots as tokens come
(``reserve``) and compresses its window in blocks, the static layer allocates every slot up front.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .outliers import SplitQuantizedTensor, SplitQuantizer, outlier_order
from .quantizer import QuantizedTensor, TurboQuantizer


def empty_slots(quantizer: TurboQuantizer | SplitQuantizer, batch: int, heads: int, capacity: int,
                dtype: torch.dtype, device: torch.device, fill=torch.empty) -> QuantizedTensor | SplitQuantizedTensor:
    """Storage for (batch, heads, capacity) vectors of ``quantizer`` (``dtype``: what they decode to); ``fill``:
    torch.empty (uninitialized) or torch.zeros (slots decode to zeros before they are written)."""
    if isinstance(quantizer, SplitQuantizer):
        return SplitQuantizedTensor(*(empty_slots(part, batch, heads, capacity, dtype, device, fill)
                                      for part in quantizer.parts))
    lead = (batch, heads, capacity)
    qjl = quantizer.qjl
    return QuantizedTensor(
        packed_indices=fill(*lead, quantizer.dim * quantizer.mse_bits // 8, dtype=torch.uint8, device=device),
        scales=fill(lead, dtype=torch.float32, device=device),
        qjl_signs=fill(*lead, quantizer.dim // 8, dtype=torch.uint8, device=device) if qjl else None,
        residual_norms=fill(lead, dtype=torch.float32, device=device) if qjl else None,
        dim=quantizer.dim, mse_bits=quantizer.mse_bits, dtype=dtype,
    )


def encode_slots(states: torch.Tensor, quantizer: TurboQuantizer | SplitQuantizer,
                 slots: QuantizedTensor | SplitQuantizedTensor, start: int, channels: torch.Tensor | None) -> None:
    """Encode (B, H, n, D) states into ``slots`` [start, start + n) (``kernels.encode_into``); a split quantizer's
    parts each get their channels, in the order ``channels`` ((B, H, D) int64, outliers first; None: as they are)."""
    from .kernels import encode_into

    if not isinstance(quantizer, SplitQuantizer):
        encode_into(states, quantizer, slots, start)
        return
    if channels is not None:
        states = torch.take_along_dim(states, channels[:, :, None, :], dim=-1)
    for part, part_states, part_slots in zip(quantizer.parts, quantizer.split(states), (slots.outliers, slots.regular)):
        encode_into(part_states, part, part_slots, start)


def decode_slots(past: QuantizedTensor | SplitQuantizedTensor, quantizer: TurboQuantizer | SplitQuantizer,
                 out: torch.Tensor, channels: torch.Tensor | None) -> None:
    """Dequantize ``past`` (leading shape (B, H, n)) into ``out`` (B, H, n, D) (``kernels.dequantize_into``); a split
    quantizer's coordinates go back to the channels they came from (``channels``: as in ``encode_slots``)."""
    from .kernels import dequantize_into

    if not isinstance(quantizer, SplitQuantizer):
        dequantize_into(past, quantizer, out)
        return
    ordered = out if channels is None else torch.empty_like(out)
    for part, part_out, part_past in zip(quantizer.parts, quantizer.split(ordered), (past.outliers, past.regular)):
        dequantize_into(part_past, part, part_out)
    if channels is not None:
        out.scatter_(-1, channels[:, :, None, :].expand(out.shape), ordered)


def dense_states(past: QuantizedTensor | SplitQuantizedTensor, quantizer: TurboQuantizer | SplitQuantizer,
                 *parts: torch.Tensor, prefix: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                 channels: torch.Tensor | None = None) -> torch.Tensor:
    """``prefix`` ((B, H, s, D) or None: the sink tokens), then ``past`` (leading shape (B, H, Np)) dequantized plus
    ``offset`` ((B, H, 1, D) fp32 or None: the key offset its tokens were stored without), then ``parts``
    ((B, H, n_i, D) each) along the token axis: one new (B, H, s + Np + sum n_i, D) tensor in ``parts[-1].dtype``,
    each piece written in place (no concatenation). ``channels``: a split quantizer's channel order (``decode_slots``).
    """
    batch, heads, _, dim = parts[-1].shape
    pieces = (past, *parts) if prefix is None else (prefix, past, *parts)
    past_length = past.shape[-2]
    dense = parts[-1].new_empty((batch, heads, sum(piece.shape[-2] for piece in pieces), dim))
    start = 0
    for piece in pieces:
        if piece is past:
            if past_length and offset is None:
                decode_slots(past, quantizer, dense[:, :, start:start + past_length], channels)
            elif past_length:  # centered keys: decode and add the offset in fp32, then round (saturating) once
                centered = torch.empty(dense[:, :, start:start + past_length].shape, device=dense.device)
                decode_slots(past, quantizer, centered, channels)
                limit = torch.finfo(dense.dtype).max
                dense[:, :, start:start + past_length] = (centered + offset).clamp_(-limit, limit)
            start += past_length
        else:
            dense[:, :, start:start + piece.shape[-2]] = piece
            start += piece.shape[-2]
    return dense


def _finite_mean(states: torch.Tensor) -> torch.Tensor:
    """(B, H, n, D) -> (B, H, 1, D) fp32: the mean of the vectors whose coordinates are all finite (summed in float64:
    no overflow), zeros where there is none. A non-finite token must not spoil the others through the offset."""
    finite = torch.isfinite(states).all(dim=-1, keepdim=True)
    total = torch.where(finite, states.double(), 0.0).sum(dim=-2, keepdim=True)
    return (total / finite.sum(dim=-2, keepdim=True).clamp(min=1)).float()


class PackedKV:
    """Packed keys/values of one layer and its dense window.

    keys, values: QuantizedTensor storage with leading shape (B, H, capacity).
    window_keys, window_values: (B, H, r, D) in the model dtype, tokens in full precision.
    sink_keys, sink_values: (B, H, s, D) in the model dtype, s = min(length, ``sinks``): exact copies of the first
        slots' tokens, which attention reads instead of their packed copies (``attended_past``).
    key_offset: (B, H, 1, D) fp32 or None. With ``center_keys`` (dynamic policy), the mean of the first finite keys
        encoded into the slots after the sinks, subtracted from every key before it is encoded and added back when
        slots are decoded: keys that share a large component (Qwen2's key bias) keep their small differences.
    key_channels, value_channels: (B, H, D) int64 or None. With a ``SplitQuantizer`` (fractional bits), the channel
        order of its parts (``outliers.outlier_order``: outlier channels first), chosen from the same first tokens
        as the key offset (keys centered) and fixed from then on; None before (the sinks' own slots, never read
        packed, are then encoded in channel order) and for integer bits.

    Two policies use it. Dynamic (``TurboQuantLayer``): slots [0, length) hold the oldest ``length`` tokens (the
    first ``sinks`` of them also exact), the window the next r tokens; ``push_window`` / ``flush`` / ``reserve``
    move tokens along. Static (``StaticTurboQuantLayer``, ``ring`` given; no sinks, keys not centered): every slot
    is allocated and zeroed up front, every token is encoded into its slot when written (``write_at``), and the
    window is a ring of ``ring`` rows (token p at row p % ring) holding the newest tokens exactly. Every tensor is
    detached (a cache built under autograd can still be pickled and continued).
    """

    def __init__(self, key_quantizer: TurboQuantizer | SplitQuantizer, value_quantizer: TurboQuantizer | SplitQuantizer,
                 key_states: torch.Tensor, value_states: torch.Tensor, capacity: int = 0, ring: int | None = None,
                 sinks: int = 0, center_keys: bool = False):
        batch, heads = key_states.shape[:2]
        self.key_quantizer, self.value_quantizer = key_quantizer, value_quantizer
        self.dtype, self.device = key_states.dtype, key_states.device
        fill = torch.empty if ring is None else torch.zeros
        self.keys = empty_slots(key_quantizer, batch, heads, capacity, self.dtype, self.device, fill)
        self.values = empty_slots(value_quantizer, batch, heads, capacity, self.dtype, self.device, fill)
        self.window_keys = key_states.new_zeros((batch, heads, ring or 0, key_states.shape[-1]))
        self.window_values = value_states.new_zeros((batch, heads, ring or 0, value_states.shape[-1]))
        self.sinks = sinks
        self.center_keys = center_keys
        self.key_offset: torch.Tensor | None = None
        self.key_channels: torch.Tensor | None = None
        self.value_channels: torch.Tensor | None = None
        self.sink_keys, self.sink_values = self.window_keys[:, :, :0].clone(), self.window_values[:, :, :0].clone()
        self.length = 0
        # Slot rows [0, synced_rows) are unchanged since the last ``copy_slots_to`` (``write`` and ``map_batch`` lower
        # it; the static layout, which is never offloaded, does not keep it up to date).
        self.synced_rows = 0

    def tensors(self) -> list[torch.Tensor]:
        optional = [t for t in (self.key_offset, self.key_channels, self.value_channels) if t is not None]
        return [*self.keys.tensors(), *self.values.tensors(), self.window_keys, self.window_values, self.sink_keys,
                self.sink_values, *optional]

    # ------------------------------------------------------------------------------------------- sizes
    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    @property
    def window_length(self) -> int:
        return self.window_keys.shape[-2]

    @property
    def sink_length(self) -> int:
        return self.sink_keys.shape[-2]

    @property
    def tokens(self) -> int:
        """Tokens held: slots and window."""
        return self.length + self.window_length

    def nbytes(self) -> int:
        """Bytes of every tensor held: slots (spare capacity included), the window and the sinks."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ----------------------------------------------------------------------------------- read and write
    def past(self, length: int | None = None) -> tuple[QuantizedTensor | SplitQuantizedTensor,
                                                      QuantizedTensor | SplitQuantizedTensor]:
        """Views of the first ``length`` (default: all valid) packed keys and values, leading shape (B, H, length)."""
        length = self.length if length is None else length
        return self.keys[:, :, :length], self.values[:, :, :length]

    def attended_past(self) -> tuple[QuantizedTensor | SplitQuantizedTensor, QuantizedTensor | SplitQuantizedTensor,
                                     torch.Tensor | None, torch.Tensor | None]:
        """What attention reads of the slots: (packed keys, values after the sinks, leading shape (B, H, length - s);
        the sinks' exact keys, values (B, H, s, D), or None without sinks)."""
        s = self.sink_length
        sinks = (self.sink_keys, self.sink_values) if s else (None, None)
        return self.keys[:, :, s:self.length], self.values[:, :, s:self.length], *sinks

    def reserve(self, capacity: int) -> None:
        """Grow the slots to ``capacity`` (one copy of the valid tokens); no-op when they are already that large."""
        if capacity <= self.capacity:
            return
        batch, heads = self.keys.shape[:2]
        for name, quantizer in (("keys", self.key_quantizer), ("values", self.value_quantizer)):
            grown = empty_slots(quantizer, batch, heads, capacity, self.dtype, self.device)
            for old, new in zip(getattr(self, name).tensors(), grown.tensors()):
                new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, grown)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int) -> None:
        """Encode (B, H, n, D) states into slots [start, start + n) (within the capacity); keys less the key offset,
        which the first write past the sinks sets when ``center_keys``, as it sets the split channel orders."""
        from .kernels import encode_pair_into

        key_states, value_states = key_states.detach(), value_states.detach()
        if start < self.sinks:  # the first tokens are also kept exact (sink_length == min(length, sinks))
            count = min(self.sinks - start, key_states.shape[-2])
            self.sink_keys = torch.cat([self.sink_keys[:, :, :start], key_states[:, :, :count]], dim=-2)
            self.sink_values = torch.cat([self.sink_values[:, :, :start], value_states[:, :, :count]], dim=-2)
        # The first tokens past the sinks (the first token's key is often an outlier, and the sinks are read exact
        # anyway) set what stays fixed; the slots of sinks written before are never read packed.
        past_the_sinks = start + key_states.shape[-2] > self.sinks
        after_sinks = slice(max(self.sinks - start, 0), None)
        if self.center_keys:
            if self.key_offset is None and past_the_sinks:
                self.key_offset = _finite_mean(key_states[:, :, after_sinks])
            if self.key_offset is not None:
                key_states = key_states.float() - self.key_offset
        for name, states, quantizer in (("key_channels", key_states, self.key_quantizer),
                                        ("value_channels", value_states, self.value_quantizer)):
            if isinstance(quantizer, SplitQuantizer) and getattr(self, name) is None and past_the_sinks:
                setattr(self, name, outlier_order(states[:, :, after_sinks], quantizer.outlier_channels))
        if isinstance(self.key_quantizer, SplitQuantizer) or isinstance(self.value_quantizer, SplitQuantizer):
            encode_slots(key_states, self.key_quantizer, self.keys, start, self.key_channels)
            encode_slots(value_states, self.value_quantizer, self.values, start, self.value_channels)
        else:  # one launch for both when they share a quantizer
            encode_pair_into(key_states, value_states, self.key_quantizer, self.value_quantizer, self.keys,
                             self.values, start)
        self.synced_rows = min(self.synced_rows, start)

    def copy_slots_to(self, keys: QuantizedTensor, values: QuantizedTensor, *, fresh: bool = False) -> bool:
        """Bring ``keys`` / ``values`` (slots of this storage's shape elsewhere, e.g. a layer's host copy) up to date
        with ``non_blocking`` copies of the rows written since the last call, [synced_rows, length); every valid row
        when ``fresh`` (the targets hold nothing yet). From row 0 each tensor is copied whole: one contiguous
        transfer (the spare capacity is a fraction of a percent). Returns whether anything was copied (the caller
        waits for the copies before the targets are read)."""
        for name, source, target in (("keys", self.keys, keys), ("values", self.values, values)):
            if target.shape != source.shape or len(target.tensors()) != len(source.tensors()):
                raise ValueError(f"{name} must be slots of leading shape {tuple(source.shape[:-1])} with the same "
                                 f"fields, got {tuple(target.shape[:-1])}")
        start, stop = (0 if fresh else min(self.synced_rows, self.length)), self.length
        self.synced_rows = stop
        if start == stop:
            return False
        for source, target in zip([*self.keys.tensors(), *self.values.tensors()],
                                  [*keys.tensors(), *values.tensors()]):
            if start == 0:
                target.copy_(source, non_blocking=True)
            else:
                target[:, :, start:stop].copy_(source[:, :, start:stop], non_blocking=True)
        return True

    def write_at(self, key_states: torch.Tensor, value_states: torch.Tensor, length: torch.Tensor,
                 specs: tuple[str, str]) -> None:
        """Static policy: encode (B, H, n, D) states into slots length[0] .. length[0] + n - 1 (length: int64 on the
        device) and copy the newest min(n, ring) of them into their ring rows. No host sync; the compiler sees the
        encode as one op (``ops.static_encode``; specs: the key and value quantizers' ``quantizer_spec``, made once by
        the caller since the compiler does not trace ``json``)."""
        from .ops import static_encode

        static_encode(key_states.detach(), value_states.detach(), self.keys.packed_indices, self.keys.scales,
                      self.values.packed_indices, self.values.scales, length, *specs)
        self.write_ring(key_states, value_states, length[0] + torch.arange(key_states.shape[2], device=self.device))

    def write_ring(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor) -> None:
        """Copy the newest min(n, ring) of the (B, H, n, D) states (at ``positions``) into their ring rows."""
        ring = self.window_keys.shape[2]
        if ring == 0:
            return
        newest = min(key_states.shape[2], ring)
        rows = positions[-newest:] % ring
        self.window_keys.index_copy_(2, rows, key_states.detach()[:, :, -newest:].to(self.dtype))
        self.window_values.index_copy_(2, rows, value_states.detach()[:, :, -newest:].to(self.dtype))

    def ordered_ring(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Static policy, eager: the ring's tokens start .. stop - 1 (all held by the ring) in order, (B, H, n, D)."""
        rows = torch.arange(start, stop, device=self.device) % max(self.window_keys.shape[2], 1)
        return self.window_keys[:, :, rows], self.window_values[:, :, rows]

    def push_window(self, key_states: torch.Tensor, value_states: torch.Tensor,
                    joined: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Append (B, H, n, D) states to the dense window. ``joined``: what ``dense(..., with_past=False)`` returned
        for these states (sinks ++ window ++ them): the new window becomes a view of it instead of a new tensor (so
        whoever reads ``joined`` must not write into it)."""
        expected = self.sink_length + self.window_length + key_states.shape[-2]
        dtypes = (self.window_keys.dtype, self.window_values.dtype)
        if (joined is not None and (joined[0].dtype, joined[1].dtype) == dtypes
                and joined[0].shape[-2] == joined[1].shape[-2] == expected):
            sinks = self.sink_length
            self.window_keys, self.window_values = (states.detach()[:, :, sinks:] for states in joined)
            return
        self.window_keys = torch.cat([self.window_keys, key_states.detach()], dim=-2)
        self.window_values = torch.cat([self.window_values, value_states.detach()], dim=-2)

    def flush(self, count: int) -> None:
        """Compress the oldest ``count`` window tokens into slots [length, length + count) (reserve them first)."""
        self.write(self.window_keys[:, :, :count], self.window_values[:, :, :count], self.length)
        self.length += count
        # Clone the kept part: a view would keep the flushed tokens' dense memory alive.
        self.window_keys = self.window_keys[:, :, count:].clone()
        self.window_values = self.window_values[:, :, count:].clone()

    def dense(self, key_states: torch.Tensor, value_states: torch.Tensor, *, with_past: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sinks ++ (if ``with_past``, the dequantized rest of the slots ++) the window ++ the given (B, H, n, D)
        states, in their dtype."""
        keys, values, sink_keys, sink_values = self.attended_past()
        if not with_past:
            keys, values = self.past(0)
        return (dense_states(keys, self.key_quantizer, self.window_keys, key_states, prefix=sink_keys,
                             offset=self.key_offset, channels=self.key_channels),
                dense_states(values, self.value_quantizer, self.window_values, value_states, prefix=sink_values,
                             channels=self.value_channels))

    # ------------------------------------------------------------------------------------ cache operations
    def crop(self, length: int) -> None:
        """Keep the oldest ``length`` tokens (packed and window). Exact: each token is encoded on its own."""
        if length < self.sink_length:
            self.sink_keys, self.sink_values = self.sink_keys[:, :, :length], self.sink_values[:, :, :length]
        if length <= self.length:
            self.length = length
            self.window_keys = self.window_keys[:, :, :0]
            self.window_values = self.window_values[:, :, :0]
        else:
            keep = length - self.length
            self.window_keys = self.window_keys[:, :, :keep]
            self.window_values = self.window_values[:, :, :keep]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor], *, in_place: bool = False) -> None:
        """Apply ``fn`` (an indexing or repeat along dim 0) to every tensor: beam reorder, batch select/repeat.
        ``in_place``: copy the result into the tensors themselves (the static layout keeps its addresses)."""
        self.synced_rows = 0
        if in_place:
            for tensor in self.tensors():
                tensor.copy_(fn(tensor))
            return
        self.keys, self.values = self.keys._map(fn), self.values._map(fn)
        self.window_keys, self.window_values = fn(self.window_keys), fn(self.window_values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.key_offset, self.key_channels, self.value_channels = (
            None if t is None else fn(t) for t in (self.key_offset, self.key_channels, self.value_channels))
