"""TurboQuantCache: a transformers ``Cache`` whose past keys/values live only in compressed form.

Storage of one attention layer (``TurboQuantLayer``), for batch B, kv heads H, head_dim D:

    key_storage / value_storage   QuantizedTensor, leading shape (B, H, capacity): packed indices
                                  (uint8) and fp32 norms, contiguous per (batch, head), appended in
                                  blocks; only the first ``compressed_length`` tokens are valid.
    keys / values                 (B, H, r, D) in the model dtype: the newest tokens in full precision
                                  (the "residual window"): r grows to residual_length + min(32,
                                  residual_length), then all but the newest residual_length are
                                  compressed in one block (residual_length=0: every token at once).

``update`` appends the new tokens to the window and compresses whatever falls out of it. It returns
dense states for the attention call: the compressed past dequantized into a fresh tensor, then the
window, then the new tokens exactly as given. That tensor is transient (freed after the layer's
attention): no dense copy of old tokens survives between layers or steps.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from .codebook import SUPPORTED_BITS
from .quantizer import QuantizedTensor, TurboQuantizer
from .rotation import ROTATIONS

# Tokens the window may exceed residual_length by before its oldest tokens are compressed in one block
# (an encode launch per layer every 32 decode steps; the window stays within 25 % of its 128 default tokens).
_FLUSH_BLOCK = 32
# Storage capacity is a multiple of _GROWTH_BLOCK tokens and grows by a 512th of its size (at least 2 blocks):
# spare capacity (which ``memory_report`` counts) at most ~0.4 % at 32K tokens and 0.2 % beyond 64K (with a 64th,
# 1.6 % cost the 32K-token cache its 3.7x), for a copy of a layer's storage every 128 tokens at 32K and every 2K at
# 1M. Estimated cost: copying an 8.6 GB cache (B=8, 32K, 8B-shaped model) takes ~4 ms on an H200, once per 128
# decode steps of ~35 ms: ~0.1 %.
_GROWTH_BLOCK = 64
_GROWTH_FRACTION = 512
_GROWTH_MIN_BLOCKS = 2


# Weak references to the layer of the latest update() and the keys it returned: the "turboquant"
# attention function runs right after its layer's update and uses them to find the compressed storage
# (transformers does not pass the cache to attention functions); the identity check on the keys makes a
# mismatch safe, and weak references keep no transient dense tensor alive.
_LAST_UPDATE = threading.local()  # per thread: two generations in two threads must not see each other's update


def last_update() -> tuple[TurboQuantLayer | None, torch.Tensor | None]:
    """(layer, returned keys) of this thread's most recent ``TurboQuantLayer.update``, or None where gone."""
    layer, keys = getattr(_LAST_UPDATE, "refs", (None, None))
    return (layer() if layer else None), (keys() if keys else None)


def dense_states(storage: QuantizedTensor | None, quantizer: TurboQuantizer | None, past: int,
                 *parts: torch.Tensor) -> torch.Tensor:
    """The first ``past`` tokens of ``storage`` dequantized, then ``parts`` ((B, H, n_i, D) each), along the
    token axis: one new (B, H, past + sum n_i, D) tensor in ``parts[-1].dtype``, written in place (no cat of
    a dequantized copy)."""
    from .kernels import dequantize_into

    batch, heads, _, dim = parts[-1].shape
    lengths = [part.shape[-2] for part in parts]
    dense = parts[-1].new_empty((batch, heads, past + sum(lengths), dim))
    if past:
        dequantize_into(storage[:, :, :past], quantizer, dense[:, :, :past])
    start = past
    for part, length in zip(parts, lengths):
        dense[:, :, start:start + length] = part
        start += length
    return dense


