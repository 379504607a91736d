"""TurboQuantCache: a transformers ``Cache`` whose past keys/values live only in compressed form.

Each compressed attention layer (``TurboQuantLayer``) keeps its tokens in a ``PackedKV`` (storage.py): packed
slots for the old tokens and a dense window of the newest ``residual_length`` ones (up to 32 more, then the
oldest are compressed in one block). The layer holds policy only: when to compress, how to grow.

Contract with the attention (the only way the two talk):

* ``update(keys, values, ...)`` returns dense (B, H, L, D) states of every cached token: the packed past
  dequantized into a transient tensor, the window, the new tokens exactly as given. Any attention
  implementation can read them.
* When the model hands its attention kwargs to ``update`` (transformers >= 5.23 does, as ``kwargs=``), the layer
  adds itself to them as ``turboquant_layer``. The "turboquant" attention (attention.py) then calls
  ``layer.serve_packed(module.config)``: from the next update on, *while that config's attention
  implementation is "turboquant"*, ``update`` leaves the packed tokens after the sinks out of the returned states
  (the sinks, the window and the new tokens remain) and passes them as ``turboquant_past`` (a ``CompressedPast``)
  beside them. Switching the model to another implementation makes
  the next update return full dense states again; ``reset`` forgets the reader.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import (
    Cache, CacheLayerMixin, DynamicCache, DynamicLayer, LinearAttentionAndFullAttentionLayer, LinearAttentionLayer,
)

from .config import LayerSettings, TurboQuantConfig, integer, is_fractional
from .quantizer import FLOAT_DTYPES, QuantizedTensor, TurboQuantizer, shared_quantizer
from .kernels.decode_attention import static_dense
from .ops import quantizer_spec
from .outliers import FRACTIONAL_BITS, SplitQuantizedTensor, SplitQuantizer, outlier_channels, shared_split_quantizer
from .storage import PackedKV, dense_states

ATTENTION_NAME = "turboquant"
# Tokens the window may exceed residual_length by before its oldest tokens are compressed in one block
# (an encode launch per layer every 32 decode steps; the window stays within 25 % of its 128 default tokens).
_FLUSH_BLOCK = 32
# Slot capacity is a multiple of _GROWTH_BLOCK tokens and grows by a 512th of its size (at least 2 blocks): spare
# capacity (counted by ``memory_report``) at most ~0.4 % at 32K tokens and 0.2 % beyond 64K, for a copy of a layer's
# slots every 128 tokens at 32K and every 2K at 1M (benchmarks/RESULTS.md has the trade-off).
_GROWTH_BLOCK = 64
_GROWTH_FRACTION = 512
_GROWTH_MIN_BLOCKS = 2


def _length_to_keep(tokens_to_remove, length: int) -> int:
    """crop's argument (tokens to remove if < 0, the length to keep if > 0, as DynamicLayer) -> a length in [0,
    length]."""
    tokens_to_remove = integer("tokens_to_remove", tokens_to_remove)
    keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
    return min(max(keep, 0), length)


def _grown_capacity(capacity: int, needed: int) -> int:
    grown = max(needed, capacity + max(capacity // _GROWTH_FRACTION, _GROWTH_MIN_BLOCKS * _GROWTH_BLOCK))
    return -(-grown // _GROWTH_BLOCK) * _GROWTH_BLOCK


def _check_new_states(key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """ValueError unless both are (batch, kv_heads, tokens, head_dim) float tensors with head_dim a multiple of 8."""
    for name, states in (("key_states", key_states), ("value_states", value_states)):
        if not isinstance(states, torch.Tensor) or states.dim() != 4 or states.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a (batch, kv_heads, tokens, head_dim) float tensor, got "
                             f"{getattr(states, 'dtype', type(states).__name__)} of shape "
                             f"{tuple(getattr(states, 'shape', ()))}")
        if states.shape[-1] % 8 != 0:
            raise ValueError(f"TurboQuantCache needs {name} head_dim to be a multiple of 8 (exact bit packing), "
                             f"got {states.shape[-1]}")


@dataclasses.dataclass(frozen=True)
class CompressedPast:
    """What the fused attention reads besides the dense states: the packed past of one layer.

    keys, values: QuantizedTensor (SplitQuantizedTensor at fractional bits) views with leading shape (B, H, Np),
    the packed tokens after the sinks. The dense states of the same update hold, in position order, the sinks, then
    (after these Np packed tokens) the window and the new tokens.
    """

    keys: QuantizedTensor | SplitQuantizedTensor
    values: QuantizedTensor | SplitQuantizedTensor
    key_quantizer: TurboQuantizer | SplitQuantizer
    value_quantizer: TurboQuantizer | SplitQuantizer
    sink_length: int = 0  # the dense states handed beside it begin with the sinks: tokens 0 .. sink_length - 1, exact
    key_offset: torch.Tensor | None = None  # (B, H, 1, D) fp32: subtracted from the packed keys (center_keys)
    key_channels: torch.Tensor | None = None  # (B, H, D) int64: a split quantizer's channel order (PackedKV)
    value_channels: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Packed tokens read (after the sinks)."""
        return self.keys.shape[-2]

    @property
    def split(self) -> bool:
        """Whether keys or values are split into outlier channels (fractional bits; no fused kernel reads them)."""
        return isinstance(self.key_quantizer, SplitQuantizer) or isinstance(self.value_quantizer, SplitQuantizer)


