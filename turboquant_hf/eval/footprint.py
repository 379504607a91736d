"""Bytes a cache object actually holds, measured by walking its layers (not computed from a formula).

The walk follows a layer's attributes through containers, dataclasses and plain objects down to tensors;
tensor subclasses that wrap others (quanto's ``WeightQBitsTensor``, ``PackedTensor``) are opened with
``__tensor_flatten__``. Each storage is counted once, at its full allocated size: a view of a larger
buffer counts the buffer (spare capacity is memory the cache holds), and state shared by every layer
(a TurboQuant rotation, codebook or QJL projection) counts once per cache.
"""

from __future__ import annotations

import dataclasses
import types

import torch

_SKIPPED = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
            torch.nn.Module, torch.device, torch.dtype, str, bytes, int, float, bool, type(None))


def _tensor_storages(tensor: torch.Tensor, found: dict[int, int]) -> None:
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        inner_names, _ = tensor.__tensor_flatten__()
        for name in inner_names:
            _tensor_storages(getattr(tensor, name), found)
        return
    storage = tensor.untyped_storage()
    if storage.nbytes():
        found[storage.data_ptr()] = storage.nbytes()


def _walk(obj, found: dict[int, int], seen: set[int]) -> None:
    if isinstance(obj, _SKIPPED) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        _tensor_storages(obj, found)
    elif isinstance(obj, dict):
        for value in obj.values():
            _walk(value, found, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _walk(value, found, seen)
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            _walk(getattr(obj, field.name), found, seen)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            _walk(value, found, seen)


def held_bytes(cache) -> int:
    """Bytes of every distinct tensor storage reachable from ``cache.layers``."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    for layer in cache.layers:
        _walk(layer, found, seen)
    return sum(found.values())


def used_bytes(cache) -> int:
    """``held_bytes`` less spare capacity: a TurboQuantLayer counts its valid packed tokens (views into larger
    slots) and its window instead of its buffers."""
    from ..cache import TurboQuantLayer

    total = 0
    shared: dict[int, int] = {}
    seen: set[int] = set()
    for layer in cache.layers:
        if isinstance(layer, TurboQuantLayer) and layer.is_initialized:
            storage = layer.storage
            total += sum(part.nbytes for part in storage.past())
            total += storage.window_keys.nbytes + storage.window_values.nbytes
            for quantizer in (layer.key_quantizer, layer.value_quantizer):
                _walk(quantizer, shared, seen)
        else:
            _walk(layer, shared, seen)
    return total + sum(shared.values())


def kv_shape(config) -> tuple[int, int]:
    """(attention layers, kv heads) of a model config."""
    text_config = config.get_text_config(decoder=True)
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    return text_config.num_hidden_layers, heads


def bytes_per_token(cache, config, batch: int = 1) -> dict:
    """Held and used bytes, and both per token per layer per kv head (K and V together)."""
    layers, heads = kv_shape(config)
    tokens = cache.get_seq_length()
    held, used = held_bytes(cache), used_bytes(cache)
    slots = tokens * layers * heads * batch
    return {"cache_bytes": held, "cache_bytes_used": used, "cached_tokens": tokens,
            "bytes_per_token": held / slots if slots else float("nan"),
            "bytes_per_token_used": used / slots if slots else float("nan")}