@functools.lru_cache(maxsize=None)
def _quantizer(dim: int, bits: int, qjl: bool, rotation: str, seed: int, norm_correction: bool) -> TurboQuantizer:
    """One shared quantizer (codebook + rotation state) per configuration, for every layer."""
    return TurboQuantizer(dim, bits, qjl=qjl, rotation=rotation, seed=seed, norm_correction=norm_correction)


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class TurboQuantLayer(DynamicLayer):
    """One attention layer's TurboQuant-compressed K/V (see the module docstring for the layout).

    Args:
        key_bits, value_bits: bits per coordinate (1, 2, 3, 4 or 8).
        qjl: spend one of the key bits on the QJL residual stage (unbiased scores); values stay MSE.
        residual_length: newest tokens kept in full precision (0 = compress everything).
        rotation, seed, norm_correction: see ``TurboQuantizer`` (QJL keys never take norm correction).
    """

    is_croppable = True

    def __init__(self, key_bits: int = 4, value_bits: int = 4, *, qjl: bool = False, residual_length: int = 128,
                 rotation: str = "hadamard", seed: int = 0, norm_correction: bool = True):
        super().__init__()
        self.key_bits, self.value_bits = key_bits, value_bits
        self.qjl = qjl
        self.norm_correction = norm_correction
        self.residual_length = residual_length
        self.rotation, self.seed = rotation, seed
        self.key_quantizer: TurboQuantizer | None = None
        self.value_quantizer: TurboQuantizer | None = None
        self.key_storage: QuantizedTensor | None = None
        self.value_storage: QuantizedTensor | None = None
        self.compressed_length = 0
        self.attention_compressed_length = 0  # compressed tokens the current attention call must read
        # Set by the "turboquant" attention function: from then on ``update`` skips the dense past.
        self.fused = False

    # ----------------------------------------------------------------------------------------- state
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        head_dim = key_states.shape[-1]
        if head_dim % 8 != 0 or value_states.shape[-1] % 8 != 0:
            raise ValueError(
                f"TurboQuantCache needs key/value head_dim to be a multiple of 8 (exact bit packing), got "
                f"{head_dim} and {value_states.shape[-1]}"
            )
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.key_quantizer = _quantizer(head_dim, self.key_bits, self.qjl, self.rotation, self.seed,
                                        self.norm_correction and not self.qjl)
        self.value_quantizer = _quantizer(value_states.shape[-1], self.value_bits, False, self.rotation, self.seed,
                                          self.norm_correction)
        batch, heads = key_states.shape[:2]
        self.key_storage = self._empty_storage(self.key_quantizer, batch, heads, 0)
        self.value_storage = self._empty_storage(self.value_quantizer, batch, heads, 0)
        self.keys = key_states.new_empty((batch, heads, 0, head_dim))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        self.compressed_length = 0
        self.is_initialized = True

    def _empty_storage(self, quantizer: TurboQuantizer, batch: int, heads: int, capacity: int) -> QuantizedTensor:
        lead = (batch, heads, capacity)
        kw = {"device": self.device}
        qjl = quantizer.qjl
        return QuantizedTensor(
            packed_indices=torch.empty(*lead, quantizer.dim * quantizer.mse_bits // 8, dtype=torch.uint8, **kw),
            norms=torch.empty(lead, dtype=torch.float32, **kw),
            qjl_signs=torch.empty(*lead, quantizer.dim // 8, dtype=torch.uint8, **kw) if qjl else None,
            residual_norms=torch.empty(lead, dtype=torch.float32, **kw) if qjl else None,
            dim=quantizer.dim,
            mse_bits=quantizer.mse_bits,
            dtype=self.dtype,
        )

    @property
    def compressed_keys(self) -> QuantizedTensor:
        """The valid compressed keys, a view with leading shape (B, H, compressed_length)."""
        return self.key_storage[:, :, : self.compressed_length]

    @property
    def compressed_values(self) -> QuantizedTensor:
        return self.value_storage[:, :, : self.compressed_length]

    def _check_shapes(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (*self.keys.shape[:2], self.keys.shape[-1])
        got = (*key_states.shape[:2], key_states.shape[-1])
        if got != expected or value_states.shape[:2] != key_states.shape[:2]:
            raise ValueError(
                f"key_states (batch, kv_heads, head_dim) = {got} does not match this cache layer's {expected}: a "
                "TurboQuantCache holds one model's states; call cache.reset() or make a new cache for another model"
            )

    # ---------------------------------------------------------------------------------------- update
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, n, D) new states; return the (B, H, seq, D) states for this attention call.

        Returned: dequantized compressed past ++ residual window ++ the new states (exact), in the new
        states' dtype. In fused mode (``attn_implementation="turboquant"``) the compressed past is left
        out: the attention function reads it packed (``attention_compressed_length`` tokens of storage).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shapes(key_states, value_states)
        self.attention_compressed_length = self.compressed_length
        returned = self._attention_states(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        overflow = self.keys.shape[-2] - self.residual_length
        # Flush in blocks: the window grows to residual_length + block, then its oldest tokens are
        # compressed together, so most decode steps run no encode at all.
        if overflow > min(_FLUSH_BLOCK, self.residual_length):
            self._compress(self.keys[:, :, :overflow], self.values[:, :, :overflow])
            # Keep only the window; clone so the flushed tokens' dense memory is actually released.
            self.keys = self.keys[:, :, overflow:].clone()
            self.values = self.values[:, :, overflow:].clone()
        _LAST_UPDATE.refs = (weakref.ref(self), weakref.ref(returned[0]))
        return returned

    def _attention_states(self, key_states: torch.Tensor, value_states: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Dequantized compressed past, unless fused ++) residual window ++ the new (B, H, n, D) states, in the new
        states' dtype: one transient (B, H, [Nc +] r + n, D) tensor each, written in place."""
        past = 0 if self.fused else self.compressed_length
        return (dense_states(self.key_storage, self.key_quantizer, past, self.keys, key_states),
                dense_states(self.value_storage, self.value_quantizer, past, self.values, value_states))

    def _compress(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Encode (B, H, n, D) states and append them after the valid compressed tokens."""
        from .kernels import encode_into

        needed = self.compressed_length + keys.shape[-2]
        capacity = self.key_storage.norms.shape[-1]
        if needed > capacity:
            new_capacity = max(needed, capacity + max(capacity // _GROWTH_FRACTION, _GROWTH_MIN_BLOCKS * _GROWTH_BLOCK))
            new_capacity = -(-new_capacity // _GROWTH_BLOCK) * _GROWTH_BLOCK
            self.key_storage = self._grow(self.key_storage, self.key_quantizer, new_capacity)
            self.value_storage = self._grow(self.value_storage, self.value_quantizer, new_capacity)
        encode_into(keys, self.key_quantizer, self.key_storage, self.compressed_length)
        encode_into(values, self.value_quantizer, self.value_storage, self.compressed_length)
        self.compressed_length = needed

    def _grow(self, storage: QuantizedTensor, quantizer: TurboQuantizer, capacity: int) -> QuantizedTensor:
        batch, heads = storage.norms.shape[:2]
        grown = self._empty_storage(quantizer, batch, heads, capacity)
        for old, new in zip(storage[:, :, : self.compressed_length].tensors(), grown.tensors()):
            new[:, :, : self.compressed_length] = old
        return grown

    # --------------------------------------------------------------------------- sizes and masks
    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.compressed_length + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (storage incl. spare capacity, residual window)."""
        if not self.is_initialized:
            return 0
        storage = self.key_storage.tensors() + self.value_storage.tensors()
        return _tensor_bytes(*storage, self.keys, self.values)

    # ------------------------------------------------------------------------- cache operations
    def reset(self) -> None:
        """Drop every state; the next update starts from scratch (same on every transformers version)."""
        self.keys = self.values = None
        self.key_storage = self.value_storage = None
        self.compressed_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (a positive value is the length to keep).

        Exact: every token is compressed independently, so cropping only shortens the valid length.
        """
        length = self.get_seq_length()
        if tokens_to_remove > 0:  # legacy meaning: the length to keep
            tokens_to_remove = min(tokens_to_remove - length, 0)
        remove = min(-tokens_to_remove, length)
        if remove <= 0 or not self.is_initialized:
            return
        from_window = min(remove, self.keys.shape[-2])
        self.keys = self.keys[:, :, : self.keys.shape[-2] - from_window]
        self.values = self.values[:, :, : self.values.shape[-2] - from_window]
        self.compressed_length -= remove - from_window

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.key_storage = self.key_storage._map(fn)
        self.value_storage = self.value_storage._map(fn)
        self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        index = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._map_batch(lambda t: t.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def offload(self) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))


def _check_bits(name: str, value) -> None:
    if value not in SUPPORTED_BITS or isinstance(value, bool):
        raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {value!r}")


class TurboQuantCache(Cache):
    """KV cache compressed with TurboQuant; pass it as ``past_key_values`` (or ``cache``) to generate.

    Args:
        bits: bits per coordinate for keys and values (1, 2, 3, 4 or 8).
        key_bits, value_bits: override ``bits`` for keys / values.
        qjl: QJL residual stage on the keys (one of the key bits; needs key bits >= 2).
        residual_length: newest tokens kept in full precision per layer (0 = compress everything).
        rotation: "hadamard" (default) or "dense"; seed: the rotation / projection seed.
        norm_correction: rescale each reconstruction to its input's length (default; see ``TurboQuantizer``;
            not applied to QJL keys). False gives the paper's MSE quantizer.
        config: the model config. With it, sliding-window layers (Mistral, Gemma2/3, Qwen2 with
            use_sliding_window) keep only their window, uncompressed, as transformers'
            ``DynamicSlidingWindowLayer`` (the window is small; compressing it saves little), and
            other non-attention layer kinds are built as transformers builds them. Without it every
            layer is a compressed full-attention layer (outputs stay right: the model's masks apply
            the windows; only the memory for sliding layers is larger).
        offloading: transformers' layer offloading to CPU between uses.
    """

    def __init__(self, bits: int = 4, *, key_bits: int | None = None, value_bits: int | None = None,
                 qjl: bool = False, residual_length: int = 128, rotation: str = "hadamard", seed: int = 0,
                 norm_correction: bool = True, config=None, offloading: bool = False):
        _check_bits("bits", bits)
        key_bits = bits if key_bits is None else key_bits
        value_bits = bits if value_bits is None else value_bits
        _check_bits("key_bits", key_bits)
        _check_bits("value_bits", value_bits)
        if not isinstance(qjl, bool):
            raise TypeError(f"qjl must be a bool, got {type(qjl).__name__}")
        if qjl and key_bits not in (2, 3, 4):
            raise ValueError(f"qjl=True needs key_bits in (2, 3, 4) (one bit goes to QJL), got {key_bits}")
        if not isinstance(residual_length, int) or isinstance(residual_length, bool) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(norm_correction, bool):
            raise TypeError(f"norm_correction must be a bool, got {type(norm_correction).__name__}")
        self.key_bits, self.value_bits, self.qjl = key_bits, value_bits, qjl
        self.residual_length = residual_length
        make_layer = functools.partial(
            TurboQuantLayer, key_bits, value_bits, qjl=qjl, residual_length=residual_length,
            rotation=rotation, seed=seed, norm_correction=norm_correction,
        )
        if config is None:
            super().__init__(layer_class_to_replicate=make_layer, offloading=offloading)
            return
        # Let transformers decide the layer kinds for this config, then compress the full-attention ones.
        layers = [make_layer() if type(layer) is DynamicLayer else layer for layer in DynamicCache(config=config).layers]
        super().__init__(layers=layers, offloading=offloading)

    def memory_report(self) -> dict:
        """Bytes the cache holds vs what DynamicCache would hold for the same tokens.

        compressed_bytes: every tensor held (packed indices, norms, spare capacity, residual windows,
        uncompressed sliding layers, the shared rotation/codebook state); dense_bytes: the same tokens as
        dense K/V in the states' dtype; ratio = dense / compressed; tokens: cached tokens of layer 0.
        """
        layers, quantizers = [], {}
        for index, layer in enumerate(self.layers):
            if isinstance(layer, TurboQuantLayer):
                held = layer.nbytes()
                if layer.is_initialized:
                    batch, heads, _, dim = layer.keys.shape
                    dense = 2 * layer.get_seq_length() * batch * heads * dim * layer.keys.element_size()
                    quantizers[id(layer.key_quantizer)] = layer.key_quantizer
                    quantizers[id(layer.value_quantizer)] = layer.value_quantizer
                else:
                    dense = 0
                kind = "turboquant"
            elif isinstance(layer, CacheLayerMixin):
                keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
                held = dense = _tensor_bytes(keys, values) if layer.is_initialized else 0
                kind = type(layer).__name__
            else:
                held = dense = 0
                kind = type(layer).__name__
            layers.append({"layer": index, "kind": kind, "tokens": layer.get_seq_length() if hasattr(layer, "get_seq_length") else 0,
                           "compressed_bytes": held, "dense_bytes": dense})
        state = sum(q.state_nbytes for q in quantizers.values())
        compressed = sum(entry["compressed_bytes"] for entry in layers) + state
        dense = sum(entry["dense_bytes"] for entry in layers)
        return {
            "compressed_bytes": compressed,
            "dense_bytes": dense,
            "ratio": dense / compressed if compressed else 0.0,
            "tokens": self.get_seq_length(),
            "quantizer_state_bytes": state,
            "layers": layers,
        }