class TurboQuantLayer(DynamicLayer):
    """One attention layer's TurboQuant-compressed K/V (see the module docstring for the contract).

    Args:
        key_bits, value_bits: bits per coordinate (1, 2, 3, 4 or 8, or fractional: 2.5, 3.5, 4.5).
        qjl: spend one of the key bits on the QJL residual stage (unbiased scores); values stay MSE.
        residual_length: newest tokens kept in full precision (0 = compress everything).
        rotation, seed, norm_correction: see ``TurboQuantizer`` (QJL keys never take norm correction).
        sink_tokens, center_keys: see ``TurboQuantConfig``.
        settings: a resolved ``LayerSettings`` instead of the arguments above (what ``TurboQuantCache`` passes).

    Offloading (``TurboQuantCache(offloading=True)``, a model on CUDA): between its updates the layer's packed slots
    live in a pinned host copy that the layer keeps; the dense window (at most ``residual_length`` + 32 tokens) stays
    on the device. transformers calls ``prefetch`` on a side stream while the layer before computes: one host-to-
    device copy of the slots, which the next update waits for on the device (an event, no host sync). ``offload``
    copies back only the rows written since the last offload (a flush of 32 tokens every 32 decode steps; the prompt
    once; every row after the slots grew or the batch was reordered), waits for that copy (a host sync on those
    steps only: the copy must land before the pinned buffer is read or refilled), then drops the device slots. They
    go back to the caching allocator, which recycles them for the next layer's prefetch once the compute stream is
    past them (``record_stream``): a shared device buffer would save nothing more and would have to be sized for the
    largest layer. A decode step therefore moves the packed cache over the host link once: at long contexts the step
    time is that transfer (bytes / host-link bandwidth), ~3.8x less than an offloaded bf16 cache moves each way.
    """

    is_croppable = True

    def __init__(self, key_bits: int = 4, value_bits: int = 4, *, qjl: bool = False, residual_length: int = 128,
                 sink_tokens: int = 4, rotation: str = "hadamard", seed: int = 0, norm_correction: bool = True,
                 center_keys: bool = True, settings: LayerSettings | None = None):
        self.storage: PackedKV | None = None
        super().__init__()
        if settings is None:
            settings = TurboQuantConfig(bits=key_bits, value_bits=value_bits, qjl=qjl, residual_length=residual_length,
                                        sink_tokens=sink_tokens, rotation=rotation, seed=seed,
                                        norm_correction=norm_correction, center_keys=center_keys).for_layer(None)
        self.settings = settings
        self._reader_config: PretrainedConfig | None = None  # set by serve_packed
        self._host_slots: tuple[QuantizedTensor, QuantizedTensor] | None = None  # the offloaded keys, values
        self._fetched: torch.cuda.Event | None = None  # recorded after the prefetch's copies

    # ------------------------------------------------------------------------------------------- state
    @property
    def keys(self) -> torch.Tensor | None:
        """The dense window's keys (B, H, r, D), where transformers' layer API (and models reading it) look."""
        return None if self.storage is None else self.storage.window_keys

    @keys.setter
    def keys(self, value: None) -> None:  # CacheLayerMixin.__init__ sets None; nothing else may assign
        if value is not None:
            raise AttributeError("TurboQuantLayer.keys is its dense window: write through update()")

    @property
    def values(self) -> torch.Tensor | None:
        """The dense window's values (B, H, r, D)."""
        return None if self.storage is None else self.storage.window_values

    @values.setter
    def values(self, value: None) -> None:
        if value is not None:
            raise AttributeError("TurboQuantLayer.values is its dense window: write through update()")

    @property
    def residual_length(self) -> int:
        return self.settings.residual_length

    @property
    def key_quantizer(self) -> TurboQuantizer | None:
        return None if self.storage is None else self.storage.key_quantizer

    @property
    def value_quantizer(self) -> TurboQuantizer | None:
        return None if self.storage is None else self.storage.value_quantizer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _check_new_states(key_states, value_states)
        self.storage = PackedKV(*self._quantizers(key_states, value_states), key_states, value_states,
                                sinks=self.settings.sink_tokens, center_keys=self.settings.center_keys)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def _quantizers(self, key_states: torch.Tensor, value_states: torch.Tensor
                    ) -> tuple[TurboQuantizer | SplitQuantizer, TurboQuantizer | SplitQuantizer]:
        s = self.settings
        quantizers = []
        for name, bits, qjl, states in (("key_bits", s.key_bits, s.qjl, key_states),
                                        ("value_bits", s.value_bits, False, value_states)):
            dim = states.shape[-1]
            if is_fractional(bits):
                outlier_channels(name, bits, dim)  # ValueError naming the setting when head_dim cannot be split
                quantizers.append(shared_split_quantizer(dim, bits, s.rotation, s.seed, s.norm_correction))
            else:
                quantizers.append(shared_quantizer(dim, bits, qjl, s.rotation, s.seed, s.norm_correction and not qjl))
        return quantizers[0], quantizers[1]

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        storage = self.storage
        expected_keys = (*storage.window_keys.shape[:2], storage.window_keys.shape[-1])
        expected_values = (*storage.window_values.shape[:2], storage.window_values.shape[-1])
        for name, states, expected in (("key_states", key_states, expected_keys),
                                       ("value_states", value_states, expected_values)):
            got = (*states.shape[:2], states.shape[-1]) if states.dim() == 4 else tuple(states.shape)
            if got != expected:
                raise ValueError(
                    f"{name} (batch, kv_heads, head_dim) = {got} does not match this cache layer's {expected}: a "
                    "TurboQuantCache holds one model's states; call cache.reset() or make a new cache for another model"
                )
        if key_states.shape[-2] != value_states.shape[-2]:
            raise ValueError(f"key_states and value_states must hold as many tokens, got {key_states.shape[-2]} and "
                             f"{value_states.shape[-2]}")
        # A layer's tokens stay on the device of the states it was first given (each GPU of a device_map holds its
        # own layers); following states elsewhere would copy the whole layer there.
        if key_states.device != self.device or value_states.device != self.device:
            raise ValueError(f"key_states are on {key_states.device}, value_states on {value_states.device}; this cache "
                             f"layer holds its tokens on {self.device}: use a new cache, or load a saved one with "
                             "device= the device of each layer")

    # ------------------------------------------------------------------------------------------ update
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, n, D) new states; return the dense (B, H, L, D) states for this attention call.

        Returned: the sinks ++ the rest of the packed past dequantized ++ the window ++ the new states (exact), in the
        new states' dtype; without the packed tokens after the sinks when the attention reads them packed (module
        docstring). Then the window is a view of the returned states: read them, do not write into them.
        """
        attention_kwargs, packed = self._begin_update(key_states, value_states, kwargs)
        storage = self.storage
        returned = storage.dense(key_states, value_states, with_past=not packed)
        if attention_kwargs is not None:
            attention_kwargs["turboquant_past"] = self.compressed_past() if packed else None
        # Without the past, the returned states hold the new window already (after the sinks): no second concatenation.
        storage.push_window(key_states, value_states, joined=returned if packed else None)
        overflow = storage.window_length - self.residual_length
        # Flush in blocks: the window grows to residual_length + block, then its oldest tokens are compressed
        # together, so most decode steps run no encode at all.
        if overflow > min(_FLUSH_BLOCK, self.residual_length):
            if storage.length + overflow > storage.capacity:
                storage.reserve(_grown_capacity(storage.capacity, storage.length + overflow))
            storage.flush(overflow)
        return returned

    def _begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor, kwargs: dict
                      ) -> tuple[dict | None, bool]:
        """Initialize and check; (the attention kwargs that the model handed over, or None; whether to leave the
        packed past to the attention). Puts this layer into those kwargs as ``turboquant_layer``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        self._await_slots()
        attention_kwargs = kwargs.get("kwargs")
        if not isinstance(attention_kwargs, dict):
            return None, False
        attention_kwargs["turboquant_layer"] = self
        return attention_kwargs, self.serves_packed

    def compressed_past(self) -> CompressedPast:
        """The packed past as it is now (views, no copy), for an attention that reads it packed."""
        storage = self.storage
        keys, values, _, _ = storage.attended_past()
        return CompressedPast(keys, values, storage.key_quantizer, storage.value_quantizer, storage.sink_length,
                              storage.key_offset, storage.key_channels, storage.value_channels)

    def serve_packed(self, config: PretrainedConfig) -> None:
        """Leave the packed past out of later updates' returned states (and hand it over as ``turboquant_past``)
        while ``config._attn_implementation`` is "turboquant". Called by that attention on its first call."""
        self._reader_config = config

    @property
    def serves_packed(self) -> bool:
        """True while updates leave the packed past to the attention (see ``serve_packed``)."""
        config = self._reader_config
        return config is not None and getattr(config, "_attn_implementation", None) == ATTENTION_NAME

    # --------------------------------------------------------------------------------- sizes and masks
    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.storage.tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (packed slots incl. spare capacity, dense window)."""
        return self.storage.nbytes() if self.is_initialized else 0

    # -------------------------------------------------------------------------------- cache operations
    def reset(self) -> None:
        """Drop every state and the packed reader; the next update starts from scratch."""
        self.storage = None
        self._reader_config = None
        self._host_slots = self._fetched = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (a positive value is the length to keep), like DynamicLayer."""
        length = self.get_seq_length()
        keep = _length_to_keep(tokens_to_remove, length)
        if self.is_initialized and keep < length:
            self.storage.crop(keep)

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        offloaded = self.is_offloaded
        self._await_slots()  # on the device, where ``fn``'s index lives
        self.storage.map_batch(fn)
        if offloaded:
            self.offload()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        index = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._map_batch(lambda t: t.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # ---------------------------------------------------------------------- offloading (class docstring)
    @property
    def is_offloaded(self) -> bool:
        """True while the packed slots are in host memory (between ``offload`` and ``prefetch``)."""
        return self.is_initialized and self.device.type == "cuda" and self.storage.keys.device.type == "cpu"

    def offload(self) -> None:
        """Move the packed slots into the host copy, copying only the rows written since the last offload; a no-op
        off CUDA or when already offloaded."""
        if not self.is_initialized or self.device.type != "cuda" or self.is_offloaded:
            return
        storage, host = self.storage, self._host_slots
        fresh = host is None or any(kept.shape != slots.shape
                                    for kept, slots in zip(host, (storage.keys, storage.values)))
        if fresh:
            host = tuple(slots._map(lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
                         for slots in (storage.keys, storage.values))
        if storage.copy_slots_to(*host, fresh=fresh):
            torch.cuda.current_stream(self.device).synchronize()
        self._host_slots = host
        storage.keys, storage.values = host

    def prefetch(self) -> None:
        """Start copying the packed slots back to the layer's device on the current stream (transformers' side
        stream); the next update waits for the copy. A no-op unless offloaded."""
        if not self.is_offloaded:
            return
        # The slots are read by the compute stream (transformers' default stream): the allocator must not hand
        # their memory to a later prefetch on this stream before those reads are done.
        compute_stream = torch.cuda.default_stream(self.device)

        def fetch(tensor: torch.Tensor) -> torch.Tensor:
            fetched = tensor.to(self.device, non_blocking=True)
            fetched.record_stream(compute_stream)
            return fetched

        storage = self.storage
        storage.keys, storage.values = storage.keys._map(fetch), storage.values._map(fetch)
        self._fetched = torch.cuda.Event()
        self._fetched.record(torch.cuda.current_stream(self.device))

    def wait_for_prefetch(self) -> None:
        """Make the current stream wait for a prefetch in flight (transformers prefetches layer 0 at the end of every
        forward): what reads the slots outside ``update`` (save, copy) calls it first."""
        if self._fetched is not None:
            torch.cuda.current_stream(self.device).wait_event(self._fetched)
            self._fetched = None

    def __getstate__(self) -> dict:
        """What pickle and deepcopy copy: the layer at rest (a prefetch in flight is waited for: its CUDA event
        cannot be copied)."""
        self.wait_for_prefetch()
        return self.__dict__.copy()

    def _await_slots(self) -> None:
        """The slots on the device, ready for the current stream (prefetched now if nobody did)."""
        if self.is_offloaded:
            self.prefetch()
        self.wait_for_prefetch()


class TurboQuantHybridLayer(LinearAttentionLayer, TurboQuantLayer):
    """A layer holding both a linear-attention / SSM state and attention K/V (Zamba2's hybrid layers, Falcon-H1):
    transformers' ``LinearAttentionAndFullAttentionLayer`` with the K/V compressed; the conv/recurrent states are
    transformers' own (``LinearAttentionLayer``)."""

    def __init__(self, settings: LayerSettings, number_of_states: int = 1):
        TurboQuantLayer.__init__(self, settings=settings)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        # update() passes the K/V positionally; update_conv_state / update_recurrent_state pass keywords.
        if len(args) == 2 and not kwargs:
            TurboQuantLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def offload(self) -> None:
        TurboQuantLayer.offload(self)
        LinearAttentionLayer.offload(self)

    def prefetch(self) -> None:
        TurboQuantLayer.prefetch(self)
        LinearAttentionLayer.prefetch(self)

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        TurboQuantLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        TurboQuantLayer.reorder_cache(self, beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        LinearAttentionLayer.crop(self, tokens_to_remove)
        TurboQuantLayer.crop(self, tokens_to_remove)


_STATIC_OFFLOADING = (
    "offloading with max_cache_len is not supported: the static layout keeps every slot at a fixed device address "
    "(torch.compile and CUDA graphs replay over them); offload the dynamic layout (no max_cache_len) instead"
)


@dataclasses.dataclass(frozen=True)
class StaticPast:
    """What the fused attention reads from a static layout in a compiled step: every slot, the ring and the lengths
    (int64 [cached tokens, first position the ring holds]), all on the device (``ops.static_decode_attention``)."""

    keys: QuantizedTensor
    values: QuantizedTensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    lengths: torch.Tensor
    key_spec: str  # ops.quantizer_spec of each quantizer: what the op takes
    value_spec: str


class StaticTurboQuantLayer(TurboQuantLayer):
    """The static layout of one layer: ``max_cache_len`` packed slots and a ring of ``residual_length + 1`` dense rows,
    allocated on the first update; every token is encoded into its slot when written and the newest ones also stay
    exact in the ring. The lengths live in a device tensor, so a compiled decode step has no host sync, no data-
    dependent branch and no growth, and CUDA graphs can replay it (``is_compileable``).

    Eager calls (the prefill, or decoding without compile) read the lengths on the host once and behave like the
    dynamic layout: the states returned and the masks asked for have the exact length. Compiled calls use the
    full ``max_cache_len`` (masks, dense states) or hand the attention a ``StaticPast``. Keys are encoded as they are
    (``center_keys`` and ``sink_tokens`` are settings of the dynamic layout).
    """

    is_compileable = True

    def __init__(self, settings: LayerSettings, max_cache_len: int, max_batch_size: int | None = None):
        super().__init__(settings=settings)
        self.max_cache_len, self.max_batch_size = max_cache_len, max_batch_size
        self.lengths: torch.Tensor | None = None  # int64 [cached tokens, first position the ring holds]

    @property
    def ring(self) -> int:
        """Rows of the dense ring: the window and the token being decoded, which a compiled step reads back from the
        ring (an eager step, like the dynamic layout, attends to the new tokens as given)."""
        return self.residual_length + 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _check_new_states(key_states, value_states)
        batch = key_states.shape[0]
        if self.max_batch_size is not None and batch > self.max_batch_size:
            raise ValueError(f"batch size {batch} exceeds this TurboQuantCache's max_batch_size={self.max_batch_size}")
        self.storage = PackedKV(*self._quantizers(key_states, value_states), key_states, value_states,
                                capacity=self.max_cache_len, ring=self.ring)
        self.lengths = torch.zeros(2, dtype=torch.int64, device=key_states.device)
        self.specs = quantizer_spec(self.storage.key_quantizer), quantizer_spec(self.storage.value_quantizer)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True
        if not torch.compiler.is_compiling():
            for tensor in (*self.storage.tensors(), self.lengths):
                torch._dynamo.mark_static_address(tensor)  # fixed addresses: CUDA graphs replay over them
                # Fixed shapes too: with symbolic sizes (torch.compile(dynamic=True)) every call checked guards on
                # the size relations of every layer's tensors (207 size guards against StaticCache's 32 on an
                # 8-layer model); now none, and each cache shape compiles its own graph, as StaticCache's does.
                torch._dynamo.mark_static(tensor)

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super()._check_states(key_states, value_states)
        if key_states.dtype != self.dtype:
            raise ValueError(f"key_states are {key_states.dtype}; this static layer holds {self.dtype} (its storage is "
                             "allocated once): use a new cache")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (B, H, n, D) new states into their slots (and the ring); return what the attention reads (class
        docstring)."""
        attention_kwargs, packed = self._begin_update(key_states, value_states, kwargs)
        if torch.compiler.is_compiling():
            return self._compiled_update(key_states, value_states, attention_kwargs, packed)
        return self._eager_update(key_states, value_states, attention_kwargs, packed)

    def _eager_update(self, key_states, value_states, attention_kwargs, packed):
        storage, n = self.storage, key_states.shape[-2]
        length, ring_floor = self.lengths.tolist()  # eager: one host read per call
        if length + n > self.max_cache_len:
            raise ValueError(f"{length} cached + {n} new tokens exceed this TurboQuantCache's max_cache_len="
                             f"{self.max_cache_len}; nothing was written")
        window_start = max(length - self.residual_length, ring_floor, 0)
        past = storage.past(window_start)
        shown = storage.past(0) if packed else past  # the attention reads a packed past itself
        window_keys, window_values = storage.ordered_ring(window_start, length)
        returned = (dense_states(shown[0], storage.key_quantizer, window_keys, key_states),
                    dense_states(shown[1], storage.value_quantizer, window_values, value_states))
        if attention_kwargs is not None:
            attention_kwargs["turboquant_past"] = (
                CompressedPast(*past, storage.key_quantizer, storage.value_quantizer) if packed else None)
        storage.write(key_states, value_states, length)
        storage.write_ring(key_states, value_states, torch.arange(length, length + n, device=self.device))
        self.lengths[0] = length + n
        return returned

    def _compiled_update(self, key_states, value_states, attention_kwargs, packed):
        storage, n = self.storage, key_states.shape[-2]
        storage.write_at(key_states, value_states, self.lengths, self.specs)
        self.lengths[0] += n
        if packed:
            attention_kwargs["turboquant_past"] = StaticPast(storage.keys, storage.values, storage.window_keys,
                                                             storage.window_values, self.lengths, *self.specs)
            return key_states, value_states
        if attention_kwargs is not None:
            attention_kwargs["turboquant_past"] = None
        keys, values = static_dense(storage.keys, storage.values, storage.key_quantizer, storage.value_quantizer,
                                    storage.window_keys, storage.window_values, self.lengths, self.dtype)
        return keys, values

    def get_seq_length(self) -> int | torch.Tensor:
        if not self.is_initialized:
            return 0
        return self.lengths[0] if torch.compiler.is_compiling() else int(self.lengths[0])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if torch.compiler.is_compiling():
            return self.max_cache_len, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Lengths to zero, the reader forgotten; the storage stays allocated (same addresses, no reallocation)."""
        if self.is_initialized:
            self.lengths.zero_()
        self._reader_config = None

    def crop(self, tokens_to_remove: int) -> None:
        """Like ``TurboQuantLayer.crop``; the ring keeps what it still holds (its rows of later tokens are dropped)."""
        length, ring_floor = self.lengths.tolist() if self.is_initialized else (0, 0)
        keep = _length_to_keep(tokens_to_remove, length)
        if keep < length:
            # The ring held tokens length - ring .. length - 1: those below keep are still there, and the tokens
            # written from keep on will be too.
            self.lengths.copy_(torch.tensor([keep, min(max(ring_floor, length - self.ring), keep)]))

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self.storage.map_batch(fn, in_place=True)

    def offload(self) -> None:
        raise ValueError(_STATIC_OFFLOADING)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("the static TurboQuantCache layout has a fixed batch size: build it for the expanded batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("the static TurboQuantCache layout has a fixed batch size: it cannot drop batch rows")


_ENCODER_DECODER = (
    "TurboQuantCache holds one decoder stack's self-attention; for an encoder-decoder model wrap it: "
    "EncoderDecoderCache(TurboQuantCache(...), DynamicCache()) (the cross-attention K/V stay dense)"
)


# The short-form arguments of TurboQuantCache and their defaults (those of TurboQuantConfig).
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TurboQuantConfig)
             if field.name != "layer_overrides"}


class TurboQuantCache(Cache):
    """KV cache compressed with TurboQuant; pass it to ``generate`` as ``cache=`` (``past_key_values=`` on
    transformers < 5.23, still accepted).

    Args:
        bits, key_bits, value_bits, qjl, residual_length, sink_tokens, rotation, seed, norm_correction,
            center_keys, first_layer_key_bits: the settings, as in ``TurboQuantConfig`` (the short form).
        config: a ``TurboQuantConfig`` (the long form: then leave the settings above at their defaults), or, as
            before, the model's config (same as ``model_config``).
        model_config: the model config. With it, sliding-window layers (Mistral, Gemma2/3, Qwen2 with
            use_sliding_window) keep only their window, uncompressed, as transformers' ``DynamicSlidingWindowLayer``
            (the window is small; compressing it saves little), and other non-attention layer kinds are built as
            transformers builds them. Without it every layer is a compressed full-attention layer (outputs stay
            right: the model's masks apply the windows; only the memory for sliding layers is larger).
        offloading: keep each compressed layer's packed tokens in pinned host memory between its uses, the next
            layer prefetched on a side stream while the current one computes (``TurboQuantLayer``'s docstring has
            the design). GPU memory then holds about two layers' packed tokens plus the dense windows; a decode step
            moves the packed cache over the host link once. A no-op for a model on the CPU; not with
            ``max_cache_len``.
        max_cache_len, max_batch_size: the static layout (``StaticTurboQuantLayer``): slots for ``max_cache_len``
            tokens allocated per layer on its first update, at most ``max_batch_size`` sequences (None: any batch);
            ``torch.compile`` and CUDA graphs capture its decode steps, and ``generate`` compiles them by itself on
            CUDA, as for transformers' ``StaticCache``. No QJL; ``sink_tokens`` and ``center_keys`` do not apply
            (every token is encoded as it is into its slot).
    """

    def __init__(self, bits: int = 4, *, key_bits: int | None = None, value_bits: int | None = None,
                 qjl: bool = False, residual_length: int = 128, sink_tokens: int = 4, rotation: str = "hadamard",
                 seed: int = 0, norm_correction: bool = True, center_keys: bool = True,
                 first_layer_key_bits: int | float | None = 8, config: TurboQuantConfig | PretrainedConfig | None = None,
                 model_config: PretrainedConfig | None = None, offloading: bool = False,
                 max_cache_len: int | None = None, max_batch_size: int | None = None):
        settings = dict(bits=bits, key_bits=key_bits, value_bits=value_bits, qjl=qjl, residual_length=residual_length,
                        sink_tokens=sink_tokens, center_keys=center_keys, first_layer_key_bits=first_layer_key_bits,
                        rotation=rotation, seed=seed, norm_correction=norm_correction)
        if isinstance(config, PretrainedConfig):
            if model_config is not None:
                raise ValueError("pass the model config once: config= or model_config=, not both")
            config, model_config = None, config
        if config is None:
            config = TurboQuantConfig(**settings)
        elif isinstance(config, TurboQuantConfig):
            changed = [name for name, default in _DEFAULTS.items() if settings[name] != default]
            if changed:
                raise ValueError(f"with config=TurboQuantConfig(...), set {changed} in the config, not as arguments")
        else:
            raise TypeError(f"config must be a TurboQuantConfig or the model's PretrainedConfig, got "
                            f"{type(config).__name__}")
        if model_config is not None and not isinstance(model_config, PretrainedConfig):
            raise TypeError(f"model_config must be a transformers PretrainedConfig, got {type(model_config).__name__}")
        if not isinstance(offloading, bool):
            raise TypeError(f"offloading must be a bool, got {offloading!r}")
        if model_config is not None and getattr(model_config, "is_encoder_decoder", False):
            raise ValueError(f"model_config is an encoder-decoder ({model_config.model_type}): {_ENCODER_DECODER}")
        if max_cache_len is not None:
            max_cache_len = integer("max_cache_len", max_cache_len)
            if max_cache_len < 1:
                raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len}")
            if config.qjl or any(settings.get("qjl") for settings in config.layer_overrides.values()):
                raise ValueError("the static layout (max_cache_len=) does not support qjl=True")
            if config.fractional:
                raise ValueError(f"the static layout (max_cache_len=) does not support fractional bits "
                                 f"{FRACTIONAL_BITS}: use bits 1, 2, 3, 4 or 8 there, or the dynamic layout")
            if offloading:
                raise ValueError(_STATIC_OFFLOADING)
        if max_batch_size is not None:
            if max_cache_len is None:
                raise ValueError("max_batch_size goes with max_cache_len (the static layout)")
            max_batch_size = integer("max_batch_size", max_batch_size)
            if max_batch_size < 1:
                raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size}")
        self._static_shape = (max_cache_len, max_batch_size)
        self.config = config
        if model_config is None:  # layers are made as the model first reaches them, in order
            super().__init__(layer_class_to_replicate=self._next_layer, offloading=offloading)
            return
        # Let transformers decide the layer kinds for this model, then compress the self-attention K/V. Mllama's
        # cross-attention layers stay dense: it reads their image K/V back as `layer.keys` / `layer.values`.
        text_config = model_config.get_text_config(decoder=True)
        cross_attention_layers = set(getattr(text_config, "cross_attention_layers", None) or ())
        layers = []
        for index, layer in enumerate(DynamicCache(config=model_config).layers):
            if type(layer) is DynamicLayer and index not in cross_attention_layers:
                layer = self._layer(index)
            elif type(layer) is LinearAttentionAndFullAttentionLayer:
                layer = TurboQuantHybridLayer(config.for_layer(index), number_of_states=layer.number_of_states)
            layers.append(layer)
        super().__init__(layers=layers, offloading=offloading)

    # Properties (transformers 5.17's Cache has read-only, deprecated ones of these names).
    @property
    def max_cache_len(self) -> int | None:
        """Slots per layer of the static layout; None for the dynamic layout."""
        return self._static_shape[0]

    @property
    def max_batch_size(self) -> int | None:
        """The static layout's batch limit (None: whatever the first update brings)."""
        return self._static_shape[1]

    def _layer(self, index: int) -> TurboQuantLayer:
        settings = self.config.for_layer(index)
        if self.max_cache_len is None:
            return TurboQuantLayer(settings=settings)
        return StaticTurboQuantLayer(settings, self.max_cache_len, self.max_batch_size)

    def _next_layer(self) -> TurboQuantLayer:
        """The layer the model reaches next (a method, not a closure: the cache stays picklable)."""
        return self._layer(len(self.layers))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``Cache.update``; with offloading and states off CUDA (a model on the CPU) the layers stay
        where they are (transformers' offloading waits on CUDA streams, and host memory is already where they'd go)."""
        if not self.offloading or key_states.device.type == "cuda":
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    # Built without model_config, the cache has attention layers only: a linear-attention / SSM model asks it for
    # conv or recurrent states and would fail inside transformers with an IndexError.
    def _refuse_linear_state_without_config(self, layer_idx) -> None:
        if self.layer_class_to_replicate is not None:
            raise ValueError(
                f"the model asked layer {layer_idx} for linear-attention / state-space states, but this TurboQuantCache "
                "was built without model_config= and holds attention layers only: build it with "
                "TurboQuantCache(model_config=model.config, ...) so transformers makes those layers"
            )

    def has_previous_state(self, layer_idx: int | None = None, *args, **kwargs) -> bool:
        self._refuse_linear_state_without_config(layer_idx)
        return super().has_previous_state(layer_idx, *args, **kwargs)

    def get_conv_state(self, layer_idx: int, *args, **kwargs):  # transformers >= 5.24
        self._refuse_linear_state_without_config(layer_idx)
        return super().get_conv_state(layer_idx, *args, **kwargs)

    def get_recurrent_state(self, layer_idx: int, *args, **kwargs):  # transformers >= 5.24
        self._refuse_linear_state_without_config(layer_idx)
        return super().get_recurrent_state(layer_idx, *args, **kwargs)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> torch.Tensor:
        self._refuse_linear_state_without_config(layer_idx)
        return super().update_conv_state(conv_states, layer_idx, *args, **kwargs)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> torch.Tensor:
        self._refuse_linear_state_without_config(layer_idx)
        return super().update_recurrent_state(recurrent_states, layer_idx, *args, **kwargs)

    @property
    def is_compileable(self) -> bool:
        """The static layout is (also before its layers exist, which ``generate`` asks first); the dynamic one not."""
        return self.max_cache_len is not None and all(layer.is_compileable for layer in self.layers)

    # ---------------------------------------------------------------------- keep and reuse (persist.py)
    def __getstate__(self) -> dict:
        """What pickle and deepcopy copy: everything but transformers' prefetch stream (offloading), which cannot be
        copied; ``__setstate__`` gives the copy a stream of its own."""
        state = self.__dict__.copy()
        state.pop("prefetch_stream", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.offloading:
            self.prefetch_stream = torch.Stream()

    def save(self, path) -> Any:
        """Write the cache to ``path``: one safetensors file, written atomically; returns the ``pathlib.Path``."""
        from .persist import save

        return save(self, path)

    @classmethod
    def load(cls, path, device: torch.device | str | list[torch.device | str] | None = None,
             model_config: PretrainedConfig | None = None) -> TurboQuantCache:
        """The cache saved at ``path``, tensors on ``device`` (default CPU; a list: one device per layer, for a model
        split over GPUs); with ``model_config``, built for that model and checked against it (ValueError naming the
        mismatch). See ``persist.load``."""
        from .persist import load

        return load(path, device=device, model_config=model_config)

    def copy(self) -> TurboQuantCache:
        """An independent copy (tensors cloned, quantizers shared): one prefilled prefix, many continuations."""
        from .persist import copy_cache

        return copy_cache(self)

    def check_compatible(self, model_config: PretrainedConfig) -> None:
        """ValueError naming the first mismatch (layer count, kind, kv heads, head_dim) with ``model_config``."""
        from .persist import check_compatible

        check_compatible(self, model_config)

    def memory_report(self) -> dict[str, Any]:
        """Bytes the cache holds vs what DynamicCache would hold for the same tokens.

        compressed_bytes: every tensor held (packed slots and their spare capacity, dense windows, uncompressed
        sliding layers, and the rotation/codebook state shared by the layers, once per device they are on, which is
        also given alone as ``quantizer_state_bytes``); dense_bytes: the same tokens as dense K/V in the states' dtype; ratio = dense /
        compressed (None before the first token); tokens: cached tokens of layer 0, of which ``window_tokens`` are
        kept dense in layer 0's window (on short prompts the window dominates and the ratio is low);
        config: the settings (``TurboQuantConfig.to_dict``); layers: per-layer entries.
        """
        layers, quantizers = [], {}
        for index, layer in enumerate(self.layers):
            entry = {"layer": index, "kind": type(layer).__name__, "tokens": 0, "compressed_bytes": 0,
                     "dense_bytes": 0}
            if isinstance(layer, TurboQuantLayer) and layer.is_initialized:
                storage = layer.storage
                batch, heads, _, dim = storage.window_keys.shape
                entry.update(tokens=layer.get_seq_length(), compressed_bytes=layer.nbytes(),
                             dense_bytes=2 * layer.get_seq_length() * batch * heads * dim
                             * storage.window_keys.element_size(), window_tokens=storage.window_length,
                             sink_tokens=storage.sink_length)
                for quantizer in (storage.key_quantizer, storage.value_quantizer):  # a state per device it is used on
                    quantizers[id(quantizer), storage.device] = quantizer
            elif isinstance(layer, CacheLayerMixin) and layer.is_initialized and not isinstance(layer, TurboQuantLayer):
                held = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                entry.update(tokens=layer.get_seq_length(), compressed_bytes=held, dense_bytes=held)
            layers.append(entry)
        state = sum(q.state_nbytes for q in quantizers.values())
        compressed = sum(entry["compressed_bytes"] for entry in layers) + state
        dense = sum(entry["dense_bytes"] for entry in layers)
        return {
            "compressed_bytes": compressed,
            "dense_bytes": dense,
            "ratio": dense / compressed if dense else None,
            "tokens": self.get_seq_length(),
            "window_tokens": layers[0].get("window_tokens", 0) if layers else 0,
            "quantizer_state_bytes": state,
            "config": self.config.to_dict(),
            "layers": layers,
        }

